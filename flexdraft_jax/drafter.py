"""The FlexDraft drafter on top of a frozen target (ALGORITHM.md §2).

Params are one tree `{'target': <model.py params>, 'draft': <below>}`:
  draft/mask                  [d]            the one learned mask-slot input
  draft/layers/...            Attention params of layers s..L-1 (a stacked
                              [K, ...] tree, or a tuple for unrolled decoding),
                              initialised as copies of the target's
  draft/calib/{w1,b1,w2,b2}   the bonus-guided calibration MLP
                              ([2d, r], [r], [r, V], [V]); absent when r = 0;
                              a logit delta (the paper's). With calib_target
                              'hidden', w2h [r, d] and b2h [d] instead: a delta
                              on the final-normed slot state, fed through the
                              frozen LM head (an option; r x d, not r x V)
  (`decoding_draft` may pack the projectors and calib w1 / w2 (w2h) for the CPU
  matmul kernel: `model.pack_attention`, calib/{w1,w2}_packed, w2 dropped)
  draft/vocab/{ids,head}      decoding only (`restrict_vocab`): the draft vocabulary, the
                              N most frequent target tokens (ids [N] ascending), and the
                              LM head's rows for them (head/kernel [d, N], or packed);
                              calib w2 / b2 are then sliced to those N columns. Drafts are
                              drawn from these N tokens; verification still uses the
                              target's whole head, so decoding stays lossless

Every token, clean or mask slot, is described by `Tokens` (position, anchor,
block and segment), and one function, `visibility`, turns two descriptor sets
into the boolean attention mask. Packed training rows, the parallel decode
pass (verify + several groups of slots) and the sequential draft pass all use
it, so there is one place where the rules of §2 live.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flexdraft_jax import attention
from flexdraft_jax import cpu_matmul
from flexdraft_jax import model as model_lib
from flexdraft_jax.model_config import ModelConfig

Params = Any


CALIB_TARGETS = ("logits", "hidden")
ALL_NODES = np.uint32(0xFFFFFFFF)  # Tokens.anc outside a token tree
TREE_BITS = 32  # Tokens.anc is a uint32 bitmask: a token tree has at most 32 nodes


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
  num_draft_layers: int = 6  # K: layers s = L-K .. L-1 get draft projectors
  block_size: int = 16       # B: mask slots per block
  calib_rank: int = 256      # r of the calibration MLP; 0 turns calibration off
  calib_target: str = "logits"  # what the MLP corrects: 'logits' (the paper's) or 'hidden'

  def split(self, cfg: ModelConfig) -> int:
    return cfg.num_layers - self.num_draft_layers

  def validate(self, cfg: ModelConfig) -> "DrafterConfig":
    for name in ("num_draft_layers", "block_size", "calib_rank"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 1 <= self.num_draft_layers <= cfg.num_layers:
      raise ValueError(f"num_draft_layers (K) must be in [1, {cfg.num_layers}] for a target "
                       f"with {cfg.num_layers} layers, got {self.num_draft_layers}")
    if self.block_size < 2:
      raise ValueError(f"block_size must be at least 2, got {self.block_size}")
    if self.calib_rank < 0:
      raise ValueError(f"calib_rank must be >= 0, got {self.calib_rank}")
    if self.calib_target not in CALIB_TARGETS:
      raise ValueError(f"calib_target must be one of {CALIB_TARGETS}, got {self.calib_target!r}")
    return self

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------
# Visibility: one mask builder for every layout
# ----------------------------------------------------------------------------
@flax.struct.dataclass
class Tokens:
  """Descriptors of a set of tokens, all [B, T] int32.

  Clean tokens have block = -1 and anchor = their own position. Mask slot j of
  a block anchored at clean position a has position a+1+j, anchor a and the
  block's id (>= 0). Segments separate packed sequences (decoding uses one).
  In a token tree (`tree_tokens`), node i of the pass has node = i, and `anc`
  holds the bits of the tree nodes a token may see: a node's ancestors and
  itself, or, for slots, those of the node they are anchored at (all bits:
  no tree, position alone decides).
  """
  pos: jax.Array
  anchor: jax.Array
  block: jax.Array
  seg: jax.Array
  node: jax.Array  # -1 for tokens outside a tree
  anc: jax.Array   # uint32

  @classmethod
  def clean(cls, pos, seg=None, node=None, anc=None):
    seg = jnp.zeros_like(pos) if seg is None else seg
    return cls(pos=pos, anchor=pos, block=jnp.full_like(pos, -1), seg=seg,
               node=jnp.full_like(pos, -1) if node is None else node,
               anc=jnp.full(pos.shape, ALL_NODES) if anc is None else anc)

  @classmethod
  def slots(cls, anchor_BG, block_size: int, seg_BG=None, anc_BG=None):
    """G blocks of `block_size` slots, block g anchored at anchor_BG[:, g] (ids 0..G-1),
    seeing the tree nodes anc_BG[:, g] (default: all)."""
    b, g = anchor_BG.shape
    j = jnp.arange(block_size, dtype=jnp.int32)
    rep = lambda a: jnp.repeat(a, block_size, axis=1)
    seg = jnp.zeros_like(anchor_BG) if seg_BG is None else seg_BG
    anc = jnp.full(anchor_BG.shape, ALL_NODES) if anc_BG is None else anc_BG
    return cls(pos=rep(anchor_BG) + jnp.tile(j + 1, g)[None], anchor=rep(anchor_BG),
               block=jnp.broadcast_to(rep(jnp.arange(g, dtype=jnp.int32)[None]), (b, g * block_size)),
               seg=rep(seg), node=jnp.full((b, g * block_size), -1, jnp.int32), anc=rep(anc))

  def concat(self, other: "Tokens") -> "Tokens":
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), self, other)


def visibility(q: Tokens, k: Tokens) -> jax.Array:
  """[B, Tq, Tk] mask of ALGORITHM.md §2 (cached keys are visible to everyone).

  - same segment only;
  - a clean key is seen by a query whose anchor is at or after it (for a
    clean query that is plain causal attention);
  - a slot key is seen only by the slots of its own block;
  - so a clean query never sees a slot;
  - a tree node key is seen only by queries whose `anc` holds its bit: its descendants,
    itself and the slots anchored at those.
  """
  ex_q = lambda a: a[:, :, None]
  ex_k = lambda a: a[:, None, :]
  clean_key = ex_k(k.block) < 0
  lineage = ex_k(k.node < 0) | holds_node(ex_q(q.anc), ex_k(k.node))
  sees = jnp.where(clean_key, (ex_k(k.pos) <= ex_q(q.anchor)) & lineage,
                   ex_k(k.block) == ex_q(q.block))
  return sees & (ex_q(q.seg) == ex_k(k.seg))


def holds_node(anc, node) -> jax.Array:
  """Whether the ancestry bits `anc` hold tree node `node` (>= 0; broadcast). A node past
  TREE_BITS only occurs in a chain, whose bits are ALL_NODES: held."""
  bit = jnp.clip(node, 0, TREE_BITS - 1).astype(jnp.uint32)
  return (node >= TREE_BITS) | (((anc >> bit) & 1) == 1)


def tree_tokens(lengths_B, depth_BT, anc_BT) -> Tokens:
  """Clean tokens of a token tree after each row's cached ones: node i at position
  n + depth_i, seeing its ancestors and itself (`speculation.Candidates`)."""
  t = depth_BT.shape[1]
  return Tokens.clean(lengths_B[:, None] + depth_BT,
                      node=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], depth_BT.shape),
                      anc=anc_BT)


# ----------------------------------------------------------------------------
# Params
# ----------------------------------------------------------------------------
def init_draft(cfg: ModelConfig, dcfg: DrafterConfig, target: Params, rng: jax.Array) -> Params:
  """Draft params: projector copies of layers s..L-1, a mask vector, the calibration MLP."""
  dcfg.validate(cfg)
  s = dcfg.split(cfg)
  layers = target["layers"]
  if isinstance(layers, tuple):
    layers = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  k_mask, k_w1 = jax.random.split(rng)
  emb = target["embed"]["embedding"]
  scale = jnp.sqrt(jnp.mean(jnp.square(emb.astype(jnp.float32))))
  dt = jnp.float32  # trainable master weights stay f32; compute casts to cfg.dtype
  draft = {
      "mask": (jax.random.normal(k_mask, (cfg.hidden_size,)) * scale).astype(dt),
      "layers": jax.tree.map(lambda a: a[s:].astype(dt), layers["attn"]),
  }
  if dcfg.calib_rank:
    d, r = cfg.hidden_size, dcfg.calib_rank
    draft["calib"] = {
        "w1": (jax.random.normal(k_w1, (2 * d, r)) / jnp.sqrt(2 * d)).astype(dt),
        "b1": jnp.zeros((r,), dt),
    }
    # Zero output layer: calibration starts as the identity on the logits.
    out, n = ("2h", d) if dcfg.calib_target == "hidden" else ("2", cfg.vocab_size)
    draft["calib"][f"w{out}"] = jnp.zeros((r, n), dt)
    draft["calib"][f"b{out}"] = jnp.zeros((n,), dt)
  return draft


def check_params(draft: Params, cfg: ModelConfig, dcfg: DrafterConfig) -> None:
  """Raises ValueError when draft params do not match dcfg (K layers, calibration rank and
  target)."""
  dcfg.validate(cfg)
  layers = draft["layers"]
  k = len(layers) if isinstance(layers, tuple) else jax.tree.leaves(layers)[0].shape[0]
  if k != dcfg.num_draft_layers:
    raise ValueError(f"draft params have {k} draft layers but num_draft_layers = "
                     f"{dcfg.num_draft_layers}")
  rank = draft["calib"]["w1"].shape[1] if "calib" in draft else 0
  if rank != dcfg.calib_rank:
    raise ValueError(f"draft params have calibration rank {rank} but calib_rank = "
                     f"{dcfg.calib_rank}")
  target = "hidden" if rank and "b2h" in draft["calib"] else "logits"
  if rank and target != dcfg.calib_target:
    raise ValueError(f"draft params calibrate the {target} but calib_target = "
                     f"{dcfg.calib_target!r}")


def draft_shapes(cfg: ModelConfig, dcfg: DrafterConfig) -> Params:
  """Shapes/dtypes of the draft tree, without allocating anything."""
  target = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  return jax.eval_shape(lambda t: init_draft(cfg, dcfg, t, jax.random.key(0)), target)


# The draft vocabulary by default (where the drafter has token counts): this share of the
# target's vocabulary, rounded up to a multiple of 256. SmolLM2-135M (49,152 tokens, so
# 8,192), shipped drafter, 2026-12-06 on the 2-vCPU CPU: MT-Bench tau (20 prompts, batch 1)
# parallel / sequential 1.352 / 1.908 with all tokens, 1.352 / 1.908 with 32,768, 1.350 /
# 1.893 with 16,384, 1.349 / 1.871 with 8,192; a parallel step at width 4 cost 2.00 /
# 1.83 / 1.64 / 1.55x an ar step at batch 1, 4.76 / - / 3.16 / 2.95x at batch 4
# (scripts/step_costs.py, docs/results/cpu/step_costs_vocab_2026-12-06_b*.json).
DEFAULT_DRAFT_VOCAB_SHARE = 1 / 6


def default_draft_vocab(vocab_size: int) -> int:
  return min(vocab_size, -(-int(vocab_size * DEFAULT_DRAFT_VOCAB_SHARE) // 256) * 256)


def draft_vocab_ids(counts_V, size: int | None, vocab_size: int) -> jax.Array | None:
  """The draft vocabulary to decode with: `size` None means `default_draft_vocab` where
  there are counts (else the whole vocabulary), 0 or >= vocab_size the whole vocabulary
  (None). ValueError for a size the counts cannot give."""
  if size is None:
    size = 0 if counts_V is None else default_draft_vocab(vocab_size)
  if size < 0:
    raise ValueError(f"draft vocabulary size must be >= 0 (0: the whole vocabulary), got {size}")
  if size == 0 or size >= vocab_size:
    return None
  if counts_V is None:
    raise ValueError(f"a draft vocabulary of {size} tokens needs the drafter's token counts "
                     "(token_counts.npz: `python -m flexdraft_jax.data token_counts DRAFTER_DIR "
                     "DATA`, or train.py's export)")
  return vocab_ids(counts_V, size)


def vocab_ids(counts_V, size: int) -> jax.Array:
  """The `size` most frequent token ids of counts [V] (ties: the lower id first), ascending."""
  counts = np.asarray(counts_V, np.int64)
  if not 1 <= size <= counts.shape[0]:
    raise ValueError(f"draft vocabulary size must be in [1, {counts.shape[0]}], got {size}")
  order = np.lexsort((np.arange(counts.shape[0]), -counts))  # count descending, then id
  return jnp.asarray(np.sort(order[:size]), jnp.int32)


def restrict_vocab(draft: Params, target: Params, cfg: ModelConfig, ids) -> Params:
  """Draft params that draft from the tokens `ids` [N] only (`vocab_ids`): the LM head's
  rows for them, and the calibration MLP's logit delta sliced to them. For decoding: the
  slot logits cost N / V of the full head's (ALGORITHM.md's drafts may come from any
  distribution; the target verifies)."""
  ids = jnp.asarray(ids, jnp.int32)
  if "lm_head" in target:
    w = target["lm_head"]["kernel"][:, ids]  # [d, N]
  else:
    w = target["embed"]["embedding"][ids].T  # tied: [V, d] rows -> [d, N]
  out = {**draft, "vocab": {"ids": ids, "head": {"kernel": w}}}
  if "calib" in draft and _calib_out(draft["calib"]) == "w2":
    calib = draft["calib"]
    if "w2" not in calib:
      raise ValueError("restrict_vocab needs the unpacked calibration MLP: call it before "
                       "decoding_draft")
    out["calib"] = {**calib, "w2": calib["w2"][:, ids], "b2": calib["b2"][ids]}
  return out


def decoding_draft(draft: Params, unroll: bool, pack: bool | None = None) -> Params:
  """Draft params laid out like `model.decoding_params` lays out the target's.

  `pack` (default: f32 and `cpu_matmul.enabled()`, as for the target) packs the
  projectors and the calibration MLP for the CPU kernel.
  """
  if unroll and not isinstance(draft["layers"], tuple):
    k = jax.tree.leaves(draft["layers"])[0].shape[0]
    draft = {**draft, "layers": tuple(model_lib.layer_slice(draft["layers"], i) for i in range(k))}
  if pack is None:
    pack = model_lib.can_pack(draft) and cpu_matmul.enabled()
  return pack_draft(draft) if pack else draft


def pack_draft(draft: Params) -> Params:
  """Draft params (unrolled or stacked layers) -> the CPU kernel's packed layout."""
  layers = draft["layers"]
  out = {**draft, "layers": (tuple(model_lib.pack_attention(a) for a in layers)
                             if isinstance(layers, tuple) else model_lib.pack_attention(layers))}
  if "vocab" in draft and "kernel" in draft["vocab"]["head"]:
    w = draft["vocab"]["head"]["kernel"]
    out["vocab"] = {**draft["vocab"], "head": {"packed": cpu_matmul.pack(w)}}
  if "calib" in draft and not any(k.endswith("_packed") for k in draft["calib"]):
    calib, w2 = draft["calib"], _calib_out(draft["calib"])
    # w1 stays: flex reads the rank from its shape. w2 [r, V] (or w2h) is replaced.
    out["calib"] = {**{k: v for k, v in calib.items() if k != w2},
                    "w1_packed": cpu_matmul.pack(calib["w1"]),
                    f"{w2}_packed": cpu_matmul.pack(calib[w2])}
  return out


# ----------------------------------------------------------------------------
# Dual-attention layers s..L-1
# ----------------------------------------------------------------------------
def _dual_layer(cfg: ModelConfig, lp: Params, dp: Params, x_c, x_s, pos_c, pos_s, mask,
                cache, layer, kv_c=None):
  """One deep layer for clean tokens (target projectors) and slots (draft projectors).

  x_c [B,T,d] may be None, with the clean keys/values given as kv_c (training:
  one frozen clean pass supplies them). Queries are [clean; slots] and keys
  [clean; slots] under `mask` [B, Tq, T+M]. Returns (x_c, x_s, (k_c, v_c)).
  """
  layer_mod, attn = model_lib.DecoderLayer(cfg), model_lib.Attention(cfg)
  on_layer = lambda fn, *a: layer_mod.apply({"params": lp}, *a, method=fn)
  t = 0 if x_c is None else x_c.shape[1]
  x = x_s if x_c is None else jnp.concatenate([x_c, x_s], axis=1)
  h = on_layer(lambda m, x: m.input_norm(x), x)
  q_s, k_s, v_s = attn.apply({"params": dp}, h[:, t:], pos_s, method="project")
  if x_c is None:  # no clean tokens in this pass (kv_c None: the slots see the cache alone)
    q, (k_c, v_c) = q_s, (k_s[:, :0], v_s[:, :0]) if kv_c is None else kv_c
  else:
    q_c, k_c, v_c = attn.apply({"params": lp["attn"]}, h[:, :t], pos_c, method="project")
    q = jnp.concatenate([q_c, q_s], axis=1)
  out = attention.attend(q, jnp.concatenate([k_c, k_s], axis=1),
                         jnp.concatenate([v_c, v_s], axis=1), mask, cache, layer)
  o_s = attn.apply({"params": dp}, out[:, t:], method="output")
  if x_c is not None:
    o_c = attn.apply({"params": lp["attn"]}, out[:, :t], method="output")
    o_s = jnp.concatenate([o_c, o_s], axis=1)
  x = on_layer(lambda m, x: m.residual_mlp(x), x + o_s)
  return (None if x_c is None else x[:, :t]), x[:, t:], (k_c, v_c)


def run_dual_layers(cfg: ModelConfig, dcfg: DrafterConfig, target_layers, draft_layers, x_c, x_s,
                    pos_c, pos_s, mask, cache=None, kv_c=None):
  """Runs layers s..L-1. Stacked params scan; tuples (decoding on CPU) unroll.

  kv_c, when given instead of x_c, is [K, B, T, kv, H] per deep layer.
  Returns (x_c, x_s, (k_c, v_c) stacked [K, B, T, kv, H]).
  """
  s = dcfg.split(cfg)
  if isinstance(target_layers, tuple):
    ks, vs = [], []
    for i in range(s, cfg.num_layers):
      kv = None if kv_c is None else (kv_c[0][i - s], kv_c[1][i - s])
      x_c, x_s, (k, v) = _dual_layer(cfg, target_layers[i], draft_layers[i - s], x_c, x_s, pos_c,
                                     pos_s, mask, cache, i, kv)
      ks.append(k)
      vs.append(v)
    return x_c, x_s, (jnp.stack(ks), jnp.stack(vs))

  def body(carry, xs):
    x_c, x_s = carry
    i, kv = xs
    x_c, x_s, kv = _dual_layer(cfg, model_lib.layer_view(target_layers, i),
                               model_lib.layer_view(draft_layers, i - s), x_c, x_s, pos_c, pos_s,
                               mask, cache, i, kv)
    return (x_c, x_s), kv

  (x_c, x_s), kv = lax.scan(body, (x_c, x_s), (jnp.arange(s, cfg.num_layers), kv_c))
  return x_c, x_s, kv


def slot_inputs(draft: Params, cfg: ModelConfig, b: int, m: int) -> jax.Array:
  return jnp.broadcast_to(draft["mask"].astype(cfg.jnp_dtype), (b, m, cfg.hidden_size))


# ----------------------------------------------------------------------------
# Logits
# ----------------------------------------------------------------------------
def slot_logits(params: Params, cfg: ModelConfig, h_BJD, bonus_BJ=None) -> jax.Array:
  """Draft logits [..., V] f32 from final-normed slot states ([..., N] over the draft
  vocabulary `draft/vocab/ids` when there is one); calibrated when `bonus_BJ` is given
  and the drafter has a calibration MLP."""
  if bonus_BJ is None or "calib" not in params["draft"]:
    return draft_head(params, cfg, h_BJD)
  return calibrated_logits(params, cfg, h_BJD, bonus_BJ)


def draft_head(params: Params, cfg: ModelConfig, h_BTD) -> jax.Array:
  """The LM head for drafts: the target's, or its rows for the draft vocabulary."""
  vocab = params["draft"].get("vocab")
  if vocab is None:
    return model_lib.lm_logits(params["target"], cfg, h_BTD)
  n = vocab["ids"].shape[0]
  if "packed" in vocab["head"]:  # `decoding_draft`: the CPU kernel
    return cpu_matmul.dense(h_BTD.astype(jnp.float32), vocab["head"]["packed"], n)
  return jnp.einsum("...D,DN->...N", h_BTD, vocab["head"]["kernel"].astype(cfg.jnp_dtype),
                    preferred_element_type=jnp.float32)


def calibrated_logits(params: Params, cfg: ModelConfig, h_BJD, bonus_BJ, z=None) -> jax.Array:
  """Calibrated draft logits [..., V] f32: z + delta (calib_target 'logits'; `z`, the raw
  logits of h, is computed when not given, so training shares one head pass), or the LM
  head of h + delta ('hidden')."""
  delta = calibration(params, cfg, h_BJD, bonus_BJ)
  if _calib_out(params["draft"]["calib"]) == "w2h":
    return draft_head(params, cfg, (h_BJD + delta).astype(h_BJD.dtype))
  return (draft_head(params, cfg, h_BJD) if z is None else z) + delta


def _calib_out(calib: Params) -> str:
  """The calibration MLP's output layer: 'w2' (logit delta) or 'w2h' (hidden-state delta)."""
  return "w2h" if "b2h" in calib else "w2"


def calibration(params: Params, cfg: ModelConfig, h_BJD, bonus_BJ) -> jax.Array:
  """The bonus-guided correction W2 silu(W1 [E(bonus); h] + b1) + b2, f32 [..., V] (or
  [..., d] with calib_target 'hidden')."""
  calib, dt = params["draft"]["calib"], cfg.jnp_dtype
  w2 = _calib_out(calib)
  b2 = calib["b2h" if w2 == "w2h" else "b2"].astype(jnp.float32)
  e = model_lib.embed(params["target"], cfg, bonus_BJ)
  if f"{w2}_packed" in calib:  # `decoding_draft`: the CPU kernel
    eh = jnp.concatenate([e, h_BJD.astype(dt)], axis=-1)
    u = cpu_matmul.dense(eh, calib["w1_packed"], calib["w1"].shape[1]) + calib["b1"].astype(dt)
    return cpu_matmul.dense(jax.nn.silu(u).astype(jnp.float32), calib[f"{w2}_packed"],
                            b2.shape[0]) + b2
  u = jnp.concatenate([e, h_BJD.astype(dt)], axis=-1) @ calib["w1"].astype(dt) + calib["b1"].astype(dt)
  delta = jnp.einsum("...R,RN->...N", jax.nn.silu(u), calib[w2].astype(dt),
                     preferred_element_type=jnp.float32)
  return delta + b2


# ----------------------------------------------------------------------------
# Decoding pass: clean tokens + groups of mask slots, one forward
# ----------------------------------------------------------------------------
def mixed_pass(params: Params, cfg: ModelConfig, dcfg: DrafterConfig, tokens_BT, anchors_BG,
               cache: model_lib.KVCache, clean: Tokens | None = None, anchor_anc=None):
  """Clean tokens at each row's cache length (or as `clean` describes them: a token tree,
  `tree_tokens`), plus G blocks of mask slots.

  Block g is anchored at clean position anchors_BG[:, g] (a cached or current
  clean token; in a tree it sees the nodes anchor_anc[:, g]). Reads the cache;
  returns (clean logits [B,T,V] f32, final-normed slot states [B,G,Bs,d], clean
  (k, v) [L,B,T,K,H]) for the caller to write (`KVCache.append`): mask slots
  never enter the cache.
  """
  target, draft = params["target"], params["draft"]
  b, t = tokens_BT.shape
  g = anchors_BG.shape[1]
  if clean is None:
    clean = Tokens.clean(model_lib.next_positions(cache, t))
  slots = Tokens.slots(anchors_BG, dcfg.block_size, anc_BG=anchor_anc)
  every = clean.concat(slots)
  x, (k0, v0) = model_lib.run_layers(cfg, target["layers"], model_lib.embed(target, cfg, tokens_BT),
                                     clean.pos, visibility(clean, clean), cache, 0, dcfg.split(cfg))
  x_c, x_s, (k1, v1) = run_dual_layers(
      cfg, dcfg, target["layers"], draft["layers"], x, slot_inputs(draft, cfg, b, g * dcfg.block_size),
      clean.pos, slots.pos, visibility(every, every), cache)
  logits = model_lib.lm_logits(target, cfg, model_lib.final_hidden(target, cfg, x_c))
  h_s = model_lib.final_hidden(target, cfg, x_s).reshape(b, g, dcfg.block_size, -1)
  return logits, h_s, (jnp.concatenate([k0, k1]), jnp.concatenate([v0, v1]))


def slot_pass(params: Params, cfg: ModelConfig, dcfg: DrafterConfig, anchors_BG,
              cache: model_lib.KVCache) -> jax.Array:
  """G blocks of mask slots alone through layers s..L-1, anchored at cached clean positions
  anchors_BG (reading the cache, no clean token): final-normed slot states [B,G,Bs,d].

  The slots of `mixed_pass` for a block whose clean context is all cached: the deep
  layers only, with the draft projectors.
  """
  target, draft = params["target"], params["draft"]
  b, g = anchors_BG.shape
  slots = Tokens.slots(anchors_BG, dcfg.block_size)
  _, x_s, _ = run_dual_layers(cfg, dcfg, target["layers"], draft["layers"], None,
                              slot_inputs(draft, cfg, b, g * dcfg.block_size), None, slots.pos,
                              visibility(slots, slots), cache)
  return model_lib.final_hidden(target, cfg, x_s).reshape(b, g, dcfg.block_size, -1)


# ----------------------------------------------------------------------------
# Training pass: packed rows, anchors, one frozen clean pass
# ----------------------------------------------------------------------------
def clean_kv(target: Params, cfg: ModelConfig, dcfg: DrafterConfig, tokens, pos, seg):
  """The frozen clean pass over packed rows: (x [B,S,d], (k, v) of layers s..L-1 [K,B,S,kvh,hd]).

  The only source of the deep layers' clean keys/values, online (every train
  step) and offline (`kv_data.build`, once per dataset).
  """
  clean = Tokens.clean(pos, seg)
  x, (k, v) = model_lib.run_layers(cfg, target["layers"], model_lib.embed(target, cfg, tokens), pos,
                                   visibility(clean, clean))
  s = dcfg.split(cfg)
  return lax.stop_gradient((x, (k[s:], v[s:])))


def train_outputs(params: Params, cfg: ModelConfig, dcfg: DrafterConfig, batch: dict,
                  with_clean_logits: bool = False):
  """Slot states for packed rows with anchors (ALGORITHM.md §3).

  batch: tokens/segment_ids/positions [B,S], anchors [B,A] (index of the anchor
  token in the row, -1 = none). The clean pass runs the frozen target once
  (no gradient) and hands every deep layer's keys/values to the mask path; in
  offline mode the batch carries them instead (`kv` [B,S,K,2,kvh,hd],
  `kv_data`) and the clean pass is skipped.
  Returns (slot states [B,A,Bs,d] final-normed, clean logits [B,S,V] or None).
  """
  target, draft = params["target"], params["draft"]
  tokens, seg, pos, anchors = batch["tokens"], batch["segment_ids"], batch["positions"], batch["anchors"]
  b, a = anchors.shape
  clean = Tokens.clean(pos, seg)
  if "kv" in batch:
    if with_clean_logits:
      raise ValueError("clean logits need the clean pass, which offline mode (cached K/V) skips")
    kv = batch["kv"].astype(cfg.jnp_dtype)  # [B,S,K,2,kvh,hd]
    x, (k, v) = None, (jnp.moveaxis(kv[:, :, :, 0], 2, 0), jnp.moveaxis(kv[:, :, :, 1], 2, 0))
  else:
    x, (k, v) = clean_kv(target, cfg, dcfg, tokens, pos, seg)
  valid = anchors >= 0
  idx = jnp.maximum(anchors, 0)
  anchor_pos = jnp.take_along_axis(pos, idx, axis=1)
  # Invalid anchors get segment -1: they see no clean token and carry no loss.
  anchor_seg = jnp.where(valid, jnp.take_along_axis(seg, idx, axis=1), -1)
  slots = Tokens.slots(anchor_pos, dcfg.block_size, anchor_seg)
  _, x_s, _ = run_dual_layers(cfg, dcfg, target["layers"], draft["layers"], None,
                              slot_inputs(draft, cfg, b, a * dcfg.block_size), None, slots.pos,
                              visibility(slots, clean.concat(slots)), kv_c=(k, v))
  h_s = model_lib.final_hidden(target, cfg, x_s).reshape(b, a, dcfg.block_size, -1)
  clean_logits = None
  if with_clean_logits:
    clean_logits = model_lib.lm_logits(target, cfg, model_lib.final_hidden(target, cfg, x))
  return h_s, clean_logits

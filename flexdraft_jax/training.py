"""Drafter training: param labels, the masked optimizer, the loss, sharding, the train step.

Only the drafter learns (ALGORITHM.md §2, "Trainable"). The whole param tree
`{'target', 'draft'}` is labelled leaf by leaf; `optax.multi_transform` gives
trainable leaves AdamW (warmup-cosine, clipping) and frozen ones `set_to_zero`,
which keeps no state. Gradients are taken of the draft subtree only, so the
target's zero updates are never used and XLA drops them.

Sharding: every param, batch and KV-cache array has logical axis names; one
table, `LOGICAL_RULES`, maps them to the mesh axes ('data', 'fsdp', 'tensor'),
for training (`compile_train_step`) and for decoding (`decode_shardings`, used
by `flex.compile_flex` and `generate.compile_generate` when given a mesh). A
dimension that a mesh axis does not divide stays replicated on that axis
(`spec_for`), so any mesh runs any model; it only shards less.

  array                                 logical axes                 mesh axes
  embed/embedding      [V, d]           vocab, embed                 tensor, fsdp
  lm_head/kernel       [d, V]           embed, vocab                 fsdp, tensor
  q_proj kernel        [d, N, H]        embed, heads, head_dim       fsdp, tensor, -
  k/v_proj kernel      [d, K, H]        embed, kv_heads, head_dim    fsdp, tensor, -
  q/k/v_proj bias      [N|K, H]         heads|kv_heads, head_dim     tensor, -
  o_proj kernel        [N, H, d]        heads, head_dim, embed       tensor, -, fsdp
  gate/up_proj kernel  [d, F]           embed, mlp                   fsdp, tensor
  down_proj kernel     [F, d]           mlp, embed                   tensor, fsdp
  norm scales, draft/mask               norm                         -
  calib w1 [2d, r], b1 [r]              norm, rank / rank            -
  calib w2 [r, V], b2 [V]               rank, vocab / vocab          -, tensor
  train batch          [B, S] / [B, A]  batch, (seq)                 (data, fsdp), -
  KV cache k/v         [L, B, K, C, H]  layers, batch, kv_heads,     -, (data, fsdp), tensor,
                                        cache_len, head_dim          -, -
  cache lengths [B]; prompts [B, P], prompt lengths [B], stop ids [B, S],
  generated tokens [B, M], num_new [B]  batch                        (data, fsdp)
  PRNG key, cost table, loop stats      (none)                       replicated

Layer params carry a leading "layers" axis [L, ...] (never sharded) when stacked
(training, and decoding on accelerators); the unrolled decoding layout
(`model.decoding_params`, `drafter.decoding_draft`: a tuple of per-layer trees)
matches the same path suffixes without it, so both layouts shard each layer
alike. The frozen target is sharded the same way in training and in decoding,
the draft and its AdamW moments like the draft params. So on a (1, 1, 8) mesh
decoding is tensor-parallel over heads, kv heads, MLP width and vocabulary, and
on an (8, 1, 1) mesh data-parallel over the rows of the batch.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax.drafter import DrafterConfig
from flexdraft_jax.model_config import ModelConfig

Params = Any
MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. The one place that says how anything is sharded,
# in training and in decoding (the module docstring lists every array).
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),  # rows: train sequences, decoded prompts, cache rows
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("rank", None),
    ("seq", None),
    ("cache_len", None),          # KV cache slots
)

# Logical axes of the KV cache buffers `model.KVCache.k/v` [L, B, K, C, H];
# its `lengths` [B] are ("batch",).
CACHE_AXES = ("layers", "batch", "kv_heads", "cache_len", "head_dim")

# Param path (regex on "a/b/c") -> logical axes, without the leading layer axis
# that stacked layers carry. Every path must match exactly one entry here and
# in `TRAINABLE`, or labelling fails: a new param must be classified explicitly.
_PARAM_AXES = (
    (r"embed/embedding", ("vocab", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"(q_proj)/kernel", ("embed", "heads", "head_dim")),
    (r"(k_proj|v_proj)/kernel", ("embed", "kv_heads", "head_dim")),
    (r"q_proj/bias", ("heads", "head_dim")),
    (r"(k_proj|v_proj)/bias", ("kv_heads", "head_dim")),
    (r"o_proj/kernel", ("heads", "head_dim", "embed")),
    (r"(q_norm|k_norm)/scale", ("norm",)),
    (r"(input_norm|post_norm|final_norm)/scale", ("norm",)),
    (r"(gate_proj|up_proj)/kernel", ("embed", "mlp")),
    (r"down_proj/kernel", ("mlp", "embed")),
    (r"draft/mask", ("norm",)),
    (r"calib/w1", ("norm", "rank")),
    (r"calib/b1", ("rank",)),
    (r"calib/w2", ("rank", "vocab")),
    (r"calib/b2", ("vocab",)),
)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def label_params(params: Params) -> Params:
  """'trainable' for the draft subtree, 'frozen' for the target's; unknown paths fail."""
  def label(path, _):
    name = _path_str(path)
    if not any(re.search(pat + "$", name) for pat, _ in _PARAM_AXES):
      raise ValueError(f"param {name!r} has no entry in training._PARAM_AXES; classify it")
    if name.startswith("draft/"):
      return "trainable"
    if name.startswith("target/"):
      return "frozen"
    raise ValueError(f"param {name!r} is neither under 'target' nor under 'draft'")
  return jax.tree_util.tree_map_with_path(label, params)


def logical_axes(path, shape) -> tuple:
  name = _path_str(path)
  for pat, axes in _PARAM_AXES:
    if re.search(pat + "$", name):
      extra = len(shape) - len(axes)
      if extra not in (0, 1):
        raise ValueError(f"param {name} has shape {shape}, expected axes {axes} (+ layers)")
      return ("layers",) * extra + axes
  raise ValueError(f"param {name!r} has no entry in training._PARAM_AXES")


def spec_for(shape, axes, mesh: Mesh) -> P:
  """PartitionSpec from logical axes via LOGICAL_RULES, dropping non-dividing mesh axes."""
  spec = nn.logical_to_mesh_axes(axes, LOGICAL_RULES)
  out = []
  for dim, entry in zip(shape, spec):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept, size = [], 1
    for n in names:
      if dim % (size * mesh.shape[n]) == 0:
        kept.append(n)
        size *= mesh.shape[n]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def param_shardings(params: Params, mesh: Mesh) -> Params:
  return jax.tree_util.tree_map_with_path(
      lambda path, a: NamedSharding(mesh, spec_for(a.shape, logical_axes(path, a.shape), mesh)),
      params)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, spec_for((mesh.shape["data"] * mesh.shape["fsdp"],) + (1,) * (ndim - 1),
                                      ("batch",) + (None,) * (ndim - 1), mesh))


# ----------------------------------------------------------------------------
# Decoding shardings (the same rules table)
# ----------------------------------------------------------------------------
def check_mesh(mesh) -> None:
  """Raises ValueError unless `mesh` has the axes MESH_AXES, in that order."""
  if tuple(getattr(mesh, "axis_names", ())) != MESH_AXES:
    raise ValueError(f"decoding needs a mesh with axes {MESH_AXES} (training.make_mesh), "
                     f"got {mesh!r}")


def rows_sharding(batch: int, mesh: Mesh) -> NamedSharding:
  """Sharding of any decoding array with `batch` leading rows ([B] or [B, ...]):
  the rows on 'batch', every later dimension replicated. A batch that
  data * fsdp does not divide falls back like any other axis (`spec_for`)."""
  return NamedSharding(mesh, spec_for((batch,), ("batch",), mesh))


def cache_shardings(cache, mesh: Mesh):
  """A `model.KVCache` (or its `jax.eval_shape`) of NamedShardings: k and v by
  CACHE_AXES (rows on 'batch', kv heads on 'tensor'), lengths by rows."""
  if np.ndim(cache.k) != 5 or np.shape(cache.k) != np.shape(cache.v):
    raise ValueError(f"KV cache k/v must both be [L, B, K, C, H], got {np.shape(cache.k)} and "
                     f"{np.shape(cache.v)}")
  kv = NamedSharding(mesh, spec_for(np.shape(cache.k), CACHE_AXES, mesh))
  return cache.replace(k=kv, v=kv, lengths=rows_sharding(np.shape(cache.lengths)[0], mesh))


@dataclasses.dataclass(frozen=True)
class DecodeShardings:
  """NamedShardings of one decoding call (`decode_shardings`)."""
  params: Params             # the params tree given, one NamedSharding per leaf
  cache: Any                 # a model.KVCache of NamedShardings
  rows: NamedSharding        # every [B, ...] input and output: prompts, prompt lengths,
                             # stop ids, generated tokens, num_new
  replicated: NamedSharding  # the PRNG key, the cost table, the loop stats


def decode_shardings(params: Params, cache, mesh: Mesh) -> DecodeShardings:
  """Shardings for decoding over `mesh`, from the same `LOGICAL_RULES` as training.

  `params` is a target tree (`model.init_params` or `model.decoding_params`,
  stacked or unrolled layers) or `{'target': ..., 'draft': ...}` with the draft
  from `drafter.init_draft`/`decoding_draft`; leaves may be arrays or
  `jax.ShapeDtypeStruct`s. `cache` is a `model.KVCache` or its `eval_shape`,
  whose batch B sizes `rows`. The target is tensor-parallel on heads, kv heads,
  MLP width and vocab ('tensor') and split on the hidden size over 'fsdp'; the
  cache and all rows are split on B over ('data', 'fsdp') and the cache also on
  kv heads over 'tensor'. Non-dividing axes stay replicated.
  """
  check_mesh(mesh)
  return DecodeShardings(params=param_shardings(params, mesh), cache=cache_shardings(cache, mesh),
                         rows=rows_sharding(np.shape(cache.lengths)[0], mesh),
                         replicated=NamedSharding(mesh, P()))


def make_mesh(shape, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over the first data*fsdp*tensor devices;
  'auto' puts every device on 'data'."""
  devices = jax.devices() if devices is None else devices
  if shape == "auto":
    shape = (len(devices), 1, 1)
  shape = tuple(int(s) for s in shape)
  n = int(np.prod(shape))
  if len(shape) != 3 or n > len(devices) or min(shape) < 1:
    raise ValueError(f"mesh shape {shape} (data, fsdp, tensor) needs {n} devices, "
                     f"{len(devices)} are available")
  return Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES)


# ----------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 3e-4
  warmup_steps: int = 100
  total_steps: int = 1000
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95


def make_optimizer(ocfg: OptimConfig, params: Params) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, ocfg.learning_rate, max(1, ocfg.warmup_steps), max(ocfg.total_steps, ocfg.warmup_steps + 1),
      end_value=ocfg.learning_rate * 0.1)
  adamw = optax.chain(optax.clip_by_global_norm(ocfg.clip_norm),
                      optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, weight_decay=ocfg.weight_decay))
  return optax.multi_transform({"trainable": adamw, "frozen": optax.set_to_zero()},
                               label_params(params))


# ----------------------------------------------------------------------------
# Loss and metrics
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LossConfig:
  slot_decay: float = 1.0      # weight of slot j is slot_decay**j (1.0 = uniform)
  calib_weight: float = 1.0    # weight of the calibrated CE of slots >= 1
  labels: str = "data"         # 'data' (self-distilled tokens) or 'target_argmax' (ablation)


def slot_targets(batch: dict, block_size: int, clean_argmax=None):
  """Labels [B,A,Bs] and validity of slot j of anchor a (the token at a+1+j)."""
  tokens, seg, loss_mask, anchors = (batch["tokens"], batch["segment_ids"], batch["loss_mask"],
                                     batch["anchors"])
  s = tokens.shape[1]
  idx = anchors[..., None] + 1 + jnp.arange(block_size)  # [B,A,Bs]
  inside = (anchors[..., None] >= 0) & (idx < s)
  idx_c = jnp.clip(idx, 0, s - 1)
  take = lambda a: jnp.take_along_axis(a[:, None, :], idx_c, axis=2)
  anchor_seg = jnp.take_along_axis(seg, jnp.maximum(anchors, 0), axis=1)[..., None]
  valid = inside & (take(seg) == anchor_seg) & take(loss_mask)
  if clean_argmax is None:
    labels = take(tokens)
  else:  # the target's own next-token argmax at the previous position
    labels = jnp.take_along_axis(clean_argmax[:, None, :], jnp.clip(idx - 1, 0, s - 1), axis=2)
  return labels, valid


def loss_and_metrics(draft: Params, target: Params, batch: dict, *, cfg: ModelConfig,
                     dcfg: DrafterConfig, lcfg: LossConfig):
  params = {"target": target, "draft": draft}
  argmax_labels = lcfg.labels == "target_argmax"
  h, clean_logits = drafter_lib.train_outputs(params, cfg, dcfg, batch,
                                              with_clean_logits=argmax_labels)
  labels, valid = slot_targets(batch, dcfg.block_size,
                               jnp.argmax(clean_logits, -1) if argmax_labels else None)
  bs = dcfg.block_size
  w = (lcfg.slot_decay ** jnp.arange(bs, dtype=jnp.float32)) * valid  # [B,A,Bs]
  z = drafter_lib.slot_logits(params, cfg, h)  # [B,A,Bs,V]
  ce = optax.softmax_cross_entropy_with_integer_labels(z, labels)
  denom = jnp.maximum(w.sum(), 1.0)
  loss = (ce * w).sum() / denom
  correct = jnp.argmax(z, -1) == labels
  count = jnp.maximum(valid.sum((0, 1)), 1)
  metrics = {"ce": loss, "acc": (correct & valid).sum((0, 1)) / count, "valid_slots": valid.sum()}
  if "calib" in draft:
    zc = z[:, :, 1:] + drafter_lib.calibration(params, cfg, h[:, :, 1:],
                                               jnp.broadcast_to(labels[:, :, :1], labels[:, :, 1:].shape))
    cec = optax.softmax_cross_entropy_with_integer_labels(zc, labels[:, :, 1:])
    loss_c = (cec * w[:, :, 1:]).sum() / jnp.maximum(w[:, :, 1:].sum(), 1.0)
    loss = loss + lcfg.calib_weight * loss_c
    metrics["ce_calib"] = loss_c
    metrics["acc_calib"] = ((jnp.argmax(zc, -1) == labels[:, :, 1:]) & valid[:, :, 1:]).sum((0, 1)) / count[1:]
  metrics["loss"] = loss
  return loss, metrics


def acceptance_proxies(metrics: dict) -> dict:
  """Expected acceptance length 1 + sum_k prod_{i<=k} acc_i (ALGORITHM.md §3).

  sequential: drafts are slots 0..Bs-1, uncalibrated. parallel: the bonus is
  the target's and the drafts are slots 1..Bs-1, calibrated when present.
  """
  acc = np.asarray(metrics["acc"])
  par = np.asarray(metrics.get("acc_calib", acc[1:]))
  return {"tau_proxy_sequential": float(1 + np.cumprod(acc).sum()),
          "tau_proxy_parallel": float(1 + np.cumprod(par).sum())}


# ----------------------------------------------------------------------------
# Train state and step
# ----------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  step: jax.Array
  draft: Params
  opt_state: Any

  def as_dict(self) -> dict:
    return {"step": self.step, "draft": self.draft, "opt_state": self.opt_state}


def init_state(tx: optax.GradientTransformation, target: Params, draft: Params) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), draft=draft,
                    opt_state=tx.init({"target": target, "draft": draft}))


def train_step(state: TrainState, target: Params, batch: dict, *, tx, cfg, dcfg, lcfg):
  """One update of the draft params. The target is an argument, never updated."""
  grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
  (_, metrics), g_draft = grad_fn(state.draft, target, batch, cfg=cfg, dcfg=dcfg, lcfg=lcfg)
  grads = {"target": jax.tree.map(jnp.zeros_like, target), "draft": g_draft}
  updates, opt_state = tx.update(grads, state.opt_state, {"target": target, "draft": state.draft})
  metrics["grad_norm"] = optax.tree.norm(g_draft)
  draft = optax.apply_updates(state.draft, updates["draft"])
  return TrainState(step=state.step + 1, draft=draft, opt_state=opt_state), metrics


def state_shardings(tx: optax.GradientTransformation, state: TrainState, target: Params,
                    mesh: Mesh) -> TrainState:
  """Shardings for the train state: the draft by the rules table, each optimizer
  moment like the param it tracks (`optax.tree_utils.tree_map_params`)."""
  full = param_shardings({"target": target, "draft": state.draft}, mesh)
  replicated = NamedSharding(mesh, P())
  # The AdamW moments exist for the draft only; the target's slots are MaskedNodes.
  masked = {"target": jax.tree.map(lambda _: optax.MaskedNode(), full["target"]),
            "draft": full["draft"]}
  opt_sh = optax.tree_utils.tree_map_params(tx, lambda _, sh: sh, state.opt_state, masked,
                                            transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, draft=full["draft"], opt_state=opt_sh)


def compile_train_step(state: TrainState, target: Params, batch: dict, mesh: Mesh, *, tx, cfg, dcfg,
                       lcfg):
  """jit with explicit in/out shardings over `mesh`; the state is donated."""
  st_sh = state_shardings(tx, state, target, mesh)
  tg_sh = param_shardings({"target": target}, mesh)["target"]
  b_sh = {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
  fn = jax.jit(lambda s, t, b: train_step(s, t, b, tx=tx, cfg=cfg, dcfg=dcfg, lcfg=lcfg),
               in_shardings=(st_sh, tg_sh, b_sh), out_shardings=(st_sh, None),
               donate_argnums=0)
  return fn, st_sh, tg_sh, b_sh

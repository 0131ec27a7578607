"""Decoder-only target model (Llama, Qwen2, Qwen3) as pure functions of params.

Layers are Flax linen modules; the layer stack is a `lax.scan` over params with
a leading layer axis, so compile time does not grow with depth and a caller can
run any contiguous range of layers (the drafter runs `[0, s)` and `[s, L)`).

Params tree (shapes use d=hidden, N/K=query/kv heads, H=head_dim, F=MLP width):
  embed/embedding             [V, d]
  layers/input_norm/scale     [L, d]
  layers/attn/{q,k,v}_proj    kernel [L, d, N|K, H] (+ bias [L, N|K, H] for Qwen2)
  layers/attn/{q,k}_norm      scale [L, H] (Qwen3)
  layers/attn/o_proj          kernel [L, N, H, d]
  layers/post_norm/scale      [L, d]
  layers/mlp/{gate,up}_proj   kernel [L, d, F];  layers/mlp/down_proj kernel [L, F, d]
  final_norm/scale            [d]
  lm_head/kernel              [d, V]  (absent when embeddings are tied)

`decoding_params` may add, for the CPU matmul kernel (`cpu_matmul`), packed
weights in place of the dense kernels they are made of: attn/qkv/{packed,
bias?} (q|k|v fused), attn/o_proj/packed, mlp/gate_up/packed (gate|up fused),
mlp/down_proj/packed and head_packed/packed (the LM head, tied or not; an
untied lm_head/kernel is then dropped). The layers pick the kernel when they
see a packed leaf; training never does.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flexdraft_jax import cpu_matmul
from flexdraft_jax.attention import CACHE_CHUNK, apply_rope, attend, rope_inv_freq
from flexdraft_jax.model_config import ModelConfig

Params = Any


# ----------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------
@flax.struct.dataclass
class KVCache:
  """Clean-token keys and values, one fixed-size buffer per layer stack.

  Row b holds valid entries at [0, lengths[b]); anything past that is stale
  (rolled back or never written) and is masked out, then overwritten.
  """
  k: jax.Array        # [L, B, K, C, H]  (heads before slots: the layout the dots read)
  v: jax.Array        # [L, B, K, C, H]
  lengths: jax.Array  # [B] int32

  @property
  def capacity(self) -> int:
    return self.k.shape[3]

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, capacity: int) -> "KVCache":
    capacity = -(-capacity // CACHE_CHUNK) * CACHE_CHUNK if capacity > CACHE_CHUNK else capacity
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
    return cls(k=jnp.zeros(shape, cfg.jnp_dtype), v=jnp.zeros(shape, cfg.jnp_dtype),
               lengths=jnp.zeros((batch,), jnp.int32))

  def write(self, k_new: jax.Array, v_new: jax.Array) -> "KVCache":
    """Writes k/v_new [l, B, T, K, H] at each row's current length (lengths unchanged)."""
    per_row = jax.default_backend() == "cpu"
    k = write_rows(self.k, jnp.swapaxes(k_new, 2, 3), self.lengths, per_row)
    v = write_rows(self.v, jnp.swapaxes(v_new, 2, 3), self.lengths, per_row)
    return self.replace(k=k, v=v)

  def append(self, kv, advance_B) -> "KVCache":
    """Writes kv = (k, v) [l, B, T, K, H] at each row's length, then lengths += advance_B."""
    return self.write(*kv).replace(lengths=self.lengths + advance_B)


def write_rows(buf_LBKCH: jax.Array, new_lBKTH: jax.Array, starts_B: jax.Array,
               per_row: bool) -> jax.Array:
  """buf with new written at [:l, b, :, starts[b]:starts[b] + T] for every row b.

  per_row=True (XLA:CPU): one in-place dynamic_update_slice per row. There a
  batched scatter makes XLA transpose and copy the whole cache per step, and a
  fori_loop over rows copies the cache into the loop (`tests/test_cache_copies.py`),
  but the unrolled rows compile slowly at large batch. per_row=False
  (accelerators): one scatter, a vmapped dynamic_update_slice.
  """
  new_lBKTH = new_lBKTH.astype(buf_LBKCH.dtype)
  if per_row:
    for b in range(starts_B.shape[0]):
      buf_LBKCH = lax.dynamic_update_slice(buf_LBKCH, new_lBKTH[:, b:b + 1],
                                           (0, b, 0, starts_B[b], 0))
    return buf_LBKCH
  put = lambda buf, new, start: lax.dynamic_update_slice(buf, new, (0, 0, start, 0))
  return jax.vmap(put, in_axes=(1, 1, 0), out_axes=1)(buf_LBKCH, new_lBKTH, starts_B)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------
class RMSNorm(nn.Module):
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)


class Attention(nn.Module):
  """q/k/v/o projectors (+ q/k norms). The drafter holds a second copy of these."""
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    dense = lambda feats, bias, axis=-1: nn.DenseGeneral(
        feats, axis=axis, use_bias=bias, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype)
    self.q_proj = dense((c.num_heads, c.head_dim), c.qkv_bias)
    self.k_proj = dense((c.num_kv_heads, c.head_dim), c.qkv_bias)
    self.v_proj = dense((c.num_kv_heads, c.head_dim), c.qkv_bias)
    self.o_proj = dense(c.hidden_size, False, axis=(-2, -1))
    if c.qk_norm:
      norm = lambda: RMSNorm(c.rms_norm_eps, c.jnp_dtype, c.jnp_param_dtype)
      self.q_norm, self.k_norm = norm(), norm()

  def _packed(self, name):
    """The packed weights of `name` (`decoding_params`), or None for the dense layout."""
    return self.variables.get("params", {}).get(name)

  def project(self, x_BTD, positions_BT):
    """Returns q [B,T,N,H], k [B,T,K,H], v [B,T,K,H], RoPE applied."""
    c = self.cfg
    if (qkv := self._packed("qkv")) is not None:  # one fused kernel call
      nq, nk = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
      y = cpu_matmul.dense(x_BTD, qkv["packed"], nq + 2 * nk, qkv.get("layer"))
      if "bias" in qkv:
        y = y + qkv["bias"].astype(y.dtype)
      q, k, v = jnp.split(y, [nq, nq + nk], axis=-1)
      q = q.reshape(*q.shape[:-1], c.num_heads, c.head_dim)
      k = k.reshape(*k.shape[:-1], c.num_kv_heads, c.head_dim)
      v = v.reshape(*v.shape[:-1], c.num_kv_heads, c.head_dim)
    else:
      q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = rope_inv_freq(self.cfg)
    return apply_rope(q, positions_BT, inv_freq), apply_rope(k, positions_BT, inv_freq), v

  def output(self, attn_BTNH):
    if (o := self._packed("o_proj")) is not None and "packed" in o:
      *lead, n, h = attn_BTNH.shape
      return cpu_matmul.dense(attn_BTNH.reshape(*lead, n * h), o["packed"], self.cfg.hidden_size,
                              o.get("layer"))
    return self.o_proj(attn_BTNH)

  def __call__(self, x_BTD, positions_BT):  # used by `init` only
    q, _, _ = self.project(x_BTD, positions_BT)
    return self.output(q)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    packed = self.variables.get("params", {})
    if "gate_up" in packed:  # `decoding_params`: the CPU kernel, gate|up fused
      f = c.intermediate_size
      gu, down = packed["gate_up"], packed["down_proj"]
      gu = cpu_matmul.dense(x, gu["packed"], 2 * f, gu.get("layer"))
      h = nn.silu(gu[..., :f]) * gu[..., f:]
      return cpu_matmul.dense(h, down["packed"], c.hidden_size, down.get("layer"))
    dense = lambda f, name: nn.Dense(f, use_bias=False, dtype=c.jnp_dtype,
                                     param_dtype=c.jnp_param_dtype, name=name)
    h = nn.silu(dense(c.intermediate_size, "gate_proj")(x)) * dense(c.intermediate_size, "up_proj")(x)
    return dense(c.hidden_size, "down_proj")(h)


class DecoderLayer(nn.Module):
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    self.input_norm = RMSNorm(c.rms_norm_eps, c.jnp_dtype, c.jnp_param_dtype)
    self.attn = Attention(c)
    self.post_norm = RMSNorm(c.rms_norm_eps, c.jnp_dtype, c.jnp_param_dtype)
    self.mlp = Mlp(c)

  def __call__(self, x_BTD, positions_BT, mask_BTS, cache=None, layer=None):
    """Returns the new residual stream and this layer's (k, v) of the T tokens."""
    q, k, v = self.attn.project(self.input_norm(x_BTD), positions_BT)
    return self.finish(x_BTD, attend(q, k, v, mask_BTS, cache, layer)), (k, v)

  def finish(self, x_BTD, attn_BTNH):
    """Residual + MLP after attention (`__call__` = project, attend, finish)."""
    return self.residual_mlp(x_BTD + self.attn.output(attn_BTNH))

  def residual_mlp(self, x_BTD):
    """The shared half of the layer: the drafter runs mask slots through it too."""
    return x_BTD + self.mlp(self.post_norm(x_BTD))


# ----------------------------------------------------------------------------
# Whole model
# ----------------------------------------------------------------------------
def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Random params (used for tests, and under eval_shape for memory checks)."""
  k_embed, k_layers, k_head = jax.random.split(rng, 3)
  x = jnp.zeros((1, 1, cfg.hidden_size), cfg.jnp_dtype)
  pos = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1), bool)
  layer = DecoderLayer(cfg)
  layers = jax.vmap(lambda k: layer.init(k, x, pos, mask)["params"])(
      jax.random.split(k_layers, cfg.num_layers))
  params = {
      "embed": {"embedding": (jax.random.normal(k_embed, (cfg.vocab_size, cfg.hidden_size))
                              * 0.02).astype(cfg.jnp_param_dtype)},
      "layers": layers,
      "final_norm": {"scale": jnp.ones((cfg.hidden_size,), cfg.jnp_param_dtype)},
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": (jax.random.normal(k_head, (cfg.hidden_size, cfg.vocab_size))
                                    * 0.02).astype(cfg.jnp_param_dtype)}
  return params


def embed(params: Params, cfg: ModelConfig, tokens_BT: jax.Array) -> jax.Array:
  return jnp.take(params["embed"]["embedding"], tokens_BT, axis=0).astype(cfg.jnp_dtype)


def final_hidden(params: Params, cfg: ModelConfig, x_BTD: jax.Array) -> jax.Array:
  return RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype).apply({"params": params["final_norm"]}, x_BTD)


def lm_logits(params: Params, cfg: ModelConfig, h_BTD: jax.Array) -> jax.Array:
  """Logits in f32 from final-normed hidden states; tied or untied head."""
  if "head_packed" in params:  # `decoding_params`: the CPU kernel
    return cpu_matmul.dense(h_BTD.astype(jnp.float32), params["head_packed"]["packed"],
                            cfg.vocab_size)
  if "lm_head" in params:
    w, spec = params["lm_head"]["kernel"], "...D,DV->...V"
  else:
    w, spec = params["embed"]["embedding"], "...D,VD->...V"
  return jnp.einsum(spec, h_BTD, w.astype(cfg.jnp_dtype), preferred_element_type=jnp.float32)


def layer_slice(layers: Params, index) -> Params:
  return jax.tree.map(lambda a: a[index], layers)


def layer_view(layers: Params, index) -> Params:
  """Layer `index` of stacked layers for a scan body: `layer_slice`, except that packed
  weights (`{"packed": [L, P, K, 16]}`) stay whole with `"layer": index` beside them, so
  that the CPU kernel reads that layer's panels in place (a slice would be a copy of the
  layer's weights on every step)."""
  def view(tree):
    if isinstance(tree, dict) and "packed" in tree:
      return {**{k: v[index] for k, v in tree.items() if k != "packed"},
              "packed": tree["packed"], "layer": index}
    if isinstance(tree, dict):
      return {k: view(v) for k, v in tree.items()}
    return tree[index]
  return view(layers)


def unstack_layers(params: Params) -> Params:
  """Params whose `layers` is a tuple of per-layer trees (see `run_layers`)."""
  layers = params["layers"]
  if isinstance(layers, tuple):
    return params
  n = jax.tree.leaves(layers)[0].shape[0]
  return {**params, "layers": tuple(layer_slice(layers, i) for i in range(n))}


def decoding_params(params: Params, unroll_layers: bool | None = None,
                    pack: bool | None = None) -> Params:
  """Params laid out for decoding (see `run_layers`).

  `pack` (default: the weights are f32 and `cpu_matmul.enabled()`, i.e. CPU with
  the kernel built) replaces the dense projections' kernels by the CPU matmul
  kernel's packed panels (module docstring), once, here. `unroll_layers`
  (default: on CPU without the kernel) unstacks the layers: XLA:CPU's scan
  slices a copy of each layer's weights per step, which packed stacks avoid.
  """
  if pack is None:
    pack = can_pack(params) and cpu_matmul.enabled()
  if unroll_layers is None:
    unroll_layers = jax.default_backend() == "cpu" and not pack
  params = unstack_layers(params) if unroll_layers else params
  return pack_params(params) if pack else params


def can_pack(tree: Params) -> bool:
  """Whether every float weight of `tree` is f32, the one dtype the CPU kernel reads
  (integer leaves, such as the draft vocabulary's ids, are not weights)."""
  return all(jnp.dtype(a.dtype) == jnp.float32 for a in jax.tree.leaves(tree)
             if jnp.issubdtype(a.dtype, jnp.floating))


def pack_attention(attn: Params) -> Params:
  """Attention params (q/k/v/o kernels [d, N|K, H] / [N, H, d], or stacks of them with a
  leading layer axis) -> packed layout."""
  if "qkv" in attn:
    return attn
  names = ("q_proj", "k_proj", "v_proj")
  o = attn["o_proj"]["kernel"]
  lead = o.shape[:-3]  # () or (L,)
  w = jnp.concatenate([attn[n]["kernel"].reshape(*lead, o.shape[-1], -1) for n in names], axis=-1)
  out = {k: v for k, v in attn.items() if k not in names + ("o_proj",)}  # q/k norms
  out["qkv"] = {"packed": cpu_matmul.pack(w)}
  if "bias" in attn["q_proj"]:
    out["qkv"]["bias"] = jnp.concatenate([attn[n]["bias"].reshape(*lead, -1) for n in names],
                                         axis=-1)
  out["o_proj"] = {"packed": cpu_matmul.pack(o.reshape(*lead, -1, o.shape[-1]))}
  return out


def pack_params(params: Params) -> Params:
  """Target params (unrolled or stacked layers) -> the CPU kernel's packed layout (module
  docstring)."""
  if "head_packed" in params:
    return params

  def layer(lp):
    mlp = lp["mlp"]
    gate_up = jnp.concatenate([mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"]], axis=-1)
    return {**lp, "attn": pack_attention(lp["attn"]),
            "mlp": {"gate_up": {"packed": cpu_matmul.pack(gate_up)},
                    "down_proj": {"packed": cpu_matmul.pack(mlp["down_proj"]["kernel"])}}}

  head = (params["lm_head"]["kernel"] if "lm_head" in params
          else params["embed"]["embedding"].T)
  out = {k: v for k, v in params.items() if k not in ("layers", "lm_head")}
  layers = params["layers"]
  out["layers"] = tuple(layer(lp) for lp in layers) if isinstance(layers, tuple) else layer(layers)
  out["head_packed"] = {"packed": cpu_matmul.pack(head)}
  return out


def run_layers(cfg: ModelConfig, layers: Params, x_BTD, positions_BT, mask_BTS,
               cache: KVCache | None = None, first: int = 0, last: int | None = None):
  """Runs layers [first, last) as clean tokens. Returns (x, (k, v)) with k/v [l,B,T,K,H].

  `layers` is either stacked (leaves [L, ...]; a `lax.scan`, compile time flat
  in depth) or a tuple of per-layer trees (`unstack_layers`; unrolled). On
  XLA:CPU the scan materialises each layer's weights per step (a dynamic
  slice feeding a dot), which the unrolled form avoids; packed stacks
  (`layer_view`) are read in place by the kernel.
  """
  last = cfg.num_layers if last is None else last
  layer = DecoderLayer(cfg)
  if first >= last:  # an empty range (a drafter with K = L has no shallow layers)
    b, t = x_BTD.shape[:2]
    empty = jnp.zeros((0, b, t, cfg.num_kv_heads, cfg.head_dim), cfg.jnp_dtype)
    return x_BTD, (empty, empty)
  if isinstance(layers, tuple):
    x, ks, vs = x_BTD, [], []
    for i in range(first, last):
      x, (k, v) = layer.apply({"params": layers[i]}, x, positions_BT, mask_BTS, cache, i)
      ks.append(k)
      vs.append(v)
    return x, (jnp.stack(ks), jnp.stack(vs))

  def body(x, i):
    return layer.apply({"params": layer_view(layers, i)}, x, positions_BT, mask_BTS, cache, i)

  return lax.scan(body, x_BTD, jnp.arange(first, last))


def causal_mask(t: int) -> jax.Array:
  return jnp.tril(jnp.ones((t, t), bool))[None]


def clean_pass(params: Params, cfg: ModelConfig, tokens_BT, positions_BT, mask_BTS,
               cache: KVCache | None = None):
  """All layers over clean tokens, reading (not writing) the cache: (logits f32, (k, v)).

  Decoding loops write the returned keys/values themselves (`KVCache.append`),
  outside any `lax.cond`/`lax.switch`: XLA copies a cache that is written
  inside a conditional branch, whole, on every step.
  """
  x, kv = run_layers(cfg, params["layers"], embed(params, cfg, tokens_BT), positions_BT, mask_BTS,
                     cache)
  return lm_logits(params, cfg, final_hidden(params, cfg, x)), kv


def next_positions(cache: KVCache, t: int) -> jax.Array:
  """[B, T] positions of T new tokens after each row's cached ones."""
  return cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]


def forward(params: Params, cfg: ModelConfig, tokens_BT, positions_BT=None,
            cache: KVCache | None = None, mask_BTS=None, advance=None):
  """Full clean forward pass: `(logits [B,T,V] f32, new_cache)`.

  With a cache, positions default to each row's length + arange(T), the T new
  keys/values are written at each row's length, and lengths grow by `advance`
  ([B], default T). Without one, returns `(logits, None)`.
  """
  b, t = tokens_BT.shape
  if positions_BT is None:
    positions_BT = (next_positions(cache, t) if cache is not None
                    else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
  if mask_BTS is None:
    mask_BTS = jnp.broadcast_to(causal_mask(t), (b, t, t))
  logits, kv = clean_pass(params, cfg, tokens_BT, positions_BT, mask_BTS, cache)
  if cache is None:
    return logits, None
  return logits, cache.append(kv, jnp.full((b,), t, jnp.int32) if advance is None else advance)

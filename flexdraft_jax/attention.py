"""Attention math shared by the target and the drafter: RoPE, and softmax attention of
new queries over a `model.KVCache` (chunk by chunk, online softmax, only up to the
longest row) merged with the new keys under an explicit visibility mask."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from flexdraft_jax.model_config import ModelConfig

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp(-inf - -inf) is nan


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse RoPE frequencies [H/2], with Llama-3 scaling when configured."""
  h = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  rs = cfg.rope_scaling
  if rs is None:
    return inv
  low_wavelen = rs.original_max_position / rs.low_freq_factor
  high_wavelen = rs.original_max_position / rs.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > low_wavelen, inv / rs.factor, inv)
  smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
      rs.high_freq_factor - rs.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate-half RoPE. x [B, T, heads, H], positions [B, T]."""
  freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


CACHE_CHUNK = 128  # cache slots scored per step of the attention loop


def _cache_attention(q, cache, layer):
  """Online-softmax attention of q [B,T,K,G,H] over layer `layer` of the cache.

  Loops over CACHE_CHUNK-slot chunks only up to the longest row, so a step
  reads the cache that is in use, not its whole capacity. Returns the running
  max m [B,K,G,T], normaliser l [B,K,G,T] and unnormalised output [B,K,G,T,H].
  """
  b, t, kh, g, h = q.shape
  capacity = cache.capacity
  chunk = min(CACHE_CHUNK, capacity)
  if capacity % chunk:
    raise ValueError(f"cache capacity {capacity} must be a multiple of {chunk}")

  def body(i, carry):
    m, l, acc = carry
    start = i * chunk
    # Slice the chunk out of the whole [L,B,K,C,H] buffer: slicing the layer
    # first would materialise a copy of that layer's cache on every step.
    take = lambda a: lax.dynamic_slice(a, (layer, 0, 0, start, 0), (1, b, kh, chunk, h))[0]
    k, v = take(cache.k), take(cache.v)
    s = jnp.einsum("BTKGH,BKCH->BKGTC", q, k, preferred_element_type=jnp.float32)
    valid = start + jnp.arange(chunk)[None, :] < cache.lengths[:, None]  # [B, C]
    s = jnp.where(valid[:, None, None, None, :], s, NEG_INF)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    acc = acc * corr[..., None] + jnp.einsum("BKGTC,BKCH->BKGTH", p.astype(v.dtype), v,
                                             preferred_element_type=jnp.float32)
    return m_new, l * corr + p.sum(-1), acc

  init = (jnp.full((b, kh, g, t), NEG_INF, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
          jnp.zeros((b, kh, g, t, h), jnp.float32))
  num_chunks = (jnp.max(cache.lengths) + chunk - 1) // chunk
  return lax.fori_loop(0, num_chunks, body, init)


def attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, cache=None, layer=None):
  """Softmax attention of T queries over the cache plus S new keys.

  `cache` holds all layers; `layer` (int or traced) picks one. Entries at index
  >= cache.lengths[b] are masked. mask_BTS says which new keys each query sees. Cache and new keys
  share one softmax (merged online), and are never concatenated.
  """
  b, t, n, h = q_BTNH.shape
  kh = k_BSKH.shape[2]
  q = q_BTNH.reshape(b, t, kh, n // kh, h) * (h ** -0.5)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q, k_BSKH, preferred_element_type=jnp.float32)
  s = jnp.where(mask_BTS[:, None, None], s, NEG_INF)
  m = s.max(-1)
  if cache is not None:
    m_c, l_c, acc_c = _cache_attention(q, cache, layer)
    m = jnp.maximum(m, m_c)
  p = jnp.exp(s - m[..., None])
  l = p.sum(-1)
  out = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v_BSKH.dtype), v_BSKH,
                   preferred_element_type=jnp.float32)
  if cache is not None:
    corr = jnp.exp(m_c - m)
    l = l + l_c * corr
    out = out + acc_c * corr[..., None]
  out = out / l[..., None]
  return jnp.einsum("BKGTH->BTKGH", out).reshape(b, t, n, h).astype(v_BSKH.dtype)

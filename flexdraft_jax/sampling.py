"""Token sampling: greedy, temperature, top-k and top-p, with explicit PRNG keys."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 0.0   # 0 means greedy (argmax)
  top_k: int = 0             # 0 disables top-k
  top_p: float = 1.0         # 1.0 disables nucleus filtering

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def argmax(logits: jax.Array) -> jax.Array:
  """int32 index of the largest entry over the last axis (the first one on ties; a row
  without a maximum, NaN, gives V-1), as jnp.argmax for finite logits. Two plain
  reductions: XLA:CPU's variadic argmax reduce measured 7x slower (2026-12-04, [1, 15,
  49152]: 3.3 ms against 0.47 ms; [64, 49152]: 13.9 ms against 1.9 ms)."""
  v = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(logits == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
  return jnp.minimum(first, v - 1)


def top_probability(logits: jax.Array) -> jax.Array:
  """max(softmax(logits)) over the last axis, f32, without the normalised distribution."""
  logits = logits.astype(jnp.float32)
  return 1.0 / jnp.sum(jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), axis=-1)


def warp_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Temperature, then top-k, then top-p; filtered entries become -inf. [..., V] f32."""
  logits = logits.astype(jnp.float32) / cfg.temperature
  if cfg.top_k:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
    exclusive = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(exclusive < cfg.top_p, sorted_logits, jnp.inf), axis=-1,
                     keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def probabilities(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """The distribution a token is drawn from (one-hot argmax when greedy)."""
  if cfg.greedy:
    return jax.nn.one_hot(argmax(logits), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(warp_logits(logits, cfg), axis=-1)


def sample(key: jax.Array, logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Draws token ids [...] from logits [..., V]."""
  if cfg.greedy:
    return argmax(logits)
  return jax.random.categorical(key, warp_logits(logits, cfg), axis=-1).astype(jnp.int32)

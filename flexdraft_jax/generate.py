"""Autoregressive batched generation: one jitted `lax.while_loop`, no host syncs.

Rows are ragged: each has its own prompt length, cache length, stop tokens and
done flag. The KV cache buffer is passed in and donated, so the loop updates it
in place (one row-scatter of the new token's k/v per step, no cache copies).
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax import model as model_lib
from flexdraft_jax import prefill as prefill_lib
from flexdraft_jax import sharding as sharding_lib
from flexdraft_jax.model_config import ModelConfig
from flexdraft_jax.sampling import SamplingConfig, sample


@flax.struct.dataclass
class ArState:
  cache: model_lib.KVCache
  last: jax.Array      # [B] last committed token, not yet in the cache
  tokens: jax.Array    # [B, M] generated tokens, -1 past each row's end
  num_new: jax.Array   # [B] tokens generated so far
  done: jax.Array      # [B] row hit a stop token or max_new_tokens
  key: jax.Array
  steps: jax.Array     # [] forward passes after prefill


def is_stop(tokens_B: jax.Array, stop_ids_BS: jax.Array) -> jax.Array:
  return jnp.any(tokens_B[:, None] == stop_ids_BS, axis=-1)


def record(tokens_BM, num_new_B, new_B, active_B):
  """Writes new_B at each active row's next free slot."""
  rows = jnp.arange(tokens_BM.shape[0])
  col = jnp.minimum(num_new_B, tokens_BM.shape[1] - 1)
  return tokens_BM.at[rows, col].set(jnp.where(active_B, new_B, tokens_BM[rows, col]))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "on_token",
                                             "prefill_chunk"),
                   donate_argnames=("cache",))
def generate(params, cache: model_lib.KVCache, prompt_BP, prompt_lens_B, stop_ids_BS, key, *,
             cfg: ModelConfig, max_new_tokens: int, sampling: SamplingConfig, on_token=None,
             prefill_chunk: int = prefill_lib.DEFAULT_CHUNK):
  """Generates up to max_new_tokens per row. Returns (tokens [B, M], num_new [B], steps, cache).

  The prompts (right-padded, ragged) are prefilled `prefill_chunk` tokens at a
  time (`prefill.prefill`).

  `on_token(tokens_B, active_B)`, if given, is called on the host for every
  committed token (streaming). It is the only host round trip in the loop and
  is off by default.
  """
  b, width = prompt_BP.shape
  if cache.capacity < width + max_new_tokens - 1:
    raise ValueError(f"KV cache capacity {cache.capacity} is below the padded prompt width "
                     f"{width} + max_new_tokens {max_new_tokens} - 1")
  logits, cache = prefill_lib.prefill(params, cfg, cache, prompt_BP, prompt_lens_B,
                                      chunk=prefill_chunk)
  key, sub = jax.random.split(key)
  first = sample(sub, logits, sampling)
  tokens = jnp.full((b, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
  if on_token is not None:
    jax.debug.callback(on_token, first, jnp.ones((b,), bool), ordered=True)
  state = ArState(cache=cache, last=first, tokens=tokens, num_new=jnp.ones((b,), jnp.int32),
                  done=is_stop(first, stop_ids_BS) | (max_new_tokens <= 1), key=key,
                  steps=jnp.zeros((), jnp.int32))

  def cond(s: ArState):
    return jnp.any(~s.done)

  def body(s: ArState):
    active = ~s.done
    logits, cache = model_lib.forward(params, cfg, s.last[:, None], cache=s.cache,
                                      advance=active.astype(jnp.int32))
    key, sub = jax.random.split(s.key)
    new = jnp.where(active, sample(sub, logits[:, 0], sampling), s.last)
    if on_token is not None:
      jax.debug.callback(on_token, new, active, ordered=True)
    num_new = s.num_new + active
    done = s.done | is_stop(new, stop_ids_BS) | (num_new >= max_new_tokens)
    return ArState(cache=cache, last=new, tokens=record(s.tokens, s.num_new, new, active),
                   num_new=num_new, done=done, key=key, steps=s.steps + 1)

  state = jax.lax.while_loop(cond, body, state)
  return state.tokens, state.num_new, state.steps, state.cache


def compile_generate(params, cfg: ModelConfig, batch: int, width: int, capacity: int,
                     num_stop_ids: int, *, max_new_tokens: int, sampling: SamplingConfig,
                     on_token=None, mesh=None, prefill_chunk: int = prefill_lib.DEFAULT_CHUNK):
  """Ahead-of-time compiled `generate` for one shape bucket (nothing is allocated).

  Call it as `exe(params, cache, prompt_BP, prompt_lens_B, stop_ids_BS, key)`.
  With `mesh`, it is compiled for `sharding.decode_shardings` of the target
  params and the cache, as `flex.compile_flex` describes (streaming, `on_token`,
  on a one-device mesh only).
  """
  cache = jax.eval_shape(lambda: model_lib.KVCache.zeros(cfg, batch, capacity))
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  args = (i32(batch, width), i32(batch), i32(batch, num_stop_ids), jax.random.key(0))
  static = dict(cfg=cfg, max_new_tokens=max_new_tokens, sampling=sampling, on_token=on_token,
                prefill_chunk=prefill_chunk)
  if mesh is None:
    return generate.lower(params, cache, *args, **static).compile()
  return compile_on_mesh(lambda *a: generate(*a, **static), params, cache, args, mesh,
                         "on_token" if on_token is not None else None)


def compile_on_mesh(fn, params, cache, args, mesh, streaming: str | None):
  """`fn(params, cache, prompt_BP, prompt_lens_B, stop_ids_BS, key, *rest)` compiled for
  `sharding.decode_shardings`: params and cache in (the cache donated) and out sharded
  that way, rows of the batch inputs and of the first two outputs split, the key, the
  third output and any non-None `rest` replicated. `streaming` names the host callback
  argument in use, if any (refused on more than one device).
  """
  sh = sharding_lib.decode_shardings(params, cache, mesh)
  if streaming is not None and mesh.size > 1:
    raise ValueError(f"{streaming} (streaming) needs a single-device mesh, got {mesh.size} "
                     "devices: JAX runs ordered host callbacks on one device only")
  rows, rep = sh.rows, sh.replicated
  rest = tuple(None if a is None else rep for a in args[4:])
  fn = jax.jit(fn, in_shardings=(sh.params, sh.cache, rows, rows, rows, rep) + rest,
               out_shardings=(rows, rows, rep, sh.cache), donate_argnums=1)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), params)
  return fn.lower(abstract, cache, *args).compile()


def pad_prompts(prompts: list[list[int]], bucket: int = 64, pad_id: int = 0):
  """Right-pads token lists to a multiple of `bucket`: (prompt_BP, lens_B) numpy."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt must have at least one token")
  width = -(-max(len(p) for p in prompts) // bucket) * bucket
  out = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    out[i, :len(p)] = p
  return out, np.array([len(p) for p in prompts], np.int32)


def stop_matrix(stop_ids: list[list[int]] | list[int], batch: int) -> np.ndarray:
  """Per-row stop ids as a padded [B, S] matrix (-1 never matches a token)."""
  rows = stop_ids if stop_ids and isinstance(stop_ids[0], (list, tuple)) else [stop_ids] * batch
  width = max(1, max(len(r) for r in rows))
  out = np.full((batch, width), -1, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out

"""Where one AR decode step's time goes: each piece jitted and timed on its own."""
from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from flexdraft_jax import model as model_lib
from flexdraft_jax.sampling import argmax
from flexdraft_jax.bench.workload import PROMPT_BUCKET, Workload


@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def _full_step(params, cache, last_b, *, cfg):
  """One AR decode step as in the loop body: forward over the cache + argmax."""
  logits, cache = model_lib.forward(params, cfg, last_b[:, None], cache=cache,
                                    advance=jnp.zeros_like(cache.lengths))
  return argmax(logits[:, 0]), cache


@functools.partial(jax.jit, static_argnames="cfg")
def _nocache_step(params, last_b, *, cfg):
  """The same step with no cache: each token attends to itself only."""
  logits, _ = model_lib.forward(params, cfg, last_b[:, None])
  return argmax(logits[:, 0])


@functools.partial(jax.jit, static_argnames="cfg")
def _layers_nocache(params, last_b, *, cfg):
  """Embedding + the layer stack, no cache, no LM head."""
  b = last_b.shape[0]
  x, _ = model_lib.run_layers(cfg, params["layers"], model_lib.embed(params, cfg, last_b[:, None]),
                              jnp.zeros((b, 1), jnp.int32), jnp.ones((b, 1, 1), bool))
  return x


@functools.partial(jax.jit, static_argnames="cfg")
def _head(params, x_b1d, *, cfg):
  """Final norm + LM head + argmax."""
  logits = model_lib.lm_logits(params, cfg, model_lib.final_hidden(params, cfg, x_b1d))
  return argmax(logits[:, 0])



@jax.jit
def _noop(x):
  return x + 1


def median_ms(call: Callable[[], Any], runs: int) -> float:
  """Median milliseconds of `call()` over `runs` calls, after one warm-up call."""
  jax.block_until_ready(call())  # compile / warm up
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def profile_step(work: Workload, batch: int, runs: int) -> dict[str, Any]:
  """Where one AR decode step's time goes at `batch` rows (medians of `runs` calls).

  Each piece is its own jitted call, so each includes one dispatch (`dispatch_ms`,
  a no-op call), which the steps inside the generate loop do not pay. The
  cache is zeros with every row's length set to the typical mid-generation
  length (mean prompt + max_new_tokens / 2). `attention_over_cache_ms` is
  full step - no-cache step: attention over the cache plus the k/v cache write.
  """
  m = work.max_new_tokens
  longest = max(len(p) for p in work.prompt_ids)
  width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
  typical = round(statistics.mean(len(p) for p in work.prompt_ids) + m / 2)
  cache = model_lib.KVCache.zeros(work.cfg, batch, width + m)
  cache = cache.replace(lengths=jnp.full((batch,), typical, jnp.int32))
  last = jnp.ones((batch,), jnp.int32)
  cfg, params = work.cfg, work.params
  state = {"cache": cache}

  def full():
    tok, state["cache"] = _full_step(params, state["cache"], last, cfg=cfg)
    return tok, state["cache"]

  x = _layers_nocache(params, last, cfg=cfg)
  out = {
      "batch_size": batch, "cache_length": typical, "cache_capacity": cache.capacity,
      "runs": runs,
      "full_step_ms": median_ms(full, runs),
      "nocache_step_ms": median_ms(lambda: _nocache_step(params, last, cfg=cfg), runs),
      "layers_nocache_ms": median_ms(lambda: _layers_nocache(params, last, cfg=cfg), runs),
      "lm_head_argmax_ms": median_ms(lambda: _head(params, x, cfg=cfg), runs),
      "dispatch_ms": median_ms(lambda: _noop(last), runs),
  }
  out["attention_over_cache_ms"] = out["full_step_ms"] - out["nocache_step_ms"]
  out["other_ms"] = out["nocache_step_ms"] - out["layers_nocache_ms"] - out["lm_head_argmax_ms"]
  return out

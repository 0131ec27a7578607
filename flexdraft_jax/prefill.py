"""Chunked prefill: prompts enter the KV cache at most `chunk` tokens at a time.

A prompt pass over W tokens with a W x W causal mask holds [B, heads, W, W]
f32 scores (20 GiB for 8 ShareGPT prompts of 6k tokens) and [B, W, V] logits.
Here the prompt goes through the model in chunks of C tokens instead. Chunk i
covers prompt positions [s_i, s_i + C) of every row, s_i = min(i * C, W - C):
its queries attend to the cache written so far (`attention.attend`'s online-softmax
loop over the cache) plus the chunk itself (causal), and its keys/values are
written at s_i before the next chunk. Only each row's last token goes through
the LM head. The largest buffers are the chunk's scores, [B, heads, C, C] and
[B, heads, C, CACHE_CHUNK] per step of the cache loop, so peak prefill memory
is O(B * heads * C * (C + CACHE_CHUNK)) besides the cache itself; nothing grows
with W^2 (see `scores_bytes`).

What is padded. Every chunk is a fixed [B, C] tile, so a row whose prompt has
ended computes filler for the remaining chunks (its cache entries past its
length are stale, masked, then overwritten by decoding), and every row's cache
attention reads up to s_i. The loop runs ceil(max(prompt_lens) / C) chunks: the
longest *actual* prompt, not the padded width W, bounds the work, and a batch
of short prompts next to one long one costs B * C per chunk, not B * W^2 per
layer. The last chunk may overlap the one before it (s_i = W - C) when C does
not divide W; the overlapped positions are recomputed to the same values.
`Engine.generate` also sorts prompts by length before it cuts them into batches
(completions come back in the given order), so a batch's rows are of similar
lengths: the 390 held-out ShareGPT prompts (78.7k tokens) at batch 8 pad to 122k
tokens in 11 distinct widths (compiles) sorted, against 295k in 19 in file order.

`prefill` is the AR loop's (`generate.generate`); `flex_prefill` is FlexDraft's:
the clean chunks, then one block of mask slots anchored at each row's last
token through the drafter's layers s..L-1, reading the cache the chunks wrote.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from flexdraft_jax import attention
from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax.model_config import ModelConfig

Params = Any

# Tokens per chunk, from a CPU profile (2 shared cores, SmolLM2-135M f32, best of
# interleaved runs): a 2048-token prompt at batch 1 takes 38.9 s in one pass, and
# 37.0 / 18.8 / 15.5 / 17.0 s in chunks of 1024 / 512 / 256 / 128; 4 prompts of
# 1024 take 37.0 s in one pass, 24.7 / 16.2 / 16.7 / 20.8 s in chunks of
# 512 / 256 / 128 / 64. Larger tiles lose on XLA:CPU, smaller ones pay per-chunk
# overhead.
DEFAULT_CHUNK = 256


def check_chunk(chunk: int, width: int, capacity: int) -> None:
  """ValueError (one line) for a chunk size < 1 or a prompt longer than the cache.

  A chunk larger than the prompt is not an error: the prompt is one chunk then.
  """
  if chunk < 1:
    raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
  if width > capacity:
    raise ValueError(f"a prompt padded to {width} tokens is longer than the KV cache "
                     f"(capacity {capacity})")


def scores_bytes(batch: int, num_heads: int, chunk: int) -> int:
  """Bytes of one chunk's f32 attention scores and probabilities (the W^2 term's successor)."""
  return 2 * batch * num_heads * chunk * (chunk + attention.CACHE_CHUNK) * 4


def _write_at(cache: model_lib.KVCache, kv, start) -> model_lib.KVCache:
  """Writes kv = (k, v) [L, B, C, K, H] at slot `start` of every row (lengths unchanged).

  One start for every row: a single in-place dynamic-update-slice per buffer,
  on one device or sharded by rows alike.
  """
  put = lambda buf, new: lax.dynamic_update_slice(
      buf, jnp.swapaxes(new, 2, 3).astype(buf.dtype), (0, 0, 0, start, 0))
  return cache.replace(k=put(cache.k, kv[0]), v=put(cache.v, kv[1]))


def clean_chunks(params: Params, cfg: ModelConfig, cache: model_lib.KVCache, prompt_BP,
                 prompt_lens_B, chunk: int):
  """The prompt through all layers, chunk by chunk, into the cache (from slot 0).

  Returns (final-normed hidden state at each row's last prompt token [B, 1, D],
  the cache with lengths = prompt_lens_B).
  """
  b, width = prompt_BP.shape
  check_chunk(chunk, width, cache.capacity)
  c = min(chunk, width)
  last_B = prompt_lens_B.astype(jnp.int32) - 1
  causal_BCC = jnp.broadcast_to(model_lib.causal_mask(c), (b, c, c))

  def body(i, carry):
    cache, x_last_B1D = carry
    start = jnp.minimum(i * c, width - c)
    tokens_BC = lax.dynamic_slice_in_dim(prompt_BP, start, c, axis=1)
    pos_BC = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (b, c))
    seen = cache.replace(lengths=jnp.full((b,), start, jnp.int32))  # the chunks before this one
    x_BCD, kv = model_lib.run_layers(cfg, params["layers"], model_lib.embed(params, cfg, tokens_BC),
                                     pos_BC, causal_BCC, seen)
    here_B = (last_B >= start) & (last_B < start + c)
    at_B = jnp.clip(last_B - start, 0, c - 1)
    x_B1D = jnp.take_along_axis(x_BCD, at_B[:, None, None], axis=1)
    return _write_at(cache, kv, start), jnp.where(here_B[:, None, None], x_B1D, x_last_B1D)

  num_chunks = (jnp.max(prompt_lens_B).astype(jnp.int32) + c - 1) // c
  x0 = jnp.zeros((b, 1, cfg.hidden_size), cfg.jnp_dtype)
  cache, x_last = lax.fori_loop(0, num_chunks, body, (cache, x0))
  h_last = model_lib.final_hidden(params, cfg, x_last)
  return h_last, cache.replace(lengths=prompt_lens_B.astype(jnp.int32))


def prefill(params: Params, cfg: ModelConfig, cache: model_lib.KVCache, prompt_BP, prompt_lens_B,
            *, chunk: int = DEFAULT_CHUNK):
  """Right-padded ragged prompts [B, W] into the cache from slot 0, `chunk` tokens at a time.

  The cache's incoming lengths are ignored (it is filled as if empty).

  Returns (f32 logits at each row's last prompt token [B, V], the cache holding
  the prompts' keys/values with lengths = prompt_lens_B).
  """
  h_last, cache = clean_chunks(params, cfg, cache, prompt_BP, prompt_lens_B, chunk)
  return model_lib.lm_logits(params, cfg, h_last)[:, 0], cache


def block_states(params: Params, cfg: ModelConfig, dcfg: drafter_lib.DrafterConfig,
                 cache: model_lib.KVCache, anchors_B):
  """One block of mask slots anchored at anchors_B, over the cache alone: [B, 1, Bs, D].

  Slot j sits at anchor + 1 + j and sees every cached clean token (so the cache
  must end at the anchor: lengths = anchor + 1) and its own block, as
  `drafter.visibility` says. Nothing is written to the cache.
  """
  target, draft = params["target"], params["draft"]
  b, bs = anchors_B.shape[0], dcfg.block_size
  slots = drafter_lib.Tokens.slots(anchors_B.astype(jnp.int32)[:, None], bs)
  none_kv = jnp.zeros((dcfg.num_draft_layers, b, 0, cfg.num_kv_heads, cfg.head_dim), cfg.jnp_dtype)
  x_s = drafter_lib.slot_inputs(draft, cfg, b, bs)
  _, x_s, _ = drafter_lib.run_dual_layers(
      cfg, dcfg, target["layers"], draft["layers"], None, x_s, None, slots.pos,
      drafter_lib.visibility(slots, slots), cache, kv_c=(none_kv, none_kv))
  return model_lib.final_hidden(target, cfg, x_s).reshape(b, 1, bs, -1)


def flex_prefill(params: Params, cfg: ModelConfig, dcfg: drafter_lib.DrafterConfig,
                 cache: model_lib.KVCache, prompt_BP, prompt_lens_B, *, chunk: int = DEFAULT_CHUNK):
  """FlexDraft's prefill: the prompt as clean tokens, one block at each row's last token.

  params = {'target', 'draft'}. The same outputs as `drafter.mixed_pass(params,
  cfg, dcfg, prompt_BP, (prompt_lens_B - 1)[:, None], cache)` followed by the
  last-token gather and `cache.append(kv, prompt_lens_B)`, in chunks: returns
  (f32 logits at each row's last prompt token [B, V], final-normed slot states
  of the block [B, 1, Bs, D], the cache with the prompts, lengths = prompt_lens_B).
  """
  h_last, cache = clean_chunks(params["target"], cfg, cache, prompt_BP, prompt_lens_B, chunk)
  h_s = block_states(params, cfg, dcfg, cache, cache.lengths - 1)
  return model_lib.lm_logits(params["target"], cfg, h_last)[:, 0], h_s, cache

"""Chunked prefill equals the one-pass prefill: logits, cache, greedy tokens, flex's block."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import prefill as prefill_lib
from flexdraft_jax.sampling import SamplingConfig

BUCKET = 16
CAPACITY = 48
DCFG = drafter_lib.DrafterConfig(num_draft_layers=1, block_size=4, calib_rank=8)


@pytest.fixture(autouse=True, scope="module")
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _prompts(cfg, lens, seed=0):
  rng = np.random.RandomState(seed)
  return generate_lib.pad_prompts([rng.randint(0, cfg.vocab_size, n).tolist() for n in lens],
                                  BUCKET)


def _one_pass(params, cfg, prompt_bp, lens):
  """The prefill before chunking: one forward over [B, W] with a W x W causal mask."""
  cache = model_lib.KVCache.zeros(cfg, prompt_bp.shape[0], CAPACITY)
  logits, cache = _forward(params, cfg, jnp.asarray(prompt_bp), cache=cache,
                           advance=jnp.asarray(lens))
  return np.asarray(logits)[np.arange(len(lens)), lens - 1], cache


_chunked = jax.jit(prefill_lib.prefill, static_argnames=("cfg", "chunk"))
_mixed_pass = jax.jit(drafter_lib.mixed_pass, static_argnums=(1, 2))
_forward = jax.jit(model_lib.forward, static_argnums=1)
_flex_chunked = jax.jit(prefill_lib.flex_prefill, static_argnames=("cfg", "dcfg", "chunk"))


def _assert_same_cache(got, want, lens):
  np.testing.assert_array_equal(got.lengths, lens)
  for a, b in ((got.k, want.k), (got.v, want.v)):
    for row, n in enumerate(lens):  # valid entries only; the rest is stale by design
      np.testing.assert_allclose(np.asarray(a)[:, row, :, :n], np.asarray(b)[:, row, :, :n],
                                 rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("chunk", [4, 5, 64])  # divides W=16, does not, above W (one chunk)
def test_chunked_logits_and_cache_equal_one_pass(tiny_model, family, chunk):
  cfg, params = tiny_model(family)
  prompt_bp, lens = _prompts(cfg, (13, 1, 16, 7))  # ragged
  want_logits, want_cache = _one_pass(params, cfg, prompt_bp, lens)
  cache = model_lib.KVCache.zeros(cfg, len(lens), CAPACITY)
  logits, cache = _chunked(params, cfg, cache, prompt_bp, lens, chunk=chunk)
  assert logits.shape == (len(lens), cfg.vocab_size) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  _assert_same_cache(cache, want_cache, lens)


def test_exactly_one_chunk_one_over_and_one_token(tiny_model):
  """Rows of exactly one chunk (8), one token over (9), 1 token; and a lone 1-token prompt."""
  cfg, params = tiny_model("llama")
  unrolled = model_lib.unstack_layers(params)  # the decoding layout on CPU
  prompt_bp, lens = _prompts(cfg, (8, 9, 1), seed=1)
  want_logits, want_cache = _one_pass(params, cfg, prompt_bp, lens)
  cache = model_lib.KVCache.zeros(cfg, 3, CAPACITY)
  logits, cache = _chunked(unrolled, cfg, cache, prompt_bp, lens, chunk=8)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  _assert_same_cache(cache, want_cache, lens)
  one_bp, one = np.array([[7]], np.int32), np.array([1], np.int32)  # W = 1 < chunk
  want_logits, want_cache = _one_pass(params, cfg, one_bp, one)
  logits, cache = _chunked(unrolled, cfg, model_lib.KVCache.zeros(cfg, 1, CAPACITY), one_bp, one,
                           chunk=8)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  _assert_same_cache(cache, want_cache, one)


def test_no_buffer_grows_with_the_square_of_the_prompt(tiny_model):
  """XLA's temporaries of the compiled prefill: the one-pass prefill's grow ~4x when W
  doubles ([B, heads, W, W] scores); the chunked one's stay flat (the cache is an argument)."""
  cfg, params = tiny_model("llama")

  def temp_bytes(fn, width):
    cache = jax.eval_shape(lambda: model_lib.KVCache.zeros(cfg, 2, width))
    args = (jax.ShapeDtypeStruct((2, width), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32))
    return fn.lower(params, cache, *args).compile().memory_analysis().temp_size_in_bytes

  chunked = jax.jit(lambda p, c, x, n: prefill_lib.prefill(p, cfg, c, x, n, chunk=64))
  one_pass = jax.jit(lambda p, c, x, n: model_lib.forward(p, cfg, x, cache=c, advance=n)[0])
  small, big = temp_bytes(chunked, 512), temp_bytes(chunked, 1024)
  assert big < 1.2 * small, (small, big)
  assert temp_bytes(one_pass, 1024) > 3 * temp_bytes(one_pass, 512)
  assert big < temp_bytes(one_pass, 1024) / 10


def _teacher_forced_ok(params, cfg, prompt, new):
  """Greedy: each generated token is the argmax of a cache-free forward over what precedes it."""
  seq = jnp.asarray([prompt + new[:-1]])
  logits, _ = model_lib.forward(params, cfg, seq)
  return np.asarray(jnp.argmax(logits[0, len(prompt) - 1:], -1)).tolist() == new


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_generation_after_chunked_prefill_is_unchanged(tiny_model, family):
  cfg, params = tiny_model(family)
  lens = (13, 1, 16, 7)
  prompt_bp, plens = _prompts(cfg, lens, seed=2)
  stops = generate_lib.stop_matrix([-1], len(lens))
  runs = {}
  for chunk in (3, 16):  # 16 = W: one chunk, the pass of the unchunked prefill
    cache = model_lib.KVCache.zeros(cfg, len(lens), CAPACITY)
    tokens, num_new, _, _ = generate_lib.generate(
        params, cache, prompt_bp, plens, stops, jax.random.key(0), cfg=cfg, max_new_tokens=8,
        sampling=SamplingConfig(), prefill_chunk=chunk)
    runs[chunk] = [np.asarray(tokens)[r, :n].tolist() for r, n in enumerate(np.asarray(num_new))]
  assert runs[3] == runs[16]
  for row, n in enumerate(lens):
    assert _teacher_forced_ok(params, cfg, prompt_bp[row, :n].tolist(), runs[3][row]), row


def _draft(cfg, target):
  draft = drafter_lib.init_draft(cfg, DCFG, target, jax.random.key(1))
  keys = iter(jax.random.split(jax.random.key(2), 32))
  return jax.tree.map(lambda a: a + 0.3 * jnp.std(a) * jax.random.normal(next(keys), a.shape),
                      draft)


@pytest.mark.parametrize("family, unroll", [("llama", True), ("qwen3", False)])
def test_flex_prefill_equals_the_mixed_pass(tiny_model, family, unroll):
  """Chunks + one block at each row's last token == flex's one mixed pass (then append)."""
  cfg, target = tiny_model(family)
  draft = _draft(cfg, target)
  params = {"target": model_lib.decoding_params(target, unroll),
            "draft": drafter_lib.decoding_draft(draft, unroll)}
  prompt_bp, lens = _prompts(cfg, (13, 1, 16, 7), seed=3)
  empty = model_lib.KVCache.zeros(cfg, len(lens), CAPACITY)
  logits, h, kv = _mixed_pass(params, cfg, DCFG, jnp.asarray(prompt_bp),
                               jnp.asarray(lens - 1)[:, None], empty)
  want_last = np.asarray(logits)[np.arange(len(lens)), lens - 1]
  want_cache = empty.append(kv, jnp.asarray(lens))
  got_last, got_h, got_cache = _flex_chunked(params, cfg, DCFG, empty, prompt_bp, lens, chunk=5)
  assert got_h.shape == h.shape == (len(lens), 1, DCFG.block_size, cfg.hidden_size)
  np.testing.assert_allclose(got_last, want_last, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_h, h, rtol=1e-5, atol=1e-5)
  _assert_same_cache(got_cache, want_cache, lens)


def test_bad_chunks_and_prompts_are_one_line_errors(tiny_model):
  cfg, params = tiny_model("llama")
  prompt_bp, lens = _prompts(cfg, (5,))
  cache = model_lib.KVCache.zeros(cfg, 1, CAPACITY)
  with pytest.raises(ValueError, match=r"^prefill chunk must be >= 1, got 0$"):
    prefill_lib.prefill(params, cfg, cache, prompt_bp, lens, chunk=0)
  small = model_lib.KVCache.zeros(cfg, 1, 8)
  with pytest.raises(ValueError, match=r"^a prompt padded to 16 tokens is longer than the KV "
                                       r"cache \(capacity 8\)$"):
    prefill_lib.prefill(params, cfg, small, prompt_bp, lens)

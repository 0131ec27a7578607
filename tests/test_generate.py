"""Batched ragged generation: rows equal per-row runs, stops, sampling, SmolLM2 vs transformers.

XLA compiles dominate on a small CPU, so the tiny-model runs share one shape
(4 prompts padded to 16, 12 new tokens, one stop id per row) where they can.
"""
from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np
import pytest
import torch

from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax.sampling import SamplingConfig

M = 12          # max_new_tokens of the tiny-model runs
BUCKET = 16     # prompt padding
GREEDY = SamplingConfig()
TOP_K = SamplingConfig(temperature=1.0, top_k=4)
TOP_P = SamplingConfig(temperature=0.8, top_p=0.7)
SMOLLM2_EOS = 2
SMOLLM2_NEW = 64


@pytest.fixture(autouse=True, scope="module")
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


@contextlib.contextmanager
def _torch_threads(n):
  """torch oversubscribes a busy 2-core CPU badly (6x slower); one thread is robust."""
  old = torch.get_num_threads()
  torch.set_num_threads(n)
  try:
    yield
  finally:
    torch.set_num_threads(old)


@dataclasses.dataclass
class Run:
  tokens: np.ndarray    # [B, M]
  num_new: np.ndarray   # [B]
  steps: int
  lengths: np.ndarray   # [B] cache lengths after the run
  prompt_lens: np.ndarray

  def row(self, b):
    return self.tokens[b, :self.num_new[b]].tolist()


def tight_capacity(prompts, max_new=M, bucket=BUCKET):
  """The least capacity `generate` accepts: padded prompt width + max_new - 1.

  (Row lengths are not static under jit, so the bound uses the padded width.)
  """
  width = generate_lib.pad_prompts(prompts, bucket=bucket)[0].shape[1]
  return width + max_new - 1


def run(cfg, params, prompts, *, max_new=M, stops=(-1,), sampling=GREEDY, key=0, capacity=None,
        bucket=BUCKET):
  """One `generate` call; capacity defaults to the tight one."""
  prompt_BP, lens = generate_lib.pad_prompts(prompts, bucket=bucket)
  stop_BS = generate_lib.stop_matrix(list(stops), len(prompts))
  capacity = capacity or tight_capacity(prompts, max_new, bucket)
  cache = model_lib.KVCache.zeros(cfg, len(prompts), capacity)
  tokens, num_new, steps, cache = generate_lib.generate(
      params, cache, prompt_BP, lens, stop_BS, jax.random.key(key), cfg=cfg,
      max_new_tokens=max_new, sampling=sampling)
  tokens = np.asarray(tokens)
  assert tokens.shape == (len(prompts), max_new) and tokens.dtype == np.int32
  assert cache.capacity >= capacity  # KVCache.zeros may round capacity up
  return Run(tokens, np.asarray(num_new), int(steps), np.asarray(cache.lengths), lens)


def check_bookkeeping(r: Run, max_new: int):
  """-1 exactly after each row's end, steps and cache lengths consistent with num_new."""
  assert ((1 <= r.num_new) & (r.num_new <= max_new)).all()
  for b, n in enumerate(r.num_new):
    assert (r.tokens[b, :n] >= 0).all() and (r.tokens[b, n:] == -1).all(), b
  assert r.steps == r.num_new.max() - 1
  np.testing.assert_array_equal(r.lengths, r.prompt_lens + r.num_new - 1)


@pytest.fixture(scope="module")
def tiny(tiny_model):
  return tiny_model("llama")


@pytest.fixture(scope="module")
def prompts(tiny):
  cfg, _ = tiny
  rng = np.random.RandomState(7)
  return [rng.randint(0, cfg.vocab_size, n).tolist() for n in (3, 11, 6, 1)]


@pytest.fixture(scope="module")
def greedy(tiny, prompts):
  return run(*tiny, prompts)


@jax.jit(static_argnames=("cfg",))
def _full(params, tokens, *, cfg):
  return model_lib.forward(params, cfg, tokens)[0]


def teacher_forced_logits(cfg, params, prompts, r: Run):
  """Logits [B, M, V] that predicted each generated token, from one no-cache pass."""
  seqs = [p + r.row(b)[:-1] for b, p in enumerate(prompts)]
  width = 2 * BUCKET
  padded = np.zeros((len(seqs), width), np.int32)
  for b, s in enumerate(seqs):
    padded[b, :len(s)] = s
  logits = np.asarray(_full(params, padded, cfg=cfg))
  out = np.full((len(seqs), r.tokens.shape[1], logits.shape[-1]), np.nan, np.float32)
  for b, p in enumerate(prompts):
    n = r.num_new[b]
    out[b, :n] = logits[b, len(p) - 1:len(p) - 1 + n]
  return out


# ----------------------------------------------------------------------------
# (d) greedy: batched == per row == teacher-forced argmax
# ----------------------------------------------------------------------------
def test_greedy_bookkeeping(greedy):
  check_bookkeeping(greedy, M)
  np.testing.assert_array_equal(greedy.num_new, M)  # no stop ids: every row runs to M
  assert len({tuple(greedy.row(b)) for b in range(4)}) > 1


def test_greedy_batched_equals_per_row(tiny, prompts, greedy):
  """Each prompt alone, with a roomy cache (the batched run had the tight capacity)."""
  for b, p in enumerate(prompts):
    alone = run(*tiny, [p], capacity=BUCKET + M)
    assert alone.row(0) == greedy.row(b), f"row {b} (prompt length {len(p)})"
    assert alone.lengths[0] == greedy.lengths[b]


def test_greedy_equals_teacher_forced_argmax(tiny, prompts, greedy):
  logits = teacher_forced_logits(*tiny, prompts, greedy)
  for b in range(len(prompts)):
    assert logits[b, :M].argmax(-1).tolist() == greedy.row(b), b


def test_stop_ids_end_rows_early(tiny, prompts, greedy):
  """Per-row stop ids taken from the unstopped run: each row ends at its first stop."""
  stops, want = [], []
  for b in range(len(prompts)):
    row = greedy.row(b)
    if b == 2:  # no stop: runs to M
      stops.append([-1])
      want.append(M)
      continue
    # row 1 stops on its first token; others on a token first seen as late as possible
    firsts = [row.index(t) for t in row if 0 < row.index(t) < M - 1]
    j = 0 if b == 1 or not firsts else max(firsts)
    stops.append([row[j]])
    want.append(j + 1)
  assert 1 < min(want[0], want[3]) < M, f"no mid-run stop candidates in {greedy.tokens}"
  r = run(*tiny, prompts, stops=stops)
  check_bookkeeping(r, M)
  np.testing.assert_array_equal(r.num_new, want)
  for b in range(len(prompts)):
    assert r.row(b) == greedy.row(b)[:want[b]]
    assert want[b] == M or r.row(b)[-1] in stops[b]
  # A stop id shared by all rows (row 0's first token) ends row 0 at once.
  shared = run(*tiny, prompts, stops=[greedy.row(0)[0]])
  assert shared.num_new[0] == 1 and shared.row(0) == greedy.row(0)[:1]
  check_bookkeeping(shared, M)


def test_max_new_tokens_one(tiny, prompts, greedy):
  r = run(*tiny, prompts, max_new=1)
  check_bookkeeping(r, 1)
  np.testing.assert_array_equal(r.num_new, 1)
  assert r.steps == 0
  np.testing.assert_array_equal(r.tokens[:, 0], greedy.tokens[:, 0])


# ----------------------------------------------------------------------------
# (d) sampling: properties (rows are not batch-size invariant under one key)
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampled(tiny, prompts):
  return {s: run(*tiny, prompts, sampling=s, key=0) for s in (TOP_K, TOP_P)}


@pytest.mark.parametrize("sampling", [TOP_K, TOP_P], ids=["top_k", "top_p"])
def test_sampling_deterministic_given_key(tiny, prompts, sampled, sampling):
  r = sampled[sampling]
  check_bookkeeping(r, M)
  again = run(*tiny, prompts, sampling=sampling, key=0)
  np.testing.assert_array_equal(again.tokens, r.tokens)
  others = [run(*tiny, prompts, sampling=sampling, key=k).tokens for k in (1, 2)]
  assert any((o != r.tokens).any() for o in others), "different keys gave identical samples"


def test_top_k_tokens_within_top_k(tiny, prompts, sampled, greedy):
  r = sampled[TOP_K]
  logits = teacher_forced_logits(*tiny, prompts, r)
  for b in range(len(prompts)):
    for j, t in enumerate(r.row(b)):
      kth = np.sort(logits[b, j])[-TOP_K.top_k]
      assert logits[b, j, t] >= kth - 1e-4, (b, j)
  # ... and they are samples, not the argmax every time
  argmax = [logits[b, :r.num_new[b]].argmax(-1).tolist() for b in range(len(prompts))]
  assert any(argmax[b] != r.row(b) for b in range(len(prompts)))


def test_top_p_tokens_within_nucleus(tiny, prompts, sampled):
  r = sampled[TOP_P]
  logits = teacher_forced_logits(*tiny, prompts, r)
  for b in range(len(prompts)):
    for j, t in enumerate(r.row(b)):
      z = logits[b, j].astype(np.float64) / TOP_P.temperature
      p = np.exp(z - z.max())
      p /= p.sum()
      mass_above = p[p > p[t]].sum()  # the nucleus holds t iff this is below top_p
      assert mass_above < TOP_P.top_p + 1e-4, (b, j, mass_above)


# ----------------------------------------------------------------------------
# Cache capacity
# ----------------------------------------------------------------------------
def test_tight_capacity(prompts, greedy):
  """The tiny runs above used the least capacity that works (and were right)."""
  assert tight_capacity(prompts) == BUCKET + M - 1
  assert greedy.lengths.max() == 11 + M - 1  # the longest prompt used its slots


@pytest.mark.parametrize("case", ["prompt", "decode"])
def test_capacity_overflow_is_a_clear_error(tiny, prompts, case):
  if case == "prompt":
    capacity = BUCKET // 2
  else:  # one slot short of what prompt width + max_new_tokens needs
    capacity = tight_capacity(prompts) - 1
  with pytest.raises(ValueError, match="capacity"):
    run(*tiny, prompts, capacity=capacity)


# ----------------------------------------------------------------------------
# (e) SmolLM2 (GGUF, f32) greedy == transformers' generate
# ----------------------------------------------------------------------------
def test_smollm2_greedy_matches_transformers(smollm2, hf_smollm2, mtbench_prompt_ids):
  cfg, params = smollm2
  ours = run(cfg, params, mtbench_prompt_ids, max_new=SMOLLM2_NEW, stops=[SMOLLM2_EOS])
  check_bookkeeping(ours, SMOLLM2_NEW)
  for b, ids in enumerate(mtbench_prompt_ids):
    with torch.no_grad(), _torch_threads(1):
      out = hf_smollm2.generate(
          torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
          do_sample=False, num_beams=1, max_new_tokens=SMOLLM2_NEW,
          eos_token_id=SMOLLM2_EOS, pad_token_id=SMOLLM2_EOS)
    ref = out[0, len(ids):].tolist()
    if SMOLLM2_EOS in ref:
      ref = ref[:ref.index(SMOLLM2_EOS) + 1]
    assert ours.row(b) == ref, f"prompt {b}"
    assert ref[-1] == SMOLLM2_EOS or len(ref) == SMOLLM2_NEW


def test_engine_batches_by_length_and_returns_the_given_order():
  """Engine.generate sorts prompts into batches of similar lengths (less padding) and gives
  the completions back in the input order, each equal to that prompt decoded alone."""
  from flexdraft_jax import engine, resources
  from flexdraft_jax.model_config import ModelConfig
  cfg = ModelConfig(family="llama", vocab_size=49152, hidden_size=16, intermediate_size=32,
                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, max_position=256,
                    tie_embeddings=True)
  e = engine.Engine("random", target=(cfg, model_lib.init_params(cfg, jax.random.key(0))),
                    tokenizer=resources.SMOLLM2_NAME, chat_template=False, costs="none")
  prompts = ["word " * 40, "a", "b c " * 20, "x y", "w " * 5]
  out, stats = e.generate(prompts, max_new_tokens=4, batch_size=2)
  assert [c.prompt for c in out] == prompts and stats.new_tokens == 4 * len(prompts)
  for p, c in zip(prompts, out):
    alone, _ = e.generate([p], max_new_tokens=4, batch_size=1)
    assert alone[0].token_ids == c.token_ids, p


def test_argmax_and_top_probability_match_jax():
  """sampling.argmax (max, then the first index of it) is jnp.argmax, ties and -inf
  included; top_probability is max(softmax)."""
  from flexdraft_jax import sampling  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  logits = rng.randint(-3, 4, (5, 7, 300)).astype(np.float32)  # many ties
  logits[0, 0] = -np.inf
  logits[0, 0, 17] = 0.0  # a delta row: one finite entry
  logits[1] = rng.randn(7, 300).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(sampling.argmax(logits)), np.argmax(logits, -1))
  assert sampling.argmax(logits).dtype == np.int32
  np.testing.assert_allclose(np.asarray(sampling.top_probability(logits)),
                             np.asarray(jax.nn.softmax(logits, -1).max(-1)), rtol=1e-6)

"""FlexDraft decoding: lossless greedy, an exact drafter, the sampling law, compiles, errors.

Compiles dominate on a small CPU: each (mode, batch, config) is compiled once
and reused, and the random-drafter runs share one AR reference per family.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from flexdraft_jax import drafter
from flexdraft_jax import flex
from flexdraft_jax import flex_stats
from flexdraft_jax import flex_timing
from flexdraft_jax import planner
from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax.model_config import ModelConfig
from flexdraft_jax.sampling import SamplingConfig, probabilities

from conftest import random_params

BUCKET = 16
INF = np.inf
M = 14                  # max_new_tokens of the tiny greedy runs
DCFG = drafter.DrafterConfig(num_draft_layers=1, block_size=4, calib_rank=8)
# A divergence from AR greedy is a near tie, not a failure, when the AR logits' top-2
# margin there is below EPS_TIE relative to the top logit: f32 sums in another order
# (a wider pass) move logits by ~1e-6 relative.
EPS_TIE = 1e-4
SMOLLM2_EOS = 2


@pytest.fixture(autouse=True, scope="module")
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def noisy_drafter(cfg, dcfg, target, seed, noise=0.3):
  """init_draft, then noise on the projectors and a non-zero calibration output layer."""
  draft = drafter.init_draft(cfg, dcfg, target, jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
  jitter = lambda a: a + noise * jnp.std(a) * jax.random.normal(next(keys), a.shape)
  draft["layers"] = jax.tree.map(jitter, draft["layers"])
  if "calib" in draft:
    w2 = "w2h" if "w2h" in draft["calib"] else "w2"
    draft["calib"][w2] = 0.5 * jax.random.normal(next(keys), draft["calib"][w2].shape)
  return draft


def decoding(target, draft, unroll=None):
  """The decoding layouts (default: the library's, `model.decoding_params`)."""
  target = model_lib.decoding_params(target, unroll)
  return {"target": target,
          "draft": drafter.decoding_draft(draft, isinstance(target["layers"], tuple))}


def table(block_size, *, ar=INF, pld=INF, parallel=INF, sequential=INF, acceptance=None):
  """A crafted planner.CostTable: ms per step of each kind (a number: every width; a list:
  per verify width), acceptance: raw confidences by default."""
  n = len(flex.verify_buckets(block_size))
  row = lambda v: list(v) if np.ndim(v) else [v] * n
  ms = [[ar] + [INF] * (n - 1), [INF] + row(pld)[1:], row(parallel), row(sequential)]
  if acceptance is None:
    acceptance = planner.AcceptanceModel.from_confidence(block_size)
  return planner.CostTable.make(ms, acceptance)


def capacity(width, fcfg, dcfg=DCFG):
  return width + fcfg.max_new_tokens + 2 * dcfg.block_size


def run_flex(cfg, params, prompts, fcfg, stops=(-1,), *, dcfg=DCFG, key=0, bucket=BUCKET,
             costs=None, exe=None):
  """One flex_generate call (or a call of `exe`, its compile_flex). Returns (rows, summary)."""
  prompt_BP, lens = generate_lib.pad_prompts(prompts, bucket)
  cache = model_lib.KVCache.zeros(cfg, len(prompts), capacity(prompt_BP.shape[1], fcfg, dcfg))
  args = (params, cache, prompt_BP, lens, generate_lib.stop_matrix(list(stops), len(prompts)),
          jax.random.key(key), costs)
  if exe is None:
    tokens, num_new, st, _ = flex.flex_generate(*args, cfg=cfg, dcfg=dcfg, fcfg=fcfg)
  else:
    tokens, num_new, st, _ = exe(*args)
  tokens, num_new = np.asarray(tokens), np.asarray(num_new)
  for b, n in enumerate(num_new):  # -1 exactly after each row's end
    assert 1 <= n <= fcfg.max_new_tokens
    assert (tokens[b, :n] >= 0).all() and (tokens[b, n:] == -1).all()
  np.testing.assert_array_equal(np.asarray(st.committed), num_new)
  return [tokens[b, :n].tolist() for b, n in enumerate(num_new)], flex_stats.summarize(st)


def run_ar(cfg, target, prompts, max_new, stops=(-1,), bucket=BUCKET):
  prompt_BP, lens = generate_lib.pad_prompts(prompts, bucket)
  cache = model_lib.KVCache.zeros(cfg, len(prompts), prompt_BP.shape[1] + max_new)
  tokens, num_new, _, _ = generate_lib.generate(
      target, cache, prompt_BP, lens, generate_lib.stop_matrix(list(stops), len(prompts)),
      jax.random.key(0), cfg=cfg, max_new_tokens=max_new, sampling=SamplingConfig())
  return [np.asarray(tokens)[b, :n].tolist() for b, n in enumerate(np.asarray(num_new))]


@jax.jit(static_argnames=("cfg",))
def _last_logits(params, tokens_1T, *, cfg):
  return model_lib.forward(params, cfg, tokens_1T)[0][0, -1]


def near_ties(cfg, target, prompts, want, got) -> int:
  """Rows where flex differs from AR greedy; fails unless each first divergence is a near tie."""
  ties = 0
  for p, w, g in zip(prompts, want, got):
    if w == g:
      continue
    j = next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), min(len(w), len(g)))
    assert j < min(len(w), len(g)), f"same tokens, different lengths: {w} vs {g}"
    top2 = np.sort(np.asarray(_last_logits(target, np.array([p + w[:j]]), cfg=cfg)))[-2:]
    margin = (top2[1] - top2[0]) / max(abs(top2[1]), 1.0)
    assert margin < EPS_TIE, f"divergence at token {j} with top-2 margin {margin:.2e}: {w} vs {g}"
    ties += 1
  if ties:
    print(f"{ties} near tie(s) within EPS_TIE={EPS_TIE}")
  return ties


# ----------------------------------------------------------------------------
# 1. Greedy is lossless with a random drafter (tiny models, ragged, stops, M mid-block)
# ----------------------------------------------------------------------------
# (mode, batch, family, verify strategy, tree_nodes): token trees by default (0: a tree as
# large as the block), chains (1) in two cases.
CASES = [("parallel", 1, "llama", "full", 0), ("sequential", 3, "llama", "min_confidence", 0),
         ("flex", 8, "qwen3", "cumulative_product", 0), ("ar", 8, "qwen3", "full", 0),
         ("parallel", 3, "qwen3", "cumulative_product", 1), ("sequential", 8, "llama", "full", 1)]


def case_config(mode, strategy, tree_nodes=0):
  return flex.FlexConfig(mode=mode, verify_strategy=strategy, verify_threshold=0.05,
                         max_new_tokens=M, tree_nodes=tree_nodes)


USED = {"ar": {"ar"}, "parallel": {"parallel"}, "sequential": {"sequential"},
        # flex at batch 8: sequential while more than FLEX_BATCH_THRESHOLD rows are active
        "flex": {"parallel", "sequential"}}


@pytest.fixture(scope="module")
def greedy_setup(tiny_model):
  """Per family: (cfg, params, 8 ragged prompts, unstopped AR output, per-row stop ids)."""
  out = {}
  for family in sorted({c[2] for c in CASES}):
    cfg, target = tiny_model(family)
    params = decoding(target, noisy_drafter(cfg, DCFG, target, seed=3))
    rng = np.random.RandomState(11)
    prompts = [rng.randint(0, cfg.vocab_size, n).tolist() for n in (5, 1, 9, 16, 3, 12, 7, 2)]
    ar = run_ar(cfg, params["target"], prompts, M)
    # Rows 0 and 1 run to M; the others stop at a token they first emit mid-run (found
    # from the AR output), or at their first token if there is none.
    stops = [[-1], [-1]]
    for row in ar[2:]:
      firsts = [t for i, t in enumerate(row) if row.index(t) == i and 2 <= i < M - 2]
      stops.append([firsts[len(firsts) // 2] if firsts else row[0]])
    out[family] = cfg, params, prompts, ar, stops
  return out


@pytest.mark.parametrize("mode,batch,family,strategy,tree_nodes", CASES)
def test_greedy_lossless_random_drafter(greedy_setup, mode, batch, family, strategy, tree_nodes):
  cfg, params, prompts, ar, stops = greedy_setup[family]
  fcfg = case_config(mode, strategy, tree_nodes)
  got, summary = run_flex(cfg, params, prompts[:batch], fcfg, stops[:batch])
  want = [r[:r.index(s[0]) + 1] if s[0] in r else r for r, s in zip(ar, stops[:batch])]
  near_ties(cfg, params["target"], prompts[:batch], want, got)
  assert summary["tau"] >= 1.0 and summary["steps"] <= M
  assert batch == 1 or min(len(w) for w in want) < M, "no row stopped mid-run"
  assert {k for k, n in summary["modes"].items() if n} == USED[mode]
  assert mode != "ar" or summary["tau"] == 1.0
  if mode == "sequential":  # each step commits its bonus and its draft pass's next token,
    row_steps = summary["new_tokens"] / summary["tau"]  # but a row's last may be cut
    assert summary["new_tokens"] >= 2 * row_steps - batch, summary


def test_tree_cache_equals_a_fresh_pass(greedy_setup):
  """After tree steps, each row's cache holds exactly the committed tokens' keys and values
  at contiguous positions (the accepted path compacted, nothing else written): it equals a
  fresh pass over prompt + output. Trees accept more per step than chains here."""
  cfg, params, prompts, _, _ = greedy_setup["llama"]
  prompts = prompts[:3]
  prompt_BP, lens = generate_lib.pad_prompts(prompts, BUCKET)
  taus = {}
  for nodes in (1, 0):
    fcfg = case_config("parallel", "full", nodes)
    cache = model_lib.KVCache.zeros(cfg, 3, capacity(BUCKET, fcfg))
    tokens, num_new, st, cache = flex.flex_generate(
        params, cache, prompt_BP, lens, generate_lib.stop_matrix([-1], 3), jax.random.key(0),
        cfg=cfg, dcfg=DCFG, fcfg=fcfg)
    taus[nodes] = flex_stats.summarize(st)["tau"]
  for b, (prompt, n) in enumerate(zip(prompts, np.asarray(cache.lengths))):
    seq = prompt + np.asarray(tokens)[b, :int(num_new[b])].tolist()
    assert len(prompt) < n <= len(seq)
    fresh = model_lib.KVCache.zeros(cfg, 1, n)
    _, fresh = model_lib.forward(params["target"], cfg, jnp.asarray([seq[:n]]), cache=fresh)
    for got, want in ((cache.k, fresh.k), (cache.v, fresh.v)):
      np.testing.assert_allclose(np.asarray(got)[:, b, :, :n], np.asarray(want)[:, 0, :, :n],
                                 atol=1e-4, rtol=1e-4)
  assert taus[0] > taus[1], taus


def test_hidden_state_calibration_is_lossless(greedy_setup, tiny_model):
  """calib_target='hidden' (a slot-state delta through the LM head; packed for the CPU
  kernel where it is on): parallel decoding, which uses the calibrated drafts, stays AR's."""
  cfg, params, prompts, ar, stops = greedy_setup["llama"]
  dcfg = dataclasses.replace(DCFG, calib_target="hidden")
  draft = noisy_drafter(cfg, dcfg, tiny_model("llama")[1], seed=3)
  assert draft["calib"]["w2h"].shape == (dcfg.calib_rank, cfg.hidden_size)
  params = {**params, "draft": drafter.decoding_draft(
      draft, isinstance(params["target"]["layers"], tuple))}
  got, summary = run_flex(cfg, params, prompts, case_config("parallel", "cumulative_product"),
                          stops, dcfg=dcfg)
  want = [r[:r.index(s[0]) + 1] if s[0] in r else r for r, s in zip(ar, stops)]
  near_ties(cfg, params["target"], prompts, want, got)
  assert summary["modes"]["parallel"] == summary["steps"]


@pytest.mark.parametrize("mode,family", [("parallel", "llama"), ("flex", "qwen3")])
def test_split_parallel_pass_makes_the_single_pass_drafts(greedy_setup, mode, family):
  """parallel_pass='split' (verify, then group acc's block alone over the cache) drafts what
  the single pass's group acc drafts: the same tokens as AR, and the same steps, accepted
  drafts per step and kinds (parallel at batch 1, sequential in flex at batch 8)."""
  cfg, params, prompts, ar, stops = greedy_setup[family]
  batch = 1 if mode == "parallel" else 8
  runs = {}
  for how in ("single", "split"):
    fcfg = dataclasses.replace(case_config(mode, "cumulative_product"), parallel_pass=how)
    runs[how] = run_flex(cfg, params, prompts[:batch], fcfg, stops[:batch])
  want = [r[:r.index(s[0]) + 1] if s[0] in r else r for r, s in zip(ar, stops[:batch])]
  assert runs["single"][0] == runs["split"][0]
  near_ties(cfg, params["target"], prompts[:batch], want, runs["split"][0])
  single, split = runs["single"][1], runs["split"][1]
  assert split["modes"]["parallel"] > 0
  for k in ("steps", "tau", "modes", "verify_hist", "accept_hist"):
    assert single[k] == split[k], k


@pytest.mark.parametrize("width", [1, 4])
def test_split_parallel_step_equals_the_single_step(greedy_setup, width):
  """One parallel step from the same state: both passes commit the same tokens and leave
  the same candidates (drafts, confidences, last logits) and cache lengths."""
  cfg, params, prompts, _, _ = greedy_setup["llama"]
  prompt_BP, lens = generate_lib.pad_prompts(prompts[:3], BUCKET)
  stops = generate_lib.stop_matrix([-1], 3)
  out = {}
  for how in ("single", "split"):
    fcfg = flex.FlexConfig(mode="parallel", max_new_tokens=M, parallel_pass=how)
    cache = model_lib.KVCache.zeros(cfg, 3, capacity(prompt_BP.shape[1], fcfg, DCFG))
    state = flex_timing.prefill_state(params, cache, prompt_BP, lens, stops, jax.random.key(0),
                                      cfg=cfg, dcfg=DCFG, fcfg=fcfg, kinds=(planner.PARALLEL,))
    # Two steps (each rewound to the prompt's end by timed_step): the first verifies the
    # prefill's sequential-made drafts, the second the parallel step's calibrated ones.
    for _ in range(2):
      state = flex_timing.timed_step(params, state, prompt_BP, lens, stops, cfg=cfg, dcfg=DCFG,
                                     fcfg=fcfg, kind=planner.PARALLEL, width=width)
    out[how] = jax.device_get(state)
  single, split = out["single"], out["split"]
  np.testing.assert_array_equal(single.tokens, split.tokens)
  np.testing.assert_array_equal(single.cache.lengths, split.cache.lengths)
  np.testing.assert_array_equal(single.cand.drafts, split.cand.drafts)
  np.testing.assert_allclose(single.cand.conf, split.cand.conf, rtol=1e-5, atol=1e-6)
  assert single.cand.conf[:, 1:].max() < 1.0  # real drafts, not only the certain bonus


def test_mixed_pass_clean_part_is_the_target(greedy_setup):
  """drafter.mixed_pass (clean tokens + slot groups) + append == model.forward on a filled cache."""
  cfg, params, prompts, _, _ = greedy_setup["llama"]
  prompt_BP, lens = generate_lib.pad_prompts(prompts[:3], BUCKET)

  @jax.jit
  def both(params, cache, tokens, anchors):
    _, cache = model_lib.forward(params["target"], cfg, prompt_BP, cache=cache, advance=lens)
    anchors = anchors + cache.lengths[:, None]
    logits, _, kv = drafter.mixed_pass(params, cfg, DCFG, tokens, anchors, cache)
    return (logits, cache.append(kv, 2)), model_lib.forward(params["target"], cfg, tokens, cache=cache)

  tokens = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
  anchors = np.array([[-1, 0, 1]] * 3, np.int32)
  got, want = both(params, model_lib.KVCache.zeros(cfg, 3, 64), tokens, anchors)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)


# ----------------------------------------------------------------------------
# 2. An exact drafter: a bigram target whose greedy output settles on a token C,
#    and a drafter that always drafts C (full acceptance, in-block stops and cuts)
# ----------------------------------------------------------------------------
BIGRAM = ModelConfig(family="llama", vocab_size=32, hidden_size=64, intermediate_size=96,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                     max_position=256)
C = BIGRAM.vocab_size - 1


def successor(x):
  return min(x + 3, C)


@pytest.fixture(scope="module")
def bigram():
  """Layers that add nothing (o_proj = down_proj = 0), so the logits depend on the last
  token only; an LM head solved so that argmax = successor, with margin 8."""
  cfg = BIGRAM
  target = random_params(cfg, seed=5)
  for name, part in (("attn", "o_proj"), ("mlp", "down_proj")):
    target["layers"][name][part]["kernel"] = jnp.zeros_like(target["layers"][name][part]["kernel"])
  h = np.asarray(model_lib.final_hidden(target, cfg, target["embed"]["embedding"]))  # [V, d]
  want = 8.0 * np.eye(cfg.vocab_size)[[successor(x) for x in range(cfg.vocab_size)]]
  target["lm_head"]["kernel"] = jnp.asarray(np.linalg.lstsq(h, want, rcond=None)[0], jnp.float32)
  draft = drafter.init_draft(cfg, DCFG, target, jax.random.key(0))
  draft["mask"] = target["embed"]["embedding"][C]  # slot state = E[C]: drafts successor(C) = C
  return cfg, decoding(target, draft)


BIGRAM_FLEX = flex.FlexConfig(mode="flex", max_new_tokens=23)


@pytest.fixture(scope="module")
def bigram_exe(bigram):
  """compile_flex of the bigram runs, with an on_commit that records: (exe, commits)."""
  cfg, params = bigram
  commits = []
  record = lambda *a: commits.append([np.asarray(x) for x in a])
  exe = flex.compile_flex(params, cfg, DCFG, 4, BUCKET, capacity(BUCKET, BIGRAM_FLEX), 1,
                          fcfg=BIGRAM_FLEX, on_commit=record)
  return exe, commits


def test_exact_drafter_full_acceptance(bigram, bigram_exe):
  cfg, params = bigram
  exe, commits = bigram_exe
  prompts = [[4, 9, 0], [7, 1], [2, 2, 2, 2, 29], [5, 2]]
  stops = [[-1], [13], [-1], [C]]
  fcfg = BIGRAM_FLEX
  commits.clear()
  got, summary = run_flex(cfg, params, prompts, fcfg, stops, exe=exe)
  for p, s, row in zip(prompts, stops, got):
    want = [successor(p[-1])]
    while len(want) < fcfg.max_new_tokens and want[-1] not in s:
      want.append(successor(want[-1]))
    assert row == want
  bs = DCFG.block_size
  assert summary["tau"] > 1.5
  assert summary["accept_hist"][bs] > 0 and summary["acceptance_by_depth"][bs - 1] > 0
  assert summary["modes"]["parallel"] and summary["modes"]["sequential"]
  # Streaming: the callback's blocks rebuild the output; some block was cut before its bonus.
  streamed = [[] for _ in prompts]
  cut = False
  for tokens, count, drafted in commits:
    for b in range(len(prompts)):
      streamed[b] += tokens[b, :count[b]].tolist()
      assert (tokens[b, count[b]:] == -1).all() and drafted[b] <= count[b]
      cut |= bool(0 < count[b] == drafted[b])
  assert streamed == got and cut


def test_planner_picks_ar_when_no_speculation_pays(bigram):
  """Every speculative step costs 10x an AR step: compile_flex compiles AR alone, and a
  loop carrying all four kinds (flex_generate) still steps ar every time."""
  cfg, params = bigram
  costs = table(DCFG.block_size, ar=1.0, pld=10.0, parallel=10.0, sequential=10.0,
                acceptance=planner.AcceptanceModel.from_confidence(DCFG.block_size))
  assert flex.compiled_kinds(BIGRAM_FLEX, 2, DCFG.block_size, costs) == (planner.AR,)
  _, summary = run_flex(cfg, params, [[4, 9, 0], [7, 1]], BIGRAM_FLEX, costs=costs)
  assert summary["modes"]["ar"] == summary["steps"] > 0 and summary["tau"] == 1.0


def test_planner_speculates_when_it_pays(bigram):
  """The exact drafter's drafts are confident: parallel at 1.5x an AR step pays, so flex
  compiles it, and the loop speculates and commits several tokens per step."""
  cfg, params = bigram
  costs = table(DCFG.block_size, ar=1.0, pld=9.0, parallel=1.5, sequential=3.0)
  assert planner.PARALLEL in flex.compiled_kinds(BIGRAM_FLEX, 2, DCFG.block_size, costs)
  _, summary = run_flex(cfg, params, [[4, 9, 0], [7, 1]], BIGRAM_FLEX, costs=costs)
  speculative = summary["modes"]["parallel"] + summary["modes"]["sequential"]
  assert speculative > summary["steps"] / 2 and summary["tau"] > 1.5, summary
  assert summary["calibration_error"] is not None


# Costs under which the planner's choice cycles through the state a step leaves (raw-
# confidence acceptance, stationary 1/2; a sequential step also commits its free token,
# planner.FREE). MIXING: after ar a parallel step (1.875 tokens expected / 1.1 ms beats
# sequential's 2.875 / 1.8); after parallel a sequential one; after sequential ar (its own
# unconfident drafts give ~2.05 / 1.8 < 1 / 0.7). MIXING_LOOKUP: cheap pld, dear
# sequential: ar, parallel, and pld where lookups matched.
MIXING = dict(ar=0.7, pld=1.3, parallel=1.1, sequential=1.8)
MIXING_LOOKUP = dict(ar=0.7, pld=1.0, parallel=1.2, sequential=1.9)


def test_all_four_kinds_mixed_are_lossless(greedy_setup):
  """Crafted tables make one loop switch kinds step by step (llama and qwen3, batches
  1 and 8, stops inside blocks, max_new_tokens mid-block): tokens equal AR's. Each run
  mixes at least three kinds, and all four are asserted over the runs. (Batch 3, ragged:
  test_greedy_lossless_random_drafter.)"""
  fcfg = case_config("flex", "cumulative_product")  # flex_generate with a table: all kinds
  used = {}
  for family, batch in itertools.product(("llama", "qwen3"), (1, 8)):
    costs = table(DCFG.block_size, **(MIXING if family == "llama" else MIXING_LOOKUP))
    cfg, params, prompts, ar, stops = greedy_setup[family]
    got, summary = run_flex(cfg, params, prompts[:batch], fcfg, stops[:batch], costs=costs)
    want = [r[:r.index(s[0]) + 1] if s[0] in r else r for r, s in zip(ar, stops[:batch])]
    near_ties(cfg, params["target"], prompts[:batch], want, got)
    used[family, batch] = {k for k, n in summary["modes"].items() if n}
    assert len(used[family, batch]) >= 3, summary["modes"]
  assert set().union(*used.values()) == set(planner.KINDS), used


def test_cache_is_not_copied(bigram, bigram_exe):
  """No cache-sized copy in the compiled loop: the conditional branches only read the
  cache, and every write is in place (cf. test_cache_copies for generate)."""
  cfg, _ = bigram
  text = bigram_exe[0].as_text()
  cache = jax.eval_shape(lambda: model_lib.KVCache.zeros(cfg, 4, capacity(BUCKET, BIGRAM_FLEX)))
  dims = ",".join(map(str, cache.k.shape))
  copy = re.compile(rf"\s*(ROOT )?%\S+ = f32\[{dims}\]\S* copy\(")
  bodies, name = {}, None  # computation -> its lines
  for line in text.splitlines():
    head = re.match(r"^(ENTRY )?(%\S+) ", line)
    if head:
      name = head.group(2)
    bodies.setdefault(name, []).append(line)
  copied = {n: [l for l in lines if copy.match(l)] for n, lines in bodies.items()}
  copied = {n: c for n, c in copied.items() if c}
  # The chunked prefill's loop (once per prompt chunk, not per step) copies k and v twice
  # on XLA:CPU, as generate's does (test_cache_copies); the step loop (the computation
  # with the switch) copies nothing.
  assert "dynamic-update-slice" in text and len(copied) <= 1, copied
  for n, c in copied.items():
    assert len(c) <= 4 and not any("conditional(" in l for l in bodies[n]), (n, c)


# ----------------------------------------------------------------------------
# 3. Speculative sampling keeps the target's law (exact, by enumeration)
# ----------------------------------------------------------------------------
SMALL = ModelConfig(family="llama", vocab_size=12, hidden_size=16, intermediate_size=32,
                    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6,
                    max_position=64)
SAMPLE_DCFG = drafter.DrafterConfig(num_draft_layers=1, block_size=2, calib_rank=8)
SAMPLE_ROWS = 2        # rows per flex_generate call (they share each step's mode and width)
SAMPLE_CALLS = 10240   # independent calls, vmapped into one program: 20480 samples
SAMPLE_PROMPT = [3, 1, 4, 1, 5]


@pytest.fixture(scope="module")
def small():
  target = random_params(SMALL, seed=9)
  target["lm_head"]["kernel"] = 2.0 * target["lm_head"]["kernel"]  # peakier, less uniform laws
  draft = noisy_drafter(SMALL, SAMPLE_DCFG, target, seed=4, noise=1.0)
  return SMALL, target, decoding(target, draft)


@jax.jit(static_argnames=("cfg",))
def _logits(params, tokens_BT, *, cfg):
  return model_lib.forward(params, cfg, tokens_BT)[0]


def exact_law(cfg, target, sampling, k=3):
  """P(first k tokens) [V]*k from one no-cache pass over every (k-1)-token continuation."""
  v, n = cfg.vocab_size, len(SAMPLE_PROMPT)
  seqs = [SAMPLE_PROMPT + list(p) for p in itertools.product(range(v), repeat=k - 1)]
  logits = _logits(target, jnp.asarray(seqs, jnp.int32), cfg=cfg)[:, n - 1:]
  probs = np.asarray(probabilities(logits, sampling), np.float64)  # [V^(k-1), k, V]
  joint = np.ones(())
  for i in range(k):  # P(x_{i+1} | x_1..x_i): rows whose later tokens are 0
    cond = probs[:, i].reshape((v,) * k)[(slice(None),) * i + (0,) * (k - 1 - i)]
    joint = joint[..., None] * cond
  return joint


def sample_counts(cfg, params, fcfg, costs=None, broken=False, k=3, dcfg=SAMPLE_DCFG):
  """First k tokens of SAMPLE_CALLS x SAMPLE_ROWS rows, counted [V]*k, and FlexStats.

  Calls are vmapped: a large real batch compiles one cache write per row, slowly.
  """
  prompt_BP, lens = generate_lib.pad_prompts([SAMPLE_PROMPT] * SAMPLE_ROWS, 8)
  stops = generate_lib.stop_matrix([-1], SAMPLE_ROWS)
  cache = model_lib.KVCache.zeros(cfg, SAMPLE_ROWS, capacity(8, fcfg, dcfg))
  caches = jax.tree.map(lambda a: jnp.broadcast_to(a, (SAMPLE_CALLS,) + a.shape), cache)
  many = _vmapped(cfg, fcfg, broken, dcfg)
  tokens, num_new, st, _ = many(params, caches, prompt_BP, lens, stops,
                                jax.random.split(jax.random.key(0), SAMPLE_CALLS), costs)
  assert (np.asarray(num_new) == k).all()
  counts = np.zeros((cfg.vocab_size,) * k, np.int64)
  np.add.at(counts, tuple(np.asarray(tokens).reshape(-1, k).T), 1)
  return counts, jax.tree.map(lambda a: np.asarray(a).sum(0), st)


@functools.cache
def _vmapped(cfg, fcfg, broken, dcfg):
  kinds = None if fcfg.mode != "flex" else tuple(range(len(planner.KINDS)))
  call = functools.partial(flex.flex_generate, cfg=cfg, dcfg=dcfg, fcfg=fcfg, kinds=kinds,
                           _broken=broken)
  return jax.jit(jax.vmap(call, in_axes=(None, 0, None, None, None, 0, None)))


def law_pvalue(counts, law):
  """Chi-square p-value of counts against law, cells with expected count < 5 pooled."""
  counts, law = counts.ravel(), law.ravel()
  assert counts[law == 0].sum() == 0, "sampled a token the target never draws"
  expected = law * counts.sum()
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  stat = np.sum((obs - exp) ** 2 / np.maximum(exp, 1e-12))
  return scipy_stats.chi2.sf(stat, len(obs) - 1)


def pair_pvalues(counts, law):
  """p-values of the pairs (x1, x2) and (x2, x3)."""
  return [law_pvalue(counts.sum(2), law.sum(2)), law_pvalue(counts.sum(0), law.sum(0))]


T1 = SamplingConfig(temperature=1.0)
# Step costs [mode, verify width] growing with the width, so widths vary with confidence.
COSTS = {"parallel": table(2, ar=5.0, parallel=[1.0, 1.5], sequential=5.0),
         "sequential": table(2, ar=5.0, parallel=5.0, sequential=[1.0, 1.2]),
         # ar first (after the prefill's uncertain drafts), then parallel, sequential after
         # parallel (its free token), parallel after sequential, as confidences allow
         "mixed": table(2, ar=0.8, pld=1.3, parallel=1.0, sequential=1.7)}


@pytest.mark.parametrize("favoured", ["parallel", "sequential"])
def test_speculative_sampling_law(small, favoured):
  """First 3 tokens of 20480 rows (T=1) vs the exact law; 'flex' picks the kind and verify
  width per step from the cost table (a traced argument). Switching kinds: below."""
  cfg, target, params = small
  fcfg = flex.FlexConfig(mode="flex", verify_strategy="expected_throughput", max_new_tokens=3,
                         sampling=T1)
  counts, st = sample_counts(cfg, params, fcfg, COSTS[favoured])
  assert min(pair_pvalues(counts, exact_law(cfg, target, T1))) > 1e-4
  assert {k for k, n in zip(planner.KINDS, st.modes) if n} == {favoured}, st.modes
  assert (st.verify_hist > 0).sum() > 1, st.verify_hist  # more than one width was chosen


def test_speculative_sampling_law_top_p(small):
  cfg, target, params = small
  sampling = SamplingConfig(temperature=1.0, top_p=0.8)
  fcfg = flex.FlexConfig(mode="sequential", verify_strategy="full", max_new_tokens=3,
                         sampling=sampling)
  counts, _ = sample_counts(cfg, params, fcfg)
  assert min(pair_pvalues(counts, exact_law(cfg, target, sampling))) > 1e-4


TREE_DCFG = drafter.DrafterConfig(num_draft_layers=1, block_size=4, calib_rank=8)


def test_speculative_sampling_law_trees(small):
  """Token trees (4 nodes, 3 children a node, tokens drawn afresh per node, so siblings
  repeat tokens) verified whole by multi-draft speculative sampling in parallel steps:
  the first 3 tokens follow the exact law. (The statistic's power against a skipped
  sibling residual: test_trees; sequential's sampled free token: the chain tests above.)"""
  cfg, target, _ = small
  params = decoding(target, noisy_drafter(SMALL, TREE_DCFG, target, seed=4, noise=1.0))
  fcfg = flex.FlexConfig(mode="parallel", verify_strategy="full", max_new_tokens=3, sampling=T1)
  counts, st = sample_counts(cfg, params, fcfg, dcfg=TREE_DCFG)
  assert min(pair_pvalues(counts, exact_law(cfg, target, T1))) > 1e-4
  assert st.verify_hist[-1] == st.steps > 0, st.verify_hist  # whole 4-node trees


def test_sampling_statistic_rejects_a_broken_acceptor(small):
  """A rejection that resamples from p instead of norm(max(0, p - q)) must fail the test."""
  cfg, target, params = small
  fcfg = flex.FlexConfig(mode="parallel", verify_strategy="full", max_new_tokens=3, sampling=T1)
  counts, _ = sample_counts(cfg, params, fcfg, broken=True)
  assert min(pair_pvalues(counts, exact_law(cfg, target, T1))) < 1e-6


# ----------------------------------------------------------------------------
# 4. No recompiles across calls of one shape bucket
# ----------------------------------------------------------------------------
def test_no_recompiles(greedy_setup):
  """New prompts of one shape bucket reuse test 1's flex program (or compile it once here)."""
  cfg, params, prompts, _, stops = greedy_setup["qwen3"]
  fcfg = case_config("flex", "cumulative_product")
  run_flex(cfg, params, prompts, fcfg, stops)
  size = flex.flex_generate._cache_size()
  compiles = []
  listener = lambda event, *_, **__: compiles.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for shift in (1, 3):
      run_flex(cfg, params, prompts[shift:] + prompts[:shift], fcfg, stops[::-1], key=shift)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert "/jax/core/compile/backend_compile_duration" not in compiles
  assert flex.flex_generate._cache_size() == size


def test_compiled_kinds_drop_what_cannot_win():
  f, bs = flex.FlexConfig(mode="flex"), 4
  assert flex.compiled_kinds(flex.FlexConfig(mode="sequential"), 1, bs) == (planner.SEQUENTIAL,)
  assert flex.compiled_kinds(flex.FlexConfig(mode="pld"), 1, bs) == (planner.AR, planner.PLD)
  no_table = [flex.compiled_kinds(f, b, bs) for b in (1, flex.FLEX_BATCH_THRESHOLD, 3)]
  assert no_table == [(planner.PARALLEL,)] * 2 + [flex.DRAFTED]  # the active count decides
  # Stationary acceptance 1/2 (a certain bonus, then 1/2, 1/4, ...): a width-4 parallel
  # step commits 1.875 tokens; at 1.5x an AR step it wins, at 3x it cannot.
  assert flex.compiled_kinds(f, 8, bs, table(bs, ar=1.0, parallel=1.5)) == (planner.PARALLEL,)
  assert flex.compiled_kinds(f, 8, bs, table(bs, ar=1.0, parallel=3.0)) == (planner.AR,)
  # Parallel 4% faster than ar: noise, not worth a branch (planner.MARGIN).
  assert flex.compiled_kinds(f, 8, bs, table(bs, ar=1.0, parallel=1.875 / 1.04)) == (planner.AR,)
  close = flex.compiled_kinds(f, 8, bs, table(bs, ar=1.0, parallel=1.875 / 1.105, sequential=9.0))
  assert close == (planner.AR, planner.PARALLEL)  # ar within planner.KEEP: both can win steps
  # A self-measured table skips widths that cannot pay: a fixed mode then plans without it.
  partial = table(bs, ar=1.0, parallel=[3.0, INF, INF], sequential=4.0)
  par, seq = flex.FlexConfig(mode="parallel"), flex.FlexConfig(mode="sequential")
  assert flex.table_for_mode(par, bs, partial) is None
  assert flex.table_for_mode(seq, bs, partial) is partial
  assert flex.table_for_mode(f, bs, partial) is partial


# ----------------------------------------------------------------------------
# 5. Bad input
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.0, -0.5, 1.5])
def test_threshold_outside_unit_interval(t):
  with pytest.raises(ValueError, match=f"verify_threshold.*{t}"):
    flex.FlexConfig(verify_threshold=t)


def test_draft_params_must_match_config(bigram):
  cfg, params = bigram
  fcfg = flex.FlexConfig(max_new_tokens=4)
  for dcfg, match in ((dataclasses.replace(DCFG, num_draft_layers=2), "draft layers"),
                      (dataclasses.replace(DCFG, calib_rank=16), "calibration rank"),
                      (dataclasses.replace(DCFG, calib_target="hidden"), "calibrate the logits")):
    with pytest.raises(ValueError, match=match):
      run_flex(cfg, params, [[1, 2]], fcfg, dcfg=dcfg)


def test_prompt_longer_than_cache(bigram):
  cfg, params = bigram
  fcfg = flex.FlexConfig(max_new_tokens=4)
  prompt_BP, lens = generate_lib.pad_prompts([[1] * 40], BUCKET)
  cache = model_lib.KVCache.zeros(cfg, 1, 40)
  with pytest.raises(ValueError, match="capacity 40 is below the padded prompt width 48"):
    flex.flex_generate(params, cache, prompt_BP, lens, generate_lib.stop_matrix([-1], 1),
                       jax.random.key(0), cfg=cfg, dcfg=DCFG, fcfg=fcfg)


def test_expected_throughput_needs_costs(bigram):
  cfg, params = bigram
  fcfg = flex.FlexConfig(verify_strategy="expected_throughput", max_new_tokens=4)
  with pytest.raises(ValueError, match="cost table"):
    run_flex(cfg, params, [[1, 2]], fcfg)


# ----------------------------------------------------------------------------
# SmolLM2 with real prompts (random drafter: tau ~ 1, losslessness is the point)
# ----------------------------------------------------------------------------
SMOL_DCFG = drafter.DrafterConfig(num_draft_layers=4, block_size=4, calib_rank=16)
SMOL_NEW = 24


@pytest.fixture(scope="module")
def smol(smollm2, mtbench_prompt_ids):
  """Stacked layers (scan): compile time flat in depth, which dominates here."""
  cfg, target = smollm2
  draft = drafter.init_draft(cfg, SMOL_DCFG, target, jax.random.key(0))
  params = decoding(target, draft, unroll=False)
  prompts = mtbench_prompt_ids[:4]
  ar = run_ar(cfg, params["target"], prompts, SMOL_NEW, stops=(SMOLLM2_EOS,), bucket=128)
  return cfg, params, prompts, ar


@pytest.mark.parametrize("favoured", ["parallel", "sequential"])
def test_smollm2_greedy_lossless(smol, favoured):
  """Batch 4, 'flex' steered by the (traced) cost table: one program, both modes."""
  cfg, params, prompts, ar = smol
  fcfg = flex.FlexConfig(mode="flex", verify_strategy="full", max_new_tokens=SMOL_NEW)
  # (parallel, sequential) ms: a sequential step also commits its free token (planner.FREE)
  cost = (1.0, 3.0) if favoured == "parallel" else (2.0, 1.0)
  costs = table(SMOL_DCFG.block_size, ar=9.0, pld=9.0, parallel=cost[0], sequential=cost[1])
  got, summary = run_flex(cfg, params, prompts, fcfg, (SMOLLM2_EOS,), dcfg=SMOL_DCFG, bucket=128,
                          costs=costs)
  near_ties(cfg, params["target"], prompts, ar, got)
  print(f"SmolLM2, random drafter, {favoured}: {summary}")
  assert summary["modes"][favoured] == summary["steps"]
  low = 1.0 if favoured == "parallel" else 1.9  # sequential: bonus + free token, bar cuts
  assert low <= summary["tau"] < low + 0.5


# ----------------------------------------------------------------------------
# SmolLM2 with the shipped (trained) drafter: real acceptance, 20 real prompts
# ----------------------------------------------------------------------------
TRAINED_PROMPTS, TRAINED_NEW, TRAINED_BATCH = 20, 24, 10


@pytest.fixture(scope="module")
def trained(smollm2, smollm2_tokenizer):
  """(cfg, dcfg, params, prompts, AR output, per-row stops): the shipped drafter on
  SmolLM2 (scanned layers) and the first 20 MT-Bench questions."""
  from flexdraft_jax import checkpoint, prompts as prompts_lib, resources, tokenizer
  cfg, target = smollm2
  cfg_dict = dataclasses.asdict(cfg)
  meta, draft = checkpoint.load_drafter(resources.shipped_drafter_path(), cfg_dict,
                                        checkpoint.target_fingerprint(cfg_dict, target),
                                        dtype=cfg.param_dtype)
  dcfg = drafter.DrafterConfig(**meta)
  params = decoding(target, draft, unroll=False)
  prompts = [tokenizer.chat_prompt_ids(smollm2_tokenizer, q)
             for q in prompts_lib.mtbench(TRAINED_PROMPTS)]
  ar = run_ar(cfg, params["target"], prompts, TRAINED_NEW, stops=(SMOLLM2_EOS,), bucket=256)
  # Odd rows also stop at a token they first emit mid-run, so stops land inside blocks.
  stops = []
  for i, row in enumerate(ar):
    firsts = [t for j, t in enumerate(row) if row.index(t) == j and 4 <= j < TRAINED_NEW - 4]
    stops.append((SMOLLM2_EOS,) + ((firsts[len(firsts) // 2],) if i % 2 and firsts else ()))
  return cfg, dcfg, params, prompts, ar, stops


def test_trained_drafter_greedy_lossless(trained):
  """Batches of 10, 'flex' carrying all four kinds, with a table where parallel up to
  width 4 costs a little more than ar: the planner switches between them as the drafts'
  confidence goes, drafts are really accepted, tokens equal AR's (after a chunked prefill)."""
  cfg, dcfg, params, prompts, ar, stops = trained
  n = len(flex.verify_buckets(dcfg.block_size))
  costs = table(dcfg.block_size, ar=1.0, pld=9.0, parallel=[1.2, 1.3, 1.4] + [9.0] * (n - 3),
                sequential=[3.5] * n)  # dear: its free token makes 2+ tokens a step
  # Prompts go in chunks of 96 (it does not divide the padded 256): the AR reference
  # prefilled each batch in one pass.
  fcfg = flex.FlexConfig(mode="flex", max_new_tokens=TRAINED_NEW, prefill_chunk=96)
  got, modes, committed, row_steps = [], dict.fromkeys(planner.KINDS, 0), 0, 0
  for i in range(0, TRAINED_PROMPTS, TRAINED_BATCH):
    rows = slice(i, i + TRAINED_BATCH)
    stop_ids = [list(s) + [-1] * (2 - len(s)) for s in stops[rows]]
    prompt_BP, lens = generate_lib.pad_prompts(prompts[rows], 256)
    cache = model_lib.KVCache.zeros(cfg, TRAINED_BATCH, capacity(256, fcfg, dcfg))
    tokens, num_new, st, _ = flex.flex_generate(
        params, cache, prompt_BP, lens, np.asarray(stop_ids, np.int32), jax.random.key(0), costs,
        cfg=cfg, dcfg=dcfg, fcfg=fcfg, kinds=tuple(range(len(planner.KINDS))))
    got += [np.asarray(tokens)[b, :n_].tolist() for b, n_ in enumerate(np.asarray(num_new))]
    summary = flex_stats.summarize(st)
    modes = {k: modes[k] + summary["modes"][k] for k in modes}
    committed += summary["new_tokens"]
    row_steps += int(np.asarray(st.row_steps).sum())
  want = [next((r[:j + 1] for j, t in enumerate(r) if t in s), r) for r, s in zip(ar, stops)]
  assert sum(len(w) < TRAINED_NEW for w in want) >= 5, "want rows that stop mid-run"
  near_ties(cfg, params["target"], prompts, want, got)
  assert sum(n > 0 for n in modes.values()) >= 2, modes
  assert committed / row_steps > 1.2  # drafts are accepted (ar steps commit exactly one)


# ----------------------------------------------------------------------------
# 5. A draft vocabulary (drafter.restrict_vocab) keeps decoding lossless
# ----------------------------------------------------------------------------
def with_vocab(cfg, target, draft, ids, unroll=None):
  """`decoding`, with drafts drawn from the tokens `ids` only."""
  return decoding(target, drafter.restrict_vocab(draft, target, cfg, np.asarray(ids)), unroll)


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # untied and tied heads
def test_draft_vocabulary_is_lossless(greedy_setup, tiny_model, family):
  """Drafts from 40 of the 101 tokens: AR's tokens in parallel and sequential mode. A
  vocabulary that holds none of the tokens AR emits accepts no draft (tau 1)."""
  cfg, params, prompts, ar, stops = greedy_setup[family]
  target = tiny_model(family)[1]
  draft = noisy_drafter(cfg, DCFG, target, seed=3)
  emitted = sorted({t for row in ar for t in row})
  rng = np.random.RandomState(5)
  half = np.sort(rng.choice(cfg.vocab_size, 40, replace=False))
  want = [r[:r.index(s[0]) + 1] if s[0] in r else r for r, s in zip(ar, stops)]
  for mode in ("parallel", "sequential"):
    got, summary = run_flex(cfg, with_vocab(cfg, target, draft, half), prompts,
                            case_config(mode, "full"), stops)
    near_ties(cfg, params["target"], prompts, want, got)
    assert summary["modes"][mode] == summary["steps"]
  missing = [t for t in range(cfg.vocab_size) if t not in emitted][:8]
  assert missing, "AR emits every token"
  got, summary = run_flex(cfg, with_vocab(cfg, target, draft, missing), prompts[:1],
                          case_config("parallel", "full"), stops[:1])
  near_ties(cfg, params["target"], prompts[:1], want[:1], got)
  assert summary["tau"] == 1.0


def test_speculative_sampling_law_switching_kinds_draft_vocabulary(small):
  """T=1 with the 'mixed' table, so that steps switch kinds, and drafts from 6 of the 12
  tokens (q zero elsewhere): the target's law holds, the other tokens included (they come
  from the residual). (One run for both: each costs a compile and 20480 samples.)"""
  cfg, target, _ = small
  draft = noisy_drafter(SMALL, SAMPLE_DCFG, target, seed=4, noise=1.0)
  params = with_vocab(cfg, target, draft, [0, 2, 3, 5, 8, 11])
  fcfg = flex.FlexConfig(mode="flex", verify_strategy="expected_throughput", max_new_tokens=3,
                         sampling=T1)
  counts, st = sample_counts(cfg, params, fcfg, COSTS["mixed"])
  assert min(pair_pvalues(counts, exact_law(cfg, target, T1))) > 1e-4
  assert sum(n > 0 for n in st.modes) >= 3, st.modes
  assert st.modes[planner.PARALLEL] and st.modes[planner.SEQUENTIAL], st.modes

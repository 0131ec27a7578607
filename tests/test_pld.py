"""Prompt lookup decoding (flex mode 'pld'): the lookup, lossless greedy, accepted drafts."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexdraft_jax import flex
from flexdraft_jax import speculation
from test_flex import DCFG, decoding, near_ties, noisy_drafter, run_ar, run_flex

M = 24


@pytest.fixture(autouse=True, scope="module")
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def test_lookup_drafts():
  hist = jnp.array([[5, 6, 7, 8, 9, 5, 6, 7, 0, 0],    # 3-gram 5 6 7 -> 8 9 5 6 7 (cut at length)
                    [1, 2, 3, 4, 2, 3, 1, 2, 0, 0],    # 3-gram 3 1 2 absent, 2-gram 1 2 -> 3 4 2
                    [1, 2, 3, 4, 5, 6, 7, 8, 0, 0]])   # no match
  drafts, conf = speculation.lookup_drafts(hist, jnp.array([8, 8, 8]), 6)
  np.testing.assert_array_equal(conf, [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0] * 6])
  np.testing.assert_array_equal(drafts[0, :5], [8, 9, 5, 6, 7])
  np.testing.assert_array_equal(drafts[1], [3, 4, 2, 3, 1, 2])


@pytest.mark.parametrize("strategy,batch", [("cumulative_product", 4), ("full", 1)])
def test_pld_greedy_lossless(tiny_model, strategy, batch):
  cfg, target = tiny_model("llama")
  params = decoding(target, noisy_drafter(cfg, DCFG, target, seed=3))
  rng = np.random.RandomState(5)
  prompts = [rng.randint(0, cfg.vocab_size, n).tolist() for n in (7, 2, 12, 4)][:batch]
  want = run_ar(cfg, params["target"], prompts, M)
  fcfg = flex.FlexConfig(mode="pld", verify_strategy=strategy, max_new_tokens=M)
  got, summary = run_flex(cfg, {"target": params["target"], "draft": None}, prompts, fcfg)
  near_ties(cfg, params["target"], prompts, want, got)
  modes = summary["modes"]  # a width-1 lookup step is a target pass over the bonus: ar
  assert modes["parallel"] == modes["sequential"] == 0
  assert modes["ar"] + modes["pld"] == summary["steps"] and modes["pld"] > 0
  assert strategy != "full" or modes["pld"] == summary["steps"]
  assert summary["forward_passes"] == summary["steps"] + 1


def test_pld_accepts_on_repetitive_prompt(tiny_model):
  """A prompt that repeats, whose AR continuation repeats it too: pld commits > 1 token a step."""
  cfg, target = tiny_model("llama")
  params = decoding(target, noisy_drafter(cfg, DCFG, target, seed=3))
  rng = np.random.RandomState(0)
  prompts = [rng.randint(0, cfg.vocab_size, 6).tolist() * 4 for _ in range(2)]
  want = run_ar(cfg, params["target"], prompts, M)
  got, summary = run_flex(cfg, params, prompts, flex.FlexConfig(mode="pld", max_new_tokens=M))
  near_ties(cfg, params["target"], prompts, want, got)
  assert summary["tau"] > 1.2 and summary["accept_hist"][1:] != [0] * (len(summary["accept_hist"]) - 1)
  assert summary["steps"] < M

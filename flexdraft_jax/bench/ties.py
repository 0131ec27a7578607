"""The lossless check: a mode's rows against AR's, near ties apart; one JSON row."""
from __future__ import annotations

import functools
from typing import Any

from absl import logging
import jax
import numpy as np

from flexdraft_jax import model as model_lib
from flexdraft_jax.bench.hf_reference import compared_length, same_tokens
from flexdraft_jax.bench.workload import PROMPT_BUCKET, ModeResult, Workload

# A greedy divergence from AR is a near tie, not a loss of exactness, when AR's
# logits there put the two tokens within this margin, relative to the top logit:
# a k-token pass and a one-token step sum in another order, and bf16 rounds each
# layer's output to 8 mantissa bits (2^-8 = 0.4%), so its ties are wider.
TIE_EPS = {"float32": 1e-4, "bfloat16": 2e-2}


@functools.partial(jax.jit, static_argnames="cfg")
def _logits_at(params, tokens_1T, n, *, cfg):
  """The target's logits at position n - 1 of tokens_1T (right padding is causal-masked)."""
  return model_lib.forward(params, cfg, tokens_1T)[0][0, n - 1]


def check_ties(work: Workload, prompts: list[list[int]], ar_rows: list[list[int]],
               rows: list[list[int]]) -> tuple[int, int]:
  """(near ties, real divergences) over rows that differ from AR's greedy tokens.

  At each row's first differing token j, AR's logits after prompt + ar[:j] are
  recomputed; the row is a near tie if logit[ar_j] - logit[ours_j] is within
  TIE_EPS[dtype] of |top logit| (or 1), else a real divergence.
  """
  eps, ties, real = TIE_EPS.get(work.cfg.dtype, 1e-4), 0, 0
  for prompt, want, got in zip(prompts, ar_rows, rows):
    j = next((i for i, (w, g) in enumerate(zip(want, got)) if w != g), None)
    if j is None:
      real += len(want) != len(got) and not work.ignore_eos  # a stop seen by one side only
      continue
    seq = prompt + want[:j]
    padded = np.zeros((1, -(-len(seq) // PROMPT_BUCKET) * PROMPT_BUCKET), np.int32)
    padded[0, :len(seq)] = seq
    logits = np.asarray(_logits_at(work.params, padded, len(seq), cfg=work.cfg), np.float32)
    margin = (logits[want[j]] - logits[got[j]]) / max(abs(float(logits.max())), 1.0)
    if margin <= eps:
      ties += 1
    else:
      real += 1
      logging.warning("row diverges from AR at token %d with relative margin %.2e > %.0e", j,
                      margin, eps)
  return ties, real


def make_row(mode: str, b: int, ours: ModeResult, hf: ModeResult | None,
             work: Workload, ar: ModeResult, prompts: list[list[int]] | None = None) -> dict[str, Any]:
  """One JSON row; unless it reproduces AR's greedy tokens up to near ties
  (`lossless` false), the speed columns are null."""
  rows, ar_rows = [t for g in ours.groups for t in g.tokens], [t for g in ar.groups for t in g.tokens]
  ties, real = (0, 0) if rows == ar_rows else check_ties(work, prompts, ar_rows, rows)
  lossless = real == 0
  row = {"mode": mode, "batch_size": b, "lossless": lossless, "exact_rows":
         sum(r == a for r, a in zip(rows, ar_rows)), "near_tie_rows": ties,
         "tokens_per_s": ours.tokens_per_s,
         "speedup_vs_ar": ar.wall_s / ours.wall_s if ours.wall_s else None,
         "tau": None, "forward_passes": None, "mean_verify_len": None, "mode_histogram": None,
         "ms_per_step": ours.ms_per_step, "compile_s": ours.compile_s,
         "new_tokens": ours.new_tokens, "steps": ours.steps, "wall_s": ours.wall_s,
         "groups": len(ours.groups), "hf_tokens_per_s": None, "hf_ms_per_step": None,
         "hf_new_tokens": None, "ratio_vs_hf": None, "matches_hf": None, "matches_hf_of": None,
         "matches_hf_tokens": None}
  row.update(ours.extra)
  if hf is not None:
    ours_rows = [t for g in ours.groups for t in g.tokens]
    hf_rows = [t for g in hf.groups for t in g.tokens]
    row.update(hf_tokens_per_s=hf.tokens_per_s, hf_ms_per_step=hf.ms_per_step,
               hf_new_tokens=hf.new_tokens,
               ratio_vs_hf=ours.tokens_per_s / hf.tokens_per_s if hf.tokens_per_s else None,
               matches_hf=sum(same_tokens(o, h, work.eos_ids, work.ignore_eos)
                              for o, h in zip(ours_rows, hf_rows)),
               matches_hf_of=len(ours_rows),
               matches_hf_tokens=sum(compared_length(o, h, work.eos_ids, work.ignore_eos)
                                     for o, h in zip(ours_rows, hf_rows)))
  if not lossless:
    logging.warning("%s at batch %d does not reproduce AR's greedy tokens beyond near ties: "
                    "no speed reported", mode, b)
    row.update(tokens_per_s=None, speedup_vs_ar=None, ms_per_step=None, wall_s=None,
               ratio_vs_hf=None)
  return row

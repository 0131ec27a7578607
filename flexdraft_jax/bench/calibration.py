"""The flex planner's cost table: step times per batch size, kind and verify width
(`cost_cache.measure_step_ms`), and the drafter's acceptance model
(`cost_cache.measure_acceptance`: greedy decoding of the prompts in pld,
parallel and sequential mode, full blocks verified)."""
from __future__ import annotations

import statistics
from typing import Sequence

from absl import logging
import numpy as np

from flexdraft_jax import cost_cache
from flexdraft_jax import planner
from flexdraft_jax.bench.workload import PROMPT_BUCKET, Workload


def calibrate(work: Workload, batch_sizes: Sequence[int]) -> tuple[dict[int, np.ndarray], dict]:
  """({batch: step_ms [kinds, widths]}, acceptance counts {tried, hit})."""
  params = {"target": work.params, "draft": work.draft}
  typical = round(statistics.mean(len(p) for p in work.prompt_ids) + work.max_new_tokens / 2)
  step_ms = {}
  for b in batch_sizes:
    step_ms[b] = cost_cache.measure_step_ms(params, work.cfg, work.dcfg, b, context=typical,
                                            progress=lambda m, b=b: logging.info(
                                                "calibrate: batch %d: %s", b, m))
  counts = cost_cache.measure_acceptance(
      params, work.cfg, work.dcfg, work.prompt_ids, batch=min(batch_sizes),
      max_new_tokens=work.max_new_tokens, stop_ids=work.stop_ids, bucket=PROMPT_BUCKET,
      log=lambda m: logging.info("calibrate: %s", m))
  model = planner.AcceptanceModel.fit(**counts)
  logging.info("calibrate: stationary acceptance by depth %s",
               {s: np.round(model.alpha_bar[i, :4], 3).tolist()
                for i, s in enumerate(planner.SOURCES)})
  return step_ms, counts

"""The timed decoding modes: our AR loop and `flex.flex_generate` in each mode.

A runner is a generator over the groups of one batch size: for each group it
compiles (once per shape) and warms up, yields a call that decodes the group
once, and gets back (that call's last output, its median wall time) from
`time_interleaved`, which times every mode's call of a group in the same
rounds. It returns the mode's `ModeResult`.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Generator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax import flex as flex_lib
from flexdraft_jax import flex_stats
from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import planner
from flexdraft_jax.bench.workload import (
    PROMPT_BUCKET, GroupRun, Groups, ModeResult, Runner, Workload)
from flexdraft_jax.sampling import SamplingConfig


def run_ar(work: Workload, groups: Groups) -> Generator:
  """Our jitted AR loop (`generate.generate`), one executable per (batch, width)."""
  m = work.max_new_tokens
  result = ModeResult(groups=[])
  compiled = {}  # (batch, width) -> [executable, cache]; the cache is donated and handed back
  for gi, group in enumerate(groups):
    prompt_bp, lens_b = generate_lib.pad_prompts(group, PROMPT_BUCKET, work.pad_id)
    b, width = prompt_bp.shape
    args = (jnp.asarray(prompt_bp), jnp.asarray(lens_b),
            jnp.asarray(generate_lib.stop_matrix(work.stop_ids, b)), jax.random.key(0))
    if (b, width) not in compiled:
      cache = model_lib.KVCache.zeros(work.cfg, b, width + m)
      start = time.perf_counter()
      exe = generate_lib.compile_generate(work.params, work.cfg, b, width, cache.capacity,
                                          len(work.stop_ids), max_new_tokens=m,
                                          sampling=SamplingConfig())
      took = time.perf_counter() - start
      result.compile_s += took
      start = time.perf_counter()
      cache = jax.block_until_ready(exe(work.params, cache, *args))[3]  # warm-up
      logging.info("ar: compiled batch=%d width=%d capacity=%d in %.1f s; warm-up %.2f s",
                   b, width, cache.capacity, took, time.perf_counter() - start)
      compiled[b, width] = [exe, cache]
    slot = compiled[b, width]

    def call(slot=slot, args=args):
      out = slot[0](work.params, slot[1], *args)
      slot[1] = out[3]
      return out

    (tokens, num_new, steps, _), wall = yield call
    tokens, num_new = np.asarray(tokens), np.asarray(num_new)
    run = GroupRun(tokens=[tokens[r, :num_new[r]].tolist() for r in range(b)],
                   new_tokens=int(num_new.sum()), steps=int(steps), wall_s=wall)
    result.groups.append(run)
    logging.info("ar: batch=%d group %d/%d: %d tokens, %d steps, %.2f s (%.1f tok/s)", b,
                 gi + 1, len(groups), run.new_tokens, run.steps, wall, run.new_tokens / wall)
  result.extra = dict(tau=1.0, forward_passes=result.steps + len(groups), mean_verify_len=None,
                      mode_histogram=None)
  return result


def run_flex(work: Workload, groups: Groups, *, mode: str, tree_nodes: int = 0) -> Generator:
  """`flex.flex_generate` in `mode` with `tree_nodes` (FlexConfig's), one executable per
  (batch, width); FlexStats summed."""
  m, bs = work.max_new_tokens, work.dcfg.block_size
  fcfg = flex_lib.FlexConfig(mode=mode, verify_strategy=work.verify_strategy, max_new_tokens=m,
                             tree_nodes=tree_nodes)
  nodes, branch = flex_lib.tree_shape(fcfg, bs)
  params = {"target": work.params, "draft": work.draft}
  result, compiled, stats = ModeResult(groups=[]), {}, []
  costs = flex_lib.table_for_mode(fcfg, bs, work.cost_table(len(groups[0])))
  if mode == "flex" and costs is None:
    logging.warning("flex: no cost table for batch size %d; falling back to the active-row "
                    "threshold", len(groups[0]))
  kinds = flex_lib.compiled_kinds(fcfg, len(groups[0]), bs, costs)
  for group in groups:
    prompt_bp, lens_b = generate_lib.pad_prompts(group, PROMPT_BUCKET, work.pad_id)
    b, width = prompt_bp.shape
    args = (jnp.asarray(prompt_bp), jnp.asarray(lens_b),
            jnp.asarray(generate_lib.stop_matrix(work.stop_ids, b)), jax.random.key(0), costs)
    if (b, width) not in compiled:  # [executable, cache]: the cache is donated and handed back
      start = time.perf_counter()
      exe = flex_lib.compile_flex(params, work.cfg, work.dcfg, b, width, width + m + 2 * bs,
                                  len(work.stop_ids), fcfg=fcfg, costs=costs, kinds=kinds)
      result.compile_s += time.perf_counter() - start
      cache = model_lib.KVCache.zeros(work.cfg, b, width + m + 2 * bs)
      compiled[b, width] = [exe, jax.block_until_ready(exe(params, cache, *args))[3]]  # warm-up
    slot = compiled[b, width]

    def call(slot=slot, args=args):
      out = slot[0](params, slot[1], *args)
      slot[1] = out[3]
      return out

    (tokens, num_new, st, _), wall = yield call
    tokens, num_new, st = np.asarray(tokens), np.asarray(num_new), jax.device_get(st)
    stats.append(st)
    result.groups.append(GroupRun(tokens=[tokens[r, :num_new[r]].tolist() for r in range(b)],
                                  new_tokens=int(num_new.sum()), steps=int(st.steps), wall_s=wall))
    logging.info("%s: batch=%d: %d tokens, %d steps, %.2f s", mode, b, int(num_new.sum()),
                 int(st.steps), wall)
  total = lambda f: sum(np.asarray(getattr(st, f)) for st in stats)
  hist = total("verify_hist")
  summary = flex_stats.summarize(jax.tree.map(lambda *a: sum(a), *stats))
  result.extra = dict(
      tau=float(total("committed").sum() / max(total("row_steps").sum(), 1)),
      forward_passes=int(total("forward_passes")),
      mean_verify_len=(float(np.dot(hist, flex_lib.verify_buckets(bs)) / hist.sum())
                       if hist.sum() else None),
      mode_histogram=summary["modes"], cost_table=costs is not None,
      tree_nodes=nodes if branch > 1 else 1,
      compiled_kinds=[planner.KINDS[k] for k in kinds],
      # The acceptance model against what happened: accepted drafts expected / observed - 1.
      predicted_accepted=summary["predicted_accepted"],
      observed_accepted=summary["observed_accepted"],
      calibration_error=summary["calibration_error"])
  return result


def time_interleaved(runs: dict[str, Generator], repeats: int) -> dict[str, ModeResult]:
  """Drives the runners group by group. Each round calls every mode's call of the group
  once, mode after mode (in reverse order every other round, so that a steady drift of
  the machine's speed evens out over two rounds), so that all modes are measured side by
  side (their ratios come from one run); each runner gets back the last output and the
  median over `repeats` rounds. Returns each mode's ModeResult."""
  results, calls = {}, {}

  def advance(mode, value=None):
    try:
      calls[mode] = runs[mode].send(value)
    except StopIteration as stop:
      calls.pop(mode, None)
      results[mode] = stop.value

  for mode in runs:
    advance(mode)
  while calls:
    walls, outs = {m: [] for m in calls}, {}
    for r in range(repeats):
      for mode, call in (list(calls.items()) if r % 2 == 0 else reversed(calls.items())):
        start = time.perf_counter()
        outs[mode] = jax.block_until_ready(call())
        walls[mode].append(time.perf_counter() - start)
    for mode in list(calls):
      advance(mode, (outs[mode], statistics.median(walls[mode])))
  return results


# Mode name -> runner.
MODES: dict[str, Runner] = {"ar": run_ar, **{
    m: functools.partial(run_flex, mode=m) for m in ("parallel", "sequential", "flex", "pld")}}
DRAFTED = ("parallel", "sequential", "flex")  # the modes that need a drafter


def split_mode(name: str) -> tuple[str, int]:
  """'parallel@1' -> ('parallel', 1): a drafted mode with its --tree_nodes (1: chains, N:
  at most N nodes, auto); a bare name -> (name, 0), auto. ValueError for a bad node count
  or a tree on a mode without drafts."""
  base, _, nodes = name.partition("@")
  n = flex_lib.parse_tree_nodes(nodes) if nodes else 0
  if nodes and base not in DRAFTED:
    raise ValueError(f"mode {name!r}: token trees (@N) need one of {', '.join(DRAFTED)}")
  return base, n


def runner(name: str) -> Runner:
  """The runner of a --modes entry (`split_mode`)."""
  base, nodes = split_mode(name)
  return functools.partial(MODES[base], tree_nodes=nodes) if nodes else MODES[base]

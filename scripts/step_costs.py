"""One flex step's cost per kind, verify width and parallel pass, interleaved in one run.

  python scripts/step_costs.py --batch_size=1 --out=bench_out/step_costs_b1.json

Loads SmolLM2-135M-Instruct with the shipped drafter (or --drafter), fills a
cache with --context random prompt tokens, and times `flex_timing.timed_step` (one
loop step rewound to the prompt, as the planner's cost tables do) for ar,
sequential and parallel with both `FlexConfig.parallel_pass` values (--passes), for
each draft vocabulary size in --draft_vocabs. Each round
times every program once (median of --calls calls), so that load drift hits
all of them alike; the JSON keeps every round and the medians, and each
program's ratio to the ar step of its round.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

from absl import app, flags
import jax
import numpy as np

from flexdraft_jax import cpu_matmul
from flexdraft_jax import engine as engine_lib
from flexdraft_jax import flex as flex_lib
from flexdraft_jax import flex_timing
from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import planner
from flexdraft_jax import resources

_DRAFTER = flags.DEFINE_string("drafter", "drafters/smollm2-135m-instruct", "exported drafter")
_BATCH = flags.DEFINE_integer("batch_size", 1, "rows")
_CONTEXT = flags.DEFINE_integer("context", 128, "cached prompt tokens per row")
_WIDTHS = flags.DEFINE_list("widths", ["1", "2", "4", "8", "16"], "parallel verify widths")
_PASSES = flags.DEFINE_list("passes", ["single", "split"], "parallel passes to time")
_VOCABS = flags.DEFINE_list("draft_vocabs", ["0"], "draft vocabulary sizes to time (0: all "
                            "tokens; drafter.restrict_vocab, with the drafter's token counts)")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "interleaved rounds")
_CALLS = flags.DEFINE_integer("calls", 5, "timed calls per program and round (median kept)")
_OUT = flags.DEFINE_string("out", "bench_out/step_costs.json", "JSON output")


def main(argv):
  del argv
  vocabs = [int(v) for v in _VOCABS.value]
  engines = {v: engine_lib.Engine(resources.SMOLLM2_NAME, drafter=_DRAFTER.value, costs="none",
                                  draft_vocab=v) for v in vocabs}
  eng = engines[vocabs[0]]
  cfg, dcfg, b, ctx = eng.cfg, eng.dcfg, _BATCH.value, _CONTEXT.value
  drafts = {v: e.draft for v, e in engines.items()}
  params = {"target": eng.params, "draft": drafts[vocabs[0]]}
  prompt = np.random.RandomState(0).randint(0, cfg.vocab_size, (b, ctx)).astype(np.int32)
  lens, stops = np.full((b,), ctx, np.int32), generate_lib.stop_matrix([-1], b)
  fcfgs = {p: flex_lib.FlexConfig(mode="flex", max_new_tokens=2 * dcfg.block_size,
                                  parallel_pass=p) for p in ("single", "split")}
  capacity = -(-(ctx + 4 * dcfg.block_size) // 128) * 128
  state = flex_timing.prefill_state(params, model_lib.KVCache.zeros(cfg, b, capacity), prompt,
                                    lens, stops, jax.random.key(0), cfg=cfg, dcfg=dcfg,
                                    fcfg=fcfgs["single"], kinds=tuple(range(len(planner.KINDS))))
  # The state's candidates hold token ids, whatever the draft vocabulary: one state serves all.
  programs = [("ar", planner.AR, 1, "single", vocabs[0])]
  for v in vocabs:
    programs += [("sequential", planner.SEQUENTIAL, 1, "single", v)]
    programs += [("parallel", planner.PARALLEL, int(w), p, v) for w in _WIDTHS.value
                 for p in _PASSES.value]

  def timed(kind, width, how, vocab):
    nonlocal state
    times = []
    both = {"target": eng.params, "draft": drafts[vocab]}
    for i in range(_CALLS.value + 1):  # the first call compiles / warms up
      start = time.perf_counter()
      state = jax.block_until_ready(flex_timing.timed_step(
          both, state, prompt, lens, stops, cfg=cfg, dcfg=dcfg, fcfg=fcfgs[how], kind=kind,
          width=width))
      if i:
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)

  rounds = []
  for r in range(_ROUNDS.value):
    ms = {f"{n} w{w} {p}" + (f" v{v}" if len(vocabs) > 1 and n != "ar" else ""):
          timed(k, w, p, v) for n, k, w, p, v in programs}
    rounds.append(ms)
    print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()), file=sys.stderr)
  names = list(rounds[0])
  header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_model": platform.processor(), "load_avg_end": list(os.getloadavg()),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "matmul": cpu_matmul.status()[1], "batch_size": b, "context": ctx,
            "drafter": _DRAFTER.value, "draft_vocabs": vocabs,
            "command": " ".join(sys.orig_argv)}
  out = {"header": header,
         "rounds_ms": rounds,
         "median_ms": {n: statistics.median(r[n] for r in rounds) for n in names},
         "median_ratio_to_ar": {n: statistics.median(r[n] / r["ar w1 single"] for r in rounds)
                                for n in names}}
  path = pathlib.Path(_OUT.value)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=2) + "\n")
  for n in names:
    print(f"{n:24s} {out['median_ms'][n]:8.1f} ms  {out['median_ratio_to_ar'][n]:5.2f}x ar")
  print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)

"""What carrying the pld branch costs the flex loop, and what flex gains with it, at batch 1.

  python scripts/branch_cost.py [NUM_PROMPTS]   # default 8 MT-Bench prompts, 64 new tokens

Three programs of `flex.compile_flex` on SmolLM2 with the shipped drafter, timed in 3
interleaved rounds over the same prompts (one batch-1 call per prompt):
  ar             kinds (ar,): the plain AR loop;
  ar+pld never   kinds (ar, pld) with a table that prices pld out: the flex loop
                 carrying the pld branch but taking ar steps only;
  ar+pld table   kinds (ar, pld) with this machine's measured table (`cost_cache`).
Prints the summed wall time per round and ar's time over each program's (medians),
and whether all three decoded the same tokens. Measured 2026-12-04: planner.MARGIN.
"""
import statistics
import sys
import time

import jax
import numpy as np

from flexdraft_jax import engine as engine_lib
from flexdraft_jax import flex as flex_lib
from flexdraft_jax import flex_stats
from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import planner
from flexdraft_jax import prompts as prompts_lib
from flexdraft_jax import resources

M = 64


def main(n: int) -> None:
  eng = engine_lib.Engine(resources.SMOLLM2_NAME, drafter="drafters/smollm2-135m-instruct")
  table = eng.cost_table(1)
  print("rates (tokens/ms):", dict(zip(planner.KINDS, planner.stationary_rates(
      table, flex_lib.verify_buckets(eng.dcfg.block_size)).round(4))))
  never = planner.CostTable.make(np.where(np.arange(len(planner.KINDS))[:, None] == planner.PLD,
                                          1e9, np.asarray(table.step_ms)), table.acceptance)
  params = {"target": eng.params, "draft": eng.draft}
  fcfg = flex_lib.FlexConfig(mode="flex", max_new_tokens=M)
  progs = {"ar": ((planner.AR,), None), "ar+pld never": ((planner.AR, planner.PLD), never),
           "ar+pld table": ((planner.AR, planner.PLD), table)}
  runs = []
  for ids in (eng.encode(p) for p in prompts_lib.load_prompt_set("mtbench", n)):
    prompt, lens = generate_lib.pad_prompts([ids], 64)
    cap = -(-(prompt.shape[1] + M + 2 * eng.dcfg.block_size) // 128) * 128
    exes = {name: flex_lib.compile_flex(params, eng.cfg, eng.dcfg, 1, prompt.shape[1], cap, 1,
                                        fcfg=fcfg, costs=t, kinds=k)
            for name, (k, t) in progs.items()}
    runs.append((prompt, lens, cap, generate_lib.stop_matrix([-1], 1), exes))
  walls, tokens, kinds = {name: [] for name in progs}, {}, {}
  for _ in range(3):
    for name, (_, t) in progs.items():
      total, toks, hist = 0.0, [], {}
      for prompt, lens, cap, stops, exes in runs:
        cache = jax.block_until_ready(model_lib.KVCache.zeros(eng.cfg, 1, cap))
        start = time.perf_counter()
        out = jax.block_until_ready(exes[name](params, cache, prompt, lens, stops,
                                               jax.random.key(0), t))
        total += time.perf_counter() - start
        toks.append(np.asarray(out[0])[0].tolist())
        for k, v in flex_stats.summarize(jax.device_get(out[2]))["modes"].items():
          hist[k] = hist.get(k, 0) + v
      walls[name].append(total)
      tokens[name], kinds[name] = toks, hist
  base = statistics.median(walls["ar"])
  for name, w in walls.items():
    print(f"{name:14s} rounds {[round(x, 2) for x in w]} s, median {statistics.median(w):.2f} s, "
          f"ar / this {base / statistics.median(w):.3f}, steps {kinds[name]}")
  print("identical tokens:", tokens["ar"] == tokens["ar+pld never"] == tokens["ar+pld table"])


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)

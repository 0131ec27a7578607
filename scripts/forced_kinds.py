"""The flex loop with forced kind sets against the AR loop, with this machine's cost table.

  python scripts/forced_kinds.py [NUM_PROMPTS] [BATCH]   # default 8 MT-Bench prompts, batch 1

Programs of `flex.compile_flex` on SmolLM2 with the shipped drafter (and its default
draft vocabulary), 64 new tokens, timed in 3 interleaved rounds (every other round in
reverse order) over the same prompts:
  ar            kinds (ar,): the plain AR loop;
  ar+par        kinds (ar, parallel), planned per step with the measured table;
  ar+pld+par    kinds (ar, pld, parallel), the same;
  all4          all four kinds, the same;
  par           kinds (parallel,) alone, widths by the table-less rule.
Prints each program's median summed wall time, ar's over it, whether its tokens equal
ar's, the steps by kind and tau: whether a kind the planner leaves out would have paid.
"""
import statistics
import sys
import time

import jax
import numpy as np

from flexdraft_jax import engine as engine_lib
from flexdraft_jax import flex as flex_lib
from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import planner
from flexdraft_jax import prompts as prompts_lib
from flexdraft_jax import resources

M = 64


def main(n: int, batch: int) -> None:
  eng = engine_lib.Engine(resources.SMOLLM2_NAME, drafter="drafters/smollm2-135m-instruct")
  table = eng.cost_table(batch)
  bs = eng.dcfg.block_size
  print("step ms [kind, width]:", np.asarray(table.step_ms).round(1).tolist())
  print("rates (tokens/ms):", dict(zip(planner.KINDS, planner.stationary_rates(
      table, flex_lib.verify_buckets(bs)).round(4))))
  params = {"target": eng.params, "draft": eng.draft}
  fcfg = flex_lib.FlexConfig(mode="flex", max_new_tokens=M)
  a, l, p, s = planner.AR, planner.PLD, planner.PARALLEL, planner.SEQUENTIAL
  progs = {"ar": ((a,), None), "ar+par": ((a, p), table), "ar+pld+par": ((a, l, p), table),
           "all4": ((a, l, p, s), table), "par": ((p,), None)}
  texts = prompts_lib.load_prompt_set("mtbench", n)
  runs = []
  for i in range(0, n, batch):
    prompt, lens = generate_lib.pad_prompts([eng.encode(t) for t in texts[i:i + batch]], 64)
    cap = -(-(prompt.shape[1] + M + 2 * bs) // 128) * 128
    exes = {name: flex_lib.compile_flex(params, eng.cfg, eng.dcfg, batch, prompt.shape[1], cap, 1,
                                        fcfg=fcfg, costs=t, kinds=k)
            for name, (k, t) in progs.items()}
    runs.append((prompt, lens, cap, generate_lib.stop_matrix([-1], batch), exes))
  walls, tokens, kinds, tau = {name: [] for name in progs}, {}, {}, {}
  for r in range(3):
    for name in (list(progs) if r % 2 == 0 else list(progs)[::-1]):
      total, toks, hist, steps, new = 0.0, [], np.zeros(len(planner.KINDS), int), 0, 0
      for prompt, lens, cap, stops, exes in runs:
        cache = jax.block_until_ready(model_lib.KVCache.zeros(eng.cfg, batch, cap))
        start = time.perf_counter()
        out = jax.block_until_ready(exes[name](params, cache, prompt, lens, stops,
                                               jax.random.key(0), progs[name][1]))
        total += time.perf_counter() - start
        toks.append(np.asarray(out[0]).tolist())
        hist += np.asarray(out[2].modes)
        steps += int(np.sum(out[2].row_steps))
        new += int(np.sum(out[1]))
      walls[name].append(total)
      tokens[name], kinds[name], tau[name] = toks, hist.tolist(), new / max(steps, 1)
  ar = statistics.median(walls["ar"])
  for name in progs:
    wall = statistics.median(walls[name])
    print(f"{name:12s} {wall:7.2f} s  ar/this {ar / wall:.3f}  same tokens as ar: "
          f"{tokens[name] == tokens['ar']}  steps by kind {dict(zip(planner.KINDS, kinds[name]))}"
          f"  tau {tau[name]:.2f}")


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 8, int(sys.argv[2]) if len(sys.argv) > 2 else 1)

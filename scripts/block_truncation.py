"""Decode the shipped drafter with fewer mask slots per block than it was trained with.

  python scripts/block_truncation.py [NUM_PROMPTS]   # default 10; JSON to stdout's last line

MT-Bench prompts, batch 1, 64 new tokens, greedy; parallel and sequential mode
with blocks of 16 (as trained), 8 and 4 slots (the draft params do not depend
on the block size). Prints tau and tok/s per (mode, block). Measured
2026-12-04: docs/results/cpu/block_truncation_2026-12-04.json.
"""
import dataclasses
import json
import sys
import time

from flexdraft_jax import engine as engine_lib
from flexdraft_jax import flex as flex_lib
from flexdraft_jax import prompts as prompts_lib
from flexdraft_jax import resources


def main(n: int) -> None:
  eng = engine_lib.Engine(resources.SMOLLM2_NAME, drafter="drafters/smollm2-135m-instruct",
                          costs="none")
  ps, full, res = prompts_lib.load_prompt_set("mtbench", n), eng.dcfg, []
  for mode in ("parallel", "sequential"):
    for bs in (16, 8, 4):
      eng.dcfg = dataclasses.replace(full, block_size=bs)
      eng._compiled = {}  # pylint: disable=protected-access
      fc = flex_lib.FlexConfig(mode=mode, max_new_tokens=64)
      eng.generate(ps[:1], max_new_tokens=64, batch_size=1, flex=fc)  # compile
      start = time.perf_counter()
      _, st = eng.generate(ps, max_new_tokens=64, batch_size=1, flex=fc)
      res.append(dict(mode=mode, block=bs, tau=st.tau, tok_s=st.new_tokens / st.decode_s,
                      wall=time.perf_counter() - start))
      print(res[-1], flush=True)
  print(json.dumps(res))


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)

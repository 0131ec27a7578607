"""Where one decoding pass spends its time: a `jax.profiler` trace, summed per op.

  python scripts/op_profile.py T       # the target pass over T tokens (T = 1: an ar step's)
  python scripts/op_profile.py slot    # the split parallel step's slot pass (16 slots, K layers)

SmolLM2 f32 with the shipped drafter (default draft vocabulary) at batch 1 over 128
cached random tokens; 20 calls are traced after 5 warm-up calls, and the 25 largest
events (XLA ops, `ffi_call` = the CPU matmul kernel) are printed as ms per call.
"""
import collections
import gzip
import json
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax import drafter
from flexdraft_jax import engine as engine_lib
from flexdraft_jax import flex as flex_lib
from flexdraft_jax import flex_timing
from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import planner
from flexdraft_jax import resources

CALLS = 20


def main(which: str) -> None:
  eng = engine_lib.Engine(resources.SMOLLM2_NAME, drafter="drafters/smollm2-135m-instruct",
                          costs="none")
  cfg, dcfg, b, ctx = eng.cfg, eng.dcfg, 1, 128
  params = {"target": eng.params, "draft": eng.draft}
  prompt = np.random.RandomState(0).randint(0, cfg.vocab_size, (b, ctx)).astype(np.int32)
  lens, stops = np.full((b,), ctx, np.int32), generate_lib.stop_matrix([-1], b)
  state = flex_timing.prefill_state(params, model_lib.KVCache.zeros(cfg, b, 256), prompt, lens,
                                    stops, jax.random.key(0), cfg=cfg, dcfg=dcfg,
                                    fcfg=flex_lib.FlexConfig(max_new_tokens=32),
                                    kinds=tuple(range(len(planner.KINDS))))
  if which == "slot":
    fn = jax.jit(lambda p, c: drafter.slot_pass(p, cfg, dcfg, c.lengths[:, None] - 1, c))
    args = (params, state.cache)
  else:
    t = int(which)
    mask = jnp.broadcast_to(model_lib.causal_mask(t), (b, t, t))
    fn = jax.jit(lambda p, c, tok: model_lib.clean_pass(p["target"], cfg, tok,
                                                        model_lib.next_positions(c, t), mask, c))
    args = (params, state.cache, jnp.zeros((b, t), jnp.int32))
  for _ in range(5):
    jax.block_until_ready(fn(*args))
  out = tempfile.mkdtemp(prefix="op_profile_")
  jax.profiler.start_trace(out)
  for _ in range(CALLS):
    jax.block_until_ready(fn(*args))
  jax.profiler.stop_trace()
  trace = sorted(pathlib.Path(out).rglob("*.trace.json.gz"))[-1]
  total, count = collections.Counter(), collections.Counter()
  for e in json.load(gzip.open(trace))["traceEvents"]:
    if e.get("ph") == "X" and not e["name"].startswith(("$", "Thunk", "Pjit", "Common", "Parse")):
      total[e["name"]] += e["dur"]
      count[e["name"]] += 1
  for name, us in total.most_common(25):
    print(f"{us / CALLS / 1e3:8.3f} ms  {count[name] / CALLS:5.1f}x per call  {name[:100]}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "1")

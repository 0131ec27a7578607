"""Greedy decoding of a tiny random target + drafter on meshes of 8 simulated CPU devices.

Run by tests/test_decode_sharding.py in a subprocess (the device count is fixed
at JAX start-up):

  python tests/multidevice_decode.py 1,1,1 8,1,1 [--engine=2,2,2]

Per mesh it compiles `generate.compile_generate` (AR, chunked prefill) and `flex.compile_flex`
(mode flex, which switches) with that mesh, places params and cache by
`sharding.decode_shardings`, and decodes the same 8 ragged prompts. With
--engine it also serves prompts through `engine.Engine(mesh=...)`, AR and
parallel. Prints one JSON line: per mesh, the tokens of each mode and the
specs and per-device shapes of what went in and came out.
"""
import json
import os
import pathlib
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # conftest.random_params

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from conftest import random_params  # noqa: E402
from flexdraft_jax import drafter, flex, flex_stats, generate, model, sharding  # noqa: E402
from flexdraft_jax.model_config import ModelConfig  # noqa: E402
from flexdraft_jax.sampling import SamplingConfig  # noqa: E402

# Heads, kv heads and MLP width divide by 8 (tensor=8 shards them); the vocab of
# 100 does not, so on a tensor=8 mesh the embedding and lm head stay replicated
# on vocab (the fallback), while tensor=2 splits them.
CFG = ModelConfig(family="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=16, num_kv_heads=8, head_dim=8, rms_norm_eps=1e-6,
                  max_position=256)
DCFG = drafter.DrafterConfig(num_draft_layers=1, block_size=4, calib_rank=8)
M, BUCKET = 16, 16
# AR prefills in chunks of 5 (it does not divide the padded width 16; rows of 1..16 tokens),
# flex in one pass: the lossless check below compares the two.
PREFILL_CHUNK = 5
# flex alone, with the default verify strategy (widths 1, 2, 4): its switch runs
# both the parallel and the sequential branches here (see the stops below), so
# the fixed modes would add compiles (time) but no coverage.
STRATEGY = {"flex": "cumulative_product"}


def noisy_draft(cfg, target):
  """init_draft moved away from init (a copy of the target's projectors, zero
  calibration output), so drafts are right only some of the time."""
  draft = drafter.init_draft(cfg, DCFG, target, jax.random.key(1))
  keys = iter(jax.random.split(jax.random.key(2), 32))
  draft["layers"] = jax.tree.map(
      lambda a: a + 0.3 * jnp.std(a) * jax.random.normal(next(keys), a.shape), draft["layers"])
  draft["calib"]["w2"] = 0.5 * jax.random.normal(next(keys), draft["calib"]["w2"].shape)
  return draft


def spec(x) -> str:
  return str(x.sharding.spec)


def rows(tokens, num_new):
  return [np.asarray(tokens)[r, :n].tolist() for r, n in enumerate(np.asarray(num_new))]


def decode_on_meshes(meshes):
  target = random_params(CFG, seed=0)
  params = {"target": model.decoding_params(target, pack=False),  # sharded: dense layouts
            "draft": drafter.decoding_draft(noisy_draft(CFG, target), True, pack=False)}
  rng = np.random.RandomState(5)
  prompt_bp, lens = generate.pad_prompts(
      [rng.randint(0, CFG.vocab_size, n).tolist() for n in (5, 1, 9, 16, 3, 12, 7, 2)], BUCKET)
  b, width = prompt_bp.shape
  capacity = width + M + 2 * DCFG.block_size
  no_stops, stops = generate.stop_matrix([-1], b), None
  out = {}
  for shape in meshes:
    t0 = time.perf_counter()
    mesh = sharding.make_mesh(shape)
    zeros = lambda: model.KVCache.zeros(CFG, b, capacity)
    sh = sharding.decode_shardings(params, jax.eval_shape(zeros), mesh)
    placed = jax.device_put(params, sh.params)
    new_cache = jax.jit(zeros, out_shardings=sh.cache)
    run = {"tokens": {}, "modes": {}, "params": {}}
    ar = generate.compile_generate(placed["target"], CFG, b, width, capacity, 1, max_new_tokens=M,
                                   sampling=SamplingConfig(), mesh=mesh,
                                   prefill_chunk=PREFILL_CHUNK)
    tokens, num_new, _, cache = ar(placed["target"], new_cache(), prompt_bp, lens, no_stops,
                                   jax.random.key(0))
    run["tokens"]["ar"] = rows(tokens, num_new)
    run["ar_cache_out"] = spec(cache.k)
    if stops is None:
      # Rows 0-5 stop at a token of their own AR output, rows 6-7 run to M: the flex
      # loop goes sequential while more than FLEX_BATCH_THRESHOLD rows are active,
      # then parallel.
      run["stops"] = [[int(tokens[r, 3 + 2 * r])] if r < 6 else [] for r in range(b)]
      stops = generate.stop_matrix(run["stops"], b)
    for mode, strategy in STRATEGY.items():
      fcfg = flex.FlexConfig(mode=mode, verify_strategy=strategy, verify_threshold=0.05,
                             max_new_tokens=M)
      t1 = time.perf_counter()
      exe = flex.compile_flex(placed, CFG, DCFG, b, width, capacity, stops.shape[1], fcfg=fcfg,
                              mesh=mesh)
      print(f"  {mode}: compiled in {time.perf_counter() - t1:.1f} s", file=sys.stderr, flush=True)
      cache_in = new_cache()
      run["cache_in"] = {"k": spec(cache_in.k), "lengths": spec(cache_in.lengths)}
      tokens, num_new, stats, cache = exe(placed, cache_in, prompt_bp, lens, stops,
                                          jax.random.key(0), None)
      run["tokens"][mode] = rows(tokens, num_new)
      run["modes"][mode] = flex_stats.summarize(stats)["modes"]
      run["cache_out"] = {"k": spec(cache.k), "v": spec(cache.v), "lengths": spec(cache.lengths),
                          "k_shard": list(cache.k.addressable_shards[0].data.shape)}
      run["rows_out"] = {"tokens": spec(tokens), "num_new": spec(num_new),
                         "tokens_shard": list(tokens.addressable_shards[0].data.shape)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(placed):
      run["params"][sharding.path_str(path)] = {
          "spec": spec(leaf), "shard": list(leaf.addressable_shards[0].data.shape)}
    run["seconds"] = round(time.perf_counter() - t0, 1)
    out[str(shape)] = run
    print(f"mesh {shape}: {run['seconds']} s", file=sys.stderr, flush=True)
  return out


def engine_on_mesh(shape):
  """Engine(mesh=shape) decoding a random target with the SmolLM2 tokenizer's vocabulary
  and an exported random drafter, in mode parallel and AR (no drafter used)."""
  import dataclasses

  from flexdraft_jax import checkpoint, resources
  from flexdraft_jax.engine import Engine
  t0 = time.perf_counter()
  cfg = ModelConfig(family="llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=8, num_kv_heads=8, head_dim=8, rms_norm_eps=1e-6,
                    max_position=512, tie_embeddings=True)
  target = random_params(cfg, seed=1)
  arch = dataclasses.asdict(cfg)
  prompts = ["The capital of France is", "One, two, three,", "Hello", "Write a haiku about rain",
             "Why is the sky blue?"]
  res = {}
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint.export_drafter(tmp, jax.device_get(noisy_draft(cfg, target)), DCFG.to_dict(), arch,
                              checkpoint.target_fingerprint(arch, target), dtype="float32")
    e = Engine("random", target=(cfg, target), tokenizer=resources.SMOLLM2_NAME, drafter=tmp,
               chat_template=False, mesh=shape)
  for name, fcfg in (("ar", None), ("parallel", flex.FlexConfig(mode="parallel",
                                                                verify_strategy="full"))):
    done, stats = e.generate(prompts, max_new_tokens=8, batch_size=4, flex=fcfg, prompt_bucket=16)
    res[name] = [c.token_ids for c in done]
  res["specs"] = {"embedding": spec(e.params["embed"]["embedding"]),
                  "q_proj": spec(e.params["layers"][0]["attn"]["q_proj"]["kernel"]),
                  "draft_q_proj": spec(e.draft["layers"][0]["q_proj"]["kernel"])}
  res["seconds"] = round(time.perf_counter() - t0, 1)
  print(f"engine {shape}: {res['seconds']} s", file=sys.stderr, flush=True)
  return res


def main(argv):
  parse = lambda m: tuple(int(x) for x in m.split(","))
  meshes = [parse(a) for a in argv if not a.startswith("--")]
  out = {"meshes": decode_on_meshes(meshes)}
  for a in argv:
    if a.startswith("--engine="):
      out["engine"] = engine_on_mesh(parse(a.split("=", 1)[1]))
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])

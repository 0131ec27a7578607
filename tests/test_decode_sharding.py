"""Sharded decoding by the sharding rules table: specs per layout, fallbacks, errors,
and token-identical greedy decoding on meshes of 8 simulated CPU devices."""
import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from conftest import fast_compile_env
from flexdraft_jax import drafter, flex, generate, model, sharding
from flexdraft_jax.model_config import ModelConfig
from flexdraft_jax.sampling import SamplingConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


# As in tests/multidevice_decode.py: heads, kv heads, MLP width divide by 8, the vocab does not.
CFG = ModelConfig(family="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=16, num_kv_heads=8, head_dim=8, max_position=256)
DCFG = drafter.DrafterConfig(num_draft_layers=1, block_size=4, calib_rank=8)
BATCH = ("data", "fsdp")


def _abstract(unroll: bool):
  target = jax.eval_shape(lambda: model.init_params(CFG, jax.random.key(0)))
  draft = jax.eval_shape(lambda t: drafter.init_draft(CFG, DCFG, t, jax.random.key(0)), target)
  # The dense layouts (pack=False): the CPU kernel's packed panels are replicated.
  return jax.eval_shape(lambda t, d: {"target": model.decoding_params(t, unroll, pack=False),
                                      "draft": drafter.decoding_draft(d, unroll, pack=False)},
                        target, draft)


def _specs(shardings) -> dict:
  return {sharding.path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)}


def _cache(batch):
  return jax.eval_shape(lambda: model.KVCache.zeros(CFG, batch, 40))


def test_decoding_specs_follow_the_rules_in_both_layer_layouts():
  mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  stacked = sharding.decode_shardings(_abstract(False), _cache(8), mesh)
  unrolled = sharding.decode_shardings(_abstract(True), _cache(8), mesh)
  s, u = _specs(stacked.params), _specs(unrolled.params)
  assert s["target/layers/attn/q_proj/kernel"] == P(None, "fsdp", "tensor", None)
  assert s["target/layers/attn/k_proj/kernel"] == P(None, "fsdp", "tensor", None)
  assert s["target/layers/attn/o_proj/kernel"] == P(None, "tensor", None, "fsdp")
  assert s["target/layers/mlp/up_proj/kernel"] == P(None, "fsdp", "tensor")
  assert s["target/layers/mlp/down_proj/kernel"] == P(None, "tensor", "fsdp")
  assert s["target/embed/embedding"] == P("tensor", "fsdp")
  assert s["target/lm_head/kernel"] == P("fsdp", "tensor")
  assert s["draft/layers/q_proj/kernel"] == P(None, "fsdp", "tensor", None)
  assert s["draft/calib/w2"] == P(None, "tensor")
  assert s["draft/mask"] == P(None)
  # Unrolled layer i ("target/layers/i/attn/...") gets the stacked spec without its
  # leading, unsharded layer axis.
  matched = set()
  for name in (k for k in u if "/layers/" in k):
    parts = name.split("/")
    stacked_name = "/".join(parts[:2] + parts[3:])
    assert s[stacked_name] == P(None, *u[name]), name
    matched.add(stacked_name)
  assert matched == {k for k in s if "/layers/" in k}
  assert stacked.cache.k.spec == stacked.cache.v.spec == P(None, BATCH, "tensor", None, None)
  assert stacked.cache.lengths.spec == stacked.rows.spec == P(BATCH)
  assert stacked.replicated.spec == P()


def test_axes_that_do_not_divide_stay_replicated():
  mesh = AbstractMesh((2, 2, 2), sharding.MESH_AXES)
  params = _abstract(False)
  six = sharding.decode_shardings(params, _cache(6), mesh)  # 6 rows: data divides, fsdp not
  assert six.rows.spec == six.cache.lengths.spec == P("data")
  assert six.cache.k.spec == P(None, "data", "tensor", None, None)
  three = sharding.decode_shardings(params, _cache(3), mesh)
  assert three.rows.spec == P(None)
  tp8 = sharding.decode_shardings(params, _cache(8), AbstractMesh((1, 1, 8), sharding.MESH_AXES))
  specs = _specs(tp8.params)
  assert specs["target/embed/embedding"] == P(None, "fsdp")  # vocab 100: not split 8 ways
  assert specs["target/layers/attn/q_proj/kernel"] == P(None, "fsdp", "tensor", None)
  assert tp8.cache.k.spec == P(None, BATCH, "tensor", None, None)
  few_kv = dataclasses.replace(CFG, num_kv_heads=2)
  cache = jax.eval_shape(lambda: model.KVCache.zeros(few_kv, 8, 40))
  assert sharding.cache_shardings(cache, tp8.replicated.mesh).k.spec == P(None, BATCH, None, None,
                                                                          None)


def test_bad_meshes_and_caches_are_named():
  params, cache = _abstract(False), _cache(8)
  with pytest.raises(ValueError, match=r"mesh with axes \('data', 'fsdp', 'tensor'\)"):
    sharding.decode_shardings(params, cache, AbstractMesh((8,), ("x",)))
  with pytest.raises(ValueError, match=r"mesh with axes"):
    flex.compile_flex(params, CFG, DCFG, 8, 16, 40, 1, fcfg=flex.FlexConfig(max_new_tokens=4),
                      mesh=AbstractMesh((2, 4), ("data", "tensor")))
  two = AbstractMesh((2, 1, 1), sharding.MESH_AXES)
  with pytest.raises(ValueError, match="on_commit \\(streaming\\) needs a single-device mesh"):
    flex.compile_flex(params, CFG, DCFG, 8, 16, 40, 1, fcfg=flex.FlexConfig(max_new_tokens=4),
                      on_commit=print, mesh=two)
  with pytest.raises(ValueError, match="on_token \\(streaming\\) needs a single-device mesh"):
    generate.compile_generate(params["target"], CFG, 8, 16, 40, 1, max_new_tokens=4,
                              sampling=SamplingConfig(), on_token=print, mesh=two)
  with pytest.raises(ValueError, match=r"must both be \[L, B, K, C, H\]"):
    sharding.cache_shardings(cache.replace(k=jax.ShapeDtypeStruct(cache.k.shape[1:], np.float32)),
                             AbstractMesh((1, 1, 1), sharding.MESH_AXES))
  from flexdraft_jax.engine import Engine
  n = jax.device_count()
  with pytest.raises(ValueError, match=f"needs {n + 1} devices, {n} are available"):
    Engine("random", target=(CFG, None), mesh=(n + 1, 1, 1))


def _cut_at_stop(row, stop):
  return row[:row.index(stop[0]) + 1] if stop and stop[0] in row else row


def test_greedy_decoding_is_token_identical_on_8_simulated_devices():
  """AR and flex (switching between parallel and sequential) on 4 meshes, and Engine.

  10 compiles in one subprocess: the slowest test here.
  """
  out = subprocess.run([sys.executable, str(ROOT / "tests" / "multidevice_decode.py"),
                        "1,1,1", "8,1,1", "2,2,2", "1,1,8", "--engine=2,2,2"],
                       capture_output=True, text=True, timeout=1500,
                       env={**fast_compile_env(), "PYTHONPATH": str(ROOT)})
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  runs = res["meshes"]
  ref = runs["(1, 1, 1)"]
  stops = ref["stops"]
  # lossless: AR's tokens up to each stop
  assert ref["tokens"]["flex"] == [_cut_at_stop(r, s) for r, s in zip(ref["tokens"]["ar"], stops)]
  assert len({len(r) for r in ref["tokens"]["flex"]}) > 2  # rows stop at different steps
  expect = {  # mesh: (rows per device, kv heads per device, q_proj kernel and embedding shards)
      "(1, 1, 1)": (8, 8, [64, 16, 8], [100, 64]),
      "(8, 1, 1)": (1, 8, [64, 16, 8], [100, 64]),
      "(2, 2, 2)": (2, 4, [32, 8, 8], [50, 32]),
      "(1, 1, 8)": (8, 1, [64, 2, 8], [100, 64]),  # vocab 100: not split 8 ways
  }
  for name, (rows, kv, q_shard, emb_shard) in expect.items():
    run = runs[name]
    assert run["tokens"] == ref["tokens"], name
    # flex switched: sequential while > FLEX_BATCH_THRESHOLD rows were active, then parallel.
    assert run["modes"]["flex"]["sequential"] > 0 and run["modes"]["flex"]["parallel"] > 0
    assert run["cache_in"]["k"] == run["cache_out"]["k"] == run["ar_cache_out"] == str(
        P(None, BATCH, "tensor", None, None))
    assert run["cache_out"]["k_shard"] == [2, rows, kv, 40, 8], name
    assert run["rows_out"]["tokens_shard"] == [rows, 16], name
    params = run["params"]
    for leaf in ("target/layers/0/attn/q_proj/kernel", "draft/layers/0/q_proj/kernel"):
      assert params[leaf]["shard"] == q_shard, (name, leaf)
    assert params["target/embed/embedding"]["shard"] == emb_shard, name
    if name == "(1, 1, 8)":  # tensor parallel: every head / MLP-width dimension split 8 ways
      for leaf in ("attn/k_proj/kernel", "attn/o_proj/kernel", "mlp/gate_proj/kernel",
                   "mlp/down_proj/kernel"):
        full = np.prod(run["params"][f"target/layers/1/{leaf}"]["shard"]) * 8
        assert full == np.prod(ref["params"][f"target/layers/1/{leaf}"]["shard"]), leaf
  eng = res["engine"]  # Engine(mesh=(2, 2, 2)): speculative decoding as lossless as AR
  assert eng["parallel"] == eng["ar"] and len(eng["ar"]) == 5
  assert eng["specs"] == {"embedding": str(P("tensor", "fsdp")),
                          "q_proj": str(P("fsdp", "tensor", None)),
                          "draft_q_proj": str(P("fsdp", "tensor", None))}

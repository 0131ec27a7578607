"""Train checkpoints (orbax + grain), SIGTERM flag, drafter export/load, target fingerprint."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flexdraft_jax import checkpoint as ckpt

CONFIG = {"lr": 1e-3, "num_steps": 100, "save_every": 2,
          "model": {"hidden_size": 64, "num_drafts": 3}}
TARGET = {"family": "llama", "hidden_size": 64, "num_layers": 2, "vocab_size": 101,
          "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "param_dtype": "float32"}


def random_draft(seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32))
  return {"mask": f32(8),
          "layers": {"q_proj": {"kernel": f32(2, 8, 4, 2)},
                     "norm": {"scale": f32(2, 8).astype(jnp.bfloat16)}},
          "calib": {"w1": f32(8, 5), "b1": f32(5), "w2": f32(5, 1), "b2": f32(1)}}


def train_state(step=3):
  """A draft with a real, non-trivial adamw state (two updates)."""
  draft = random_draft()
  tx = optax.adamw(1e-2)
  opt_state = tx.init(draft)
  for _ in range(2):
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, draft)
    updates, opt_state = tx.update(grads, opt_state, draft)
    draft = optax.apply_updates(draft, updates)
  return {"step": step, "draft": draft, "opt_state": opt_state}


def data_iter():
  return iter(grain.MapDataset.source(list(range(100))).shuffle(seed=0).to_iter_dataset()
              .batch(4))


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes())


def test_round_trip_is_exact_and_data_continues(tmp_path):
  state, it = train_state(step=4), data_iter()
  for _ in range(3):
    next(it)
  with ckpt.Checkpointer(tmp_path, CONFIG, save_interval_steps=2) as cp:
    assert cp.latest_step() is None
    assert cp.maybe_save(4, state, it)
  expected_batches = [next(it) for _ in range(3)]

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                          if isinstance(x, jax.Array) else x, train_state(step=0))
  for target in (abstract, train_state(step=0)):  # abstract or concrete arrays
    it2 = data_iter()
    with ckpt.Checkpointer(tmp_path, CONFIG, save_interval_steps=2) as cp:
      assert cp.latest_step() == 4
      restored = cp.restore(target, it2)
    assert_bitwise_equal(restored, state)
    for want in expected_batches:
      np.testing.assert_array_equal(next(it2), want)


def test_restore_reshards_onto_other_meshes(tmp_path):
  """A train state saved under mesh (8,1,1) restores under (2,2,2) and (1,1,8), from
  sharded ShapeDtypeStructs and from concrete arrays: bit-exact leaves, each in the new
  mesh's sharding, and the next train step's loss is the original mesh's."""
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, str(root / "tests" / "reshard_checkpoint.py"),
                        str(tmp_path), "8,1,1", "2,2,2", "1,1,8"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": str(root)})
  assert out.returncode == 0, out.stderr[-3000:]
  runs = json.loads(out.stdout.strip().splitlines()[-1])
  want = runs.pop("(8, 1, 1)")["saved"]["loss3"]
  assert sorted(runs) == ["(1, 1, 8)", "(2, 2, 2)"]
  for mesh, kinds in runs.items():
    assert sorted(kinds) == ["abstract", "concrete"]
    for kind, got in kinds.items():
      assert got["equal"], (mesh, kind)
      assert got["wrong_sharding"] == [], (mesh, kind)
      assert got["split"] > 0, (mesh, kind)  # the new mesh really splits some leaves
      np.testing.assert_allclose(got["loss3"], want, rtol=1e-5, err_msg=f"{mesh} {kind}")


def test_interval_forced_and_max_to_keep(tmp_path):
  state = train_state()
  with ckpt.Checkpointer(tmp_path, CONFIG, save_interval_steps=3, max_to_keep=2) as cp:
    saved = [s for s in range(1, 8) if cp.maybe_save(s, state)]
    assert saved == [3, 6]
    assert cp.maybe_save(7, state, force=True)
    assert cp.latest_step() == 7
    assert not cp.maybe_save(7, state, force=True)  # already saved: no error, no rewrite
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7"]


def test_config_change_raises_naming_each_key(tmp_path):
  with ckpt.Checkpointer(tmp_path, CONFIG, save_interval_steps=2) as cp:
    cp.maybe_save(2, train_state())
  changed = {**CONFIG, "lr": 3e-4, "num_steps": 500, "seed": 1,
             "model": {"hidden_size": 128, "num_drafts": 3}}
  with pytest.raises(ckpt.CheckpointError) as err:
    ckpt.Checkpointer(tmp_path, changed, save_interval_steps=2)
  msg = str(err.value)
  assert "lr: 0.001 -> 0.0003" in msg
  assert "model.hidden_size: 64 -> 128" in msg
  assert "seed: '<absent>' -> 1" in msg
  assert "num_steps:" not in msg and "num_drafts" not in msg


def test_allowed_keys_may_change_on_resume(tmp_path):
  with ckpt.Checkpointer(tmp_path, CONFIG, save_interval_steps=2) as cp:
    cp.maybe_save(2, train_state(step=2))
  resumed = {**CONFIG, "num_steps": 500, "save_every": 10, "log_every": 5}
  with ckpt.Checkpointer(tmp_path, resumed, save_interval_steps=10) as cp:
    assert cp.latest_step() == 2
    assert cp.restore(train_state(step=0))["step"] == 2


def test_interrupted_save_is_not_latest(tmp_path):
  state = train_state(step=2)
  with ckpt.Checkpointer(tmp_path, CONFIG, save_interval_steps=2) as cp:
    cp.maybe_save(2, state)
  root = tmp_path / "checkpoints"
  # What a save killed before its final rename leaves (orbax's temporary name).
  shutil.copytree(root / "2", root / "4.orbax-checkpoint-tmp")
  with ckpt.Checkpointer(tmp_path, CONFIG, save_interval_steps=2) as cp:
    assert cp.latest_step() == 2
    assert cp.restore(train_state(step=0))["step"] == 2
    assert cp.maybe_save(4, state)
    assert cp.latest_step() == 4
  assert sorted(os.listdir(root)) == ["2", "4"]


def test_sigterm_sets_flag_and_loop_saves(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  state, it = train_state(), data_iter()
  with ckpt.SigtermFlag() as flag, ckpt.Checkpointer(tmp_path, CONFIG, 100) as cp:
    assert not flag.is_set()
    for step in range(1, 20):
      next(it)
      if step == 5:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not flag.is_set() and time.monotonic() < deadline:
          time.sleep(0.01)
      cp.maybe_save(step, state, it)
      if flag.is_set():
        assert cp.maybe_save(step, state, it, force=True)
        break
  assert step == 5
  assert signal.getsignal(signal.SIGTERM) is previous
  with ckpt.Checkpointer(tmp_path, CONFIG, 100) as cp:
    assert cp.latest_step() == 5


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_export_load_round_trip(tmp_path, dtype):
  draft, fp = random_draft(), "ab" * 32
  drafter_cfg = {"num_layers": 2, "k": 3}
  json_path = ckpt.export_drafter(tmp_path / "out", draft, drafter_cfg, TARGET, fp, dtype=dtype)
  assert sorted(os.listdir(tmp_path / "out")) == ["drafter.json", "drafter.safetensors"]
  meta = json.loads(json_path.read_text())
  assert meta["format"] == "flexdraft-jax-drafter" and meta["version"] == 1
  assert meta["dtype"] == dtype and meta["drafter"] == drafter_cfg
  assert meta["target"]["hidden_size"] == 64 and meta["target"]["fingerprint"] == fp
  assert "param_dtype" not in meta["target"]

  for path in (tmp_path / "out", json_path):
    cfg, params = ckpt.load_drafter(path, TARGET, fp)
    assert cfg == drafter_cfg
    assert_bitwise_equal(params, jax.tree.map(lambda x: x.astype(dtype), draft))
  _, params = ckpt.load_drafter(json_path, TARGET, None, dtype="float32")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_load_rejects_wrong_target_and_bad_files(tmp_path):
  ckpt.export_drafter(tmp_path, random_draft(), {}, TARGET, "ab" * 32)
  other = {**TARGET, "hidden_size": 96}
  with pytest.raises(ckpt.DrafterMismatchError) as err:
    ckpt.load_drafter(tmp_path, other, "cd" * 32)
  msg = str(err.value)
  assert "hidden_size=64, this target has 96" in msg
  assert "fingerprint=abababababababab…, this target has cdcdcdcdcdcdcdcd…" in msg
  with pytest.raises(ckpt.DrafterMismatchError, match="hidden_size") as err:
    ckpt.load_drafter(tmp_path, other, None)  # fingerprint not checked
  assert "fingerprint" not in str(err.value)

  with pytest.raises(ckpt.DrafterFileError, match="does not exist"):
    ckpt.load_drafter(tmp_path / "nowhere", TARGET, None)
  weights = tmp_path / "drafter.safetensors"
  weights.write_bytes(weights.read_bytes()[:100])
  with pytest.raises(ckpt.DrafterFileError, match="corrupt"):
    ckpt.load_drafter(tmp_path, TARGET, None)
  weights.unlink()
  with pytest.raises(ckpt.DrafterFileError, match="does not exist"):
    ckpt.load_drafter(tmp_path, TARGET, None)
  meta_path = tmp_path / "drafter.json"
  meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "version": 2}))
  with pytest.raises(ckpt.DrafterFileError, match="version 2"):
    ckpt.load_drafter(tmp_path, TARGET, None)
  meta_path.write_text("{not json")
  with pytest.raises(ckpt.DrafterFileError, match="corrupt"):
    ckpt.load_drafter(tmp_path, TARGET, None)


def test_target_fingerprint():
  rng = np.random.default_rng(0)
  params = {"embed": {"embedding": jnp.asarray(rng.standard_normal((101, 64), np.float32))},
            "layers": {"kernel": jnp.asarray(rng.standard_normal((2, 64, 96), np.float32))},
            "norm": {"scale": jnp.ones((64,))}}
  fp = ckpt.target_fingerprint(TARGET, params)
  assert len(fp) == 64
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert ckpt.target_fingerprint({**TARGET, "param_dtype": "bfloat16"}, bf16) == fp
  other = jax.tree.map(lambda x: x * 1.5, params)
  assert ckpt.target_fingerprint(TARGET, other) != fp
  assert ckpt.target_fingerprint({**TARGET, "num_layers": 3}, params) != fp


@pytest.mark.parametrize("shape", [(128256, 4096), (32, 4096, 14336), (32, 4096, 8, 128),
                                   (7,), (), (0, 5)])
def test_fingerprint_sample_is_bounded(shape):
  strides = ckpt._sample_strides(shape)
  assert np.prod([-(-n // s) for n, s in zip(shape, strides)]) <= ckpt.SAMPLE_SIZE

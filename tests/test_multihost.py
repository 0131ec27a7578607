"""Multi-process training on localhost: two `train.py --multihost` processes (jax.distributed,
CPU collectives over gloo), per-process data shards, one shared workdir, resume across processes.

jax 0.10.2 reads JAX_COORDINATOR_ADDRESS but has no environment variables for the process
count and id, so train.py takes --coordinator_address, --num_processes and --process_id.
"""
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flexdraft_jax import data as data_lib
from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax import trainer, training

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
LOCAL_DEVICES = 2  # per process: a (4, 1, 1) mesh over both processes, one row per device
TIMEOUT_S = 240    # per launch: a hung coordinator or collective is killed, not waited for


def _tiny(overrides: dict):
  from configs import tiny
  c = tiny.get_config()
  c.update_from_flattened_dict(overrides)
  return c


def _overrides(data: pathlib.Path, **extra) -> dict:
  return {"data.train_dir": str(data / "train"), "data.heldout_dir": str(data / "heldout"),
          "data.generate_if_missing": False, "optim.total_steps": 4, "log_every": 1,
          "save_every": 1, "eval_every": 0, "export_dtype": "float32", **extra}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  """Random (prompt, response) rows in the tiny vocabulary: no tokenizer or model needed."""
  root = tmp_path_factory.mktemp("mhdata")
  rng = np.random.default_rng(0)
  vocab = _tiny({}).random_model.vocab_size
  row = lambda: (rng.integers(1, vocab, rng.integers(20, 60)), rng.integers(1, vocab, rng.integers(8, 24)))
  data_lib.write_rows(root / "train", [row() for _ in range(12)], model="random", split="train")
  data_lib.write_rows(root / "heldout", [row() for _ in range(4)], model="random", split="heldout")
  return root


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir: pathlib.Path, overrides: dict) -> list[subprocess.Popen]:
  """The processes of one `train.py --multihost` job on localhost (a fresh coordinator port)."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         # LLVM -O0: about a third less compile time, the same numbers to rtol 1e-5.
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES} "
                      "--xla_backend_optimization_level=0",
         # The resumed launch reuses the first one's compiled programs.
         "JAX_COMPILATION_CACHE_DIR": str(workdir.parent / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/tiny.py",
       f"--workdir={workdir}", "--multihost", f"--coordinator_address=127.0.0.1:{port}",
       f"--num_processes={NUM_PROCESSES}", f"--process_id={i}",
       *[f"--config.{k}={v}" for k, v in overrides.items()]],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
      for i in range(NUM_PROCESSES)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
  """Each process's stderr once all exit 0; all are killed if one outlives TIMEOUT_S."""
  deadline = time.monotonic() + TIMEOUT_S
  errs = []
  try:
    for p in procs:
      errs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[1])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    tails = "\n".join(f"--- process {i}:\n{p.communicate()[1][-2000:]}" for i, p in enumerate(procs))
    pytest.fail(f"the multi-process run did not finish in {TIMEOUT_S} s:\n{tails}")
  for i, (p, err) in enumerate(zip(procs, errs)):
    assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
  return errs


def _done(errs: list[str]) -> dict[int, tuple[int, float]]:
  """{process id: (step, loss)} from each process's last line, 'process i of n done: ...'."""
  found = {}
  for err in errs:
    for m in re.finditer(r"process (\d+) of (\d+) done: step (\S+) loss (\S+)", err):
      assert int(m[2]) == NUM_PROCESSES
      found[int(m[1])] = (int(m[3]), float(m[4]))
  return found


def _reference(config, steps: int):
  """Losses and final draft of one process (its default device) fed, each step, the global
  batch the processes assemble: data shard i's rows (make_iterator(shard_index=i,
  shard_count=NUM_PROCESSES)) stacked in process order. Compiled at -O0, like the workers."""
  cfg, target = trainer.load_target(config)
  dcfg = trainer.drafter_config(config, cfg)
  draft = jax.jit(drafter_lib.init_draft, static_argnums=(0, 1))(
      cfg, dcfg, target, jax.random.key(config.seed + 1))
  tx = training.make_optimizer(trainer.optim_config(config), {"target": target, "draft": draft})
  state = training.init_state(tx, target, draft)
  its = [data_lib.make_iterator(config.data.train_dir, seq_len=config.seq_len,
                                batch_size=config.batch_size // NUM_PROCESSES,
                                block_size=dcfg.block_size, anchors_per_seq=config.anchors_per_seq,
                                seed=config.seed, shard_index=i, shard_count=NUM_PROCESSES)
         for i in range(NUM_PROCESSES)]
  step_fn = jax.jit(lambda s, b: training.train_step(s, target, b, tx=tx, cfg=cfg, dcfg=dcfg,
                                                     lcfg=trainer.loss_config(config)))
  batches = [[next(it) for it in its] for _ in range(steps)]
  batches = [{k: np.concatenate([p[k] for p in parts]) for k in parts[0]} for parts in batches]
  step_fn = step_fn.lower(state, batches[0]).compile({"xla_backend_optimization_level": 0})
  losses = []
  for batch in batches:
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.draft)


def test_two_processes_train_like_one_process_with_the_same_global_batch(tiny_data, tmp_path):
  """Two processes (2 CPU devices each) train 1 step, then resume for a 2nd (and evaluate);
  the losses, the metrics log and the exported drafter match one process fed the same two
  data shards."""
  from safetensors.numpy import load_file
  workdir = tmp_path / "run"
  first = _launch(workdir, _overrides(tiny_data, num_steps=1))
  losses, draft = _reference(_tiny(_overrides(tiny_data)), steps=2)  # while they run
  first = _finish(first)
  second = _finish(_launch(workdir, _overrides(tiny_data, num_steps=2, eval_every=2,
                                               eval_batches=1)))

  for errs, step in ((first, 1), (second, 2)):
    done = _done(errs)
    assert sorted(done) == list(range(NUM_PROCESSES)), "every process id ran to the end"
    assert {s for s, _ in done.values()} == {step}
    np.testing.assert_allclose([l for _, l in done.values()], losses[step - 1], rtol=1e-5)
    # Process 0 alone exports (and says so).
    assert [("exported drafter to" in err) for err in errs] == [True, False]
  assert f"resumed from step 1 in {workdir}" in second[0]

  # One row per step: process 1 appending too would duplicate them.
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2]
  assert np.isfinite(rows[1]["eval_loss"])  # held-out batches assembled from both processes
  np.testing.assert_allclose([r["loss"] for r in rows], losses, rtol=1e-5)
  # Orbax wrote both steps, and grain each process's own iterator position.
  for step in (1, 2):
    saved = sorted(p.name for p in (workdir / "checkpoints" / str(step) / "data").glob("*.json"))
    assert saved == [f"process_{i}-of-{NUM_PROCESSES}.json" for i in range(NUM_PROCESSES)]
  exported = load_file(workdir / "drafter" / "drafter.safetensors")
  want = {".".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(draft)}
  assert exported.keys() == want.keys()
  for name, value in want.items():
    np.testing.assert_allclose(exported[name], value, atol=1e-4, err_msg=name)


def test_multihost_without_a_cluster_or_coordinator_is_a_clear_error(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  base = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/tiny.py",
          f"--workdir={tmp_path}"]
  bad = subprocess.run(base + ["--multihost"], capture_output=True, text=True, timeout=120, env=env)
  assert bad.returncode == 2  # a usage error (cli.EXIT_USER)
  assert "train.py: error: --multihost: coordinator_address should be defined" in bad.stderr
  assert "Traceback" not in bad.stderr
  bad = subprocess.run(base + ["--num_processes=2"], capture_output=True, text=True, timeout=120,
                       env=env)
  assert bad.returncode == 2 and "need --multihost" in bad.stderr
  assert "Traceback" not in bad.stderr

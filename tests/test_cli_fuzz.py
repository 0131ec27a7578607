"""Bad input to every CLI, and the cases that used to lose or corrupt a training run.

Each bad input must give exit status 2, exactly one line on stderr, no traceback, and
leave the workdir (or output folder) as it was. train.py and decode.py each run in one
`cli_runner` process (their flags cannot share an interpreter); the bench and
`python -m flexdraft_jax.data` run in this process. Every case stops before a model
is compiled, except the training runs at the end, which share one tiny dataset written
directly (no generation).
"""
from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cli_runner import CliRunner
from cli_runner import _call  # pylint: disable=protected-access
from flexdraft_jax import cli
from flexdraft_jax import data as data_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = f"--config={ROOT}/configs/tiny.py"
_runners: dict[str, CliRunner] = {}
_ABSL_LOG = re.compile(r"^[IWEF]\d{4} ")  # absl's own log lines are not the error


@pytest.fixture(scope="module", autouse=True)
def _close_runners():
  yield
  for r in _runners.values():
    r.close()
  _runners.clear()


def _run(script: str, *args: str, timeout: float = 300, runner: str = ""):
  """`python script *args` in the runner process named `runner` (default: the script's)."""
  key = runner or script
  if key not in _runners or not _runners[key].alive:
    _runners[key] = CliRunner(ROOT / script)
  return _runners[key].run(*args, timeout=timeout)


def _snapshot(path: pathlib.Path):
  """Every file under `path` with its size and mtime (None when `path` does not exist)."""
  if not path.exists():
    return None
  if path.is_file():
    return path.stat().st_size, path.stat().st_mtime_ns
  return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file()
          else "dir" for p in sorted(path.rglob("*"))}


def _assert_one_line(r, message: str, prog: str):
  lines = [l for l in r.stderr.splitlines() if l.strip() and not _ABSL_LOG.match(l)]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.returncode == cli.EXIT_USER, (r.returncode, r.stderr[-3000:])
  assert len(lines) == 1, r.stderr[-3000:]
  assert lines[0].startswith(f"{prog}: error: ") and message in lines[0], lines[0]


def _bytes(path: pathlib.Path, content: bytes) -> str:
  path.write_bytes(content)
  return str(path)


def _truncated_npz(path: pathlib.Path) -> str:
  np.savez_compressed(path, train_tokens=np.arange(5000, dtype=np.uint16))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  return str(path)


# ----------------------------------------------------------------------------
# train.py
# ----------------------------------------------------------------------------
def _train_cases(tmp: pathlib.Path):
  """(args, text of the one line) for train.py, the workdir being tmp/w (absent)."""
  (tmp / "a_file").write_text("x")
  (tmp / "a_dir").mkdir()
  return [
      ([TINY, "--config.batch_size=abc"], "flag --config.batch_size=abc"),
      ([TINY, "--config.batch_size="], "--config.batch_size"),
      ([TINY, "--config.batch_size=0"], "config.batch_size must be an integer >= 1, got 0"),
      ([TINY, "--config.batch_size=-3"], "config.batch_size must be an integer >= 1"),
      ([TINY, "--config.num_steps=1.5"], "--config.num_steps"),
      ([TINY, "--config.optim.learning_rate=nan"], "config.optim.learning_rate must be > 0"),
      ([TINY, "--config.optim.learning_rate=inf"], "config.optim.learning_rate must be a finite"),
      ([TINY, "--config.optim.b1=nan"], "config.optim.b1 must be in [0.0, 1.0)"),
      ([TINY, "--config.time_limit_s=inf"], "config.time_limit_s must be a number >= 0"),
      ([TINY, "--config.loss.calib_weight=-inf"], "config.loss.calib_weight must be a number"),
      ([TINY, "--config.drafter.num_draft_layers=99"], "num_draft_layers"),
      ([TINY, "--config.mode=x"], "--config.mode: the config has no field 'mode'"),
      ([TINY, "--config.dtype=float64"], "config.dtype must be one of"),
      ([TINY, "--config.mesh=1,x,1"], "config.mesh must be 'auto'"),
      ([TINY, "--config.data.archive=/no/such.npz"], "config.data.archive='/no/such.npz' does not"),
      ([TINY, f"--config.data.archive={tmp}/a_dir"], "a_dir' is a directory"),
      ([TINY, f"--config.data.archive={_truncated_npz(tmp / 'cut.npz')}"],
       "cut.npz: not a dataset archive"),
      ([TINY, f"--config.data.archive={_bytes(tmp / 'junk.npz', b'PK' + bytes(300))}"],
       "junk.npz: not a dataset archive"),
      ([TINY, f"--config.init_from={tmp}/a_file"], "is not an exported drafter"),
      ([TINY, "--config.data.train_dir=/no/such/dir", "--config.data.generate_if_missing=False"],
       "config.data.train_dir='/no/such/dir' does not exist"),
      ([TINY, "--mode=bogus"], "flag --mode=bogus"),
      ([TINY, "--num_processes=2"], "need --multihost"),
      ([TINY, "extra"], "unexpected arguments: extra"),
      ([TINY, "--workdir="], "--workdir must not be empty"),
      ([TINY, f"--workdir={tmp}/a_file"], "is a file, not a directory"),
      ([TINY, f"--workdir={tmp}/a_file/sub"], "is a file, not a directory"),
      ([TINY, "--workdir=/proc/flexdraft-test"], "--workdir=/proc/flexdraft-test"),
  ]


def test_train_py_bad_input(tmp_path):
  workdir = tmp_path / "w"
  for args, message in _train_cases(tmp_path):
    if not any(a.startswith("--workdir") for a in args):
      args = [*args, f"--workdir={workdir}"]
    before = _snapshot(tmp_path)
    r = _run("train.py", *args)
    _assert_one_line(r, message, "train.py")
    assert _snapshot(tmp_path) == before, args  # the workdir is not even created


def test_train_py_bad_config_files(tmp_path):
  """In a runner of their own: a config file that fails to load leaves ml_collections'
  --config.KEY flags undefined for the rest of the process (a fresh process each time
  for a user)."""
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  (tmp_path / "raises.py").write_text("def get_config():\n  return 1 / 0\n")
  (tmp_path / "a_dir").mkdir()
  for args, message in [
      (["--config=/no/such/config.py"], "No such file or directory: '/no/such/config.py'"),
      ([f"--config={tmp_path}/a_dir"], "--config"),
      ([f"--config={tmp_path}/syntax.py"], f"--config: {tmp_path}/syntax.py:1: SyntaxError"),
      ([f"--config={tmp_path}/raises.py"], f"raises.py:2: ZeroDivisionError: division by zero"),
      (["--config="], "--config"),
      ([], "--config"),
  ]:
    before = _snapshot(tmp_path)
    r = _run("train.py", *args, f"--workdir={tmp_path}/w", runner="train.py:configs")
    _assert_one_line(r, message, "train.py")
    assert _snapshot(tmp_path) == before, args


# ----------------------------------------------------------------------------
# decode.py (each case stops before a model is loaded)
# ----------------------------------------------------------------------------
def _decode_cases(tmp: pathlib.Path):
  (tmp / "d").mkdir()
  (tmp / "notjson.txt").write_text("x")
  return [
      (["--prompt=a", "--temperature=nan"], "--temperature must be >= 0 and finite"),
      (["--prompt=a", "--temperature=inf"], "--temperature must be >= 0 and finite"),
      (["--prompt=a", "--temperature=-1"], "--temperature must be >= 0 and finite"),
      (["--prompt=a", "--temperature=hot"], "flag --temperature=hot"),
      (["--prompt=a", "--top_p=nan"], "--top_p must be in (0, 1]"),
      (["--prompt=a", "--top_p=1.5"], "--top_p must be in (0, 1]"),
      (["--prompt=a", "--top_k=-1"], "--top_k must be >= 0"),
      (["--prompt=a", "--top_k=1.5"], "flag --top_k=1.5"),
      (["--prompt=a", "--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
      (["--prompt=a", "--max_new_tokens="], "flag --max_new_tokens="),
      (["--prompt=a", "--batch_size=-1"], "--batch_size must be >= 1"),
      (["--prompt=a", "--seed=-1"], "--seed must be in [0, 2**32)"),
      (["--prompt=a", f"--seed={2**70}"], "--seed must be in [0, 2**32)"),
      (["--prompt=a", "--verify_threshold=nan"], "--verify_threshold must be in (0, 1]"),
      (["--prompt=a", "--prefill_chunk=-4"], "--prefill_chunk must be >= 1"),
      (["--prompt=a", "--draft_vocab=x"], "flag --draft_vocab=x"),
      (["--prompt=a", "--mode=turbo"], "flag --mode=turbo"),
      (["--prompt=a", "--dtype=int8"], "flag --dtype=int8"),
      (["--prompts_file=mtbench", "--num_prompts=0"], "--num_prompts must be >= 1"),
      (["--prompt="], "--prompt must not be empty"),
      (["--prompt=   "], "--prompt must not be empty"),
      (["--prompt=caf\udcc3\udca9 \udcff"], "--prompt is not valid UTF-8 text"),  # argv bytes
      (["--prompts_file="], "--prompts_file= does not exist"),
      (["--prompts_file=/no/such.jsonl"], "--prompts_file=/no/such.jsonl does not exist"),
      ([f"--prompts_file={tmp}/d"], "is a directory, not a file"),
      (["--prompt=a", f"--costs={tmp}/d"], "is a directory, not a file"),
      (["--prompt=a", "--costs=/no/costs.json"], "--costs=/no/costs.json does not exist"),
      (["--prompt=a", "--drafter=/no/drafter"], "--drafter=/no/drafter does not exist"),
      (["--prompt=a", f"--drafter={tmp}/notjson.txt"], "is a file, not a folder"),
      (["--prompt=a", "--model=/no/model.gguf"], "--model=/no/model.gguf is neither"),
      (["--prompt=a", "--drafter=none", f"--model={tmp}/d"], "is not an HF checkpoint folder"),
      (["--prompt=a", "--drafter=none", f"--model={_bytes(tmp / 'm.gguf', b'GGUF' + bytes(9))}"],
       "m.gguf"),
      (["--prompt=a", "--drafter=none", f"--model={_bytes(tmp / 'junk.gguf', bytes(64))}"],
       "junk.gguf"),
  ]


def _prompt_files(tmp: pathlib.Path):
  """(file contents, text of the one line): prompt files are read before the model loads."""
  return [
      (b"", "no prompts (the file is empty)"),
      (b'{"prompt": "ok"}\n{"prompt": "cut', "p.jsonl:2: invalid JSON"),
      (b'{"prompt": "ok"}\n{"prompt": "\xff\xfe"}\n', "p.jsonl:2: not UTF-8 text"),
      (b'{"prompt": "\\ud800 lone"}\n', "p.jsonl:1: the prompt holds a lone surrogate"),
      (b'[1, 2]\n', "p.jsonl:1: expected a JSON object, got list"),
      (b'{"prompt": 7}\n', "p.jsonl:1: prompt must be a non-empty string"),
      (b'{"turns": []}\n', "p.jsonl:1: 'turns' must be a non-empty list"),
  ]


def test_decode_py_bad_input(tmp_path):
  for args, message in _decode_cases(tmp_path):
    before = _snapshot(tmp_path)
    r = _run("decode.py", *args)
    _assert_one_line(r, message, "decode.py")
    assert _snapshot(tmp_path) == before, args


def test_decode_py_bad_prompt_files(tmp_path):
  for content, message in _prompt_files(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    r = _run("decode.py", f"--prompts_file={path}", "--drafter=none", "--nocompilation_cache")
    _assert_one_line(r, message, "decode.py")


# ----------------------------------------------------------------------------
# python -m flexdraft_jax.bench and python -m flexdraft_jax.data (in this process)
# ----------------------------------------------------------------------------
BENCH_CASES = [
    (["--batch_sizes=0"], "--batch_sizes must be positive integers"),
    (["--batch_sizes=1,x"], "--batch_sizes must be a comma list of integers"),
    (["--batch_sizes="], "--batch_sizes must be positive integers"),
    (["--modes="], "--modes must name at least one mode"),
    (["--modes=ar,warp"], "unknown --modes ['warp']"),
    (["--num_prompts=-1"], "--num_prompts=-1 is smaller than the largest batch size"),
    (["--num_prompts=nan"], "flag --num_prompts=nan"),
    (["--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
    (["--repeats=0"], "--repeats and --profile_runs must be >= 1"),
    (["--hf_num_threads=0"], "--hf_num_threads must be >= 1"),
    (["--max_prompt_tokens=0"], "--max_prompt_tokens must be >= 1"),
    (["--draft_vocab=-1"], "flag --draft_vocab=-1"),
    (["--dtype=int4"], "flag --dtype=int4"),
    (["--costs=/no/costs.json"], "--costs=/no/costs.json does not exist"),
    (["--drafter=/no/drafter"], "--drafter=/no/drafter does not exist"),
    (["--block_size=1"], "--block_size must be >= 2"),
    (["unexpected"], "unexpected arguments: unexpected"),
]


def _bench(capfd, *argv):
  from absl import flags
  from absl.testing import flagsaver
  from flexdraft_jax.bench import __main__ as bench_main
  with flagsaver.flagsaver():
    code = _call(bench_main, ["bench", "--nocompilation_cache", "--compare_hf=false", *argv])
  out, err = capfd.readouterr()
  del flags
  return subprocess.CompletedProcess(argv, code, out, err)


def test_bench_bad_input(tmp_path, capfd):
  (tmp_path / "d").mkdir()
  (tmp_path / "f").write_text("x")
  cases = BENCH_CASES + [
      ([f"--costs={tmp_path}/d"], "is a directory"),
      ([f"--out_dir={tmp_path}/f"], "is a file, not a folder"),
      ([f"--out_dir={tmp_path}/f/sub"], "is a file, not a folder"),
      ([f"--prompts={tmp_path}/d", "--batch_sizes=1", "--num_prompts=1"],
       "is a directory, not a prompt file"),
      (["--prompts=/no/p.jsonl", "--batch_sizes=1", "--num_prompts=1"], "/no/p.jsonl"),
  ]
  for argv, message in cases:
    before = _snapshot(tmp_path)
    r = _bench(capfd, f"--out_dir={tmp_path}/out", *argv)
    _assert_one_line(r, message, "python -m flexdraft_jax.bench")
    assert _snapshot(tmp_path) == before, argv


def _data_cli(capfd, *argv):
  try:
    code = data_lib.main(list(argv))
  except SystemExit as e:
    code = e.code
  out, err = capfd.readouterr()
  return subprocess.CompletedProcess(argv, code, out, err)


def test_data_cli_bad_input(tmp_path, capfd):
  ds = tmp_path / "ds"
  data_lib.write_rows(ds, [([1, 2, 3], [4, 5])], model="m")
  drafter = tmp_path / "drafter"
  drafter.mkdir()
  (drafter / "drafter.json").write_text('{"format": "flexdraft-jax-drafter", "version": 1, '
                                        '"target": {"vocab_size": null}}')
  (tmp_path / "d").mkdir()
  cases = [
      ([], "usage: python -m flexdraft_jax.data OUT.npz"),
      (["out.txt", f"train={ds}"], "usage:"),
      ([f"{tmp_path}/o.npz", "train"], "usage:"),
      ([f"{tmp_path}/o.npz", "train="], "usage:"),
      ([f"{tmp_path}/o.npz", f"train={ds}", f"train={ds}"], "each split once"),
      ([f"{tmp_path}/missing/o.npz", f"train={ds}"], f"the folder {tmp_path}/missing does not exist"),
      ([f"{tmp_path}/n.npz", f"train={tmp_path}/nothing"], "no such dataset directory"),
      ([f"{tmp_path}/o.npz", f"train={tmp_path}/d"], "no meta.json"),
      (["token_counts"], "usage:"),
      (["token_counts", f"{tmp_path}/nodrafter", str(ds)], "does not exist"),
      (["token_counts", str(drafter), str(ds)], "target.vocab_size must be a positive integer"),
      (["token_counts", f"{tmp_path}/d", str(ds)], "not an exported drafter"),
  ]
  (tmp_path / "d.npz").mkdir()
  cases.append(([f"{tmp_path}/d.npz", f"train={ds}"], "is a directory; give the archive's"))
  ok = tmp_path / "ok_drafter"
  ok.mkdir()
  (ok / "drafter.json").write_text('{"format": "flexdraft-jax-drafter", "version": 1, '
                                   '"target": {"vocab_size": 10}}')
  cases += [
      (["token_counts", str(ok), _truncated_npz(tmp_path / "cut.npz")], "not a dataset archive"),
      (["token_counts", str(ok), f"{tmp_path}/d.npz"], "is a directory, not a dataset archive"),
      (["token_counts", str(ok), f"{tmp_path}/none.npz"], "does not exist, not a dataset"),
  ]
  for argv, message in cases:
    before = _snapshot(tmp_path)
    r = _data_cli(capfd, *argv)
    _assert_one_line(r, message, "python -m flexdraft_jax.data")
    assert _snapshot(tmp_path) == before, argv
  r = _data_cli(capfd, f"{tmp_path}/o.npz", f"train={ds}")  # and a good call still works
  assert r.returncode == 0 and "train 1 rows" in r.stdout, r.stderr


def test_checkpoint_cli_bad_input(tmp_path):
  """python -m flexdraft_jax.checkpoint convert (its flags are defined when it runs, so each
  call is a process of its own: two cases)."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  for argv, message in [
      (["convert", str(tmp_path)], "usage: python -m flexdraft_jax.checkpoint convert"),
      (["convert", f"{tmp_path}/src", f"{tmp_path}/dst", "--model=/no/model"], "/no/model"),
  ]:
    r = subprocess.run([sys.executable, "-m", "flexdraft_jax.checkpoint", *argv], env=env,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    _assert_one_line(r, message, "python -m flexdraft_jax.checkpoint")
    assert sorted(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# Training runs: the workdir lock, checkpoints that do not restore, SIGTERM
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
  """A small token dataset for configs/tiny.py, written directly (no target generates it)."""
  root = tmp_path_factory.mktemp("rows")
  rng = np.random.default_rng(0)
  rows = [(rng.integers(1, 49152, 12), rng.integers(1, 49152, 20)) for _ in range(32)]
  data_lib.write_rows(root / "train", rows, model="random")
  return root / "train"


def _train_args(rows, workdir, *extra):
  return [TINY, f"--workdir={workdir}", f"--config.data.train_dir={rows}",
          "--config.data.generate_if_missing=False", "--config.eval_every=0",
          "--config.seq_len=64", "--config.log_every=1", "--config.export_dtype=float32",
          "--config.optim.warmup_steps=0", *extra]


def test_a_locked_workdir_is_refused_at_once(tmp_path, tiny_rows):
  workdir = tmp_path / "w"
  with cli.WorkdirLock(workdir):
    before = _snapshot(workdir)
    start = time.perf_counter()
    r = _run("train.py", *_train_args(tiny_rows, workdir, "--config.num_steps=2"))
    took = time.perf_counter() - start
    _assert_one_line(r, f"is in use by another run (pid {os.getpid()} on host "
                        f"{socket.gethostname()})", "train.py")
    assert _snapshot(workdir) == before and took < 30
    with pytest.raises(cli.WorkdirError, match="in use by another run"):  # in one process too
      cli.WorkdirLock(workdir)
  assert not workdir.exists()  # released: the lock file goes, and the folder it made
  # A holder killed with SIGKILL blocks no one: the OS drops its lock.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import os, signal, sys; from flexdraft_jax import cli; "
       f"cli.WorkdirLock({str(workdir)!r}); print('held', flush=True); sys.stdin.read()"],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
      env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(cli.WorkdirError, match=f"pid {holder.pid} on host"):
    cli.WorkdirLock(workdir)
  holder.kill()
  holder.wait()
  with cli.WorkdirLock(workdir) as lock:
    assert open(lock.path).read().split()[0] == str(os.getpid())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_rows):
  """An uninterrupted train.py run to step 4 (checkpoints 2 and 4, and the export)."""
  w = tmp_path_factory.mktemp("straight") / "w"
  r = _run("train.py", *_train_args(tiny_rows, w, "--config.num_steps=4",
                                    "--config.save_every=2"))
  assert r.returncode == 0, r.stderr[-3000:]
  return w


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_resume_skips_checkpoints_that_do_not_restore_and_sigterm_exits_143(
    tmp_path, tiny_rows, straight_run):
  """A copy of a run to step 4 (checkpoints 2 and 4) whose step 4 arrays are truncated,
  with an empty step folder 1000: the next run warns about each in one line, resumes from
  2, saves 4 again (the damaged one moved aside, not deleted), and SIGTERM stops it:
  saved, exit status 143, how to resume."""
  import shutil
  w = tmp_path / "w"
  shutil.copytree(straight_run, w)
  args = lambda n, *extra: _train_args(tiny_rows, w, f"--config.num_steps={n}",
                                       "--config.save_every=2", *extra)
  assert _steps(w) == [2, 4] and (w / "drafter" / "drafter.safetensors").is_file()
  assert not (w / cli.LOCK_FILE).exists()
  for p in (w / "checkpoints" / "4" / "state").rglob("*"):
    if p.is_file() and p.parent.name == "d":  # the arrays' data files
      with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)
  (w / "checkpoints" / "1000").mkdir()

  # SIGTERM during training (the runner process gets it): saved, exit 143, how to resume.
  metrics = w / "metrics.jsonl"
  rows_before = metrics.read_text().count("\n")
  reply = []
  call = threading.Thread(target=lambda: reply.append(_run("train.py", *args(100000))))
  call.start()
  deadline = time.time() + 120
  while time.time() < deadline and metrics.read_text().count("\n") < rows_before + 3:
    time.sleep(0.1)
  os.kill(_runners["train.py"]._proc.pid, signal.SIGTERM)  # pylint: disable=protected-access
  call.join(timeout=120)
  r = reply[0]
  assert r.returncode == cli.EXIT_SIGTERM == 143, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) < 30, r.stderr[-3000:]
  warnings = [l for l in r.stderr.splitlines() if l.startswith("warning: checkpoint")]
  assert len(warnings) == 2, r.stderr
  assert f"{w}/checkpoints/1000 does not restore" in warnings[0]
  assert f"{w}/checkpoints/4 does not restore" in warnings[1]
  assert "resumed from step 2" in r.stderr
  line = next(l for l in r.stderr.splitlines() if "SIGTERM" in l)
  step = int(re.search(r"saved step (\d+) in", line).group(1))
  assert "Run the same command again to resume" in line and step >= 4, line
  assert step in _steps(w) and (w / "checkpoints" / "1000").is_dir()
  kept = [p.name for p in (w / "checkpoints").iterdir() if ".unrestorable-" in p.name]
  assert len(kept) == 1 and kept[0].startswith("4."), (kept, _steps(w), r.stderr)  # moved aside
  assert not (w / cli.LOCK_FILE).exists()


def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(
    tmp_path, tiny_rows, straight_run):
  """train.py killed (SIGKILL: no handler runs, a save may be cut mid-write) after a random
  step, then run again: the exported params equal an uninterrupted run's, bit for bit.
  Training only: killing --mode=generate / cache_kv needs a target generating data, which
  does not fit this file's time budget (their commit points: test_data, test_kv_data)."""
  from safetensors.numpy import load_file
  kill_after = int(np.random.default_rng().integers(1, 4))  # steps logged before the kill
  # save_every may change on resume and does not change the math: every step is saved here.
  args = lambda w: _train_args(tiny_rows, w, "--config.num_steps=4", "--config.save_every=1")
  killed = tmp_path / "killed"
  victim = CliRunner(ROOT / "train.py")

  def run_victim():
    try:
      victim.run(*args(killed), timeout=120)
    except subprocess.TimeoutExpired:  # what a killed runner answers
      pass
  try:
    call = threading.Thread(target=run_victim)
    call.start()
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= kill_after):
      time.sleep(0.02)
    os.kill(victim._proc.pid, signal.SIGKILL)  # pylint: disable=protected-access
    call.join(timeout=60)
  finally:
    victim.close()
  assert not (killed / "drafter").exists(), f"finished before the kill (after {kill_after})"
  r = _run("train.py", *args(killed))
  assert r.returncode == 0, (kill_after, r.stderr[-3000:])
  want = load_file(straight_run / "drafter" / "drafter.safetensors")
  got = load_file(killed / "drafter" / "drafter.safetensors")
  assert want.keys() == got.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name}, killed after "
                                                                 f"step {kill_after}")


def test_no_checkpoint_restores_is_one_error_and_deletes_nothing(tmp_path):
  """Every step damaged: CheckpointError (a user error: train.py exits 2) naming the
  folder, every step still on disk; no checkpoint at all: None."""
  import grain

  from flexdraft_jax import checkpoint as ckpt
  state = {"step": 0, "w": np.arange(8, dtype=np.float32)}
  it = lambda: iter(grain.MapDataset.source(list(range(10))).to_iter_dataset())
  with ckpt.Checkpointer(tmp_path, {"a": 1}, save_interval_steps=1) as cp:
    assert cp.restore_newest(state, it()) is None
    for s in (1, 2):
      cp.maybe_save(s, {**state, "step": s}, it(), force=True)
  for p in (tmp_path / "checkpoints").rglob("_METADATA"):
    p.write_text("{")
  (tmp_path / "checkpoints" / "3").mkdir()
  with ckpt.Checkpointer(tmp_path, {"a": 1}, save_interval_steps=1) as cp:
    with pytest.raises(ckpt.CheckpointError, match=r"none of the 3 checkpoints in .* restores "
                                                   r"\(steps 3, 2, 1; .*nothing was deleted"):
      cp.restore_newest(state, it())
    assert sorted(cp.skipped) == [1, 2, 3]
  assert cli.is_user_error(ckpt.CheckpointError("x"))
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2", "3"]


def test_damaged_dataset_and_kv_cache_are_one_line(tmp_path, tiny_rows):
  """tokens.bin cut below its commit point: train.py says which file, exit 2. kv.bin cut
  below kv_meta.json's commit point: the store refuses it, naming the file."""
  import shutil

  from flexdraft_jax import drafter, kv_data
  from flexdraft_jax.model_config import ModelConfig
  rows = tmp_path / "rows"
  shutil.copytree(tiny_rows, rows)
  with open(rows / "tokens.bin", "r+b") as f:
    f.truncate(100)
  r = _run("train.py", *_train_args(rows, tmp_path / "w", "--config.num_steps=2"))
  _assert_one_line(r, f"{rows}/index.bin: row", "train.py")
  assert not (tmp_path / "w").exists()

  cfg = ModelConfig(family="llama", vocab_size=49152, hidden_size=64, intermediate_size=128,
                    num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)
  dcfg = drafter.DrafterConfig(num_draft_layers=2, block_size=4, calib_rank=16)
  kv = tmp_path / "kv"
  shutil.copytree(tiny_rows, kv)
  n = data_lib.TokenDataset(kv).meta["tokens"]
  meta = {**kv_data._config(cfg, dcfg, "f" * 64, "float32"), "rows": 32}  # pylint: disable=protected-access
  data_lib.write_json_atomic(kv / "kv_meta.json", meta)
  (kv / "kv.bin").write_bytes(bytes(kv_data.bytes_per_token(cfg, dcfg, "float32") * (n - 1)))
  with pytest.raises(kv_data.KVCacheError, match=r"kv.bin: .* need .*rerun python train.py "
                                                 r"--mode=cache_kv"):
    kv_data.KVStore(kv, cfg, dcfg, "f" * 64)
  assert cli.is_user_error(kv_data.KVCacheError("x"))


def test_internal_errors_keep_their_traceback(capfd):
  """The boundary translates only user errors: a bug still shows where it is."""
  def buggy():
    return {}["missing"]
  with pytest.raises(KeyError):
    cli.guard(buggy, "prog")()
  with pytest.raises(SystemExit) as e:
    cli.guard(lambda: (_ for _ in ()).throw(data_lib.DatasetError("a\n  b")), "prog")()
  assert e.value.code == 2 and capfd.readouterr().err == "prog: error: a b\n"
  with pytest.raises(SystemExit) as e:
    cli.guard(lambda: open("/no/such/file"), "prog")()
  assert e.value.code == 2 and capfd.readouterr().err == (
      "prog: error: /no/such/file: no such file or directory\n")
  with pytest.raises(OSError):  # an OSError without a file is not the user's
    cli.guard(lambda: (_ for _ in ()).throw(OSError(errno_eio(), "I/O error")), "prog")()


def errno_eio() -> int:
  import errno
  return errno.EIO


# ----------------------------------------------------------------------------
# Errors raised by the modules behind the boundary: one-line error types, not tracebacks.
# ----------------------------------------------------------------------------
def test_truncated_token_counts_is_a_drafter_file_error(tmp_path):
  from flexdraft_jax import checkpoint
  _truncated_npz(tmp_path / checkpoint.TOKEN_COUNTS_FILE)
  with pytest.raises(checkpoint.DrafterFileError, match="token_counts.npz"):
    checkpoint.load_token_counts(tmp_path, 5000)


def test_drafter_json_with_a_null_field_is_a_user_error():
  from flexdraft_jax import drafter
  from flexdraft_jax.model_config import ModelConfig
  cfg = ModelConfig(family="llama", vocab_size=10, hidden_size=8, intermediate_size=8,
                    num_layers=4, num_heads=2, num_kv_heads=1, head_dim=4)
  with pytest.raises(ValueError, match="block_size"):
    drafter.DrafterConfig(num_draft_layers=2, block_size=None, calib_rank=4).validate(cfg)

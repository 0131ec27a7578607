"""Runs one CLI script many times in one interpreter, for tests (`CliRunner`).

  python tests/cli_runner.py decode.py      # requests on stdin, replies on stdout

A request is a JSON list of arguments, one per line; its reply is one JSON line
{"returncode", "stdout", "stderr"}: what `python decode.py *args` gives, file
descriptors 1 and 2 included (absl logs, XLA's own messages), but without
paying the interpreter start, the imports and the model load on every call.

Each call starts from the flags' defaults (`FLAGS.unparse_flags`) and runs the
script's own `_parse_flags` and `_main`, as its `app.run(_main,
flags_parser=_parse_flags)` line does; an uncaught exception prints its
traceback and exits 1, as the interpreter would. `weights.load_model` is
memoized (the same file gives the same params; nothing mutates them), and the
warn-once set is cleared, so every call prints what a fresh process prints.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import traceback


class CliRunner:
  """`run(*args) -> subprocess.CompletedProcess` through one `cli_runner.py` subprocess."""

  def __init__(self, script: pathlib.Path, env: dict | None = None):
    self.script = pathlib.Path(script)
    self._proc = subprocess.Popen([sys.executable, __file__, str(self.script)],
                                  cwd=self.script.parent, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)

  @property
  def alive(self) -> bool:
    return self._proc.poll() is None

  def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """One call; a call past `timeout` kills the runner (TimeoutExpired): start another."""
    self._proc.stdin.write(json.dumps(list(args)) + "\n")
    self._proc.stdin.flush()
    watchdog = threading.Timer(timeout, self._proc.kill)
    watchdog.start()
    try:
      line = self._proc.stdout.readline()
    finally:
      watchdog.cancel()
    if not line:
      raise subprocess.TimeoutExpired([str(self.script), *args], timeout)
    reply = json.loads(line)
    return subprocess.CompletedProcess([str(self.script), *args], reply["returncode"],
                                       reply["stdout"], reply["stderr"])

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.close()
      try:
        self._proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self._proc.kill()


def _exit_code(e: SystemExit) -> int:
  return e.code if isinstance(e.code, int) else 0 if e.code is None else 1


def _call(module, argv: list[str]) -> int:
  from absl import flags
  from flexdraft_jax import cost_cache
  flags.FLAGS.unparse_flags()
  cost_cache._warned.clear()  # pylint: disable=protected-access
  # ml_collections' config flag reads its --config.KEY overrides from sys.argv and defines a
  # flag for each while parsing: a fresh process each time for a user.
  sys.argv = list(argv)
  for name in [n for n in flags.FLAGS if "." in n]:
    delattr(flags.FLAGS, name)
  try:
    module._main(module._parse_flags(argv))  # pylint: disable=protected-access
    return 0
  except SystemExit as e:
    return _exit_code(e)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    return 1


def _captured(module, argv: list[str]) -> dict:
  """Runs one call with fds 1 and 2 on temporary files; their text and the exit code."""
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    saved = os.dup(1), os.dup(2)
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
    try:
      code = _call(module, argv)
    finally:
      sys.stdout.flush(), sys.stderr.flush()
      os.dup2(saved[0], 1), os.dup2(saved[1], 2)
      os.close(saved[0]), os.close(saved[1])
    out.seek(0), err.seek(0)
    return {"returncode": code, "stdout": out.read(), "stderr": err.read()}


def serve(script: str) -> None:
  path = pathlib.Path(script).resolve()
  sys.path.insert(0, str(path.parent))
  spec = importlib.util.spec_from_file_location(path.stem + "_cli", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from absl import logging
  from flexdraft_jax import weights
  logging.use_absl_handler()  # as app.run does
  weights.load_model = functools.cache(weights.load_model)
  replies = os.fdopen(os.dup(1), "w")
  for line in sys.stdin:
    reply = _captured(module, [str(path), *json.loads(line)])
    replies.write(json.dumps(reply) + "\n")
    replies.flush()


if __name__ == "__main__":
  serve(sys.argv[1])

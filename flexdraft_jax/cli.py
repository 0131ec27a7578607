"""The CLIs' one error boundary: an error the user's input caused is one line, exit status 2.

  _parse_flags, _main = cli.wrap(main, "decode.py")
  app.run(_main, flags_parser=_parse_flags)       # or: cli.run(main, "decode.py")

Every CLI (`train.py`, `decode.py`, `python -m flexdraft_jax.bench`, `python -m
flexdraft_jax.data`, `scripts/ablate.py`) runs its main through `wrap` (or `guard`
for one without absl flags). What reaches the boundary is sorted by type:

- a user error (`is_user_error`): a bad flag value, `app.UsageError`, `UserError`
  and its subclasses (the library raises them on purpose: `train_config.ConfigError`,
  `data.DatasetError`, `kv_data.KVCacheError`, ...), the library error types listed in
  `USER_ERRORS` by name (raised on purpose in modules that import jax, or that other
  modules own), and an OSError on a named file that the user can fix (permission
  denied, no space, a directory where a file was expected, ...): printed as
  `prog: error: <message>` on one line, exit status 2 (EXIT_USER);
- `Exit` (an end that is not an error, e.g. SIGTERM: EXIT_SIGTERM = 143): its message
  on one line and its status;
- anything else is a bug, and keeps its traceback (exit status 1).

Imports absl only, so a CLI can reject bad flags before it imports jax, and any module
can derive its error types from `UserError`.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Callable

from absl import app
from absl import flags

EXIT_OK = 0
EXIT_INTERNAL = 1   # a bug: the traceback is printed
EXIT_USER = 2       # the user's input (flags, config, files) is wrong; one line says which
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_SIGTERM = 143  # 128 + SIGTERM, as a death by the signal would give


class UserError(Exception):
  """An error the user can fix: a flag, config field or file their input names.

  The message names it, and is printed on one line with exit status 2. Library error
  types derive from it (with ValueError, where they did before)."""


class Exit(Exception):
  """Ends a CLI with `code`, its message on one line and no traceback: for ends that are
  not errors, such as a run stopped by SIGTERM (EXIT_SIGTERM)."""

  def __init__(self, message: str, code: int):
    super().__init__(message)
    self.code = code


# Error types raised on purpose for something the user can fix, in modules this one must
# not import (they import jax) or that other modules own; matched by qualified name along
# the exception's MRO. A new such type derives from UserError instead where it can.
USER_ERRORS = frozenset({
    "flexdraft_jax.weights.WeightsError",                  # --model / config.model files
    "flexdraft_jax.checkpoint.CheckpointError",            # the workdir's checkpoints
    "flexdraft_jax.checkpoint.DrafterMismatchError",       # --drafter / config.init_from
    "flexdraft_jax.checkpoint.DrafterFileError",           # --drafter / config.init_from
    "flexdraft_jax.planner.CostTableError",                # --costs
    "flexdraft_jax.resources.MissingResourceError",        # a packaged file not installed
    "absl.app.UsageError",
})

# OSErrors on a named file that the user (or their machine's admin) fixes: one line.
_FILE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                          errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ENOENT,
                          errno.ENAMETOOLONG})


def _qualname(cls: type) -> str:
  return f"{cls.__module__}.{cls.__qualname__}"


def is_user_error(e: BaseException) -> bool:
  """Whether `e` is an error of the user's input (see the module docstring)."""
  if isinstance(e, (UserError, app.UsageError, flags.Error)):
    return True
  if any(_qualname(c) in USER_ERRORS for c in type(e).__mro__):
    return True
  return (isinstance(e, OSError) and e.errno in _FILE_ERRNOS
          and getattr(e, "filename", None) is not None)


def one_line(message: str) -> str:
  """The message's lines joined by spaces (indentation dropped)."""
  return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def message(e: BaseException) -> str:
  """What the boundary prints for a user error `e` (an OSError as 'file: reason')."""
  if isinstance(e, OSError) and getattr(e, "filename", None) is not None and e.strerror:
    return f"{e.filename}: {e.strerror.lower()}"
  return one_line(str(e)) or type(e).__name__


def usage_error(prog: str, text: str, exitcode: int = EXIT_USER):
  """Prints `prog: error: <text on one line>` and exits."""
  print(f"{prog}: error: {one_line(text)}", file=sys.stderr)
  sys.exit(exitcode)


def guard(main: Callable, prog: str) -> Callable:
  """`main` behind the boundary: user errors and `Exit` become one line and their exit
  status, Ctrl-C exits 130; other exceptions propagate with their traceback."""
  def guarded(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except Exit as e:
      print(f"{prog}: {one_line(str(e))}", file=sys.stderr)
      sys.exit(e.code)
    except KeyboardInterrupt:
      print(f"{prog}: interrupted", file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - only user errors are translated
      if not is_user_error(e):
        raise
      usage_error(prog, message(e), EXIT_USER)
  return guarded


def wrap(main: Callable, prog: str, *,
         parse_error: tuple[type[Exception], Callable[[Exception, list], str | None]] | None = None):
  """(flags_parser, main) for `app.run`: a bad flag value (absl's flags.Error) and
  `parse_error`'s exception types raised while parsing, when its function turns them into
  a message (e.g. ml_collections' unknown --config.KEY; None: not a user error), are each
  one line with exit status 2, and `main` runs behind `guard`."""
  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      # absl's first line names the flag; later lines may repeat its help.
      usage_error(prog, str(e).strip().splitlines()[0])
    except Exception as e:  # noqa: BLE001 - only parse_error's types are translated
      text = (parse_error[1](e, argv) if parse_error is not None
              and isinstance(e, parse_error[0]) else None)
      if text is None:  # not one the function knows: a bug, with its traceback
        raise
      usage_error(prog, text)

  return parse, guard(main, prog)


def run(main: Callable, prog: str, **kwargs):
  """`app.run(main)` with `wrap`'s one-line usage errors."""
  parse, guarded = wrap(main, prog, **kwargs)
  app.run(guarded, flags_parser=parse)


# ----------------------------------------------------------------------------
# The workdir lock (train.py)
# ----------------------------------------------------------------------------
LOCK_FILE = ".lock"


class WorkdirError(UserError):
  """--workdir cannot be used: a file, not writable, or locked by another run."""


class WorkdirLock:
  """An exclusive `fcntl.flock` on `workdir/.lock`, held until `release` (or the process
  ends: the OS drops a flock with its holder, so a killed run never blocks the next).

  A second lock on the same workdir, from any process, fails at once with WorkdirError
  naming the holder's PID and host (which the holder writes into the file). `release`
  removes the file (and the workdir, when this lock created it and it is still empty), so
  a run refused for any reason leaves the workdir as it found it; a lock taken on a file
  that was removed meanwhile is taken again (the file's inode is checked), so two runs
  never both hold one.
  """

  def __init__(self, workdir, flag: str = "--workdir"):
    self._fd = None
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise WorkdirError(f"{flag}={workdir} is a file, not a directory")
    self._created = not os.path.exists(self.workdir)
    try:
      os.makedirs(self.workdir, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f"{flag}={workdir} cannot be created ({_reason(e)})") from None
    while self._fd is None:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        self._remove_created()
        raise WorkdirError(f"{flag}={workdir} is not writable ({_reason(e)})") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise WorkdirError(f"{flag}={workdir}: cannot lock {self.path} ({_reason(e)})") from None
        who = (f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2
               else "a process that has not written its pid yet")
        raise WorkdirError(f"{flag}={workdir} is in use by another run ({who}); wait for it "
                           "to end or use another workdir") from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        self._fd = fd
      else:  # the holder released (removed) it between our open and flock: again
        os.close(fd)
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, f"{os.getpid()} {socket.gethostname()} "
                        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)

  def _remove_created(self) -> None:
    if self._created:
      try:
        os.rmdir(self.workdir)  # only when empty
      except OSError:
        pass

  def release(self) -> None:
    if self._fd is not None:
      try:
        os.unlink(self.path)  # while still held: no one else can hold this inode
      except FileNotFoundError:
        pass
      os.close(self._fd)  # drops the flock
      self._fd = None
      self._remove_created()

  def __enter__(self) -> WorkdirLock:
    return self

  def __exit__(self, *exc):
    self.release()


def _reason(e: OSError) -> str:
  return (e.strerror or str(e)).lower()

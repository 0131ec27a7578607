"""absl plumbing shared by the CLIs: every usage error is one line on stderr, exit code 2.

  _parse_flags, _main = cli.wrap(main, "decode.py")
  app.run(_main, flags_parser=_parse_flags)       # or: cli.run(main, "decode.py")

Imports absl only, so a CLI can reject bad flags before it imports jax.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app
from absl import flags


def usage_error(prog: str, message: str, exitcode: int = 2):
  """Prints `prog: error: <first line of message>` and exits."""
  print(f"{prog}: error: {message.strip().splitlines()[0]}", file=sys.stderr)
  sys.exit(exitcode)


def wrap(main: Callable, prog: str, *,
         parse_error: tuple[type[Exception], Callable[[Exception, list], str | None]] | None = None):
  """(flags_parser, main) for `app.run`: a bad flag value (absl's flags.Error), an
  `app.UsageError` from main, and `parse_error`'s exception types raised while parsing
  (turned into a message by its function, e.g. ml_collections' unknown --config.KEY) are
  each printed as one line."""
  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      usage_error(prog, str(e))
    except Exception as e:  # noqa: BLE001 - only parse_error's types are translated
      if parse_error is None or not isinstance(e, parse_error[0]):
        raise
      usage_error(prog, parse_error[1](e, argv) or str(e))

  def guarded(argv):
    try:
      main(argv)
    except app.UsageError as e:
      usage_error(prog, str(e), e.exitcode)

  return parse, guarded


def run(main: Callable, prog: str, **kwargs):
  """`app.run(main)` with `wrap`'s one-line usage errors."""
  parse, guarded = wrap(main, prog, **kwargs)
  app.run(guarded, flags_parser=parse)

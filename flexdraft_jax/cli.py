"""absl plumbing shared by the CLIs: every usage error is one line on stderr, exit code 2.

  cli.run(main, "decode.py")

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


def run(main: Callable, prog: str, *,
        parse_error: tuple[type[Exception], Callable[[Exception, list], str | None]] | None = None):
  """`app.run(main)`, with a bad flag value (absl's flags.Error), an `app.UsageError` from
  main, and `parse_error`'s exception types raised while parsing (turned into a message by
  its function, e.g. ml_collections' unknown --config.KEY) each printed as one line."""
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

  app.run(guarded, flags_parser=parse)

"""Shared entry-point plumbing for `python -m medjax.<command>`."""
from collections.abc import Callable
from pathlib import Path

from absl import app

from medjax.errors import MedjaxError


def run(main: Callable, define_flags: Callable[[], None]) -> None:
  """Defines the flags, runs `main` under absl, and prints bad input as one line (exit 1).

  Flags are defined here, not at import, so tests can import several entry points at once.
  """
  define_flags()
  try:
    app.run(main)
  except MedjaxError as e:
    raise SystemExit(f"error: {e}") from None


def parse_command_line(argv) -> list[str]:
  """Parses the flags once up front so a bad --config or override is one line, not a trace."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is not None:
    path = Path(spec.split(":", 1)[0])
    if not path.is_file():
      raise MedjaxError(f"--config={spec}: no such file {str(path)!r}")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise MedjaxError(str(e)) from None
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    text = " ".join(str(e).replace("\\n", " ").split()).strip("'\"")
    text = text.replace("\\'", "'")
    if "get_config" in text:
      text = f"--config={spec}: the file has no get_config(arg) function"
    elif "Did you mean" in text:
      text = f"--config: unknown key {text}"
    elif "config" not in text.lower():
      text = f"--config: {text}"
    raise MedjaxError(text) from None


def run_with_config(main_fn, define_flags_fn):
  """Runs a config-file entry point (train, evaluate): flags parsed once, bad input one line."""
  import sys  # pylint: disable=g-import-not-at-top

  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags_fn()
  try:
    rest = parse_command_line(sys.argv)
    app.run(main_fn, argv=sys.argv, flags_parser=lambda _: rest)
  except MedjaxError as e:
    raise SystemExit(f"error: {e}") from None

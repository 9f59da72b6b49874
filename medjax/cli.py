"""Shared entry-point plumbing for `python -m medjax.<command>`."""
import sys
from collections.abc import Callable
from pathlib import Path

from absl import app
from absl import flags

from medjax.config_args import load_config_file
from medjax.errors import MedjaxError
from medjax.validation import check_known_keys


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
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is not None:
    path = Path(spec.split(":", 1)[0])
    if not path.is_file():
      raise MedjaxError(f"--config={spec}: no such file {str(path)!r}")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "MedjaxError: " in text:  # raised by get_config; ml_collections adds its traceback
      text = text.rsplit("MedjaxError: ", 1)[1].splitlines()[0]
    raise MedjaxError(text) from None
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    if spec is not None and any(isinstance(x, KeyError) for x in (e, *e.args)):
      check_override_keys(argv, spec)  # an override of a key the config lacks
    text = " ".join(str(e).replace("\\n", " ").split()).strip("'\"")
    text = text.replace("\\'", "'")
    if "get_config" in text:
      text = f"--config={spec}: the file has no get_config(arg) function"
    elif "config" not in text.lower():
      text = f"--config: {text}"
    raise MedjaxError(text) from None


def check_override_keys(argv, spec: str) -> None:
  """The unknown-key error (as `check_train_config` words it) for the first `--config.a.b=`
  override that the config file `spec` lacks; ml_collections' own error names no place."""
  config = load_config_file(spec)
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    node, where = config, "--config"
    for part in arg[len("--config."):].split("=", 1)[0].split("."):
      if not hasattr(node, "keys"):
        break
      check_known_keys([part], node.keys(), where)
      node, where = node[part], f"{where}.{part}"


def run_with_config(main_fn, define_flags_fn):
  """Runs a config-file entry point (train, evaluate): flags parsed once, bad input one line."""
  define_flags_fn()
  try:
    rest = parse_command_line(sys.argv)
    app.run(main_fn, argv=sys.argv, flags_parser=lambda _: rest)
  except MedjaxError as e:
    raise SystemExit(f"error: {e}") from None

"""Shared entry-point plumbing for `python -m medjax.<command>`.

Every command ends a fault with one `error: ...` line on stderr and exit status 1 (130 for
Ctrl-C): bad input (`MedjaxError`) and OS errors reaching the entry point (disk full, permission
denied, read-only filesystem, a file where a folder belongs) alike. Library threads that die
with the run (orbax's async writers) are kept to one log line each instead of tracebacks.
"""
import contextlib
import logging
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
  with one_line_errors():
    app.run(quiet_libraries(main))


@contextlib.contextmanager
def one_line_errors():
  """MedjaxError, OSError and Ctrl-C as one `error:` line (exit 1, or 130 for Ctrl-C)."""
  try:
    yield
  except MedjaxError as e:
    raise SystemExit(f"error: {e}") from None
  except OSError as e:
    raise SystemExit(f"error: {os_error_text(e)}") from None
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    raise SystemExit(130) from None


def os_error_text(e: OSError) -> str:
  """`<path>: <strerror>` (both paths of a failed rename), or the error's own words."""
  names = [str(n) for n in (e.filename, e.filename2) if n is not None]
  text = e.strerror or str(e)
  return ": ".join([" -> ".join(names), text] if names else [text])


class _LibraryNoise(logging.Filter):
  """Drops orbax's INFO chatter (a dozen lines per checkpoint save or restore; its warnings stay)
  and the tracebacks of its failed background writes (logged by orbax, and by asyncio once the
  tasks are collected): the same error reaches the main thread and ends the command as one
  line."""

  def filter(self, record):
    if record.levelno < logging.WARNING and "orbax" in record.pathname:
      return False  # orbax's per-save/restore INFO chatter (a dozen lines per checkpoint)
    if "Given directory is read only" in record.getMessage():
      return False  # readers open checkpoints read-only on purpose (medjax.checkpoint)
    if record.name == "asyncio" and "orbax" in record.getMessage():
      return False  # an orbax write task that failed: the main thread reports it
    if record.exc_info and "orbax" in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


def quiet_libraries(main: Callable) -> Callable:
  """`main` with library tracebacks off the console (see `_LibraryNoise`; the unraisable
  ones of orbax's aborted reads and writes: `medjax.checkpoint`)."""
  def quiet_main(argv):
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
      handler.addFilter(_LibraryNoise())
    return main(argv)
  return quiet_main


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


def define_config_and_workdir(config_help: str, workdir_help: str) -> None:
  """The two required flags of a config-file entry point: --config (locked) and --workdir."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])


def run_with_config(main_fn, define_flags_fn):
  """Runs a config-file entry point (train, evaluate): flags parsed once, bad input one line."""
  define_flags_fn()
  with one_line_errors():
    rest = parse_command_line(sys.argv)
    app.run(quiet_libraries(main_fn), argv=sys.argv, flags_parser=lambda _: rest)

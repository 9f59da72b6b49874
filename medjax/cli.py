"""Shared entry-point plumbing for `python -m medjax.<command>`."""
from typing import Callable

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

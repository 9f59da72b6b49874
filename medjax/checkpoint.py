"""Orbax checkpoints of a train run: the sharded state plus a JSON of the data iterator.

Orbax writes each step into a temporary folder and renames it when complete, so a crash (even
SIGKILL) mid-save leaves the previous checkpoints intact; restarting resumes from the newest
complete one. SIGTERM (preemption) is caught: the loop saves at the next step and exits.
"""
import json
import signal
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from medjax.errors import MedjaxError


class Checkpointer:
  """Save every `every` steps, keep the newest `keep`, restore the latest exactly."""

  def __init__(self, directory, *, keep: int = 3, every: int = 100, async_save: bool = False):
    if keep < 1:
      raise MedjaxError(f"config.keep_checkpoints={keep}: keep at least 1 checkpoint")
    if every < 1:
      raise MedjaxError(f"config.checkpoint_every_steps={every}: expected a positive integer")
    self.directory = Path(directory).absolute()
    self.every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "extra"))
    self._preempted = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, extra: dict, *, force: bool = False) -> bool:
    """Saves when `step` is a multiple of `every` (or `force`); returns whether it saved."""
    if not force and step % self.every:
      return False
    if step in self._manager.all_steps():
      return False
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)
    logging.info("checkpoint: saved step %d to %s", step, self.directory)
    return bool(saved)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """(state, extra, step) of `step` (default latest); `abstract_state` gives shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise MedjaxError(f"{self.directory}: no checkpoint to restore")
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise MedjaxError(f"{self.directory}/{step}: cannot restore the train state "
                        f"({type(e).__name__}: {str(e)[:300]}); was it written by another "
                        "config?") from None
    return out.state, dict(out.extra), step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # -- preemption ------------------------------------------------------------------------------

  def watch_preemption(self) -> None:
    """Turns SIGTERM into a flag that `preempted()` reports (the loop then saves and exits)."""
    def handler(signum, frame):  # pylint: disable=unused-argument
      logging.warning("SIGTERM received: saving a checkpoint at the next step, then exiting")
      self._preempted = True
    try:
      signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner's worker thread)
      pass

  def preempted(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._preempted or self._manager.reached_preemption(step)
    return self._preempted


def read_run_config(workdir) -> dict | None:
  path = Path(workdir) / "config.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise MedjaxError(f"{path}: not valid JSON ({e}); delete it or use another --workdir") \
        from None

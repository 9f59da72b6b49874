"""Orbax checkpoints of a train run: the sharded state plus a JSON of the data iterator.

Orbax writes each step into a temporary folder and renames it when complete, so a crash (even
SIGKILL) mid-save leaves the previous checkpoints intact; restarting resumes from the newest
complete one. The directory may be a URL (`gs://...`): it goes through `medjax.paths`/epath.

Preemption: `should_stop(step)` (the SIGTERM watch itself is `medjax.preemption`).

Bad checkpoints: `save` refuses a state holding NaN/Inf; `restore` of the latest step falls back
to the newest step that reads and holds finite values, warning once per step it skips. A step
whose data cannot be read (truncated or garbled files) or holds NaN/Inf is moved to
`<dir>_unreadable/<step>` (never deleted) so that its step number can be saved again; a state
that does not fit the target (another config) is an error and nothing is moved. Readers (export,
evaluation) open a run with `read_only=True`: nothing in it is changed, not even the temporary
folders of a save in progress that orbax would otherwise clean up.
"""
import contextlib
import json
import os
import re
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from medjax import hosts
from medjax import paths
from medjax import preemption
from medjax.errors import MedjaxError

UNREADABLE_SUFFIX = "_unreadable"  # <dir>_unreadable/<step>: steps restore skipped and moved


class Checkpointer:
  """Save every `every` steps, keep the newest `keep`, restore the latest good one exactly.

  With `async_save` a save returns once the arrays are copied to host memory and the files are
  written in the background; `wait()` (or `close()`) must run before the process exits.
  `read_only`: only restore; nothing under `directory` is created, moved or deleted.
  """

  def __init__(self, directory, *, keep: int = 3, every: int = 100, async_save: bool = False,
               read_only: bool = False):
    check_options(keep, every)
    _quiet_aborted_io()
    self.directory = paths.workdir_path(directory)
    self.every = every
    self.read_only = read_only
    self._async = async_save
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             cleanup_tmp_directories=False,
                                             save_interval_steps=0)
    else:
      if hosts.is_lead():
        _check_writable(self.directory)
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True,
                                             enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "extra"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, extra: dict, *, force: bool = False) -> bool:
    """Saves when `step` is a multiple of `every` (or `force`); returns whether it saved.

    A state with a NaN/Inf anywhere is refused (MedjaxError): a checkpoint is always resumable.
    """
    if self.read_only:
      raise RuntimeError(f"{self.directory}: opened read-only; cannot save step {step}")
    if not force and step % self.every:
      return False
    if step in self._manager.all_steps():
      return False
    if not all_finite(state):
      good = self.latest_step()
      raise MedjaxError(f"step {step}: the train state holds NaN or Inf values; not saved to "
                        f"{self.directory} (last good checkpoint: "
                        f"{'none' if good is None else f'step {good}'})")
    with self._os_errors():  # (a failed earlier async save surfaces here)
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)
    logging.info("checkpoint: %s step %d to %s", "saving" if self._async else "saved", step,
                 self.directory)
    return bool(saved)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """(state, extra, step) of `step`, by default of the newest step that restores.

    `abstract_state` gives shapes and shardings. Without `step`, steps whose data cannot be read
    or hold NaN/Inf are skipped with a warning each (and moved aside unless read-only); a state
    that does not fit `abstract_state` ends the search (MedjaxError) and nothing is moved.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if step is not None and step not in steps:
      raise MedjaxError(f"{self.directory}: no checkpoint of step {step} (steps: "
                        f"{', '.join(map(str, sorted(steps))) or 'none'})")
    if not steps:
      raise MedjaxError(f"{self.directory}: no checkpoint to restore")
    skipped = []
    for s in ([step] if step is not None else steps):
      kind, result = self._attempt(abstract_state, s)
      if kind == "ok":
        self._set_aside(skipped, s)
        return result
      where = f"{self.directory}/{s}"
      if kind == "mismatch":
        raise MedjaxError(f"{where}: cannot restore the train state ({result}); was it written "
                          "by another config or medjax version?")
      if kind == "unknown":
        raise MedjaxError(f"{where}: cannot restore the train state ({result})")
      if step is not None:
        raise MedjaxError(f"{where}: {_why(kind, result)}")
      skipped.append((s, kind, result))
    reasons = "; ".join(f"step {s}: {_why(kind, why)}" for s, kind, why in skipped)
    raise MedjaxError(f"{self.directory}: no checkpoint restores ({_clip(reasons, 600)}); nothing "
                      "was moved: move the steps aside to start over, or use another --workdir")

  def _attempt(self, abstract_state: Any, step: int) -> tuple[str, Any]:
    """('ok', (state, extra, step)) or (kind, one-line reason), the same on every process."""
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
      kind, why = "ok", ""
      if not isinstance(out.extra, dict):
        kind, why = "unreadable", f"'extra' holds {type(out.extra).__name__}, not a JSON object"
    except Exception as e:  # pylint: disable=broad-exception-caught
      kind, why = classify_restore_error(e)
    if jax.process_count() > 1:  # a read can fail on some processes only: take the worst
      outcomes = hosts.allgather_json([kind, why])
      kind, why = min(outcomes, key=lambda o: _RANK[o[0]])
    if kind == "ok" and not all_finite(out.state):
      kind, why = "non_finite", ""
    if kind != "ok":
      return kind, why
    return kind, (out.state, dict(out.extra), step)

  def _set_aside(self, skipped: list[tuple[int, str, str]], good: int) -> None:
    """Warns of each skipped step; unless read-only, moves it out of the way (process 0)."""
    moved = {}
    if not self.read_only and skipped:
      if hosts.is_lead():
        moved = {s: self._move_aside(s) for s, _, _ in skipped}
      hosts.sync("medjax_checkpoint_set_aside")
      self._manager.reload()
    for s, kind, why in skipped:
      if self.read_only:
        fate = "left in place (read-only)"
      elif not hosts.is_lead():
        fate = "moved aside by process 0"
      else:
        fate = moved[s]
      logging.warning("checkpoint: skipped step %d in %s: %s; %s; using step %d", s,
                      self.directory, _why(kind, why), fate, good)

  def _move_aside(self, step: int) -> str:
    src = self.directory / str(step)
    root = self.directory.parent / f"{self.directory.name}{UNREADABLE_SUFFIX}"
    try:
      root.mkdir(parents=True, exist_ok=True)
      dest = root / str(step)
      n = 0
      while dest.exists():
        n += 1
        dest = root / f"{step}.{n}"
      src.rename(dest)
    except Exception as e:  # pylint: disable=broad-exception-caught
      return (f"could not move it aside ({type(e).__name__}: {_one_line(e)}), so step {step} "
              "will not be saved again until it is moved")
    return f"moved to {dest}"

  def wait(self) -> None:
    with self._os_errors():
      self._manager.wait_until_finished()

  def close(self) -> None:
    with self._os_errors():
      self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    """Closes however the block ends, so orbax's threads never outlive the interpreter; a
    failed save's error is raised only when the block itself did not fail."""
    if kind is None:
      self.close()
      return
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      logging.warning("checkpoint: closing after an error failed as well", exc_info=False)

  @contextlib.contextmanager
  def _os_errors(self):
    """tensorstore's write errors (a ValueError ending in [os_error_code='28']) as OSError."""
    try:
      yield
    except ValueError as e:
      code = re.search(r"os_error_code='(\d+)'", str(e))
      if code is None:
        raise
      number = int(code.group(1))
      raise OSError(number, f"{os.strerror(number)} (writing a checkpoint)",
                    str(self.directory)) from None

  # -- preemption ------------------------------------------------------------------------------

  def watch_preemption(self, grace_s: float | None = None) -> None:
    """Starts catching SIGTERM (idempotent; `should_stop` also calls it). Call it from the main
    thread after `medjax.distributed.maybe_initialize_distributed()`.

    `grace_s`: after a SIGTERM, end the process if no `should_stop` call comes within this many
    seconds (the loop is stuck, e.g. in a collective a peer never joins). None: wait.
    """
    preemption.WATCH.install(grace_s)

  def should_stop(self, step: int) -> bool:
    """True when the run must save `step` (force) and exit 0 as preempted.

    Call it on every process after every step with the same, increasing step numbers (JAX's
    sync point counts on that); it costs no device sync and no collective per step.
    """
    preemption.WATCH.install()
    if preemption.WATCH.requested:
      preemption.WATCH.alive.set()
    if jax.process_count() > 1:
      return bool(self._manager.reached_preemption(step))
    return preemption.WATCH.requested


def has_checkpoint(directory) -> bool:
  """Whether `directory` holds a finished checkpoint (orbax names those by their step)."""
  directory = paths.workdir_path(directory)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_options(keep: int, every: int) -> None:
  """The config values a Checkpointer takes, checked before anything is written."""
  if keep < 1:
    raise MedjaxError(f"config.keep_checkpoints={keep}: keep at least 1 checkpoint")
  if every < 1:
    raise MedjaxError(f"config.checkpoint_every_steps={every}: expected a positive integer")


def _check_writable(directory) -> None:
  """A folder that cannot hold checkpoints is an error now, not a traceback from orbax's
  background thread at the first save (or a run that trains for hours and saves nothing)."""
  probe = directory / f".medjax-write-test-{os.getpid()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise MedjaxError(f"{directory}: cannot write checkpoints there ({type(e).__name__}: "
                      f"{e.strerror or e}); check the --workdir and its permissions") from None


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_float(x)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def all_finite(tree: Any) -> bool:
  """Whether every floating leaf is free of NaN/Inf: one jitted reduction on the devices (no
  copy of the arrays to the host; with several processes a global value all of them agree on).

  With one process on CPU the arrays already are host memory: NumPy reads them in place, which
  spares compiling the reduction (~2 s for a U-Net state's 600 leaves on 2 cores).
  """
  leaves = [x for x in jax.tree.leaves(tree) if _is_float(x)]
  on_cpu = all(d.platform == "cpu" for x in leaves if isinstance(x, jax.Array)
               for d in x.sharding.device_set)
  if jax.process_count() == 1 and on_cpu:
    return all(bool(np.isfinite(v).all()) for v in jax.device_get(leaves))
  return bool(hosts.to_host(_all_finite(leaves)))


def _is_float(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return jnp.issubdtype(np.result_type(x) if dtype is None else dtype, jnp.inexact)


# Why restore skips a step, as the warnings say it.
_WHY = {"unreadable": "its data cannot be read", "non_finite": "it holds NaN or Inf values"}
# Which outcome of a restore wins when processes disagree: an error that moves nothing first.
_RANK = {"mismatch": 0, "unknown": 1, "unreadable": 2, "non_finite": 3, "ok": 4}
# Substrings of orbax's errors when the on-disk tree does not fit the target (another config).
_MISMATCH = ("tree structures do not match", "is not compatible with the stored shape")
# TensorStore status codes of a read that failed on the data itself (not access or the network).
_DATA_ERRORS = ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND")
_READ_PHRASES = ("Error reading", "Error decoding", "does not exist")


def _why(kind: str, detail: str) -> str:
  return f"{_WHY[kind]} ({detail})" if detail else _WHY[kind]


def _one_line(e: BaseException) -> str:
  text = str(e).split(" [tensorstore_spec", 1)[0].split(" See full TensorStore details", 1)[0]
  return _clip(" ".join(text.split()), 240)


def _clip(text: str, limit: int) -> str:
  return text if len(text) <= limit else text[:limit - 3] + "..."


def classify_restore_error(e: BaseException) -> tuple[str, str]:
  """('unreadable' | 'mismatch' | 'unknown', one-line reason) of a failed restore.

  'unreadable': the step's files are damaged, whatever the target (a TensorStore data error, a
  file that is not JSON, an item folder missing); 'mismatch': the stored tree does not fit the
  target. Anything else is 'unknown' (e.g. permissions, the network), which moves nothing.
  """
  chain, x = [], e
  while x is not None and len(chain) < 10:
    chain.append(x)
    x = x.__cause__ or x.__context__
  for x in chain:
    if any(m in str(x) for m in _MISMATCH):
      return "mismatch", f"{type(x).__name__}: {_one_line(x)}"
  for x in chain:
    text = str(x).strip("'\"")
    damaged = (isinstance(x, (json.JSONDecodeError, UnicodeDecodeError))
               or (text.startswith(_DATA_ERRORS) and any(p in text for p in _READ_PHRASES))
               or (isinstance(x, KeyError) and "was not found in the checkpoint" in text))
    if damaged:
      return "unreadable", f"{type(x).__name__}: {_one_line(x)}"
  return "unknown", f"{type(e).__name__}: {_one_line(e)}"


_IO_FILTER_ON = False
# What asyncio reports for TensorStore callbacks into orbax's closed event loop, and for
# coroutines collected at interpreter exit: symptoms of an error the main thread reports itself.
_SHUTDOWN_NOISE = ("Event loop is closed", "sys.meta_path is None")


def _quiet_aborted_io() -> None:
  """After a failed restore or an interrupted save, the reads and writes still in flight end
  later, from other threads, and Python prints a traceback for each (unraisable exceptions):
  TensorStore callbacks into orbax's closed event loop ('Event loop is closed') and orbax's read
  coroutines that failed after the first. Drop exactly those; other unraisables pass on."""
  global _IO_FILTER_ON
  if _IO_FILTER_ON:
    return
  _IO_FILTER_ON = True
  previous = sys.unraisablehook

  def hook(unraisable):
    value, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    if any(text in str(value) for text in _SHUTDOWN_NOISE):
      return
    if code is not None and f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in code.co_filename:
      return
    previous(unraisable)
  sys.unraisablehook = hook
  # (the pending read/write coroutines of a failed restore or save, collected at exit)
  warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)


def read_run_config(workdir) -> dict | None:
  path = paths.workdir_path(workdir) / "config.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise MedjaxError(f"{path}: not valid JSON ({e}); delete it or use another --workdir") \
        from None

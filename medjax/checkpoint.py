"""Orbax checkpoints of a train run: the sharded state plus a JSON of the data iterator.

Orbax writes each step into a temporary folder and renames it when complete, so a crash (even
SIGKILL) mid-save leaves the previous checkpoints intact; restarting resumes from the newest
complete one. The directory may be a URL (`gs://...`): it goes through `medjax.paths`/epath.

Preemption, one mechanism for one process and many: the loop calls `should_stop(step)` once per
step on every process; after a SIGTERM to any process it returns True on all of them at the same
step (JAX's preemption sync point, which orbax's `reached_preemption` wraps: the notice spreads
through the coordination service and every process stops at max(step) + 1). The loop then saves
that step and exits 0. With one process a SIGTERM handler sets a flag that `should_stop` reads.
JAX's own SIGTERM handler (its preemption notifier, installed by `jax.distributed.initialize`) is
kept: ours passes the signal on to it. After the first SIGTERM, a second SIGTERM or a SIGINT ends
the process at once (default handlers), also while it is stuck in a collective; with `grace_s`,
so does a loop that makes no step for that long after the SIGTERM.
"""
import contextlib
import ctypes
import json
import os
import re
import signal
import sys
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from medjax import paths
from medjax.errors import MedjaxError


class Checkpointer:
  """Save every `every` steps, keep the newest `keep`, restore the latest exactly.

  With `async_save` a save returns once the arrays are copied to host memory and the files are
  written in the background; `wait()` (or `close()`) must run before the process exits.
  """

  def __init__(self, directory, *, keep: int = 3, every: int = 100, async_save: bool = False):
    if keep < 1:
      raise MedjaxError(f"config.keep_checkpoints={keep}: keep at least 1 checkpoint")
    if every < 1:
      raise MedjaxError(f"config.checkpoint_every_steps={every}: expected a positive integer")
    self.directory = paths.workdir_path(directory)
    self.every = every
    self._async = async_save
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
    """Saves when `step` is a multiple of `every` (or `force`); returns whether it saved."""
    if not force and step % self.every:
      return False
    if step in self._manager.all_steps():
      return False
    with self._os_errors():  # (a failed earlier async save surfaces here)
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)), force=True)
    logging.info("checkpoint: %s step %d to %s", "saving" if self._async else "saved", step,
                 self.directory)
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
                        f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); was it "
                        "written by another config?") from None
    return out.state, dict(out.extra), step

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
    _PREEMPTION.install(grace_s)

  def should_stop(self, step: int) -> bool:
    """True when the run must save `step` (force) and exit 0 as preempted.

    Call it on every process after every step with the same, increasing step numbers (JAX's
    sync point counts on that); it costs no device sync and no collective per step.
    """
    _PREEMPTION.install()
    if _PREEMPTION.requested:
      _PREEMPTION.alive.set()
    if jax.process_count() > 1:
      return bool(self._manager.reached_preemption(step))
    return _PREEMPTION.requested


class _Preemption:
  """The process-wide SIGTERM watch (signal handlers belong to the process, not a Checkpointer).

  Python runs signal handlers in the main thread between bytecodes, so a main thread blocked in
  XLA (a collective, a long computation) would not see a SIGTERM. Python's C-level handler also
  writes the signal number to a wakeup fd at once; a watcher thread reads it and handles the
  first SIGTERM right away: sets the flag, passes the signal on to JAX's notifier, and makes the
  next SIGTERM or SIGINT fatal (default actions, set at the OS level).
  """

  def __init__(self):
    self.requested = False
    self.grace_s: float | None = None
    self.alive = threading.Event()  # should_stop ran after the SIGTERM
    self._installed = False
    self._chained = None  # the sigaction that was there before ours (JAX's notifier), raw bytes
    self._lock = threading.Lock()
    self._handled = False

  def install(self, grace_s: float | None = None) -> None:
    if grace_s is not None:
      self.grace_s = grace_s
    if self._installed:
      return
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set from the main thread (e.g. a test runner thread)
    jax_notifier = jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
    if jax.process_count() > 1 and not jax_notifier:
      logging.warning("preemption: JAX's preemption service is off (jax_enable_preemption_service)"
                      ", so processes cannot agree on a step to save; SIGTERM ends the run")
      self._installed = True
      return
    self._chained = _current_sigaction(signal.SIGTERM) if jax_notifier else None
    signal.signal(signal.SIGTERM, self._handle)
    self._start_watcher()
    self._installed = True

  def _start_watcher(self) -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    old = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    if old != -1:  # someone else's (an asyncio loop): keep theirs, rely on the Python handler
      signal.set_wakeup_fd(old)
      os.close(read_fd)
      os.close(write_fd)
      return
    threading.Thread(target=self._watch, args=(read_fd,), name="medjax-sigterm",
                     daemon=True).start()

  def _watch(self, read_fd: int) -> None:
    while signal.SIGTERM not in os.read(read_fd, 64):
      pass
    self._first_sigterm()
    if self.grace_s is not None and not self.alive.wait(self.grace_s):
      logging.error("preemption: no step within %g s of SIGTERM; exiting now", self.grace_s)
      os.kill(os.getpid(), signal.SIGTERM)  # the default action by now

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._first_sigterm()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (already so at the OS level)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

  def _first_sigterm(self) -> None:
    with self._lock:
      if self._handled:
        return
      self._handled = True
    self.requested = True
    if self._chained is not None:
      _restore_sigaction(signal.SIGTERM, self._chained)
      signal.raise_signal(signal.SIGTERM)  # JAX's notifier handles it now, in this thread
    _set_default_action(signal.SIGTERM)
    _set_default_action(signal.SIGINT)
    logging.warning("SIGTERM received: saving a checkpoint at the step all processes agree on, "
                    "then exiting; a second SIGTERM or Ctrl-C stops at once")


_PREEMPTION = _Preemption()


def _libc():
  if not sys.platform.startswith(("linux", "darwin")):
    return None
  try:
    return ctypes.CDLL(None, use_errno=True)
  except OSError:
    return None


def _current_sigaction(signum: int) -> bytes | None:
  """The installed `struct sigaction` of `signum` as opaque bytes (no layout is assumed)."""
  libc = _libc()
  if libc is None:
    return None
  buf = ctypes.create_string_buffer(1024)  # larger than struct sigaction on any libc
  if libc.sigaction(signum, None, buf) != 0:
    return None
  return buf.raw


def _restore_sigaction(signum: int, raw: bytes) -> None:
  libc = _libc()
  if libc is not None:
    libc.sigaction(signum, ctypes.create_string_buffer(raw, len(raw)), None)


def _set_default_action(signum: int) -> None:
  """SIG_DFL from any thread (Python's `signal.signal` works only in the main thread)."""
  libc = _libc()
  if libc is None:
    if threading.current_thread() is threading.main_thread():
      signal.signal(signum, signal.SIG_DFL)
    return
  libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
  libc.signal.restype = ctypes.c_void_p
  libc.signal(signum, None)  # NULL == SIG_DFL


def has_checkpoint(directory) -> bool:
  """Whether `directory` holds a finished checkpoint (orbax names those by their step)."""
  directory = paths.workdir_path(directory)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def read_run_config(workdir) -> dict | None:
  path = paths.workdir_path(workdir) / "config.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise MedjaxError(f"{path}: not valid JSON ({e}); delete it or use another --workdir") \
        from None

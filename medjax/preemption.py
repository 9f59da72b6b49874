"""The process-wide SIGTERM watch behind `Checkpointer.should_stop` (`medjax.checkpoint`).

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
import ctypes
import os
import signal
import sys
import threading

import jax
from absl import logging


class SigtermWatch:
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


WATCH = SigtermWatch()


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

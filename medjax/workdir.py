"""Output folders checked before anything is built or written, and held while a run uses them.

`take(path)` is what train and evaluate do first on process 0: the path must be a directory or
creatable, and writable (a probe file is created and removed, so read-only filesystems, missing
permissions and full disks show up here, not after minutes of model building); then it takes a
lock: `fcntl.flock` on `<workdir>/.medjax.lock`, holding the owner's pid and host. The kernel
drops a flock when its process dies, so a killed run never blocks the next one; a second run on
a held workdir stops with one line naming the owner. URL workdirs (gs://...) get no lock and no
probe (object stores have neither): do not start two runs on one bucket path.

`Held.discard()` removes what the run created (the entries that were not there when it started,
the folder itself if it made it), for a fresh run that fails before its first checkpoint.
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path

from absl import logging
from etils import epath

from medjax import paths
from medjax.errors import MedjaxError

LOCK_NAME = ".medjax.lock"
# flock is not supported there (some network filesystems): run without a lock, with a warning.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def output_path(path, flag: str = "--workdir") -> epath.Path:
  """`path` as an epath; refuses an empty one (it would mean the current directory)."""
  if not os.fspath(path).strip():
    raise MedjaxError(f"{flag} is empty: give the directory to write to")
  return paths.workdir_path(path)


def _stat(path: Path, flag: str) -> os.stat_result | None:
  """os.stat of `path`, None when nothing is there; a dangling link or a loop is an error."""
  try:
    return os.stat(path)
  except FileNotFoundError:
    if os.path.lexists(path):
      raise MedjaxError(f"{flag}={path}: a symbolic link to nothing "
                        f"({os.readlink(path)!r})") from None
    return None
  except NotADirectoryError:
    parent = next(p for p in path.parents if os.path.isfile(p))
    raise MedjaxError(f"{flag}={path}: {parent} is a file, not a directory") from None
  except OSError as e:  # ELOOP, EACCES on a parent
    raise MedjaxError(f"{flag}={path}: {e.strerror}") from None


def check_dir(path, flag: str = "--workdir") -> epath.Path:
  """`path` is a directory, or one can be made there, and a file can be written in it.

  Nothing is created: a missing directory is probed in its nearest existing parent.
  """
  path = output_path(path, flag)
  if paths.is_url(path):
    return path
  here = Path(path)
  st = _stat(here, flag)
  if st is not None and not os.path.isdir(here):
    raise MedjaxError(f"{flag}={here}: exists and is not a directory")
  probe_in = here
  while st is None:
    probe_in = probe_in.parent
    st = _stat(probe_in, flag)
    if st is not None and not os.path.isdir(probe_in):
      raise MedjaxError(f"{flag}={here}: {probe_in} is a file, not a directory")
  probe(probe_in, f"{flag}={here}" + ("" if probe_in == here else f": in {probe_in}"))
  return path


def probe(folder: Path, what: str) -> None:
  """Creates, writes one byte to and removes a file in `folder` (no os.access: it ignores
  read-only mounts and full disks, and says yes to root everywhere)."""
  name = folder / f".medjax-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
      os.write(fd, b"\n")
      os.fsync(fd)
    finally:
      os.close(fd)
      with contextlib.suppress(OSError):
        os.unlink(name)
  except OSError as e:
    raise MedjaxError(f"{what}: cannot write a file ({e.strerror})") from None


class Held:
  """A taken workdir: its lock (None for URLs and filesystems without flock) and what it held
  before the run, so `discard` removes only what the run created."""

  def __init__(self, path: epath.Path, created: bool, before: set[str], fd: int | None):
    self.path, self.created, self.before, self._fd = path, created, before, fd

  def discard(self) -> None:
    """Removes the entries the run created (and the folder, if it made it and it is empty)."""
    for entry in list(self.path.iterdir()):
      if entry.name not in self.before and entry.name != LOCK_NAME:
        logging.info("removing %s (the run failed before its first checkpoint)", entry)
        with contextlib.suppress(OSError):
          entry.rmtree() if entry.is_dir() else entry.unlink()
    if self.created:
      self.close()
      with contextlib.suppress(OSError):
        self.path.rmdir()

  def close(self) -> None:
    """Releases the lock and removes the lock file (while still holding it: see `_lock`)."""
    if self._fd is None:
      return
    lock = Path(self.path) / LOCK_NAME
    with contextlib.suppress(OSError):
      if _same_file(self._fd, lock):
        os.unlink(lock)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def take(path, command: str, flag: str = "--workdir") -> Held:
  """Checks `path` (`check_dir`), creates it if needed and locks it for `command`."""
  path = check_dir(path, flag)
  created = not path.exists()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise MedjaxError(f"{flag}={path}: cannot create it ({e.strerror})") from None
  before = {p.name for p in path.iterdir()}
  fd = None if paths.is_url(path) else _lock(Path(path), command, flag)
  return Held(path, created, before, fd)


def _same_file(fd: int, path: Path) -> bool:
  a, b = os.fstat(fd), os.stat(path)
  return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _lock(folder: Path, command: str, flag: str) -> int | None:
  """An exclusive flock on folder/.medjax.lock holding pid and host; the open fd keeps it."""
  lock = folder / LOCK_NAME
  while True:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = _owner(fd)
      os.close(fd)
      raise MedjaxError(f"{flag}={folder} is in use by {owner} (lock file {lock}); wait for "
                        "that run to end or use another directory") from None
    except OSError as e:
      os.close(fd)
      if e.errno in _NO_LOCKS:
        logging.warning("%s: no file locks on this filesystem (%s); not locking it", folder,
                        e.strerror)
        return None
      raise
    # Its last owner may have removed the file between our open and flock: lock the new one.
    try:
      if _same_file(fd, lock):
        break
    except FileNotFoundError:
      pass
    os.close(fd)
  owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  try:
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(owner) + "\n").encode())
  except OSError:
    with contextlib.suppress(OSError):
      os.unlink(lock)
    os.close(fd)
    raise
  return fd


def _owner(fd: int) -> str:
  try:
    owner = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    text = f"pid {owner['pid']} on host {owner['host']}"
    return f"{text} ({owner['command']} since {owner['started']})" if "command" in owner else text
  except (OSError, ValueError, KeyError, TypeError):
    return "another process"

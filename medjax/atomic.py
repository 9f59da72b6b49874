"""Write-then-rename, so a crash or bad input never leaves a half-written output file.

Local paths are written beside the target and renamed (`os.replace`, atomic on POSIX). URLs
(`gs://...`, see `medjax.paths`) are written to a local temp file first, since writers such as
PIL or torch want a local filename, then uploaded to a temp object beside the target and renamed
through epath; on object stores a rename is a copy, but the target only ever appears complete.
"""
import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from etils import epath

from medjax import paths

_COPY_CHUNK = 16 << 20


@contextlib.contextmanager
def atomic_path(path, mode: int = 0o644):
  """Yields a local temp path; on success it becomes `path` (readable by all), on error it is
  removed and `path` is untouched. `path` may be a URL (then `mode` does not apply)."""
  if paths.is_url(path):
    with tempfile.TemporaryDirectory(prefix="medjax-upload-") as folder:
      local = Path(folder) / paths.workdir_path(path).name
      yield local
      upload(local, path)
    return
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    yield Path(tmp)
    os.chmod(tmp, mode)  # mkstemp creates 0600
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    if isinstance(e, OSError) and e.filename is None and e.errno:
      raise named(e, path) from e
    raise


def named(error: OSError, path) -> OSError:
  """`error` naming `path` (a failed write() names no file, so `error: ...` could not say which
  file the disk was full for)."""
  if error.filename is not None or not error.errno:
    return error
  return OSError(error.errno, error.strerror, os.fspath(path))


def upload(local, target) -> epath.Path:
  """Copies a local file to `target` (any epath path) via a temp object beside it + rename."""
  target = paths.workdir_path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
  try:
    with open(local, "rb") as src, tmp.open("wb") as dst:
      shutil.copyfileobj(src, dst, _COPY_CHUNK)
    tmp.replace(target)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink(missing_ok=True)
    raise
  return target


def write_text(path, text: str) -> Path | epath.Path:
  """Writes `text` atomically; returns the path (an `epath.Path` for URLs)."""
  with atomic_path(path) as tmp:
    tmp.write_text(text)
  return paths.workdir_path(path) if paths.is_url(path) else Path(path)

"""Write-then-rename, so a crash or bad input never leaves a half-written output file."""
import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, mode: int = 0o644):
  """Yields a temp path beside `path`; on success it becomes `path` (readable by all), on error
  it is removed and `path` is untouched."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    yield Path(tmp)
    os.chmod(tmp, mode)  # mkstemp creates 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path, text: str) -> Path:
  with atomic_path(path) as tmp:
    tmp.write_text(text)
  return Path(path)

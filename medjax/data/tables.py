"""CSV / CSV.GZ reading with the column checks every dataset index needs."""
import csv
import gzip
import io
import os
from collections.abc import Iterator, Sequence

from medjax.errors import MedjaxError


def check_root(root, what: str) -> str:
  """Fails early and clearly on a missing or unset dataset root."""
  root = os.fspath(root or "")
  if not root:
    raise MedjaxError(f"{what}: data root is not set (config.data.root)")
  if os.path.exists(root) and not os.path.isdir(root):
    raise MedjaxError(f"{root}: {what} root is a file, not a directory (config.data.root)")
  if not os.path.isdir(root):
    raise MedjaxError(f"{root}: {what} root directory does not exist")
  return root


def read_csv(path: str, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
  """Yields (line_number, row) from a .csv or .csv.gz after checking the header has `required`.

  Raises:
    MedjaxError naming the file for a missing file, an empty file, or missing columns.
  """
  if not os.path.isfile(path):
    raise MedjaxError(f"{path}: file not found")
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f)
      try:
        header = [name.strip() for name in next(reader)]
      except StopIteration:
        raise MedjaxError(f"{path}: empty CSV file (no header)") from None
      missing = [name for name in required if name not in header]
      if missing:
        raise MedjaxError(f"{path}: CSV is missing required column(s) {missing}; found {header}")
      for row in reader:
        if not row or all(not cell.strip() for cell in row):
          continue
        if len(row) != len(header):
          raise MedjaxError(f"{path}:{reader.line_num}: row has {len(row)} fields, header has "
                            f"{len(header)}")
        yield reader.line_num, dict(zip(header, row, strict=True))
  except (OSError, EOFError, csv.Error, UnicodeDecodeError, gzip.BadGzipFile) as e:
    raise MedjaxError(f"{path}: unreadable CSV ({type(e).__name__}: {e})") from None


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
  """Writes a .csv or .csv.gz atomically (temp file, then rename)."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  writer.writerows(rows)
  data = buffer.getvalue().encode("utf-8")
  if path.endswith(".gz"):
    data = gzip.compress(data, mtime=0)
  atomic_write_bytes(path, data)


def atomic_write_bytes(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)

"""Bad files under `on_bad_file='skip'`: each counted once, reported, and held to a budget.

Skipping must not turn a broken data set into an endless loop of skips (every file bad and a
stream that repeats forever never yields a batch). `config.data.max_bad_fraction` bounds it:
more than that fraction of a data pass bad, or of the files read so far once enough were read
from a shuffled stream, stops the pipeline with one MedjaxError naming the count and a file.
"""
import threading
from collections.abc import Sequence
from typing import Any

from absl import logging

from medjax.errors import MedjaxError

DEFAULT_MAX_BAD_FRACTION = 0.5
MAX_EXAMPLES = 20  # messages kept for reports, summary.json and checkpoints
MAX_LOGGED = 20  # bad files logged one by one per session; the rest are only counted
# A shuffled stream's running fraction is judged after this many reads, then after each doubling:
# a few checks on growing samples, so a data set just under the budget is not stopped by chance.
MIN_SAMPLE = 256


def check_fraction(value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
    raise MedjaxError(f"config.data.max_bad_fraction={value!r}: expected a number in [0, 1]")
  return float(value)


def _over(bad: int, total: int, fraction: float) -> bool:
  """More than `fraction` of `total` bad; a total with nothing good always is."""
  return total > 0 and (bad > fraction * total or bad >= total)


def _hint(fraction: float, example: str) -> str:
  return (f"more than config.data.max_bad_fraction={fraction:g} allows; e.g. {example}. Fix or "
          "remove them, or raise config.data.max_bad_fraction")


def file_index(records: Sequence[Any]) -> dict[str, int]:
  """File -> a number, for the files of `records` in order: what bad files are counted by (the
  image, or for PI-CAI slices their study's T2W file; phantoms have keys only)."""
  out: dict[str, int] = {}
  for record in records:
    out.setdefault(record.path or record.key, len(out))
  return out


def check_index(skipped: Sequence[str], records: Sequence[Any], fraction: float,
                where: str) -> None:
  """The budget over what the indexer dropped (missing images, bad rows, broken studies) and the
  files it kept."""
  total = len(skipped) + len(file_index(records)) if skipped else 0
  if skipped and _over(len(skipped), total, fraction):
    raise MedjaxError(f"{where}: {len(skipped)} of {total} indexed files are bad, "
                      f"{_hint(fraction, skipped[0])}")


class SkipLedger:
  """Counts the bad files met while reading, distinct by record, and enforces the budget.

  `pass_size` is how many elements one data pass of this process reads (bad ones included);
  `sampled` allows the early judgement on the running fraction (shuffled streams only: in
  file order, bad files may cluster). The state travels in the data iterator's checkpoints.
  """

  def __init__(self, *, index_skipped: Sequence[str], file_index: dict[str, int],
               pass_size: int, max_bad_fraction: float, sampled: bool):
    self.index_skipped = list(index_skipped)
    self.fraction = check_fraction(max_bad_fraction)
    self._file_index = file_index
    self._pass_size = max(1, int(pass_size))
    self._sampled = sampled
    self._lock = threading.Lock()
    self._bad: dict[int, str] = {}  # file number (`file_index`) -> message ('' if restored)
    self._reads = self._bad_reads = 0  # since the run started (restored with the state)
    self._window = [0, 0]  # reads and bad reads in the current pass
    self._next_sample = MIN_SAMPLE
    self._logged = 0
    self._last = ""

  @property
  def count(self) -> int:
    """Distinct bad files: dropped while indexing plus found while reading."""
    return len(self.index_skipped) + len(self._bad)

  def messages(self) -> list[str]:
    with self._lock:
      return self.index_skipped + [m for _, m in sorted(self._bad.items()) if m]

  def good(self) -> None:
    self._read(False)

  def bad(self, file: str, message: str) -> None:
    """Records a bad file; raises MedjaxError when the budget is spent."""
    position = self._file_index.get(file, -1 - len(self._bad))
    self._last = message
    with self._lock:
      new = not self._bad.get(position)  # (restored entries carry no message)
      if new:
        self._bad[position] = message
    if new and self._logged < MAX_LOGGED:
      self._logged += 1
      last = self._logged == MAX_LOGGED
      logging.warning("medjax.data: skipping bad file: %s%s", message,
                      " (further bad files are counted, not logged)" if last else "")
    self._read(True)

  def _read(self, bad: bool) -> None:
    self._reads += 1
    self._bad_reads += bad
    self._window[0] += 1
    self._window[1] += bad
    reads, bads = self._window
    if bad and _over(bads, self._pass_size, self.fraction):
      raise MedjaxError(f"medjax.data: {bads} of the {self._pass_size} files of a data pass are "
                        f"bad, {_hint(self.fraction, self._last)}")
    if self._sampled and self._reads >= self._next_sample:
      self._next_sample *= 2
      if _over(self._bad_reads, self._reads, self.fraction):
        raise MedjaxError(f"medjax.data: {self._bad_reads} of the first {self._reads} files read "
                          f"were bad ({len(self._bad)} distinct files), "
                          f"{_hint(self.fraction, self._last)}")
    if reads >= self._pass_size:
      self._window = [0, 0]

  def report(self) -> str:
    messages = self.messages()
    if not self.count:
      return "no files skipped"
    lines = "\n  ".join(messages[:MAX_EXAMPLES])
    more = self.count - min(len(messages), MAX_EXAMPLES)
    tail = f"\n  ... and {more} more" if more else ""
    return f"skipped {self.count} bad file(s) (each counted once):\n  {lines}{tail}"

  def summary(self) -> dict:
    """What `merge` takes: this process's skips (JSON-able)."""
    with self._lock:
      bad = sorted(self._bad)
      examples = {str(p): m for p, m in sorted(self._bad.items()) if m}
    return {"index_count": len(self.index_skipped),
            "index_examples": self.index_skipped[:MAX_EXAMPLES],
            "bad": bad, "examples": dict(list(examples.items())[:MAX_EXAMPLES])}

  def get_state(self) -> dict:
    with self._lock:
      bad = sorted(self._bad)
      examples = {str(p): m for p, m in sorted(self._bad.items()) if m}
    return {"bad": bad, "examples": dict(list(examples.items())[:MAX_EXAMPLES]),
            "reads": self._reads, "bad_reads": self._bad_reads, "window": list(self._window)}

  def set_state(self, state: dict | None) -> None:
    state = state or {}  # older checkpoints hold no ledger: count afresh
    examples = state.get("examples", {})
    with self._lock:
      self._bad = {int(p): examples.get(str(p), "") for p in state.get("bad", [])}
    self._reads, self._bad_reads = int(state.get("reads", 0)), int(state.get("bad_reads", 0))
    self._window = [int(v) for v in state.get("window", [0, 0])]
    self._next_sample = MIN_SAMPLE
    while self._next_sample <= self._reads:
      self._next_sample *= 2


def merge(summaries: Sequence[dict]) -> dict:
  """Processes' `SkipLedger.summary()`s -> {'count', 'examples'}: files dropped by the indexer
  (the same on every process) once, plus the distinct files found bad by any process."""
  if not summaries:
    return {"count": 0, "examples": []}
  bad, examples = set(), {}
  for s in summaries:
    bad.update(s["bad"])
    for position, message in s["examples"].items():
      examples.setdefault(int(position), message)
  messages = list(summaries[0]["index_examples"]) + [m for _, m in sorted(examples.items())]
  return {"count": summaries[0]["index_count"] + len(bad), "examples": messages[:MAX_EXAMPLES]}

"""Subprocesses that tests late in the session need, started when the session starts.

On a 2-core machine, single-threaded work (XLA compiles above all) leaves a core idle for much of
a test run. A job started at collection time with the lowest CPU priority (nice 19) runs in that
idle time and yields the CPU to everything else. Only jobs that depend on nothing and are not
timed go here (a 1-process reference run, not a run that gets signals).

A test module maps a fixture name to its jobs: `EARLY_JOBS = {"runs": {"name": factory}}`, where
`factory(path)` returns `(argv, env)` for a job whose files go under `path` (not created). Once
collection selects a test that uses the fixture, tests/conftest.py queues the jobs (one runs at a
time). The fixture calls `wait(jobs, names)`: a job not started yet starts then, at normal
priority; it returns each job's exit code, output and path. Without the queue (a run without
tests/conftest.py), `wait` just runs them.
"""
import contextlib
import dataclasses
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
Factory = Callable[[Path], tuple[list[str], dict]]


@dataclasses.dataclass
class Result:
  returncode: int
  output: str
  path: Path


class _Job:

  def __init__(self, name: str, factory: Factory, root: Path):
    self.path, self.log = root / name, root / f"{name}.log"
    self.factory, self.proc = factory, None

  def start(self, nice: bool) -> None:
    argv, env = self.factory(self.path)
    if nice and shutil.which("nice"):  # from the start, so processes it starts inherit it
      argv = ["nice", "-n", "19", *argv]
    with open(self.log, "w") as log:
      self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT)
    if nice and not argv[0] == "nice":
      with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, self.proc.pid, 19)


_lock = threading.Lock()
_jobs: dict[str, _Job] = {}
_queue: list[str] = []
_state: dict = {"root": None, "runner": None}


def _root() -> Path:
  if _state["root"] is None:
    _state["root"] = Path(tempfile.mkdtemp(prefix="medjax-early-jobs-"))
  return _state["root"]


def _job(name: str, jobs: dict[str, Factory]) -> _Job:
  if name not in _jobs:
    _jobs[name] = _Job(name, jobs[name], _root())
  return _jobs[name]


def queue(jobs: dict[str, Factory]) -> None:
  """Queues `jobs` (names unique in the session) to run one at a time, niced, in the background."""
  with _lock:
    for name in jobs:
      if name not in _jobs:
        _job(name, jobs)
        _queue.append(name)
    if _queue and _state["runner"] is None:
      _state["runner"] = threading.Thread(target=_run, name="early-jobs", daemon=True)
      _state["runner"].start()


def _run() -> None:
  while True:
    with _lock:
      if not _queue:
        _state["runner"] = None
        return
      job = _jobs[_queue.pop(0)]
      job.start(nice=True)
    job.proc.wait()


def wait(jobs: dict[str, Factory], names, timeout: float = 1800) -> dict[str, Result]:
  """Each named job's result, once it has ended; the ones not started yet start now, at once."""
  with _lock:
    for name in names:
      job = _job(name, jobs)
      if job.proc is None:
        if name in _queue:
          _queue.remove(name)
        job.start(nice=False)
  results = {}
  for name in names:
    job = _jobs[name]
    job.proc.wait(timeout=timeout)
    results[name] = Result(job.proc.returncode, job.log.read_text(), job.path)
  return results


def stop() -> None:
  """Ends the session's jobs (killed if still running) and removes their files."""
  with _lock:
    _queue.clear()
    for job in _jobs.values():
      if job.proc is not None and job.proc.poll() is None:
        job.proc.kill()
        job.proc.wait()
    _jobs.clear()
    root, _state["root"] = _state["root"], None
  if root is not None:
    shutil.rmtree(root, ignore_errors=True)

#!/usr/bin/env python3
r"""Runs one command as N JAX processes on this machine, as a cluster would run it on N hosts.

  python launch/local.py --num_processes=2 --devices_per_process=2 -- \
      python -m medjax.train --config=configs/cxr_unet.py --workdir=/tmp/run

Each copy gets the generic multi-process variables that `medjax.distributed` reads
(`JAX_COORDINATOR_ADDRESS` = a free localhost port, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`),
`XLA_FLAGS=--xla_force_host_platform_device_count=D` (added to any XLA_FLAGS already set) and
`JAX_PLATFORMS=cpu` unless JAX_PLATFORMS is set. Output lines are prefixed with `[pK]`.
SIGTERM and SIGINT are passed on to every process (the second one of either ends them). When one
process fails, the others get `--grace_s` seconds to end by themselves, then SIGTERM, then
SIGKILL. The exit code is 0 only if every process exits 0, else the first failure's code.

Only the standard library: it imports no jax. Tests import it and call `launch(...)`.
"""
import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A TCP port nobody listens on now (the coordinator of process 0 binds it moments later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: Mapping[str, str], process_id: int, num_processes: int, port: int,
                devices_per_process: int) -> dict[str, str]:
  """The environment of process `process_id`."""
  env = dict(base)
  env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
  env["JAX_NUM_PROCESSES"] = str(num_processes)
  env["JAX_PROCESS_ID"] = str(process_id)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
  env["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_COUNT_FLAG}={devices_per_process}"])
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


# Started in each child before the command (Linux): SIGKILL when the launcher dies, so no process
# is left waiting forever for its peers; then exec the command (same pid). A shim rather than
# `preexec_fn`, which runs Python between fork and exec and is unsafe in a threaded parent.
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "  ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "  pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "  sys.exit(1)  # the launcher is gone already\n"
    "try:\n"
    "  os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as e:\n"
    "  sys.exit(f'launch/local.py: cannot run {sys.argv[2]}: {e}')\n")


def _command(cmd: Sequence[str]) -> list[str]:
  if not sys.platform.startswith("linux"):
    return list(cmd)
  return [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *cmd]


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
  for raw in iter(stream.readline, b""):
    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    with lock:
      out.write(f"{prefix} {line}\n")
      out.flush()
  stream.close()


def _exit_code(code: int) -> int:
  return 128 - code if code < 0 else code  # killed by signal s: 128 + s, as a shell reports it


def launch(cmd: Sequence[str], num_processes: int, devices_per_process: int = 1, *,
           env: Mapping[str, str] | None = None, grace_s: float = 10.0, out=None,
           cwd: str | None = None) -> int:
  """Runs `cmd` as `num_processes` processes; returns 0 if all exit 0, else the first failure.

  `out` (default stdout) receives the prefixed output lines. Signal forwarding is set up only
  when called from the main thread.
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"num_processes={num_processes} and devices_per_process="
                     f"{devices_per_process} must be >= 1")
  if not cmd:
    raise ValueError("no command to launch")
  out = sys.stdout if out is None else out
  base = os.environ if env is None else env
  port, lock = free_port(), threading.Lock()
  procs, pumps = [], []
  for i in range(num_processes):
    proc = subprocess.Popen(
        _command(cmd), env=process_env(base, i, num_processes, port, devices_per_process),
        cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)  # a terminal's Ctrl-C reaches them once, through us
    procs.append(proc)
  for i, proc in enumerate(procs):
    pumps.append(threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}]", out, lock),
                                  daemon=True))
    pumps[-1].start()

  def forward(signum, frame):  # pylint: disable=unused-argument
    for p in procs:
      if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
          p.send_signal(signum)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    for signum in (signal.SIGTERM, signal.SIGINT):
      previous[signum] = signal.signal(signum, forward)
  try:
    first_failure, failed_at, stage = None, None, 0
    while None in [p.poll() for p in procs]:  # a list: poll every process, every time
      for i, p in enumerate(procs):
        if first_failure is None and p.returncode not in (None, 0):
          first_failure, failed_at = i, time.monotonic()
          with lock:
            out.write(f"[launch] process {i} exited with {_exit_code(p.returncode)}; "
                      f"stopping the others in {grace_s:g} s\n")
            out.flush()
      if failed_at is not None:
        waited = time.monotonic() - failed_at
        if stage == 0 and waited > grace_s:
          forward(signal.SIGTERM, None)
          stage = 1
        elif stage == 1 and waited > 2 * grace_s:
          for p in procs:
            if p.poll() is None:
              p.kill()
          stage = 2
      time.sleep(0.05)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  for t in pumps:
    t.join(timeout=5)
  codes = [p.returncode for p in procs]
  if first_failure is None:
    first_failure = next((i for i, c in enumerate(codes) if c), None)
  return 0 if first_failure is None else _exit_code(codes[first_failure])


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    print("usage: launch/local.py --num_processes=N [--devices_per_process=D] -- COMMAND ...",
          file=sys.stderr)
    return 2
  split = argv.index("--")
  parser = argparse.ArgumentParser(prog="launch/local.py", description=__doc__.split("\n")[0])
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--grace_s", type=float, default=10.0,
                      help="after one process fails, seconds before the others get SIGTERM")
  args = parser.parse_args(argv[:split])
  cmd = argv[split + 1:]
  try:
    return launch(cmd, args.num_processes, args.devices_per_process, grace_s=args.grace_s)
  except (ValueError, OSError) as e:
    print(f"launch/local.py: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())

"""launch/local.py without jax: each process's environment, [pK] output, exit codes, a failed
process stopping the others, and SIGTERM/SIGINT reaching every process."""
import importlib.util
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_local", ROOT / "launch" / "local.py")
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)


def _py(code: str) -> list[str]:
  return [sys.executable, "-c", textwrap.dedent(code)]


def test_process_env():
  env = local.process_env({"XLA_FLAGS": "--xla_cpu_a=1 --xla_force_host_platform_device_count=8",
                           "KEEP": "x"}, 1, 3, 4567, 2)
  assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4567"
  assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("3", "1")
  assert env["XLA_FLAGS"] == "--xla_cpu_a=1 --xla_force_host_platform_device_count=2"
  assert env["JAX_PLATFORMS"] == "cpu" and env["KEEP"] == "x"
  assert local.process_env({"JAX_PLATFORMS": "cuda"}, 0, 1, 1, 1)["JAX_PLATFORMS"] == "cuda"
  assert local.process_env({}, 0, 1, 1, 4)["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=4")


def test_all_processes_run_with_prefixed_output():
  out = io.StringIO()
  code = """
      import os
      print("id", os.environ["JAX_PROCESS_ID"], "of", os.environ["JAX_NUM_PROCESSES"])
      print("second line")
  """
  assert local.launch(_py(code), 3, out=out) == 0
  lines = sorted(out.getvalue().splitlines())
  assert lines == ["[p0] id 0 of 3", "[p0] second line", "[p1] id 1 of 3", "[p1] second line",
                   "[p2] id 2 of 3", "[p2] second line"]


def test_a_failed_process_stops_the_others_and_gives_the_exit_code():
  out = io.StringIO()
  code = """
      import os, sys, time
      if os.environ["JAX_PROCESS_ID"] == "1":
        sys.exit(3)
      time.sleep(60)
  """
  t0 = time.time()
  assert local.launch(_py(code), 2, out=out, grace_s=0.5) == 3
  assert time.time() - t0 < 30
  assert "[launch] process 1 exited with 3" in out.getvalue()
  # Ignoring SIGTERM does not help: SIGKILL follows after a second grace period.
  code = """
      import os, signal, sys, time
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      if os.environ["JAX_PROCESS_ID"] == "0":
        sys.exit(5)
      time.sleep(60)
  """
  assert local.launch(_py(code), 2, out=io.StringIO(), grace_s=0.5) == 5


def test_signals_reach_every_process_and_exit_codes_combine(tmp_path):
  code = f"""
      import os, signal, sys, time
      i = os.environ["JAX_PROCESS_ID"]
      def stop(signum, frame):
        print("got", signal.Signals(signum).name, flush=True)
        sys.exit(0 if i == "0" else 7)
      signal.signal(signal.SIGTERM, stop)
      signal.signal(signal.SIGINT, stop)
      open(os.path.join({str(tmp_path)!r}, "ready" + i), "w").close()
      time.sleep(60)
  """
  for signum, code_expected in ((signal.SIGTERM, 7), (signal.SIGINT, 7)):
    for f in tmp_path.glob("ready*"):
      f.unlink()
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "local.py"),
                             "--num_processes=2", "--", *_py(code)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.time() + 30
    while len(list(tmp_path.glob("ready*"))) < 2:
      assert time.time() < end and proc.poll() is None
      time.sleep(0.05)
    os.kill(proc.pid, signum)
    out, _ = proc.communicate(timeout=30)
    assert f"[p0] got {signum.name}" in out and f"[p1] got {signum.name}" in out, out
    assert proc.returncode == code_expected, out


def test_command_line_errors():
  run = lambda *a: subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), *a],
                                  capture_output=True, text=True, timeout=60, check=False)
  assert run("--num_processes=2", "true").returncode == 2  # no "--"
  proc = run("--num_processes=0", "--", "true")
  assert proc.returncode == 2 and "must be >= 1" in proc.stderr
  proc = run("--num_processes=2", "--", "no-such-command-xyz")
  assert proc.returncode == 1 and "cannot run no-such-command-xyz" in proc.stdout
  assert run("--num_processes=2", "--devices_per_process=3", "--", "true").returncode == 0

"""Running a command as N JAX processes on this machine (launch/local.py) from a test."""
import importlib.util
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_local", ROOT / "launch" / "local.py")
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)

# Variables of an outer multi-process or cluster environment that must not leak into a test run.
_OUTER = ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
          "JAX_LOCAL_DEVICE_IDS", "SLURM_NTASKS", "MEDJAX_DISTRIBUTED",
          "JAX_CPU_COLLECTIVES_IMPLEMENTATION")
# The session's persistent compilation cache (tests/conftest.py) stays off in multi-process
# children: their cache keys differ per process and only process 0 writes, so in a repeated run
# process 0 would load its programs at once and wait for the others' compiles in its first
# collective, past gloo's fixed 30 s connect timeout on a busy machine.
_CACHE = ("JAX_COMPILATION_CACHE_DIR",)

# The smallest settings of configs/eval_*.py for `python -m medjax.evaluate` runs in tests.
SMALL_EVAL = ["--config.generation.num_per_class=4", "--config.generation.num_inference_steps=2",
              "--config.generation.batch_size=4", "--config.classifier.num_steps=2",
              "--config.fid.max_images=4", "--config.fid.batch_size=4",
              "--config.recon.num_images=4", "--config.bootstrap=0", "--config.repeats=1",
              "--config.progress_bar=False"]


def clean_env(num_processes: int = 1, **extra) -> dict:
  """This test process's environment for a child: this checkout first, CPU only, no cluster;
  for one of `num_processes` > 1, no persistent compilation cache."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  for name in _OUTER + (_CACHE if num_processes > 1 else ()):
    env.pop(name, None)
  env.update(extra)
  return env


def run(cmd: list[str], num_processes: int, devices_per_process: int, **env) -> str:
  """Runs `cmd` (e.g. `['-m', 'medjax.evaluate', ...]` after the Python executable) as
  `num_processes` x `devices_per_process` CPU devices; returns the prefixed output. Asserts
  exit code 0."""
  out = io.StringIO()
  rc = local.launch([sys.executable, *cmd], num_processes, devices_per_process,
                    env=clean_env(num_processes, **env), out=out, grace_s=5, cwd=str(ROOT))
  text = out.getvalue()
  assert rc == 0, text[-6000:]
  return text

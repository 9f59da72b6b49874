"""`python -m medjax.train` as 2 processes x 2 CPU devices through launch/local.py (gloo
collectives), against 1 process x 4 devices: same params, files written once, SIGKILL and
SIGTERM with resume.

These are issue 14's acceptance and run in CI (about 6 minutes on 2 cores: each run compiles the
tiny model's programs at 32 px); the runs share a persistent compilation cache (a resumed run
reuses the executables, which also keeps its results bit-identical)."""
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from medjax import checkpoint as checkpoint_lib
from medjax import sharding
from medjax import train_config
from medjax import trainer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_local", ROOT / "launch" / "local.py")
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)

COMMON = ["--config.batch_size=4", "--config.mesh.data=2", "--config.mesh.fsdp=2",
          "--config.resolution=32", "--config.data.phantoms.num=24",
          "--config.progress_bar=False", "--config.log_every_steps=2",
          "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=10",
          "--config.sample.num_inference_steps=2", "--config.sample.num_per_prompt=2"]
# U-Net with a sample grid every 2 steps and prior preservation: its 4 class images are generated
# with the same shapes as the grid (4 images, 2 steps), so one generation program serves both.
UNET = ["--config=configs/cxr_unet.py", *COMMON, "--config.total_steps=6",
        "--config.sample_every_steps=2", "--config.prior.enabled=True",
        "--config.prior.num_class_images=4", "--config.prior.num_inference_steps=2"]
TI = ["--config=configs/cxr_ti.py", *COMMON, "--config.total_steps=4",
      "--config.textual_inversion.num_vectors=2"]

def _env(cache: Path, devices: int | None = None) -> dict:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  for name in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "SLURM_NTASKS", "MEDJAX_DISTRIBUTED", "JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    env.pop(name, None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _cmd(workdir: Path, args) -> list[str]:
  return [sys.executable, "-m", "medjax.train", f"--workdir={workdir}", *args]


def _run_two(workdir: Path, args, cache: Path) -> str:
  out = io.StringIO()
  rc = local.launch(_cmd(workdir, args), 2, 2, env=_env(cache), out=out, cwd=str(ROOT),
                    grace_s=20)
  assert rc == 0, out.getvalue()[-5000:]
  return out.getvalue()


def _run_one(workdir: Path, args, cache: Path) -> str:
  proc = subprocess.run(_cmd(workdir, args), cwd=ROOT, env=_env(cache, devices=4),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-5000:]
  return proc.stdout


def _start_two(workdir: Path, args, cache: Path) -> subprocess.Popen:
  """The launcher as a child of its own (so a test can signal its processes)."""
  cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--num_processes=2",
         "--devices_per_process=2", "--grace_s=20", "--", *_cmd(workdir, args)]
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(cache), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _children(proc: subprocess.Popen) -> list[int]:
  text = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
  return sorted(int(p) for p in text.split())


def _wait_for_checkpoint(workdir: Path, step: int, proc, timeout=900) -> None:
  end = time.time() + timeout
  while time.time() < end:
    if (workdir / "checkpoints" / str(step) / "commit_success.txt").exists():
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended before checkpoint {step}:\n{proc.stdout.read()[-4000:]}")
    time.sleep(0.2)
  raise AssertionError(f"no checkpoint {step} after {timeout} s")


def _final_params(workdir: Path):
  """The latest checkpoint's params, restored in this process on one device."""
  raw = json.loads((workdir / "config.json").read_text())
  config = train_config.from_saved(raw)
  config.mesh.data = config.mesh.fsdp = 1
  run = trainer.setup(config, mesh=sharding.make_mesh(1, 1, devices=jax.devices()[:1]))
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=100)
  abstract = trainer.abstract_state(run)
  state, extra, step = ckpt.restore(abstract)
  ckpt.close()
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))], extra, step


def _max_diff(a, b) -> float:
  return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def _wrote(out: str, name: str) -> list[str]:
  return [line for line in out.splitlines() if "wrote" in line and name in line]


@pytest.fixture(scope="module")
def unet_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost_unet")
  cache = root / "jax_cache"
  two, one = root / "two", root / "one"
  t0 = time.time()
  out_two = _run_two(two, UNET, cache)
  t1 = time.time()
  out_one = _run_one(one, UNET, cache)
  print(f"unet runs: 2 processes {t1 - t0:.0f} s, 1 process {time.time() - t1:.0f} s")
  return cache, two, out_two, one, out_one


def test_unet_two_processes_equal_one_and_write_files_once(unet_runs):
  _, two, out_two, one, _ = unet_runs
  for step in (2, 4, 6):
    name = f"samples/step_{step:06d}.png"
    assert (two / name).is_file()
    wrote = _wrote(out_two, name)
    assert len(wrote) == 1 and wrote[0].startswith("[p0]"), wrote
  assert len(list((two / "class_images").glob("*.png"))) == 4
  assert len(_wrote(out_two, "class images")) == 1
  assert not [p for p in two.rglob("*") if p.name.endswith(".tmp")]
  summary = json.loads((two / "summary.json").read_text())
  assert summary["step"] == 6 and summary["stopped"] is None
  p2, extra2, step2 = _final_params(two)
  p1, extra1, step1 = _final_params(one)
  assert step1 == step2 == 6
  assert len(extra2["data"]) == 2 and len(extra1["data"]) == 1  # one position per process
  diff = _max_diff(p1, p2)
  print(f"U-Net params, 2 processes vs 1: max abs diff {diff:.3g}")
  assert diff <= 1e-5


def test_sigkill_both_then_resume_is_bit_identical(unet_runs):
  cache, two, _, _, _ = unet_runs
  workdir = two.parent / "killed"
  proc = _start_two(workdir, UNET, cache)
  _wait_for_checkpoint(workdir, 2, proc)
  for pid in _children(proc):
    os.kill(pid, signal.SIGKILL)
  proc.communicate(timeout=120)
  assert proc.returncode != 0
  out = _run_two(workdir, UNET, cache)
  assert "resumed from step" in out
  a, _, _ = _final_params(two)
  b, _, step = _final_params(workdir)
  assert step == 6
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)


def test_sigterm_to_one_process_all_save_one_step_and_exit_0(unet_runs):
  cache, two, _, _, _ = unet_runs
  workdir = two.parent / "preempted"
  args = [a for a in UNET if not a.startswith("--config.total_steps")] + [
      "--config.total_steps=16", "--config.checkpoint_every_steps=8",
      "--config.sample_every_steps=0", "--config.sample.num_per_prompt=0"]
  proc = _start_two(workdir, args, cache)
  end = time.time() + 900
  while not list((workdir / "tensorboard").glob("metrics.jsonl")):  # stepping by now
    assert proc.poll() is None and time.time() < end, proc.stdout.read()[-4000:]
    time.sleep(0.2)
  os.kill(_children(proc)[1], signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-5000:]
  steps = set()
  for p in ("[p0]", "[p1]"):
    lines = [line for line in out.splitlines()
             if line.startswith(p) and "preempted at step" in line]
    assert len(lines) == 1, out[-5000:]
    steps.add(int(lines[0].split("preempted at step ")[1].split(":")[0]))
  (step,) = steps
  assert 2 <= step < 16
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["stopped"] == "preempted" and summary["step"] == step
  assert step in summary["checkpoints"]
  out = _run_two(workdir, args, cache)
  assert f"resumed from step {step}" in out
  assert json.loads((workdir / "summary.json").read_text())["step"] == 16


def test_textual_inversion_two_processes_equal_one(tmp_path):
  cache = tmp_path / "jax_cache"
  two, one = tmp_path / "two", tmp_path / "one"
  out_two = _run_two(two, TI, cache)
  _run_one(one, TI, cache)
  from medjax.convert import embeddings  # pylint: disable=import-outside-toplevel
  files = sorted((two / "embeddings").rglob("*.safetensors"))
  assert len(files) == 4  # 2 tokens x (diffusers, a1111)
  for f in files:
    assert len(_wrote(out_two, f.name)) == 1
    a = embeddings.read_embeddings(f)
    b = embeddings.read_embeddings(one / f.relative_to(two))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), atol=1e-5, rtol=0)

"""The train entry point as users run it: sharded meshes on 8 simulated devices, SIGKILL/SIGTERM
and resume (bit-identical to an uninterrupted run), export of a checkpoint, bad command lines."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from medjax import checkpoint as checkpoint_lib
from medjax import exporter
from medjax import sharding
from medjax import train_config
from medjax import trainer
from medjax.pipeline import StableDiffusion
from tests import early_jobs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config=configs/cxr_unet.py", "--config.total_steps=30",
        "--config.checkpoint_every_steps=5", "--config.batch_size=2",
        "--config.data.phantoms.num=24", "--config.sample.num_per_prompt=0",
        "--config.progress_bar=False"]


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env.update(extra)
  return env


def _train(workdir, *args, wait=True):
  # Each restart loads the compiled step from the session's persistent compilation cache
  # (tests/conftest.py) instead of compiling it again.
  cmd = [sys.executable, "-m", "medjax.train", f"--workdir={workdir}", *TINY, *args]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if wait:
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out
  return proc


def _wait_for_checkpoint(workdir: Path, step: int, proc, timeout=400):
  end = time.time() + timeout
  while time.time() < end:
    if (workdir / "checkpoints" / str(step) / "commit_success.txt").exists() or (
        workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists():
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended before checkpoint {step}:\n{proc.stdout.read()[-3000:]}")
    time.sleep(0.2)
  raise AssertionError(f"no checkpoint {step} after {timeout} s")


def _final_state(workdir):
  raw = json.loads((Path(workdir) / "config.json").read_text())
  config = train_config.from_saved(raw)
  run = trainer.setup(config, mesh=sharding.make_mesh(1, 1))
  ckpt = checkpoint_lib.Checkpointer(Path(workdir) / "checkpoints", keep=100)
  abstract = trainer.abstract_state(run)
  state, extra, step = ckpt.restore(abstract)
  ckpt.close()
  return jax.device_get(state), extra, step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted 30-step run, and one killed (SIGKILL after checkpoint 5), preempted
  (SIGTERM after checkpoint 15) and resumed twice with the same command."""
  root = tmp_path_factory.mktemp("train")
  a, b = root / "a", root / "b"
  proc_a = _train(a, wait=False)
  proc_b = _train(b, wait=False)
  _wait_for_checkpoint(b, 5, proc_b)
  proc_b.send_signal(signal.SIGKILL)
  proc_b.wait()
  out_a, _ = proc_a.communicate(timeout=600)
  assert proc_a.returncode == 0, out_a[-3000:]
  proc_b = _train(b, wait=False)
  _wait_for_checkpoint(b, 15, proc_b)
  proc_b.send_signal(signal.SIGTERM)
  out_b, _ = proc_b.communicate(timeout=600)
  assert proc_b.returncode == 0, out_b[-3000:]
  preempted = json.loads((b / "summary.json").read_text())
  rc, out_b = _train(b)
  assert rc == 0, out_b[-3000:]
  return a, b, preempted, out_b


def test_killed_and_preempted_run_resumes_bit_identical(runs):
  a, b, preempted, out_b = runs
  assert preempted["stopped"] == "preempted"
  assert 15 <= preempted["step"] < 30
  assert "resumed from step" in out_b
  sa, ea, step_a = _final_state(a)
  sb, eb, step_b = _final_state(b)
  assert step_a == step_b == 30
  assert ea == eb  # data iterator positions
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert json.loads((a / "summary.json").read_text())["checkpoints"] == [20, 25, 30]  # keep 3
  assert list((a / "tensorboard").glob("events.out.tfevents.*"))
  assert (a / "config.json").exists()


def test_export_a_training_checkpoint(runs, tmp_path):
  """What `python -m medjax.export --from=<workdir> --to=DIR` runs (in-process: one compile)."""
  a = runs[0]
  out = tmp_path / "exported"
  trained = exporter.load_source(str(a))
  assert exporter.export(trained, out) < 1e-5  # the written dir reloads to the same numbers
  exported = StableDiffusion.from_pretrained(out)
  for x, y in zip(jax.tree.leaves(exported.params["unet"]),
                  jax.tree.leaves(trained.params["unet"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  base = StableDiffusion.embedded(0)
  moved = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
              zip(jax.tree.leaves(exported.params["unet"]), jax.tree.leaves(base.params["unet"])))
  assert moved > 0  # the exported U-Net is the trained one, not the base


SHARDING_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from medjax import sharding
    from tests.train_support import run_steps, tiny_config
    out_dir, names = sys.argv[1], sys.argv[2:]
    shapes = {"1": None, "8x1": (8, 1), "2x4": (2, 4), "1x8": (1, 8)}
    for name in names:
      mesh = (sharding.make_mesh(1, 1, devices=jax.devices()[:1]) if shapes[name] is None
              else sharding.make_mesh(*shapes[name]))
      # random weights, as before: from the shipped trained weights the meshes' params differed
      # by 1.5e-5 after 3 steps (summation order; Adam's g / sqrt(v) on near-zero gradients may
      # amplify it, not measured)
      config = tiny_config(**{"batch_size": 8, "total_steps": 3, "model.embedded_random": True})
      run, state, losses = run_steps(config, 3, mesh=mesh)
      params = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]
      extra = {}
      if name == "1x8":
        per_device = sharding.bytes_per_device(state.params)
        extra = {"max_device_bytes": max(per_device.values()), "devices": len(per_device)}
      np.savez(f"{out_dir}/{name}.npz", *params, losses=np.asarray(losses), **extra)
""")


def _meshes(names):
  """An early job (tests/early_jobs.py): SHARDING_SCRIPT for `names` on 8 simulated devices."""
  def factory(path):
    path.mkdir(parents=True)
    return ([sys.executable, "-c", SHARDING_SCRIPT, str(path), *names],
            _env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  return factory


# Two processes (the compiles dominate), which depend on nothing: they run in the background
# from the session's start.
EARLY_JOBS = {"mesh_runs": {"cli_meshes_a": _meshes(["1", "8x1"]),
                            "cli_meshes_b": _meshes(["2x4", "1x8"])}}


@pytest.fixture
def mesh_runs():
  jobs = early_jobs.wait(EARLY_JOBS["mesh_runs"], ["cli_meshes_a", "cli_meshes_b"])
  for job in jobs.values():
    assert job.returncode == 0, job.output[-4000:]
  return {f.stem: np.load(f) for job in jobs.values() for f in job.path.glob("*.npz")}


def test_same_params_on_every_mesh_and_fsdp_splits_params(mesh_runs):
  """3 steps on one device and on meshes (8,1), (2,4), (1,8) of 8 simulated CPU devices."""
  results = mesh_runs
  assert sorted(results) == ["1", "1x8", "2x4", "8x1"]
  n = len([k for k in results["1"].files if k.startswith("arr_")])
  ref = [results["1"][f"arr_{i}"] for i in range(n)]
  for name in ("8x1", "2x4", "1x8"):
    diff = max(float(np.abs(results[name][f"arr_{i}"] - ref[i]).max()) for i in range(n))
    assert diff <= 1e-5, (name, diff)
  fsdp = results["1x8"]
  assert int(fsdp["devices"]) == 8
  fraction = int(fsdp["max_device_bytes"]) / sum(x.nbytes for x in ref)
  assert fraction <= 1 / 8 + 0.05, fraction


@pytest.mark.parametrize("args,message", [
    (["--config=configs/nope.py"], "nope.py"),
    (["--config={tmp}/no_get_config.py"], "get_config"),
    (["--config=configs/cxr_unet.py", "--config.batch_size=abc"], "batch_size"),
    (["--config=configs/cxr_unet.py", "--config.learning_rat=1"], "learning_rat"),
    (["--config=configs/cxr_unet.py", "--config.data.sourc=x"],
     "--config.data: unknown key 'sourc'; known: check_files"),
    (["--config=configs/cxr_ti.py:papr"],
     "configs/cxr_ti.py: unknown arg 'papr' in 'papr'; accepted: paper, vectors=<int>"),
])
def test_bad_command_lines_fail_with_one_message(tmp_path, args, message):
  workdir = tmp_path / "w"
  (tmp_path / "no_get_config.py").write_text("X = 1\n")
  args = [a.format(tmp=tmp_path) for a in args]
  proc = subprocess.run([sys.executable, "-m", "medjax.train", f"--workdir={workdir}", *args],
                        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert not workdir.exists()

"""`medjax.export` from a training workdir whose checkpoint 2 processes x 2 CPU devices wrote with
FSDP-split params: one process restores it (orbax reshards onto its one device), writes a
diffusers directory, and its U-Net reloads in diffusers equal to the checkpoint's params."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests import launch_support
from tests import tiny_diffusers

ROOT = launch_support.ROOT

# A training workdir as medjax.train leaves it (config.json + orbax checkpoints/<step>), written
# by every process of a 2 x 2 run over a (data=2, fsdp=2) mesh, without compiling a train step.
# The params are changed first (x 1.5 + 0.01), so the export can only match them by reading the
# checkpoint; process 0 also writes them gathered, in diffusers names, as the expected values.
WRITE_CHECKPOINT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from medjax import distributed, hosts
    assert distributed.maybe_initialize_distributed()
    import jax, numpy as np
    from medjax import checkpoint, trainer
    from medjax.config_args import load_config_file
    from medjax.convert import diffusers as diffusers_io
    workdir = Path(sys.argv[1])
    config = load_config_file("configs/cxr_unet.py")
    config.batch_size, config.mesh.data, config.mesh.fsdp = 4, 2, 2
    run = trainer.setup(config)
    assert (jax.process_count(), run.mesh.devices.size) == (2, 4)
    split = [x for x in jax.tree.leaves(run.state.params)
             if not x.is_fully_addressable and not x.is_fully_replicated]
    bump = jax.jit(lambda p: jax.tree.map(lambda x: x * 1.5 + 0.01, p),
                   out_shardings=run.state_shardings.params)
    state = run.state.replace(params=bump(run.state.params))
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
    assert ckpt.save(1, state, {"data": {}}, force=True)
    ckpt.close()
    unet = hosts.to_host(state.params["unet"])
    if hosts.is_lead():
      trainer.write_config(config, workdir)
      np.savez(workdir / "expected_unet.npz", **diffusers_io.params_to_state_dict(unet))
    hosts.sync("test: checkpoint written")
    print(f"fsdp-split params: {len(split)} of {len(jax.tree.leaves(run.state.params))}",
          flush=True)
""")


def _export(source, target, **env) -> str:
  proc = subprocess.run([sys.executable, "-m", "medjax.export", f"--from={source}",
                         f"--to={target}"], env=launch_support.clean_env(**env), cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return proc.stdout


def _check_unet(exported, expected: dict) -> None:
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  tiny_diffusers.torch_threads()
  theirs = tiny_diffusers.state_dict_numpy(UNet2DConditionModel.from_pretrained(exported))
  assert theirs.keys() == expected.keys()
  for k in expected:
    np.testing.assert_array_equal(theirs[k], expected[k], err_msg=k)


def test_export_of_a_two_process_fsdp_checkpoint_in_one_process(tmp_path):
  workdir = tmp_path / "run"
  script = tmp_path / "write_checkpoint.py"
  script.write_text(WRITE_CHECKPOINT)
  out = launch_support.run([str(script), str(workdir)], 2, 2)
  split = [line for line in out.splitlines() if "fsdp-split params:" in line]
  assert len(split) == 2 and int(split[0].split(": ")[1].split()[0]) > 0, out[-3000:]
  printed = _export(workdir, tmp_path / "diffusers")  # one process, one CPU device
  assert "reload check: max abs diff 0.00e+00" in printed, printed
  with np.load(workdir / "expected_unet.npz") as f:
    expected = dict(f)
  _check_unet(tmp_path / "diffusers" / "unet", expected)


@pytest.mark.slow
def test_train_export_and_evaluate_as_two_processes(tmp_path):
  """The acceptance path: medjax.train as 2 x 2 processes, then export in one process and in two
  (identical files), and medjax.evaluate on the trained model as two processes."""
  workdir = tmp_path / "run"
  launch_support.run(["-m", "medjax.train", "--config=configs/cxr_unet.py",
                      "--config.total_steps=2", "--config.batch_size=4", "--config.mesh.data=2",
                      "--config.mesh.fsdp=2", "--config.sample.num_per_prompt=0",
                      "--config.progress_bar=False", f"--workdir={workdir}"], 2, 2)
  assert (workdir / "checkpoints" / "2").is_dir()
  _export(workdir, tmp_path / "one")
  out = launch_support.run(["-m", "medjax.export", f"--from={workdir}",
                            f"--to={tmp_path / 'two'}"], 2, 2)
  assert out.count("reload check") == 1 and "[p0] exported" in out, out[-3000:]
  for name in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model"
               ".safetensors", "text_encoder/model.safetensors"):
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
  from medjax import StableDiffusion  # pylint: disable=g-import-not-at-top
  from medjax.convert import diffusers as diffusers_io  # pylint: disable=g-import-not-at-top
  from medjax.convert.weights import read_safetensors  # pylint: disable=g-import-not-at-top
  trained = read_safetensors(tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors")
  base = diffusers_io.params_to_state_dict(StableDiffusion.embedded(seed=0).params["unet"])
  assert any(not np.array_equal(trained[k], base[k]) for k in base)  # the run trained the U-Net
  launch_support.run(["-m", "medjax.evaluate", "--config=configs/eval_paper_b.py",
                      f"--workdir={tmp_path / 'eval'}", f"--config.model.train_workdir={workdir}",
                      *launch_support.SMALL_EVAL], 2, 2)
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert results["protocol"] == "paper_b" and results["vae_reconstruction"]["num_images"] == 4


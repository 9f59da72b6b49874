"""python -m medjax.sample in a subprocess, on the embedded tiny model."""
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
from PIL import Image

from medjax.convert.embeddings import write_diffusers_embeddings

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-m", "medjax.sample", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def test_cli_writes_marked_pngs_and_grid(tmp_path):
  out = tmp_path / "samples"
  # A 4-vector textual-inversion token of the tiny text encoder's width (32).
  vectors = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
  write_diffusers_embeddings(tmp_path / "lungxray.safetensors", {"<lungxray>": vectors})
  proc = _run("--prompt=a <lungxray>:0.7 AND pleural effusion:0.3", "--negative_prompt=blurry",
              "--num_images=2", "--batch_size=2", "--steps=2", "--guidance=5", "--seed=7",
              f"--embeddings={tmp_path / 'lungxray.safetensors'}", f"--outdir={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert sorted(p.name for p in out.iterdir()) == ["grid.png", "sample_0000.png",
                                                   "sample_0001.png"]
  for i in range(2):
    img = Image.open(out / f"sample_{i:04d}.png")
    assert img.size == (64, 64) and img.mode == "RGB"
    assert img.text == {"synthetic": "true", "generator": "medjax",
                        "prompt": "a <lungxray>:0.7 AND pleural effusion:0.3",
                        "negative_prompt": "blurry", "seed": str(7 + i), "steps": "2",
                        "guidance": "5.0", "scheduler": "ddim", "model": "embedded-tiny",
                        "embeddings": "lungxray.safetensors"}
  grid = Image.open(out / "grid.png")
  assert grid.size == (128, 64)
  assert grid.text["synthetic"] == "true" and grid.text["seed"] == "7..8"
  np.testing.assert_array_equal(np.asarray(grid)[:, 64:],
                                np.asarray(Image.open(out / "sample_0001.png")))


def test_cli_bad_input_writes_nothing(tmp_path):
  out = tmp_path / "samples"
  proc = _run("--prompt=x", "--scheduler=heun", f"--outdir={out}")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1:] == [
      "error: --scheduler = 'heun'; expected one of ddpm, ddim, pndm, euler, euler_ancestral, "
      "dpmsolver++"]
  assert not out.exists()


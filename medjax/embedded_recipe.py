"""How the embedded model's shipped weights are made: `configs/embedded_pretrain.py`'s pieces.

`python -m medjax.reproduce --config=configs/embedded_pretrain.py --workdir=DIR` trains the tiny
VAE on chest X-ray and prostate MRI phantoms, exports it with its latent scale refitted (SD's
0.18215 is the std of *its* VAE's latents, not of a new one's), trains the U-Net and text
encoder on those latents with class prompts, exports the model, and checks it as the issue's
acceptance asks (VAE PSNR/SSIM on held-out phantoms; a classifier trained on real phantoms
scoring generated ones). This module holds the export stage and the table: the acceptance
figures beside their targets, and DIR/embedded_tiny_sd.safetensors (the file medjax ships as
`medjax/weights/`, with the recipe's command and the git commit in its metadata).
"""
import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from medjax import atomic
from medjax import embedded
from medjax import exporter
from medjax import hosts
from medjax.data import loader
from medjax.errors import MedjaxError
from medjax.pipeline import StableDiffusion

EXPORT_RECORD = "export.json"
# The acceptance: measure -> (results key path, target: at least this; None = shown only).
TARGETS = {"VAE PSNR, held-out (dB)": (("vae_reconstruction", "psnr"), 25.0),
           "VAE SSIM, held-out": (("vae_reconstruction", "ssim"), 0.80),
           "classifier AUC, real test": (("classifier_real_test", "auc"), None),
           "classifier AUC, generated": (("classifier_on_generated", "auc"), 0.90),
           "classifier accuracy, generated": (("classifier_on_generated", "accuracy"), None)}


# -- the export stage -------------------------------------------------------------------------

def export_config(source: epath.Path, fit_images: int) -> ml_collections.ConfigDict:
  """What an export stage does: write the train stage `source`'s model, refitting the latent
  scale on `fit_images` of its train images (0 keeps the scale)."""
  if fit_images < 0:
    raise MedjaxError(f"fit_scaling_factor={fit_images}: expected a count >= 0")
  return ml_collections.ConfigDict({"source": str(source), "fit_scaling_factor": fit_images})


def export_done(config: ml_collections.ConfigDict, out_dir: epath.Path) -> bool:
  """The export exists and was made from the source's current last step with these settings."""
  record = out_dir / EXPORT_RECORD
  if not record.exists():
    return False
  done = json.loads(record.read_text())
  now = {**config.to_dict(), "source_step": _last_step(config.source)}
  if done != now:
    raise MedjaxError(f"{out_dir} was exported with {done}, not {now}; remove that folder to "
                      "export again, or use another --workdir")
  return True


def _last_step(workdir) -> int:
  summary = epath.Path(workdir) / "summary.json"
  if not summary.exists():
    raise MedjaxError(f"{summary}: missing; the train stage {workdir} did not finish")
  return int(json.loads(summary.read_text())["step"])


def latent_std(sd: StableDiffusion, data_config: Any, resolution: int, num_images: int,
               batch_size: int = 32) -> float:
  """The std of VAE posterior samples (unscaled) over the first `num_images` train images."""
  it = loader.make_dataset(data_config, "train", batch_size, resolution=resolution,
                           process_index=0, process_count=1, num_epochs=1, shuffle=False)
  latents, seen = [], 0
  for i, batch in enumerate(it):
    z = sd.encode_images(batch["image"], jax.random.key(i)) / sd.scaling_factor
    latents.append(np.asarray(z, np.float64))
    seen += len(batch["image"])
    if seen >= num_images:
      break
  if not latents:
    raise MedjaxError("fit_scaling_factor: the source's train split has no images")
  return float(np.concatenate(latents)[:num_images].std())


def with_scaling_factor(sd: StableDiffusion, factor: float) -> StableDiffusion:
  configs = {name: dict(c) for name, c in sd.configs.items()}
  configs["vae"]["scaling_factor"] = float(factor)
  return dataclasses.replace(sd, configs=configs)


def export_stage(config: ml_collections.ConfigDict, out_dir: epath.Path) -> None:
  """Writes the source stage's trained model (EMA weights if it kept them) to `out_dir`."""
  step = _last_step(config.source)
  sd = exporter.load_source(config.source)
  if config.fit_scaling_factor:
    train = ml_collections.ConfigDict(
        json.loads((epath.Path(config.source) / "config.json").read_text()))
    std = latent_std(sd, train.data, int(train.resolution), int(config.fit_scaling_factor))
    sd = with_scaling_factor(sd, 1.0 / std)
  if hosts.is_lead():
    exporter.export(sd, out_dir, overwrite=True)
    atomic.write_text(out_dir / EXPORT_RECORD, json.dumps(
        {**config.to_dict(), "source_step": step}, sort_keys=True) + "\n")
  hosts.sync("medjax.reproduce export " + str(out_dir))


# -- the table and the shipped file -----------------------------------------------------------

def _get(results: dict, path: tuple[str, ...]):
  for key in path:
    results = results.get(key, {}) if isinstance(results, dict) else {}
  return results if isinstance(results, (int, float)) else None


def rows(evaluations: dict[str, dict]) -> tuple[list[list[str]], bool]:
  """The acceptance table (one column per check stage) and whether every target is met."""
  names = list(evaluations)
  table = [["measure", *names, "target"]]
  met = True
  for measure, (path, target) in TARGETS.items():
    values = [_get(evaluations[n], path) for n in names]
    table.append([measure, *("n/a" if v is None else f"{v:.3f}" for v in values),
                  "" if target is None else f">= {target}"])
    if target is not None:
      met &= all(v is not None and v >= target for v in values)
  return table, met


REPO = Path(__file__).resolve().parents[1]


@functools.cache
def git_commit(repo: Path = REPO) -> str:
  """HEAD of the checkout medjax runs from ('+dirty' with uncommitted changes), or 'unknown'.
  Cached: `medjax.reproduce` asks at its start, so the code that ran is the commit recorded."""
  try:
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "medjax",
                            "configs"], capture_output=True, text=True, check=True,
                           timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return head + ("+dirty" if dirty else "")


def package(model_dir: epath.Path, out_file: epath.Path, figures: dict) -> None:
  """The exported model as one single file with the recipe's provenance in its metadata."""
  sd = StableDiffusion.from_pretrained(model_dir)
  sd = dataclasses.replace(sd, name=embedded.PRETRAINED_NAME)
  command = "python -m medjax.reproduce " + " ".join(sys.argv[1:])
  sd.save_single_file(out_file, metadata={
      embedded.META_RECIPE: command, embedded.META_COMMIT: git_commit(),
      embedded.META_FIGURES: json.dumps(figures, sort_keys=True)})

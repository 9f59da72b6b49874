"""What a train run leaves besides checkpoints: sample grids (a VAE run: held-out originals
beside their reconstructions), learned embeddings, the summary.

Every process calls these (generation and gathering touch arrays sharded over all processes);
only process 0 writes files. Paths are `etils.epath` paths (`medjax.paths`), so a `gs://`
workdir stays one.
"""
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from medjax import atomic
from medjax import hosts
from medjax import images as images_lib
from medjax import paths as paths_lib
from medjax.convert import embeddings as embeddings_lib
from medjax.data import make_dataset
from medjax.data import select_records
from medjax.data import skips as skips_lib
from medjax.eval import recon
from medjax.pipeline import StableDiffusion


def sample_prompts(config: Any) -> list[str]:
  if config.sample.prompts:
    return list(config.sample.prompts)
  prompts = config.data.prompt
  if prompts.kind == "class" or config.objective == "textual_inversion":
    texts = list(dict(prompts.class_prompts).values())
    if prompts.kind == "token":
      texts = [prompts.token_template.format(token=prompts.token, modality="", class_text="",
                                             class_name="", labels="", text="")]
    return texts
  return ["a chest x-ray with pleural effusion", "a chest x-ray with no finding"]


def write_sample_grid(config: Any, sd: StableDiffusion, workdir, step: int, writer, mesh=None):
  """A grid of `sample.num_per_prompt` images per sample prompt (none when that is 0): all
  processes generate, process 0 writes `samples/step_NNNNNN.png`; returns its path.
  A VAE run writes `write_reconstruction_grid` there instead (on `mesh`, the run's)."""
  if config.objective == "vae":
    return write_reconstruction_grid(config, sd, workdir, step, writer, mesh)
  s = config.sample
  if s.num_per_prompt <= 0:
    return None
  prompts = [p for p in sample_prompts(config) for _ in range(s.num_per_prompt)]
  images = sd.generate(prompts, num_inference_steps=s.num_inference_steps,
                       guidance_scale=s.guidance_scale, scheduler=s.scheduler,
                       height=config.resolution, width=config.resolution,
                       seed=[s.seed + i for i in range(len(prompts))])
  grid = images_lib.grid(images_lib.to_uint8(hosts.to_host(images)))
  out = workdir / "samples" / f"step_{step:06d}.png"
  if hosts.is_lead():
    images_lib.save_png(grid, out, {"synthetic": "true", "generator": "medjax.train",
                                    "prompts": " | ".join(sample_prompts(config)),
                                    "step": step, "model": sd.name})
    writer.write_images(step, {"samples": grid[None]})
    logging.info("wrote %s", out)
  return out


_HELD_OUT: dict[str, np.ndarray] = {}  # the last held_out_images, by what it was read for


def held_out_images(config: Any) -> np.ndarray:
  """The first `sample.num_reconstructions` images of the val split ([0, 1] NHWC; the train
  split when val is empty), the same on every process and at every grid of a run."""
  n = int(config.sample.num_reconstructions)
  key = json.dumps([config.data.to_json(), config.resolution, n, config.seed])
  if key not in _HELD_OUT:
    split = "val" if select_records(config.data, "val").records else "train"
    data = make_dataset(config.data, split, n, seed=config.seed, resolution=config.resolution,
                        process_index=0, process_count=1, num_epochs=1, shuffle=False,
                        drop_remainder=False)
    _HELD_OUT.clear()
    _HELD_OUT[key] = (np.asarray(next(data)["image"], np.float32) + 1) / 2
  return _HELD_OUT[key]


def write_reconstruction_grid(config: Any, sd: StableDiffusion, workdir, step: int, writer,
                              mesh=None):
  """VAE runs: held-out originals, each beside its reconstruction (synthetic) in the grid;
  PSNR/SSIM of the VAE round trip (posterior mean) to the writer and `samples/step_NNNNNN.json`.
  None when sample.num_reconstructions is 0."""
  if config.sample.num_reconstructions <= 0:
    return None
  images = held_out_images(config)
  metrics, decoded = recon.vae_roundtrip(sd, images, batch_size=len(images), mesh=mesh)
  pairs = np.stack([images, np.clip((decoded + 1) / 2, 0, 1)], axis=1)  # [N, 2, H, W, 3]
  n, _, h, w, c = pairs.shape
  cols = 2 * int(np.ceil(np.sqrt(n)))  # an even column count: a pair never breaks over rows
  grid = np.zeros((-(-2 * n // cols) * h, cols * w, c), np.uint8)
  for i, img in enumerate(images_lib.to_uint8(pairs.reshape(2 * n, h, w, c))):
    r, q = divmod(i, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
  out = workdir / "samples" / f"step_{step:06d}.png"
  if hosts.is_lead():
    images_lib.save_png(grid, out, {
        "synthetic": "true", "generator": "medjax.train", "model": sd.name, "step": step,
        "layout": "pairs: original (left, real data) | VAE reconstruction (right, synthetic)",
        "psnr": f"{metrics['psnr']:.3f}", "ssim": f"{metrics['ssim']:.4f}"})
    atomic.write_text(out.with_suffix(".json"), json.dumps(
        {"step": step, **{k: v if k == "num_images" else float(v) for k, v in metrics.items()}},
        indent=1) + "\n")
    writer.write_images(step, {"reconstructions": grid[None]})
    writer.write_scalars(step, {"held_out_psnr": metrics["psnr"],
                                "held_out_ssim": metrics["ssim"]})
    logging.info("wrote %s (held-out PSNR %.2f dB, SSIM %.4f)", out, metrics["psnr"],
                 metrics["ssim"])
  return out


def token_file_name(token: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in token).strip("_") or "token"


def write_embeddings(embeddings, tokens: list[str], num_vectors: int, workdir, step: int) -> list:
  """Each learned token as diffusers `learned_embeds` (embeddings/diffusers/<token>.safetensors,
  for `load_textual_inversion`) and AUTOMATIC1111 (embeddings/a1111/<token>.safetensors).

  `embeddings` [len(tokens) * num_vectors, dim] may be sharded over all processes: every
  process gathers it, process 0 writes. Returns the paths.
  """
  rows = np.asarray(hosts.to_host(embeddings), np.float32)
  paths = []
  for i, token in enumerate(tokens):
    emb = rows[i * num_vectors:(i + 1) * num_vectors]
    name = token_file_name(token)
    diffusers = workdir / "embeddings" / "diffusers" / f"{name}.safetensors"
    a1111 = workdir / "embeddings" / "a1111" / f"{name}.safetensors"
    if hosts.is_lead():
      _write_file(diffusers, lambda p, t=token, e=emb: embeddings_lib.write_diffusers_embeddings(
          p, {t: e}))
      _write_file(a1111, lambda p, t=token, e=emb: embeddings_lib.write_a1111_embeddings(
          p, t, e, step=step))
      logging.info("wrote %s and %s", diffusers, a1111)
    paths += [diffusers, a1111]
  return paths


def _write_file(target, write: Callable[[Path], Any]) -> None:
  """`write(local_path)` for writers that take local paths; a URL target gets an upload."""
  if not paths_lib.is_url(target):
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    write(Path(target))
    return
  with tempfile.TemporaryDirectory(prefix="medjax-out-") as folder:
    local = Path(folder) / target.name
    write(local)
    atomic.upload(local, target)


def skipped_files(data) -> dict:
  """{'count', 'examples'} of the bad files the run skipped, over all processes (a collective):
  distinct files, each counted once however often the data repeated."""
  return skips_lib.merge(hosts.allgather_json(data.skip_summary()))


def write_summary(workdir, summary: dict) -> None:
  """summary.json, and its gist as the run's last log line."""
  skipped = summary.get("skipped_files") or {"count": 0, "examples": []}
  logging.info("run done: step %s, loss %.6g, stopped: %s, %d distinct bad file(s) skipped%s",
               summary.get("step"), summary.get("loss", float("nan")), summary.get("stopped"),
               skipped["count"], f" (e.g. {skipped['examples'][0]})" if skipped["examples"]
               else "")
  if hosts.is_lead():
    atomic.write_text(workdir / "summary.json", json.dumps(summary, indent=1) + "\n")

"""What a train run leaves besides checkpoints: sample grids, learned embeddings, the summary.

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
from medjax.data import skips as skips_lib
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


def write_sample_grid(config: Any, sd: StableDiffusion, workdir, step: int, writer):
  """A grid of `sample.num_per_prompt` images per sample prompt (none when that is 0): all
  processes generate, process 0 writes `samples/step_NNNNNN.png`; returns its path."""
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

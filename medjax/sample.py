"""python -m medjax.sample: generate PNGs marked as synthetic.

  python -m medjax.sample --prompt="a chest x-ray with pleural effusion" --num_images=8 \
      --steps=50 --outdir=/tmp/samples                  # the embedded tiny model
  python -m medjax.sample --pretrained=DIR --prompt="healthy:0.3 AND diseased:0.7" ...

Writes sample_0000.png ... and grid.png. Every PNG carries tEXt metadata (synthetic=true,
generator=medjax, prompt, seed, ...) so a generated image is never mistaken for a patient's.
Image i uses seed + i, so the images do not depend on --batch_size.
"""
import math
from pathlib import Path

from absl import flags
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
import tqdm

from medjax import schedulers
from medjax import cli
from medjax.atomic import atomic_path
from medjax.errors import MedjaxError

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command-line flags (only when run as a program, so imports never clash)."""
  flags.DEFINE_string("pretrained", "", "A diffusers directory; empty = the embedded tiny model.")
  flags.DEFINE_string("prompt", "", "Prompt; AUTOMATIC1111 'a:0.3 AND b:0.7' composes.")
  flags.DEFINE_string("negative_prompt", "", "Negative (unconditional) prompt.")
  flags.DEFINE_integer("num_images", 4, "Number of images.")
  flags.DEFINE_integer("batch_size", 4, "Images per compiled call.")
  flags.DEFINE_integer("steps", 50, "Inference steps.")
  flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale.")
  flags.DEFINE_string("scheduler", "ddim", f"One of {', '.join(schedulers.NAMES)}.")
  flags.DEFINE_integer("seed", 0, "Seed of image 0 (image i uses seed + i).")
  flags.DEFINE_integer("height", 0, "Pixels (multiple of 8); 0 = the model's default.")
  flags.DEFINE_integer("width", 0, "Pixels (multiple of 8); 0 = the model's default.")
  flags.DEFINE_string("outdir", None, "Output folder.")
  flags.DEFINE_multi_string("embeddings", [], "Textual-inversion files to load (diffusers or "
                            "AUTOMATIC1111 .safetensors); their tokens can be used in --prompt.")
  flags.DEFINE_bool("allow_pickle", False, "Allow .pt/.bin embedding files "
                    "(read with torch.load(weights_only=True)).")


def to_uint8(images) -> np.ndarray:
  return np.round(np.clip(np.asarray(images, np.float32), 0, 1) * 255).astype(np.uint8)


def save_png(array: np.ndarray, path: Path, metadata: dict) -> None:
  """Writes a PNG with tEXt metadata atomically (temp file, then rename)."""
  info = PngInfo()
  for key, value in metadata.items():
    info.add_text(key, str(value))
  with atomic_path(path) as tmp:
    Image.fromarray(array).save(tmp, format="PNG", pnginfo=info)


def grid(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one image, ceil(sqrt(N)) columns, black padding."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  out = np.zeros((rows * h, cols * w, c), np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    out[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
  return out


def check_args(*, num_images, batch_size, steps, scheduler, height, width, outdir) -> None:
  """Cheap checks before the model loads, so bad flags fail fast and write nothing."""
  for name, value in (("num_images", num_images), ("batch_size", batch_size), ("steps", steps)):
    if value <= 0:
      raise MedjaxError(f"--{name} = {value}; expected a positive integer")
  if scheduler not in schedulers.NAMES:
    raise MedjaxError(f"--scheduler = {scheduler!r}; expected one of "
                      f"{', '.join(schedulers.NAMES)}")
  for name, value in (("height", height), ("width", width)):
    if value < 0 or value % 8:
      raise MedjaxError(f"--{name} = {value}; expected 0 (default) or a positive multiple of 8")
  if not outdir:
    raise MedjaxError("--outdir is required")


def sample_to_dir(sd, outdir, *, prompt: str, negative_prompt: str = "", num_images: int = 4,
                  batch_size: int = 4, steps: int = 50, guidance: float = 7.5,
                  scheduler: str = "ddim", seed: int = 0, height: int = 0,
                  width: int = 0, extra_metadata: dict | None = None) -> list[Path]:
  """Generates `num_images` and writes them with a grid; returns the paths written."""
  check_args(num_images=num_images, batch_size=batch_size, steps=steps, scheduler=scheduler,
             height=height, width=width, outdir=outdir)
  outdir = Path(outdir)
  meta = {"synthetic": "true", "generator": "medjax", "prompt": prompt,
          "negative_prompt": negative_prompt, "steps": steps, "guidance": guidance,
          "scheduler": scheduler, "model": sd.name, **(extra_metadata or {})}
  written, kept = [], []
  for start in tqdm.trange(0, num_images, batch_size, desc="batches", unit="batch"):
    seeds = list(range(seed + start, seed + min(start + batch_size, num_images)))
    images = sd.generate([prompt] * len(seeds), negative_prompt, num_inference_steps=steps,
                         guidance_scale=guidance, scheduler=scheduler, height=height or None,
                         width=width or None, seed=seeds)
    outdir.mkdir(parents=True, exist_ok=True)  # only once the first batch has passed the checks
    for s, img in zip(seeds, to_uint8(images)):
      path = outdir / f"sample_{s - seed:04d}.png"
      save_png(img, path, {**meta, "seed": s})
      written.append(path)
      kept.append(img)
  path = outdir / "grid.png"
  save_png(grid(np.stack(kept)), path, {**meta, "seed": f"{seed}..{seed + num_images - 1}"})
  return written + [path]


def main(argv):
  del argv
  from medjax.pipeline import StableDiffusion  # pylint: disable=g-import-not-at-top
  args = dict(prompt=FLAGS.prompt, negative_prompt=FLAGS.negative_prompt,
              num_images=FLAGS.num_images, batch_size=FLAGS.batch_size, steps=FLAGS.steps,
              guidance=FLAGS.guidance, scheduler=FLAGS.scheduler, seed=FLAGS.seed,
              height=FLAGS.height, width=FLAGS.width)
  check_args(**{k: args[k] for k in ("num_images", "batch_size", "steps", "scheduler", "height",
                                     "width")}, outdir=FLAGS.outdir)
  sd = StableDiffusion.load(FLAGS.pretrained)
  extra = {}
  if FLAGS.embeddings:
    sd = sd.load_embeddings(FLAGS.embeddings, allow_pickle=FLAGS.allow_pickle)
    extra["embeddings"] = ", ".join(Path(p).name for p in FLAGS.embeddings)
  paths = sample_to_dir(sd, FLAGS.outdir, **args, extra_metadata=extra)
  print(f"wrote {len(paths) - 1} images and {paths[-1]} ({sd.name})")


def run():
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()

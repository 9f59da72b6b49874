"""python -m medjax.sample: generate PNGs marked as synthetic.

  python -m medjax.sample --prompt="a chest x-ray with pleural effusion" --num_images=8 \
      --steps=50 --outdir=/tmp/samples                  # the embedded tiny model
  python -m medjax.sample --pretrained=DIR --prompt="healthy:0.3 AND diseased:0.7" ...
  python -m medjax.sample --pretrained=model.safetensors ...      # an AUTOMATIC1111 single file
  python -m medjax.sample --pretrained=runwayml/stable-diffusion-v1-5 ...  # local HF cache

Writes sample_0000.png ... and grid.png (the first 64 images; every image streams to disk as
its batch is done, so memory stays flat in --num_images). Every PNG carries tEXt metadata
(synthetic=true, generator=medjax, prompt, seed, ...) so a generated image is never mistaken
for a patient's.
Image i uses seed + i, so the images do not depend on --batch_size.
"""
from pathlib import Path

from absl import flags

from medjax import cli
from medjax import schedulers
from medjax.errors import MedjaxError
from medjax.pipeline import StableDiffusion
from medjax.sample_files import GRID_MAX
from medjax.sample_files import check_args
from medjax.sample_files import sample_to_dir

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command-line flags (only when run as a program, so imports never clash)."""
  flags.DEFINE_string("pretrained", "", "A diffusers directory (PyTorch or old Flax weights), a "
                      "single-file checkpoint (.safetensors; .ckpt with --allow_pickle), or a "
                      "Hugging Face id in the local cache; empty = the embedded tiny model.")
  flags.DEFINE_string("prompt", "", "Prompt; AUTOMATIC1111 'a:0.3 AND b:0.7' composes.")
  flags.DEFINE_string("negative_prompt", "", "Negative (unconditional) prompt.")
  flags.DEFINE_integer("num_images", 4, "Number of images (each written as it is made; "
                       f"grid.png shows the first {GRID_MAX}).")
  flags.DEFINE_integer("batch_size", 4, "Images per compiled call.")
  flags.DEFINE_integer("steps", 50, "Inference steps.")
  flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (finite, >= 0; <= 1 "
                     "runs no guidance for a plain prompt).")
  flags.DEFINE_string("scheduler", "ddim", f"One of {', '.join(schedulers.NAMES)}.")
  flags.DEFINE_integer("seed", 0, "Seed of image 0 (image i uses seed + i, < 2^32).")
  flags.DEFINE_integer("height", 0, "Pixels (multiple of 8); 0 = the model's default.")
  flags.DEFINE_integer("width", 0, "Pixels (multiple of 8); 0 = the model's default.")
  flags.DEFINE_string("outdir", None, "Output folder.")
  flags.DEFINE_bool("overwrite", False, "Replace the images of an earlier run in --outdir.")
  flags.DEFINE_multi_string("embeddings", [], "Textual-inversion files to load (diffusers or "
                            "AUTOMATIC1111 .safetensors); their tokens can be used in --prompt.")
  flags.DEFINE_bool("allow_pickle", False, "Allow a .ckpt --pretrained and .pt/.bin embedding "
                    "files (read with torch.load(weights_only=True)).")


def main(argv):
  del argv
  args = dict(prompt=FLAGS.prompt, negative_prompt=FLAGS.negative_prompt,
              num_images=FLAGS.num_images, batch_size=FLAGS.batch_size, steps=FLAGS.steps,
              guidance=FLAGS.guidance, scheduler=FLAGS.scheduler, seed=FLAGS.seed,
              height=FLAGS.height, width=FLAGS.width)
  check_args(**{k: args[k] for k in ("num_images", "batch_size", "steps", "scheduler", "height",
                                     "width", "guidance", "seed")}, outdir=FLAGS.outdir,
             overwrite=FLAGS.overwrite)
  for path in FLAGS.embeddings:
    if not Path(path).is_file():
      raise MedjaxError(f"--embeddings={path}: no such file")
  sd = StableDiffusion.load(FLAGS.pretrained, allow_pickle=FLAGS.allow_pickle)
  extra = {}
  if FLAGS.embeddings:
    sd = sd.load_embeddings(FLAGS.embeddings, allow_pickle=FLAGS.allow_pickle)
    extra["embeddings"] = ", ".join(Path(p).name for p in FLAGS.embeddings)
  paths = sample_to_dir(sd, FLAGS.outdir, **args, extra_metadata=extra,
                        overwrite=FLAGS.overwrite)
  print(f"wrote {len(paths) - 1} images and {paths[-1]} ({sd.name})")


def run():
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()

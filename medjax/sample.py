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

  ... --image=slice.dcm --strength=0.6                  # img2img (PNG/JPEG, DICOM, NIfTI, ...)
  ... --image=healthy.png --mask=lesion.png             # inpainting: white = repaint
  ... --prompt="a prostate mri with <healthy>" --interpolate="<healthy>,<cspca>,8"

--interpolate writes sample_0000.png ... (one seed, text-encoder outputs interpolated from
--prompt to --prompt with B for A) and strip.png instead of grid.png. Init images are recorded
by basename only (no DICOM tag reaches a PNG).
"""
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from medjax import cli
from medjax import schedulers
from medjax.errors import MedjaxError
from medjax.pipeline import StableDiffusion
from medjax.sample_files import GRID_MAX
from medjax.sample_files import check_args
from medjax.sample_files import interpolation_to_dir
from medjax.sample_files import sample_to_dir
from medjax.sample_inputs import check_square
from medjax.sample_inputs import parse_interpolate
from medjax.sample_inputs import read_init_image
from medjax.sample_inputs import resize_init
from medjax.sampling import default_size

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
  flags.DEFINE_string("image", "", "img2img / inpainting start: PNG/JPEG/TIFF, DICOM, NIfTI or "
                      "MHA/NRRD (one slice, see --frame), centre-cropped to a square and resized "
                      "to the output size; recorded by basename only.")
  flags.DEFINE_string("mask", "", "Inpainting mask of --image's size: white (>= half scale) = "
                      "repaint, black = keep (as diffusers).")
  flags.DEFINE_float("strength", None, "How far --image is noised, in (0, 1] (diffusers: the "
                     "last int(steps * strength) steps run); default 0.75, 1 with --mask.")
  flags.DEFINE_integer("frame", None, "Slice/frame of a volume or multi-frame --image/--mask.")
  flags.DEFINE_string("interpolate", "", "'A,B,K': K images from one seed, from --prompt to "
                      "--prompt with B for A (text-encoder outputs interpolated); writes "
                      "strip.png.")


def run_sample(*, outdir, prompt: str = "", negative_prompt: str = "",
               num_images: int | None = None, batch_size: int = 4, steps: int = 50,
               guidance: float = 7.5, scheduler: str = "ddim", seed: int = 0, height: int = 0,
               width: int = 0, pretrained: str = "", embeddings=(), allow_pickle: bool = False,
               overwrite: bool = False, image: str = "", mask: str = "",
               strength: float | None = None, frame: int | None = None,
               interpolate: str = "") -> tuple[Sequence[Path], str]:
  """The command as a function (flags as keywords; num_images None = 4, or 1 with
  --interpolate): every input checked before the model loads where it can be; returns the paths
  written (grid or strip last; computed on demand, as `WrittenFiles`) and the model's name."""
  interp = parse_interpolate(interpolate, prompt, num_images=num_images, has_image=bool(image))
  args = dict(prompt=prompt, negative_prompt=negative_prompt, batch_size=batch_size,
              steps=steps, guidance=guidance, scheduler=scheduler, seed=seed, height=height,
              width=width, outdir=outdir, overwrite=overwrite)
  num_images = 4 if num_images is None else num_images
  check_args(**{k: v for k, v in args.items() if k not in ("prompt", "negative_prompt")},
             num_images=1 if interp else num_images)
  init = read_init_image(image, mask, strength, steps, frame)
  if init:
    check_square(height, width)
  for path in embeddings:
    if not Path(path).is_file():
      raise MedjaxError(f"--embeddings={path}: no such file")
  sd = StableDiffusion.load(pretrained, allow_pickle=allow_pickle)
  extra = {}
  if embeddings:
    sd = sd.load_embeddings(list(embeddings), allow_pickle=allow_pickle)
    extra["embeddings"] = ", ".join(Path(p).name for p in embeddings)
  if interp:
    paths = interpolation_to_dir(sd, prompt_b=interp.prompt_b, weights=interp.weights,
                                 extra_metadata=extra, **args)
    return paths, sd.name
  if init:
    h, w = height or default_size(sd)[0], width or default_size(sd)[1]
    check_square(h, w)
    image_px, mask_px = resize_init(init, h, sd.vae_scale_factor)
    extra.update(init.metadata)
    return sample_to_dir(sd, **args, num_images=num_images, extra_metadata=extra,
                         image=image_px, mask=mask_px, strength=init.strength), sd.name
  return sample_to_dir(sd, **args, num_images=num_images, extra_metadata=extra), sd.name


def main(argv):
  del argv
  paths, name = run_sample(
      outdir=FLAGS.outdir, prompt=FLAGS.prompt, negative_prompt=FLAGS.negative_prompt,
      num_images=FLAGS.num_images if FLAGS["num_images"].present else None,
      batch_size=FLAGS.batch_size, steps=FLAGS.steps, guidance=FLAGS.guidance,
      scheduler=FLAGS.scheduler, seed=FLAGS.seed, height=FLAGS.height, width=FLAGS.width,
      pretrained=FLAGS.pretrained, embeddings=FLAGS.embeddings,
      allow_pickle=FLAGS.allow_pickle, overwrite=FLAGS.overwrite, image=FLAGS.image,
      mask=FLAGS.mask, strength=FLAGS.strength, frame=FLAGS.frame,
      interpolate=FLAGS.interpolate)
  print(f"wrote {len(paths) - 1} images and {paths[-1]} ({name})")


def run():
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()

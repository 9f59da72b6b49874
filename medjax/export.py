"""python -m medjax.export: write a medjax model as a diffusers directory PyTorch can load.

  python -m medjax.export --to=/tmp/sd_tiny                  # the embedded tiny model
  python -m medjax.export --from=path/to/diffusers_dir --to=DIR

The directory is written to a temporary path and renamed when complete, then reloaded and
checked against the in-memory model, so an interrupted or faulty export never leaves a
directory that looks usable.
"""
from pathlib import Path
import shutil

from absl import app
from absl import flags
import jax
import numpy as np

from medjax import cli
from medjax.errors import MedjaxError
from medjax.pipeline import StableDiffusion

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command-line flags (only when run as a program, so imports never clash)."""
  flags.DEFINE_string("from", "", "A diffusers directory, a medjax training workdir (its "
                      "checkpoints), or empty for the embedded tiny model.")
  flags.DEFINE_integer("step", None, "Training workdir: the checkpoint step (default: latest).")
  flags.DEFINE_bool("ema", True, "Training workdir: export the EMA params when the run kept them.")
  flags.DEFINE_string("to", None, "Output diffusers directory (must not exist).")
  flags.DEFINE_integer("seed", 0, "Seed of the embedded tiny model's weights.")
  flags.DEFINE_bool("overwrite", False, "Replace --to if it exists.")
  flags.DEFINE_enum("save_dtype", "float32", ["float32", "float16", "bfloat16"],
                    "dtype of the written weights.")


def export(sd: StableDiffusion, out_dir, *, overwrite: bool = False, dtype="float32") -> float:
  """Writes `sd` to `out_dir` and returns the max abs difference of a reload's noise prediction."""
  out_dir = Path(out_dir)
  if out_dir.exists() and not overwrite:
    raise MedjaxError(f"{out_dir}: already exists (pass --overwrite to replace it)")
  staging = out_dir.with_name(f".{out_dir.name}.new")
  if staging.exists():
    shutil.rmtree(staging)
  sd.save_pretrained(staging, dtype=np.dtype(jax.numpy.dtype(dtype)))
  error = verify_reload(sd, staging)
  if out_dir.exists():
    shutil.rmtree(out_dir)
  staging.rename(out_dir)
  return error


def verify_reload(sd: StableDiffusion, path) -> float:
  """Reloads `path` and compares a full forward (prompt -> U-Net -> VAE) with `sd`'s."""
  other = StableDiffusion.from_pretrained(path)
  size = int(sd.configs["unet"].get("sample_size", 8))
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((1, size, size, sd.latent_channels)).astype(np.float32)
  results = []
  for model in (sd, other):
    emb = model.encode_prompt(["a chest x-ray with pleural effusion"])
    eps = model.predict_noise(latents, np.array([500]), emb)
    img = model.decode_latents(eps)
    results.append(np.asarray(img, np.float32))
  return float(np.max(np.abs(results[0] - results[1])))


def is_training_workdir(path) -> bool:
  path = Path(path)
  return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def load_source(source: str, *, seed: int = 0, step: int | None = None,
                ema: bool = True) -> StableDiffusion:
  """A diffusers directory / single file, a training workdir, or '' (the embedded model)."""
  if source and is_training_workdir(source):
    from medjax import trainer  # pylint: disable=g-import-not-at-top
    return trainer.restore_pipeline(source, step=step, ema=ema)
  return StableDiffusion.load(source, **({} if source else {"seed": seed}))


def main(argv):
  del argv
  if not FLAGS.to:
    raise app.UsageError("--to is required")
  source = FLAGS["from"].value
  sd = load_source(source, seed=FLAGS.seed, step=FLAGS.step, ema=FLAGS.ema)
  error = export(sd, FLAGS.to, overwrite=FLAGS.overwrite, dtype=FLAGS.save_dtype)
  print(f"exported {sd.name} to {FLAGS.to} (reload check: max abs diff {error:.2e})")


def run():
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()

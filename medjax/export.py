"""python -m medjax.export: write a medjax model as a diffusers directory PyTorch can load, or as
one single-file checkpoint for AUTOMATIC1111 / ComfyUI.

  python -m medjax.export --to=/tmp/sd_tiny                  # the embedded tiny model
  python -m medjax.export --from=path/to/diffusers_dir --to=DIR
  python -m medjax.export --from=/runs/cxr --to=cxr.safetensors --format=single_file \
      --save_dtype=float16

--from takes whatever `StableDiffusion.load` reads (a diffusers directory, old Flax weights, a
single file, a Hugging Face id in the local cache) or a training workdir.
The output is written to a temporary path and renamed when complete, then reloaded and
checked against the in-memory model (`medjax.exporter`), so an interrupted or faulty export
never leaves a directory that looks usable.

A training workdir written by several processes (FSDP-split params) exports from one process.
Run as N processes (e.g. `launch/local.py`, the same cluster job as training), all of them
restore the checkpoint together and process 0 writes the directory while the others wait.
"""
from absl import flags

from medjax import cli
from medjax import distributed
from medjax import hosts
from medjax.errors import MedjaxError
from medjax.exporter import FORMATS
from medjax.exporter import check_target
from medjax.exporter import export
from medjax.exporter import load_source

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command-line flags (only when run as a program, so imports never clash)."""
  flags.DEFINE_string("from", "", "A diffusers directory, a single-file checkpoint, a Hugging "
                      "Face id (local cache), a medjax training workdir (its checkpoints), or "
                      "empty for the embedded tiny model.")
  flags.DEFINE_enum("format", "diffusers", list(FORMATS), "diffusers: a diffusers directory; "
                    "single_file: one .safetensors checkpoint in the original SD layout.")
  flags.DEFINE_bool("allow_pickle", False, "Allow a .ckpt/.pt --from (read with "
                    "torch.load(weights_only=True)).")
  flags.DEFINE_integer("step", None, "Training workdir: the checkpoint step (default: latest).")
  flags.DEFINE_bool("ema", True, "Training workdir: export the EMA params when the run kept them.")
  flags.DEFINE_string("to", None, "Output diffusers directory, or .safetensors file with "
                      "--format=single_file (must not exist); not inside --from, nor containing "
                      "it.")
  flags.DEFINE_bool("embedded_random", False, "Empty --from: the tiny model with random weights "
                    "drawn from --seed instead of its shipped phantom-trained weights.")
  flags.DEFINE_integer("seed", 0, "Seed of the embedded tiny model's random weights.")
  flags.DEFINE_bool("overwrite", False, "Replace --to if it is a diffusers export (never any "
                    "other folder), or with --format=single_file a .safetensors file.")
  flags.DEFINE_enum("save_dtype", "float32", ["float32", "float16", "bfloat16"],
                    "dtype of the written weights.")


def main(argv):
  del argv
  if not FLAGS.to:
    raise MedjaxError("--to is required: the diffusers directory (or .safetensors file) to "
                      "write")
  distributed.maybe_initialize_distributed()
  source = FLAGS["from"].value
  # the target first: a refused one costs no model load
  hosts.lead_only(lambda: check_target(FLAGS.to, source, overwrite=FLAGS.overwrite,
                                       fmt=FLAGS.format))
  sd = load_source(source, seed=FLAGS.seed, embedded_random=FLAGS.embedded_random,
                   step=FLAGS.step, ema=FLAGS.ema,
                   allow_pickle=FLAGS.allow_pickle)  # on every process
  if hosts.is_lead():  # host arrays from here on: no collectives, so process 0 alone
    error = export(sd, FLAGS.to, overwrite=FLAGS.overwrite, dtype=FLAGS.save_dtype,
                   source=source, fmt=FLAGS.format)
    print(f"exported {sd.name} to {FLAGS.to} (reload check: max abs diff {error:.2e})")
  hosts.sync("medjax.export: written")


def run():
  cli.run(main, define_flags)


if __name__ == "__main__":
  run()

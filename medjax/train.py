"""python -m medjax.train --config=configs/cxr_unet.py[:arg] --workdir=DIR [--config.key=value]

config -> mesh -> model (+ placeholder tokens) -> sharded train state (restored if the workdir
has checkpoints) -> loop of one jitted, donated step -> checkpoints, metrics, sample grids,
learned embeddings (`medjax.trainer`). Re-running the same command resumes exactly where the
last checkpoint was.
"""
import json
import os

from absl import flags

from medjax import cli
from medjax import trainer
from medjax.errors import MedjaxError


def define_flags():
  cli.define_config_and_workdir("A config file: configs/<name>.py[:arg].",
                                "Where checkpoints, metrics, samples and outputs go.")


def main(argv):
  if len(argv) > 1:
    raise MedjaxError(f"unexpected arguments {argv[1:]}")
  _cpu_defaults()
  summary = trainer.train(flags.FLAGS.config, flags.FLAGS.workdir)
  print(json.dumps(summary, indent=1))


def _cpu_defaults():
  """XLA:CPU's concurrency-optimised scheduler doubles the train step's buffers (benchmarks/
  unet.py); on CPU-only machines prefer the memory-lean one unless the user set XLA_FLAGS."""
  if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()


def run():
  cli.run_with_config(main, define_flags)


if __name__ == "__main__":
  run()

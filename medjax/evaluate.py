"""python -m medjax.evaluate --config=configs/eval_<name>.py[:arg] --workdir=DIR

Runs one evaluation protocol (`medjax.eval.protocols`) and writes results.json, results.md,
ROC curves and sample grids as PNGs into the workdir.
"""
import json
from pathlib import Path

from medjax.errors import MedjaxError


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "An eval config: configs/eval_<name>.py[:arg].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Where results, ROC curves and samples go.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top

  from medjax.eval import protocols  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise MedjaxError(f"unexpected arguments {argv[1:]}")
  results = protocols.run_protocol(flags.FLAGS.config, flags.FLAGS.workdir)
  print(Path(flags.FLAGS.workdir, "results.md").read_text())
  print(json.dumps({"workdir": flags.FLAGS.workdir, "protocol": results["protocol"]}))


def run():
  from medjax import cli  # pylint: disable=g-import-not-at-top
  cli.run_with_config(main, define_flags)


if __name__ == "__main__":
  run()

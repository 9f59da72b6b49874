"""python -m medjax.evaluate --config=configs/eval_<name>.py[:arg] --workdir=DIR

Runs one evaluation protocol (`medjax.eval.protocols`) and writes results.json, results.md,
ROC curves and sample grids as PNGs into the workdir.

Runs as one process or as N (`launch/local.py`, SLURM, TPU pods: see README "Launch"): then
every process runs the protocol over all devices and process 0 writes the files.
"""
import json

from absl import flags

from medjax import cli
from medjax import distributed
from medjax import hosts
from medjax import paths
from medjax.errors import MedjaxError
from medjax.eval import protocols


def define_flags():
  cli.define_config_and_workdir("An eval config: configs/eval_<name>.py[:arg].",
                                "Where results, ROC curves and samples go.")


def main(argv):
  if len(argv) > 1:
    raise MedjaxError(f"unexpected arguments {argv[1:]}")
  distributed.maybe_initialize_distributed()
  results = protocols.run_protocol(flags.FLAGS.config, flags.FLAGS.workdir)
  if hosts.is_lead():
    print((paths.workdir_path(flags.FLAGS.workdir) / "results.md").read_text())
  print(json.dumps({"workdir": flags.FLAGS.workdir, "protocol": results["protocol"]}))


def run():
  cli.run_with_config(main, define_flags)


if __name__ == "__main__":
  run()

r"""Measures input-pipeline throughput (images/s), e.g. on make_phantoms output at 512 x 512:

  python -m medjax.data.make_phantoms --kind=cxr --num=256 --size=1024 --out=/tmp/cxr
  python -m medjax.data.throughput --source=chexpert --root=/tmp/cxr/CheXpert-v1.0-small
"""
import time

from absl import app
from absl import flags

from medjax.data.defaults import default_config
from medjax.data.loader import make_dataset

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command-line flags (only when run as a program, so imports never clash)."""
  flags.DEFINE_string("source", "", "config.data.source ('' = in-memory phantoms).")
  flags.DEFINE_string("root", "", "config.data.root.")
  flags.DEFINE_integer("resolution", 512, "Output resolution.")
  flags.DEFINE_integer("batch_size", 8, "Batch size.")
  flags.DEFINE_integer("batches", 20, "Timed batches (after 2 warm-up batches).")
  flags.DEFINE_integer("worker_count", 0, "config.data.pipeline.worker_count.")
  flags.DEFINE_integer("read_threads", 2, "config.data.pipeline.read_threads.")
  flags.DEFINE_string("cache_dir", "", "config.data.picai.cache_dir.")


def main(argv):
  del argv
  config = default_config()
  config.source, config.root = FLAGS.source, FLAGS.root
  config.split.fractions = (1.0, 0.0, 0.0)
  config.pipeline.worker_count = FLAGS.worker_count
  config.pipeline.read_threads = FLAGS.read_threads
  config.picai.cache_dir = FLAGS.cache_dir
  iterator = make_dataset(config, "train", FLAGS.batch_size, seed=0, resolution=FLAGS.resolution,
                          process_index=0, process_count=1)
  for _ in range(2):
    next(iterator)
  start = time.perf_counter()
  for _ in range(FLAGS.batches):
    batch = next(iterator)
  seconds = time.perf_counter() - start
  images = FLAGS.batches * FLAGS.batch_size
  print(f"{images / seconds:.1f} images/s ({images} images of {batch['image'].shape[1:]} in "
        f"{seconds:.1f} s; source={FLAGS.source or 'phantoms'}, workers={FLAGS.worker_count}, "
        f"threads={FLAGS.read_threads})")


if __name__ == "__main__":
  define_flags()
  app.run(main)

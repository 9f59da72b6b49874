"""Peak RSS of the streamed evaluation path on N tiny images, run as its own process.

  python -m tests.eval.memory_probe 128 128 2048  -> one JSON line {"peaks_mib": [...], ...}

For each N in turn (the first run also compiles and touches every buffer): N random 16 px images
go batch by batch into an `image_store`; `classifier_train.predict` scores all N from it and the
Inception statistics (`fid.inception_statistics`, two 2048 x 2048 float64 buffers) run over all
N. The peak RSS is read after each N. (The VAE round trip reads the same `read_range` batches;
its compile would cost this probe ~10 s, so protocol tests cover it instead.)
Then, as a control, the old in-RAM path on the last N: the whole set as a float32 array,
`inception_features` of it and `statistics` of those (what the protocols did before).

The networks are cheap stand-ins where their cost would dominate: the classifier is a one-layer
model in a `ClassifierState` (predict's own data path, shared with training's batch reads) and
Inception a fixed projection of the 8x8 pooled image to 2048 features. Their memory does not
depend on N, and ResNet-18 / the real Inception take minutes on a CPU for 2,048 images.
"""
import json
import resource
import sys
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.eval import classifier_train
from medjax.eval import fid
from medjax.eval import image_store

SIZE, BATCH = 16, 64


def _stand_in(module, params, images):
  del module
  pooled = jax.image.resize(images, (images.shape[0], 8, 8, 3), "linear").reshape(
      images.shape[0], -1)
  return jnp.tanh(pooled @ params["projection"])


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(1)(jnp.mean(x, axis=(1, 2)))


def _peak_mib() -> float:
  """This process's peak RSS: VmHWM, since on Linux ru_maxrss also counts a parent's peak
  before exec (a pytest parent's would hide ours); ru_maxrss where /proc is missing."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _write(folder: Path, n: int, seed: int) -> image_store.ImageStore:
  rng = np.random.default_rng(seed)
  with image_store.StoreWriter(folder / f"real_{n}") as writer:
    for start in range(0, n, BATCH):
      count = min(BATCH, n - start)
      writer.add(rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8),
                 rng.integers(0, 2, count))
    return writer.close()


def main(sizes: list[int]) -> None:
  fid._forward = _stand_in  # pylint: disable=protected-access
  params = {"projection": np.random.default_rng(0).standard_normal((192, 2048)).astype(
      np.float32) * 0.1}
  model = _Tiny()
  variables = {"params": model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]}
  state = classifier_train.create_state(model, jax.random.PRNGKey(0), (32, 32, 3),
                                        optax.adam(1e-3), variables=variables)
  peaks = []
  with tempfile.TemporaryDirectory() as folder:
    folder = Path(folder)
    for n in sizes:
      store = _write(folder, n, seed=n)
      scores = classifier_train.predict(state, store, BATCH)
      assert scores.shape == (n,)
      mu, sigma = fid.inception_statistics(params, store, batch_size=BATCH)
      assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
      del scores, mu, sigma
      peaks.append(_peak_mib())
    # Control: the old in-RAM path on the last set.
    images = store.floats(np.arange(len(store)))
    features = fid.inception_features(params, (images + 1) / 2, batch_size=BATCH)
    fid.statistics(features)
    control = _peak_mib()
  print(json.dumps({"sizes": sizes, "peaks_mib": peaks, "in_ram_control_mib": control}))


if __name__ == "__main__":
  main([int(a) for a in sys.argv[1:]])

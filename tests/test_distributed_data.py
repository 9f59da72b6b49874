"""medjax.distributed's host <-> global-mesh helpers in one process (the multi-process paths run
in tests/eval/test_evaluate_multiprocess.py and tests/test_export_multiprocess.py)."""
import jax
import jax.numpy as jnp
import numpy as np

from medjax import distributed
from medjax import sharding


def test_to_global_and_to_host_round_trip_in_one_process():
  mesh = sharding.make_mesh(-1, 1)
  batch = {"image": np.arange(24, dtype=np.float32).reshape(len(jax.devices()) * 2, -1),
           "label": np.arange(len(jax.devices()) * 2, dtype=np.int32)}
  placed = distributed.to_global(batch, sharding.batch_sharding(mesh))
  assert all(isinstance(x, jax.Array) and x.sharding == sharding.batch_sharding(mesh)
             for x in placed.values())
  back = distributed.to_host(jax.jit(lambda b: {k: v * 2 for k, v in b.items()})(placed))
  for k, v in batch.items():
    assert isinstance(back[k], np.ndarray)
    np.testing.assert_array_equal(back[k], v * 2)
  # Device arrays (committed ones too) go through the host, so any array can be placed.
  committed = jax.device_put(jnp.ones(3), jax.devices()[0])
  rep = distributed.to_global(committed, sharding.replicated(mesh))
  assert rep.sharding == sharding.replicated(mesh)
  np.testing.assert_array_equal(distributed.to_host(rep), np.ones(3))


def test_one_process_is_the_lead_and_sync_is_a_no_op():
  assert distributed.is_lead()
  distributed.sync("test")  # returns at once with one process

"""medjax.hosts on one process (plain values) and on 2 processes x 2 CPU devices through
launch/local.py: gathering JSON of different sizes, process 0's decision, a sharded array to
every host, each process's block of the global batch; and the prefetch thread's data state."""
import importlib.util
import io
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from medjax import batches
from medjax import hosts
from medjax import sharding
from tests import launch_support

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("launch_local", ROOT / "launch" / "local.py")
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)


def test_one_process_helpers_are_plain():
  assert hosts.is_lead()
  assert hosts.allgather_json({"a": (1, 2)}) == [{"a": [1, 2]}]
  assert hosts.agree(True) is True
  hosts.sync("nothing to wait for")
  x = jax.numpy.arange(4.0)
  np.testing.assert_array_equal(hosts.to_host({"x": x})["x"], np.arange(4.0))
  assert hosts.data_shard(sharding.make_mesh(1, 1), 4) == (0, 1)


class _Data:
  def __init__(self):
    self.position = 0

  def get_state(self):
    return {"position": self.position}

  def __next__(self):
    self.position += 1
    if self.position > 5:
      raise ValueError("bad file")
    return self.position


def test_prefetcher_state_follows_the_batches_taken_not_those_made_ahead():
  data = _Data()
  prefetch = batches.Prefetcher(data, lambda rows, step: (rows, step), first_step=7)
  assert prefetch.state == {"position": 0} and data.position == 0  # nothing read before use
  assert prefetch.next() == (1, 7)
  assert prefetch.next() == (2, 8)
  assert prefetch.state == {"position": 2}
  assert data.position > 2  # read ahead
  for _ in range(3):
    prefetch.next()
  try:
    prefetch.next()
    raise AssertionError("the reader's error was not raised")
  except ValueError as e:
    assert str(e) == "bad file"
  assert prefetch.state == {"position": 5}
  prefetch.close()


SCRIPT = textwrap.dedent("""
    from medjax import distributed
    distributed.maybe_initialize_distributed()
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from medjax import hosts, sharding
    pid = jax.process_index()
    values = hosts.allgather_json({"pid": pid, "text": "x" * (10 + 90 * pid)})
    assert [v["pid"] for v in values] == [0, 1] and len(values[1]["text"]) == 100, values
    assert hosts.agree(pid == 0) is True and hosts.agree(pid == 1) is False
    mesh = sharding.make_mesh(2, 2)
    assert hosts.data_shard(mesh, 8) == (pid, 2)
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    x = jax.make_array_from_process_local_data(rows, np.full((4, 3), pid, np.float32))
    full = hosts.to_host({"x": x})["x"]
    assert full.shape == (8, 3) and full[:4].max() == 0 and full[4:].min() == 1
    hosts.sync("done")
    print(f"hosts ok {hosts.is_lead()}", flush=True)
""")


def test_two_processes_gather_agree_and_find_their_block(tmp_path):
  script = tmp_path / "hosts_script.py"
  script.write_text(SCRIPT)
  env = launch_support.clean_env(num_processes=2)
  out = io.StringIO()
  rc = local.launch([sys.executable, str(script)], 2, 2, env=env, out=out, grace_s=5)
  text = out.getvalue()
  assert rc == 0, text[-4000:]
  assert "[p0] hosts ok True" in text and "[p1] hosts ok False" in text, text[-4000:]


def test_to_global_and_to_host_round_trip_in_one_process():
  mesh = sharding.make_mesh(-1, 1)
  batch = {"image": np.arange(24, dtype=np.float32).reshape(len(jax.devices()) * 2, -1),
           "label": np.arange(len(jax.devices()) * 2, dtype=np.int32)}
  placed = hosts.to_global(batch, sharding.batch_sharding(mesh))
  assert all(isinstance(x, jax.Array) and x.sharding == sharding.batch_sharding(mesh)
             for x in placed.values())
  back = hosts.to_host(jax.jit(lambda b: {k: v * 2 for k, v in b.items()})(placed))
  for k, v in batch.items():
    assert isinstance(back[k], np.ndarray)
    np.testing.assert_array_equal(back[k], v * 2)
  # Device arrays (committed ones too) go through the host, so any array can be placed.
  committed = jax.device_put(jnp.ones(3), jax.devices()[0])
  rep = hosts.to_global(committed, sharding.replicated(mesh))
  assert rep.sharding == sharding.replicated(mesh)
  np.testing.assert_array_equal(hosts.to_host(rep), np.ones(3))

"""Several processes, one run: who writes files, gathering values to every host, barriers.

Every process runs every computation on sharded arrays (a collective that one process skips
hangs the others); only process 0 writes files. These helpers are no-ops, or plain
`jax.device_get`, with one process, so single-process runs pay nothing for them.
"""
import json
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from medjax import sharding
from medjax.errors import MedjaxError


def is_lead() -> bool:
  """True on the one process that writes files (process 0)."""
  return jax.process_index() == 0


def to_global(tree: Any, shardings: Any) -> Any:
  """Host arrays that every process holds in full -> global `jax.Array`s with `shardings`.

  Each process keeps only the rows its devices hold (`device_put` of host data onto a global
  sharding), so this equals a one-process `device_put` of the same arrays. Use it where every
  process has all the data anyway (evaluation sets, prompts, seeds); a training loop that reads a
  different shard per process uses `jax.make_array_from_process_local_data` instead.
  """
  def host(x):
    return x if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x)
  return jax.device_put(jax.tree.map(host, tree), shardings)


def to_host(tree: Any) -> Any:
  """Arrays -> NumPy on every process. Leaves sharded over several processes are gathered
  (`process_allgather(..., tiled=True)`, a collective: call it on all processes alike)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


def allgather_json(value: Any) -> list:
  """Every process's JSON-able `value`, as a list indexed by process (a collective)."""
  if jax.process_count() == 1:
    return [json.loads(json.dumps(value))]
  data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32)))
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(rows[i, :int(sizes[i, 0])].tobytes()) for i in range(rows.shape[0])]


def agree(flag: bool) -> bool:
  """Process 0's `flag` on every process (a collective), e.g. 'must the class images be made'."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))


def lead_only(fn: Callable[[], Any]) -> Any:
  """`fn()` on process 0 (None elsewhere), e.g. checking and locking the output folder. When it
  fails there, every process raises (process 0 its own error), so none waits in a collective
  for a process that stopped."""
  result, error = None, None
  if is_lead():
    try:
      result = fn()
    except (MedjaxError, OSError) as e:
      error = e
  if agree(error is not None):
    raise error or MedjaxError("process 0 stopped with an error (see its output)")
  return result


def sync(name: str) -> None:
  """Waits until every process got here (e.g. process 0 has written files the others read)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def data_shard(mesh, batch_size: int) -> tuple[int, int]:
  """(index, count) of this process's block of rows in each global batch of `mesh`.

  A global batch is split over the mesh's batch axes; the process holds the rows of its devices.
  Reading block `index` of every global batch (of `count` equal blocks) gives each row the same
  example whatever the process count, so runs on 1 and N processes see identical batches.
  Meshes whose process rows are not one contiguous block fall back to (process_index, count).
  """
  count = jax.process_count()
  if count == 1:
    return 0, 1
  index_map = sharding.batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  rows = set()
  for (sl,) in index_map.values():
    rows.update(range(*sl.indices(batch_size)))
  per = batch_size // count
  start = min(rows) if rows else 0
  if rows != set(range(start, start + per)) or start % per:
    return jax.process_index(), count
  return start // per, count

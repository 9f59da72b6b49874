"""Device mesh, logical-axis rules and sharding helpers for data + FSDP parallelism.

The mesh has two axes: `data` (pure data parallelism, params replicated) and `fsdp` (data
parallelism whose params and optimizer state are split over devices, ZeRO-3 style). A batch is
split over both axes. Params carry logical axis names (`medjax.models.layers`); configs map them
to mesh axes with `rules`, a list of `(logical_name, mesh_axis_or_None)` pairs.
"""
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from medjax.errors import MedjaxError

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)

# Shard the model width of every dense/embedding kernel and the output channels of every conv over
# `fsdp`; small vectors (norms) and the other dims stay replicated.
DEFAULT_RULES = (
    ("embed", FSDP), ("conv_out", FSDP), ("mlp", None), ("heads", None), ("vocab", None),
    ("norm", None), ("conv_height", None), ("conv_width", None), ("conv_in", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A (`data`, `fsdp`) mesh; one axis may be -1 (all remaining devices).

  With fewer mesh slots than devices, the first `data * fsdp` devices are used.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  data, fsdp = int(data), int(fsdp)
  if data == -1 and fsdp == -1:
    raise MedjaxError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
  if data == -1:
    if n % fsdp:
      raise MedjaxError(f"mesh: {n} devices are not divisible by mesh.fsdp={fsdp}")
    data = n // fsdp
  elif fsdp == -1:
    if n % data:
      raise MedjaxError(f"mesh: {n} devices are not divisible by mesh.data={data}")
    fsdp = n // data
  if data < 1 or fsdp < 1:
    raise MedjaxError(f"mesh: axis sizes must be >= 1 or -1, got data={data}, fsdp={fsdp}")
  if data * fsdp > n:
    raise MedjaxError(f"mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but only {n} "
                      f"are available ({devices[0].platform})")
  if data * fsdp == n:
    try:
      grid = mesh_utils.create_device_mesh((data, fsdp), devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
      grid = np.asarray(devices).reshape(data, fsdp)
  else:
    logging.info("mesh: using %d of %d devices", data * fsdp, n)
    grid = np.asarray(devices[:data * fsdp]).reshape(data, fsdp)
  return Mesh(grid, BATCH_AXES)


def mesh_from_config(mesh_config: Any, devices: Sequence[Any] | None = None) -> Mesh:
  return make_mesh(mesh_config.data, mesh_config.fsdp, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
  """The global batch must split evenly over the data-parallel devices and the processes."""
  n = data_parallel_size(mesh)
  if batch_size < 1 or batch_size % n:
    raise MedjaxError(f"{name}={batch_size} is not divisible by the {n} data-parallel devices "
                      f"of mesh {dict(mesh.shape)} (data x fsdp)")
  if batch_size % jax.process_count():
    raise MedjaxError(f"{name}={batch_size} is not divisible by {jax.process_count()} processes")


def rules_tuple(rules: Iterable[Sequence[Any]] | None) -> tuple:
  """Config rules ([name, axis] lists, axis None/'' for replicated) -> a tuple of pairs."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for pair in rules:
    if len(pair) != 2:
      raise MedjaxError(f"mesh rule {pair!r}: expected [logical_name, mesh_axis or None]")
    name, axis = pair
    if axis not in (None, "", DATA, FSDP):
      raise MedjaxError(f"mesh rule {pair!r}: mesh axis must be one of {BATCH_AXES} or None")
    out.append((str(name), axis or None))
  return tuple(out)


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple]) -> P:
  """Maps one param's logical names to a PartitionSpec.

  A mesh axis is dropped from a dim it does not divide, and is used at most once per param, so
  every rule set gives a valid sharding for every param shape.
  """
  table = dict(rules)
  used, spec = set(), []
  for name, size in zip(logical, shape, strict=True):
    axis = table.get(name) if name is not None else None
    if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def param_shardings(logical_specs: Any, params: Any, mesh: Mesh,
                    rules: Sequence[tuple] = DEFAULT_RULES) -> Any:
  """NamedShardings for a params tree from a same-structured tree of logical PartitionSpecs."""
  is_spec = lambda x: isinstance(x, P)
  flat_specs = jax.tree.leaves(logical_specs, is_leaf=is_spec)
  flat_params, treedef = jax.tree.flatten(params)
  if len(flat_specs) != len(flat_params):
    raise MedjaxError(f"param_shardings: {len(flat_specs)} logical specs for "
                      f"{len(flat_params)} params")
  out = [NamedSharding(mesh, spec_for(tuple(s), np.shape(p), mesh, rules))
         for s, p in zip(flat_specs, flat_params, strict=True)]
  return jax.tree.unflatten(treedef, out)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over data and fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Process-local NumPy arrays -> global jax.Arrays split over the batch axes.

  Each process passes its own rows (global batch / process count); non-numeric entries (prompts,
  record keys) are dropped since they never enter a jitted step.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "biuf":
      out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out


def bytes_per_device(tree: Any) -> dict:
  """Bytes of a tree's arrays held on each device (for checking how well FSDP splits state)."""
  totals: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return totals

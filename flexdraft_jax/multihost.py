"""Training on several processes (`train.py --multihost`): each process feeds the batch
rows its own devices hold (`data_shard`), the global batch is assembled from them
(`global_batch`), values are placed shard by shard (`put_global`), and decisions
(stop, time limit) are agreed by all (`any_process`). With one process each is the
plain single-process operation."""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from flexdraft_jax import sharding as sharding_lib


class DataShard(NamedTuple):
  index: int  # which of the `count` data shards this process reads
  count: int  # distinct row slices of the global batch across processes
  rows: int   # rows per process (batch_size / count)


def data_shard(mesh, batch_size: int) -> DataShard:
  """This process's slice of the global batch, which is split over ('data', 'fsdp').

  Every process must hold one contiguous, equally large slice of rows; processes
  whose devices hold the same rows (a mesh axis spanning processes that does not
  split the batch) read the same shard. One process: shard 0 of 1, all rows.
  """
  per = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % per:
    raise ValueError(f"batch_size={batch_size} must be a multiple of data*fsdp={per} "
                     f"(mesh {dict(mesh.shape)})")
  index_map = sharding_lib.batch_sharding(mesh, 1).devices_indices_map((batch_size,))
  held: dict[int, set[int]] = {}
  for device, (rows,) in index_map.items():
    held.setdefault(device.process_index, set()).update(range(batch_size)[rows])
  if set(held) != set(range(jax.process_count())):
    raise ValueError(f"the mesh {dict(mesh.shape)} uses devices of processes {sorted(held)} only; "
                     f"with {jax.process_count()} processes it must span every process "
                     f"({jax.device_count()} devices)")
  spans = {}
  for proc, rows in held.items():
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
      raise ValueError(f"process {proc} holds batch rows {sorted(rows)}, not one contiguous slice")
    spans[proc] = (lo, hi)
  distinct = sorted(set(spans.values()))
  if any(b[0] < a[1] for a, b in zip(distinct, distinct[1:])) or \
      len({hi - lo for lo, hi in distinct}) != 1:
    raise ValueError(f"the processes hold overlapping or unequal batch slices {distinct}; "
                     "use a mesh whose ('data', 'fsdp') axes split the batch evenly over processes")
  lo, hi = spans[jax.process_index()]
  return DataShard(distinct.index((lo, hi)), len(distinct), hi - lo)


def put_global(tree, shardings):
  """`tree`'s values (the same on every process) placed with `shardings`. With several
  processes each copies in only its own devices' shards, from a host copy (`jax.device_put`
  of host values would first all-gather every value to check that the processes agree)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:  # e.g. loaded into its shards
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


def global_batch(local: dict, shardings: dict, batch_size: int) -> dict:
  """The global [batch_size, ...] arrays from each process's rows (its DataShard)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v, (batch_size,) + v.shape[1:])
          for k, v in local.items()}


def any_process(*flags: bool) -> tuple[bool, ...]:
  """Each flag OR-ed over processes, so that all take the same branch (a collective
  when there are several processes; every process must call it)."""
  if jax.process_count() == 1:
    return tuple(bool(f) for f in flags)
  gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
  return tuple(bool(f) for f in np.asarray(gathered).reshape(jax.process_count(), -1).any(0))


def to_host(tree):
  """Numpy copies of (possibly sharded) arrays; with several processes a collective
  that every process must call."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)

"""Running the attention ops per shard of a device mesh (data / FSDP / tensor parallelism).

The Pallas kernels and the chunked XLA path see one device's data: under a mesh, the layers call
them through `per_shard`, a `jax.shard_map` with the batch split over the `data` and `fsdp` axes
and the heads over the `tensor` axis. Splitting the heads keeps every GQA group on one device as
long as `tensor` divides `Hkv` (query head `h` belongs to KV head `h // G`, so contiguous blocks of
query heads match contiguous blocks of KV heads), so Q/K/V are never gathered around a kernel.

The mesh comes from the context (`jax.set_mesh(mesh)`); without one, `per_shard` just calls.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None):
  """A `(data, fsdp, tensor)` mesh over `devices` (default all); one size may be -1 (fill).

  Raises:
    ValueError: sizes that are not positive (or -1) or do not multiply to the device count.
  """
  devices = jax.devices() if devices is None else devices
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  fill = [name for name, size in sizes.items() if size == -1]
  bad = [name for name, size in sizes.items() if size != -1 and (not isinstance(size, int)
                                                                  or size < 1)]
  if bad or len(fill) > 1:
    raise ValueError(f"mesh sizes must be positive ints, at most one of them -1 (fill), got "
                     f"{sizes}")
  known = 1
  for size in sizes.values():
    known *= size if size != -1 else 1
  if fill:
    if len(devices) % known:
      raise ValueError(f"mesh {sizes} cannot fill {len(devices)} devices")
    sizes[fill[0]] = len(devices) // known
  if sizes["data"] * sizes["fsdp"] * sizes["tensor"] != len(devices):
    raise ValueError(f"mesh {sizes} needs {sizes['data'] * sizes['fsdp'] * sizes['tensor']} "
                     f"devices, there are {len(devices)}")
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def activation_spec(mesh, rank: int = 4) -> P:
  """`[B, T, H, ...]` split over the batch axes (dim 0) and the head axis (dim 2); `[B, T]`
  (segment ids) over the batch axes."""
  names = set(mesh.axis_names)
  batch = tuple(a for a in BATCH_AXES if a in names) or None
  if rank == 2:
    return P(batch, None)
  heads = HEAD_AXIS if HEAD_AXIS in names else None
  return P(batch, None, heads, *([None] * (rank - 3)))


def per_shard(fn, *arrays):
  """`fn(*arrays)` run per shard of the context mesh; arrays are `[B, T, H, ...]`, `[B, T]` or
  None.

  Every array and the output (one `[B, T, H, ...]` array) are split as `activation_spec`. Without
  a mesh (or with a single device) this is `fn(*arrays)`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*arrays)
  present = [i for i, x in enumerate(arrays) if x is not None]

  def on_shard(*shards):
    full = [None] * len(arrays)
    for i, shard in zip(present, shards):
      full[i] = shard
    return fn(*full)

  specs = tuple(activation_spec(mesh, arrays[i].ndim) for i in present)
  return jax.shard_map(on_shard, mesh=mesh, in_specs=specs, out_specs=activation_spec(mesh),
                       check_vma=False)(*(arrays[i] for i in present))

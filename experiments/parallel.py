"""Data, FSDP and tensor parallelism for `experiments.train`: mesh, parameter and batch shardings.

- Batch: split over the `data` and `fsdp` axes.
- Parameters (and the optimizer state that mirrors them): matrices split over `fsdp` along one
  dimension (gathered per layer by XLA when used) and, for the attention and MLP projections,
  over `tensor` along the head / hidden dimension (Megatron-style: column-split in, row-split
  out), so attention activations arrive split by heads, which is what
  `nsa_jax.sharding.per_shard` runs the kernels on. A dimension an axis does not divide stays
  whole.
- Multi-host (TPU pod slices): `config.multihost = True` calls `jax.distributed.initialize()`
  (which finds the coordinator from the TPU environment), every host runs the same command, and
  each feeds its own rows of the global batch (`global_batch`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nsa_jax.sharding import BATCH_AXES, make_mesh

# Projections whose output dimension is split over `tensor` (heads / MLP hidden) ...
_COLUMN_SPLIT = ("q_proj", "k_proj", "v_proj", "gate_proj", "mlp']['gate", "mlp']['up")
# ... and those whose input dimension is (they map back to the model width).
_ROW_SPLIT = ("o_proj", "mlp']['out")


def mesh_from_config(config):
  """The `(data, fsdp, tensor)` mesh of `config.mesh` over all devices (of all hosts)."""
  return make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def _spec_for(path: str, shape, mesh) -> P:
  if len(shape) != 2:  # norms, biases, the position embedding of phi, scalars: replicated
    return P(*([None] * len(shape)))
  if any(name in path for name in _COLUMN_SPLIT):
    spec = ["fsdp", "tensor"]
  elif any(name in path for name in _ROW_SPLIT):
    spec = ["tensor", "fsdp"]
  elif "embed" in path:  # [vocab, features]
    spec = [None, "fsdp"]
  else:
    spec = ["fsdp", None]
  return P(*(axis if axis and shape[i] % mesh.shape[axis] == 0 else None
             for i, axis in enumerate(spec)))


def state_shardings(state, mesh):
  """`NamedSharding`s for an NNX state (model or optimizer) by parameter path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, _spec_for(jax.tree_util.keystr(path), x.shape, mesh)),
      state)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, None))


def global_batch(batch: np.ndarray, mesh) -> jax.Array:
  """The global `[B, ...]` batch as a sharded array; each host passes the same global batch and
  contributes its own rows (batches are a pure function of the step, so every host has them)."""
  sharding = batch_sharding(mesh)
  rows = batch.shape[0] // jax.process_count()
  local = batch[jax.process_index() * rows:(jax.process_index() + 1) * rows]
  return jax.make_array_from_process_local_data(sharding, local, batch.shape)


def check_divisible(config, mesh):
  """Clear errors for a batch or head count the mesh cannot split."""
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.batch_size // config.grad_accum_steps
  if micro % batch_shards:
    raise ValueError(f"batch_size / grad_accum_steps ({micro}) must be a multiple of "
                     f"mesh data * fsdp ({batch_shards})")
  if config.model.num_kv_heads % mesh.shape["tensor"]:
    raise ValueError(f"model.num_kv_heads ({config.model.num_kv_heads}) must be a multiple of "
                     f"mesh.tensor ({mesh.shape['tensor']}) so that GQA groups stay on one device")

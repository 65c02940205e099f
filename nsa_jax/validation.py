"""Input checks shared by every public op: each failure is a `ValueError` naming the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.config import NSAConfig


def check_float(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def check_rank(name: str, x, rank: int, layout: str) -> None:
  if x.ndim != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")


def check_qkv(q, k, v) -> None:
  """Checks `q [B, T, Hq, Dk]`, `k [B, T, Hkv, Dk]`, `v [B, T, Hkv, Dv]` with `Hq % Hkv == 0`."""
  check_rank("q", q, 4, "[B, T, Hq, Dk]")
  check_rank("k", k, 4, "[B, T, Hkv, Dk]")
  check_rank("v", v, 4, "[B, T, Hkv, Dv]")
  for name, x in (("q", q), ("k", k), ("v", v)):
    check_float(name, x)
  shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
  if not (q.shape[0] == k.shape[0] == v.shape[0]):
    raise ValueError(f"q, k and v must have the same batch size B, got {shapes}")
  if not (q.shape[1] == k.shape[1] == v.shape[1]):
    raise ValueError(f"q, k and v must have the same sequence length T, got {shapes}")
  if q.shape[1] == 0:
    raise ValueError(f"the sequence length T must be positive, got {shapes}")
  _check_heads_and_dim(q, k, v, "k", "v", shapes)


def check_compressed(q, k_cmp, v_cmp, num_blocks: int | None) -> None:
  """Checks `k_cmp [B, Tc, Hkv, Dk]`, `v_cmp [B, Tc, Hkv, Dv]` against `q` (and `Tc` if given)."""
  check_rank("k_cmp", k_cmp, 4, "[B, Tc, Hkv, Dk]")
  check_rank("v_cmp", v_cmp, 4, "[B, Tc, Hkv, Dv]")
  check_float("k_cmp", k_cmp)
  check_float("v_cmp", v_cmp)
  shapes = f"q {tuple(q.shape)}, k_cmp {tuple(k_cmp.shape)}, v_cmp {tuple(v_cmp.shape)}"
  if not (q.shape[0] == k_cmp.shape[0] == v_cmp.shape[0]):
    raise ValueError(f"q, k_cmp and v_cmp must have the same batch size B, got {shapes}")
  if k_cmp.shape[1] != v_cmp.shape[1]:
    raise ValueError(f"k_cmp and v_cmp must have the same number of blocks Tc, got {shapes}")
  if num_blocks is not None and k_cmp.shape[1] != num_blocks:
    raise ValueError(
        f"k_cmp and v_cmp must hold Tc = {num_blocks} compressed blocks for T = {q.shape[1]}, "
        f"got {shapes}")
  _check_heads_and_dim(q, k_cmp, v_cmp, "k_cmp", "v_cmp", shapes)


def _check_heads_and_dim(q, k, v, k_name, v_name, shapes):
  """Same Hkv for keys and values, `Hq % Hkv == 0`, and the same Dk for queries and keys."""
  if k.shape[2] != v.shape[2]:
    raise ValueError(f"{k_name} and {v_name} must have the same number of heads Hkv, got {shapes}")
  if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
    raise ValueError(
        f"the query heads Hq must be a positive multiple of the key/value heads Hkv, got {shapes}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"q and {k_name} must have the same head dimension Dk, got {shapes}")


def check_block_indices(q, k, block_indices) -> None:
  """Checks `block_indices int [B, T, Hkv, n]` against `q [B, T, Hq, Dk]` and `k [B, T, Hkv, Dk]`."""
  check_rank("block_indices", block_indices, 4, "[B, T, Hkv, n]")
  if not jnp.issubdtype(block_indices.dtype, jnp.integer):
    raise ValueError(f"block_indices must be an integer array, got dtype {block_indices.dtype}")
  expected = (q.shape[0], q.shape[1], k.shape[2])
  if tuple(block_indices.shape[:3]) != expected:
    raise ValueError(
        f"block_indices must have shape [B, T, Hkv, n] = [{expected[0]}, {expected[1]}, "
        f"{expected[2]}, n], got {tuple(block_indices.shape)} (q {tuple(q.shape)}, "
        f"k {tuple(k.shape)})")


def check_segment_ids(x, segment_ids, x_name: str = "q") -> None:
  """Checks `segment_ids int [B, T]` (or None) against `x [B, T, ...]`."""
  if segment_ids is None:
    return
  if not hasattr(segment_ids, "dtype") or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids must be an integer array [B, T], got "
                     f"{getattr(segment_ids, 'dtype', type(segment_ids).__name__)}")
  if tuple(segment_ids.shape) != tuple(x.shape[:2]):
    raise ValueError(f"segment_ids must have shape [B, T] = {list(x.shape[:2])}, got "
                     f"{tuple(segment_ids.shape)} ({x_name} {tuple(x.shape)})")


def check_gates(q, gates) -> None:
  """Checks `gates [B, T, Hq, 3]` (order: cmp, slc, swa) against `q [B, T, Hq, Dk]`."""
  expected = tuple(q.shape[:3]) + (3,)
  if gates.ndim != 4 or tuple(gates.shape) != expected:
    raise ValueError(
        f"gates must have shape [B, T, Hq, 3] = {list(expected)}, got {tuple(gates.shape)}")
  check_float("gates", gates)


def check_config(config) -> NSAConfig:
  if not isinstance(config, NSAConfig):
    raise ValueError(f"config must be an NSAConfig, got {type(config).__name__}")
  return config


def check_positive(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return value


def check_block_stride(block, stride) -> None:
  check_positive("block", block)
  check_positive("stride", stride)
  if block % stride:
    raise ValueError(f"block ({block}) must be a multiple of stride ({stride})")


def static_scale(scale, implementation: str) -> float:
  """The Pallas kernels are specialised on `scale`: it must be a Python number, not traced."""
  try:
    return float(scale)
  except (TypeError, jax.errors.ConcretizationTypeError) as err:
    raise ValueError(f"scale must be a Python number for implementation={implementation!r}, "
                     f"got a traced value {scale!r}") from err

"""Query rows: the layout in which the GPU and TPU attention kernels read q, dO and per-head
vectors (lse, delta).

A KV group's `G` query heads of one position become consecutive rows, padded with zero heads
to `heads >= G` (a power of two, or a tile's multiple) and the positions padded to `T_pad`,
so that a tile of `R` rows is `R // heads` whole positions of one KV group:
`[B, T, Hq, D] -> [B, Hkv, T_pad, heads, Dp]`. Each kernel module flattens the last axes to its
own tiles.
"""

from __future__ import annotations

import jax.numpy as jnp


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def pow2(x: int, minimum: int = 1) -> int:
  """The least power of two >= max(x, minimum)."""
  return max(minimum, 1 << (x - 1).bit_length())


def to_rows(x, num_kv_heads: int, seq_pad: int, heads: int, dim_pad: int):
  """`[B, T, Hq, D]` -> `[B, Hkv, T_pad, heads, Dp]`, zero padded (positions, heads, D)."""
  b, t, hq, d = x.shape
  group = hq // num_kv_heads
  x = x.reshape(b, t, num_kv_heads, group, d)
  x = jnp.pad(x, [(0, 0), (0, seq_pad - t), (0, 0), (0, heads - group), (0, dim_pad - d)])
  return x.transpose(0, 2, 1, 3, 4)


def from_rows(x, seq_len: int, group: int, dim: int | None = None):
  """`[B, Hkv, T_pad, heads, ...]` -> `[B, T, Hq, ...]`: the padding cut off (a fourth axis
  also cut to `dim` unless None)."""
  x = x[:, :, :seq_len, :group]
  if dim is not None:
    x = x[..., :dim]
  x = jnp.moveaxis(x, 1, 2)  # [B, T, Hkv, G, ...]
  return x.reshape(x.shape[0], seq_len, x.shape[2] * group, *x.shape[4:])

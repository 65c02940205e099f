"""Per-tile matmuls and the softmax backward step shared by the TPU kernels (float32 results)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot_nt(a, b):
  """`a @ b.T`: `[M, K] x [N, K] -> [M, N]`."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
  """`a @ b`: `[M, K] x [K, N] -> [M, N]`."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
  """`a.T @ b`: `[K, M] x [K, N] -> [M, N]`."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def softmax_backward_tile(s, visible, lse_row, delta_row, do, v):
  """`(p, ds)` of one tile: `p = exp(s - lse)` where visible, `ds = p * (do . v^T - delta)`.

  `s`, `visible`: `[M, N]`; `lse_row`, `delta_row`: `[1, M]` (rows on the lanes); `do`: `[M, Dv]`;
  `v`: `[N, Dv]`.
  """
  p = jnp.where(visible, jnp.exp(s - lse_row.T), 0.0)
  return p, p * (dot_nt(do, v) - delta_row.T)

"""Per-tile matmuls, the softmax backward step (float32 results) and the double-buffered
hand-DMA loop shared by the TPU kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def dot_nt(a, b):
  """`a @ b.T`: `[M, K] x [N, K] -> [M, N]`."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
  """`a @ b`: `[M, K] x [K, N] -> [M, N]`."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
  """`a.T @ b`: `[K, M] x [K, N] -> [M, N]`."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def split3(x):
  """float32 -> three bfloat16 pieces whose sum is `x` to float32 precision (8+8+8 bits)."""
  hi = x.astype(jnp.bfloat16)
  rest = x - hi.astype(jnp.float32)
  mid = rest.astype(jnp.bfloat16)
  return hi, mid, (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)


def dot_by_exact(x, exact):
  """`x @ exact` to float32 precision, for float32 `x [M, K]` and a matrix `exact [K, N]` whose
  entries bfloat16 holds exactly (0/1 maps, small counts): three single-pass MXU matmuls of
  `x`'s bfloat16 pieces, where `Precision.HIGHEST` would take six passes."""
  exact = exact.astype(jnp.bfloat16)
  return sum(dot_nn(piece, exact) for piece in split3(x))


def dot_exact_by(exact, x):
  """`exact @ x` to float32 precision (as `dot_by_exact`, the exact matrix on the left)."""
  exact = exact.astype(jnp.bfloat16)
  return sum(dot_nn(exact, piece) for piece in split3(x))


def softmax_backward_tile(s, visible, lse_row, delta_row, do, v):
  """`(p, ds)` of one tile: `p = exp(s - lse)` where visible, `ds = p * (do . v^T - delta)`.

  `s`, `visible`: `[M, N]` (`visible` None: every entry); `lse_row`, `delta_row`: `[1, M]` (rows
  on the lanes); `do`: `[M, Dv]`; `v`: `[N, Dv]`.
  """
  p = jnp.exp(s - lse_row.T)
  if visible is not None:
    p = jnp.where(visible, p, 0.0)
  return p, p * (dot_nt(do, v) - delta_row.T)


def double_buffered_loop(num_groups, copies, body, init):
  """`fori_loop` over `num_groups` groups of hand-issued DMAs into two buffers.

  `copies(group, slot)` returns the group's `pltpu.make_async_copy` descriptors into buffer
  `slot`; group `g + 1`'s copies start before group `g`'s are waited on, so they overlap
  `body(group, slot, carry) -> carry`, which reads buffer `slot`. Returns the final carry.
  """
  @pl.when(num_groups > 0)
  def _first():
    for copy in copies(0, 0):
      copy.start()

  def step(group, carry):
    slot = group % 2

    @pl.when(group + 1 < num_groups)
    def _prefetch():
      for copy in copies(group + 1, 1 - slot):
        copy.start()

    for copy in copies(group, slot):
      copy.wait()
    return body(group, slot, carry)

  return jax.lax.fori_loop(0, num_groups, step, init)

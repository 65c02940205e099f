"""Constants, the tile matmul and the online-softmax step shared by the GPU kernels (Pallas,
Triton lowering)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)  # the kernels' softmax runs in base 2 (exp2)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: keeps max/exp free of inf - inf


def split3(x):
  """float32 -> three bfloat16 pieces whose sum is `x` to float32 precision (8+8+8 bits): a
  float32 operand of a tensor-core product as three bfloat16 products."""
  hi = x.astype(jnp.bfloat16)
  rest = x - hi.astype(jnp.float32)
  mid = rest.astype(jnp.bfloat16)
  return hi, mid, (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)


def block_overlaps(num_keys: int, first_block, num_blocks: int, per_cmp: int, per_slc: int):
  """int32 `[num_keys, num_blocks]`: overlap / d of compressed key `i` (spanning sub-blocks
  `i .. i + l/d`) with selection block `first_block + j` (sub-blocks of `l'/d`), SPEC.md Eq. 9."""
  sub = jnp.arange(num_keys)[:, None]  # first sub-block of key i
  slc = (first_block + jnp.arange(num_blocks))[None, :] * per_slc
  return jnp.maximum(jnp.minimum(sub + per_cmp, slc + per_slc) - jnp.maximum(sub, slc), 0)


def rows_within(max_rows: int, row_bytes: int, budget: int) -> int:
  """Rows a kernel step loads: the most, a power of two in [16, max_rows] (`max_rows` a power of
  two >= 16), whose `row_bytes` each fit in `budget` bytes, else 16 (Triton's least dot side).
  The backward kernels bound their q and dO rows a step so wide float32 heads fit in shared
  memory (float32 Dk = Dv = 256 at 64 rows asked for 279 KB; an H200 has 227 KB)."""
  fitting = max(16, budget // row_bytes)
  return min(max_rows, 1 << (fitting.bit_length() - 1))


def dot(a, b, trans_a=False, trans_b=False):
  """Tile matmul accumulating in float32: float32 inputs keep float32 precision (no TF32), half
  inputs use the tensor cores."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def masked_split_loop(num_full, num_tiles, body, init, first=0):
  """`body(i, carry, masked)` over tiles `[first, num_full)` with `masked=False` (tiles every
  row sees whole: no mask to build or apply), then `[max(first, num_full), num_tiles)` with
  `masked=True`; tiles before `first` are skipped (no row sees them)."""
  carry = jax.lax.fori_loop(first, num_full, lambda i, c: body(i, c, False), init)
  return jax.lax.fori_loop(jnp.maximum(first, num_full), num_tiles,
                           lambda i, c: body(i, c, True), carry)


def online_softmax_init(rows: int, head_dim_v: int):
  """The carry of a flash-attention loop: `(acc [rows, Dv], row_max [rows], row_sum [rows])`."""
  return (jnp.zeros((rows, head_dim_v), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def online_softmax_step(carry, scores, load_v, visible=None):
  """One key tile of a flash-attention loop in the log2 domain.

  Args:
    carry: `(acc, row_max, row_sum)` (`online_softmax_init`).
    scores: float32 `[rows, keys]` log2-domain scores, masked entries MASK_VALUE.
    load_v: returns the tile's values `[keys, Dv]`; called after the probabilities, so the load
      stays where the kernels had it.
    visible: bool `[keys]` (all rows) or `[rows, keys]`, or None: zero the probabilities of masked
      keys exactly (needed where a row may have no visible key in the tile yet).

  Returns:
    The updated carry.
  """
  return online_softmax_step_with_probs(carry, scores, load_v, visible)[0]


def online_softmax_step_with_probs(carry, scores, load_v, visible=None):
  """`online_softmax_step`, also giving the tile's probabilities `[rows, keys]`, relative to the
  new running maximum (the carry's `row_max`)."""
  acc, row_max, row_sum = carry
  new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
  correction = jnp.exp2(row_max - new_max)
  probs = jnp.exp2(scores - new_max[:, None])
  if visible is not None:
    probs = jnp.where(visible if visible.ndim == 2 else visible[None, :], probs, 0.0)
  v = load_v()
  acc = acc * correction[:, None] + dot(probs.astype(v.dtype), v)
  return (acc, new_max, row_sum * correction + jnp.sum(probs, axis=1)), probs

"""Constants and the tile matmul shared by the GPU kernels (Pallas, Triton lowering)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)  # the kernels' softmax runs in base 2 (exp2)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: keeps max/exp free of inf - inf


def pow2(x: int, minimum: int = 1) -> int:
  """The least power of two >= max(x, minimum) (Triton block shapes are powers of two)."""
  return max(minimum, 1 << (x - 1).bit_length())


def dot(a, b, trans_a=False, trans_b=False):
  """Tile matmul accumulating in float32: float32 inputs keep float32 precision (no TF32), half
  inputs use the tensor cores."""
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)

"""Merging flash-decoding partials in JAX (the TPU decode step), and what both decode kernel sets
share: the window's tile count and the selection scores' per-block sums (when they apply and
their tail weights; the GPU training kernel's fused scores use them too).

A decode kernel that splits one query's keys over several programs writes, per split, the
unnormalised output `acc = sum_s 2^(x_s - m) v_s`, the split's max `m` and sum `l = sum_s
2^(x_s - m)` of its log2-domain scores `x`; merging rescales every split to the common max. (The
GPU decode merges inside its combine kernel, `pallas_kernels/gpu/decode.py`.)
"""

from __future__ import annotations

import jax.numpy as jnp


def merge_partials(acc, row_max, row_sum, axis):
  """Merges flash-decoding partials along `axis` (log2 domain).

  Args:
    acc: `[..., P, Gp, Dv]` unnormalised outputs; `row_max`, `row_sum`: `[..., P, Gp]`.
    axis: the partials axis P (of `row_max`).

  Returns:
    `(out [..., Gp, Dv] float32, lse2 [..., Gp])`: zeros and -inf where nothing was visible.
  """
  total_max = jnp.max(row_max, axis=axis, keepdims=True)
  total_max = jnp.where(jnp.isfinite(total_max), total_max, 0.0)
  weight = jnp.exp2(row_max - total_max)  # 0 for empty partials (max -inf)
  total = jnp.sum(row_sum * weight, axis=axis)
  out = jnp.sum(acc * weight[..., None], axis=axis)
  nonempty = total > 0
  out = out / jnp.where(nonempty, total, 1.0)[..., None]
  lse2 = jnp.where(nonempty, jnp.squeeze(total_max, axis) + jnp.log2(jnp.where(nonempty, total,
                                                                              1.0)), -jnp.inf)
  return out, lse2


def merge_selected_and_window(acc, row_max, row_sum, num_selected: int):
  """The two branches of a selected + window decode kernel, whose first `num_selected` partials
  (axis 2) are selected blocks and the rest window tiles: `(o_slc, o_swa)`, `[..., Gp, Dv]`."""
  merge = lambda part: merge_partials(acc[:, :, part], row_max[:, :, part], row_sum[:, :, part],
                                      axis=2)[0]
  return merge(slice(0, num_selected)), merge(slice(num_selected, None))


def window_tiles(window: int, block: int) -> int:
  """`block`-aligned tiles that a span of `window` tokens can touch (the window's grid steps)."""
  return -(-(window - 1) // block) + 1


def block_sums_apply(per_cmp: int, per_slc: int) -> bool:
  """Whether SPEC.md Eq. 9 follows from two sums per selection block (`tail_weight`): a
  compressed block reaches at most one selection block back, `c - 1 <= m` (`l <= l' + d`)."""
  return per_cmp - 1 <= per_slc


def tail_weight(offset, per_cmp: int, per_slc: int):
  """Weight of the key at `offset` (0 .. m - 1) within its selection block in the block's tail
  sum `U_j = sum_r max(0, r + c - m) p[j*m + r]` (`c = l/d`, `m = l'/d`), float32: with
  `c - 1 <= m`, SPEC.md Eq. 9 gives block j the score `c V_j - U_j + U_{j-1}` (`V_j` the plain
  sum of its keys' probabilities; `pallas_kernels/gpu/decode.py`'s `_ScoreMap`)."""
  return jnp.maximum(offset + per_cmp - per_slc, 0).astype(jnp.float32)

"""The decode cache's append on GPU (Pallas, Triton lowering): one launch per step.

Writing token `t` into the caches and, when it completes a compressed block, that block's mean
takes ~17 small XLA ops (slices, pooling, selects, four in-place updates), ~10 us per step on an
H200 at B=1. This kernel does it in one program per (batch, KV head), updating the four caches in
place (`input_output_aliases`): it writes one row of K and V and, at most, one row of each
compressed cache, and reads the block's other `l - 1` tokens.

The mean is summed like `nsa_jax.xla.compress_kv` (float32 stride-`d` sub-block sums, added in
order, divided by `l`), so the compressed cache equals the one prefill makes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.row_layout import pow2


def supported(head_dim: int, head_dim_v: int, cmp_stride: int, cmp_cache_len: int) -> bool:
  """Whether the kernel takes these sizes (power-of-two rows and features, a compressed cache)."""
  return (cmp_cache_len > 0 and pow2(head_dim) == head_dim and pow2(head_dim_v) == head_dim_v
          and pow2(cmp_stride) == cmp_stride)


def block_to_make(pos, *, cmp_block: int, cmp_stride: int, num_cmp: int):
  """`(completes, first, slot)`: whether token `pos` completes a compressed block, that block's
  first token and its slot in the compressed cache."""
  first = pos + 1 - cmp_block
  completes = (first >= 0) & (first % cmp_stride == 0)
  return completes, first, jnp.minimum(first // cmp_stride, num_cmp - 1)


def block_mean(cache_ref, new_row, first, pos, *, cmp_block: int, cmp_stride: int):
  """Mean of rows `[first, first + l)` of `cache_ref [S, D]` as `[D]` in the cache dtype, row
  `pos` being `new_row` (the step's token, taken from registers rather than read back from its
  global store), summed like `nsa_jax.xla.compress_kv`."""
  total = jnp.zeros(new_row.shape, jnp.float32)
  for sub in range(cmp_block // cmp_stride):
    start = first + sub * cmp_stride
    rows = cache_ref[pl.ds(start, cmp_stride), :]
    is_new = (start + jnp.arange(cmp_stride) == pos)[:, None]
    rows = jnp.where(is_new, new_row[None, :], rows)
    total = total + jnp.sum(rows.astype(jnp.float32), axis=0)
  return (total / cmp_block).astype(cache_ref.dtype)


def _append_kernel(pos_ref, k_t_ref, v_t_ref, _k_in, _v_in, _k_cmp_in, _v_cmp_in, k_ref, v_ref,
                   k_cmp_ref, v_cmp_ref, *, cmp_block, cmp_stride, num_cmp):
  pos = pos_ref[0]
  new = {}
  for name, token_ref, cache_ref in (("k", k_t_ref, k_ref), ("v", v_t_ref, v_ref)):
    new[name] = token_ref[...].astype(cache_ref.dtype)
    cache_ref[pl.ds(pos, 1), :] = new[name][None, :]
  completes, first, slot = block_to_make(pos, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                         num_cmp=num_cmp)

  @pl.when(completes)
  def _():
    for name, cache_ref, cmp_ref in (("k", k_ref, k_cmp_ref), ("v", v_ref, v_cmp_ref)):
      cmp_ref[pl.ds(slot, 1), :] = block_mean(cache_ref, new[name], first, pos,
                                              cmp_block=cmp_block, cmp_stride=cmp_stride)[None, :]


@functools.partial(jax.jit, static_argnames=("cmp_block", "cmp_stride", "num_cmp", "interpret"))
def append_token(k, v, k_cmp, v_cmp, k_t, v_t, position, *, cmp_block: int, cmp_stride: int,
                 num_cmp: int, interpret: bool = False):
  """Writes token `position` and, when it completes a compressed block, the block's mean.

  Args:
    k, v: caches `[B, Hkv, S, Dk]` / `[B, Hkv, S, Dv]`; positions `[0, position)` filled.
    k_cmp, v_cmp: `[B, Hkv, Sc, Dk]` / `[B, Hkv, Sc, Dv]`, Sc > 0.
    k_t, v_t: the token's `[B, Hkv, Dk]` / `[B, Hkv, Dv]` (cast to the cache dtype).
    position: int32 scalar, `< S`.
    cmp_block, cmp_stride: `l`, `d` (a power of two); num_cmp: compressed blocks the cache can
      make (`config.num_cmp_blocks(max_len)`).
    interpret: Pallas interpret mode (CPU).

  Returns:
    `(k, v, k_cmp, v_cmp)`, updated in place when the inputs are donated (or loop-carried).
  """
  b, hkv, size, dk = k.shape
  num_slots, dv = k_cmp.shape[2], v.shape[3]
  whole = lambda n, d: pl.BlockSpec((None, None, n, d), lambda i, j: (i, j, 0, 0))
  token = lambda d: pl.BlockSpec((None, None, d), lambda i, j: (i, j, 0))
  caches = [whole(size, dk), whole(size, dv), whole(num_slots, dk), whole(num_slots, dv)]
  kernel = functools.partial(_append_kernel, cmp_block=cmp_block, cmp_stride=cmp_stride,
                             num_cmp=num_cmp)
  return pl.pallas_call(
      kernel,
      grid=(b, hkv),
      in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)), token(dk), token(dv)] + caches,
      out_specs=caches,
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k, v, k_cmp, v_cmp)],
      input_output_aliases={3: 0, 4: 1, 5: 2, 6: 3},
      compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
      interpret=interpret,
      name="nsa_decode_append",
  )(jnp.reshape(position, (1,)).astype(jnp.int32), k_t, v_t, k, v, k_cmp, v_cmp)

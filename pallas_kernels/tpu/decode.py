"""NSA decode kernels on TPU (Pallas Mosaic): one query token per sequence.

The split (flash-decoding) plan, as in `pallas_kernels/gpu/decode.py`: a grid over (batch, KV
head, split) writes per-split softmax partials, merged in JAX by
`pallas_kernels.decode_partials.merge_partials` (`nsa_jax/split_decode.py` runs the step). The G
query heads of a KV group are the matmul rows (`[Gp, D]`, Gp a multiple of 8 sublanes).
Everything data-dependent reaches the kernels by scalar prefetch, so the index maps choose which
block the pipeline DMAs:

- `compressed_decode`: grid (B, Hkv, Sc / CMP_SPLIT); prefetched: the number of visible
  compressed blocks. Splits past it revisit the last visible split's block (no new DMA) and only
  write empty partials.
- `sparse_decode`: grid (B, Hkv, n + window tiles); prefetched: the position and the selected
  blocks. Step i < n DMAs selected block `idx[i]` (unused slots: block 0, masked), the others one
  `l'`-aligned tile of the window `(t - w, t]` (tiles past the cache: its last block, masked).

Row statistics are stored lane-replicated (`[Gp, 128]`), the TPU layout for per-row vectors.
Caches are head-major `[B, Hkv, S, D]`; blocks span the full head dim, so any D is legal; `l'` must
be a multiple of 8 and S, Sc multiples of `l'` and CMP_SPLIT (`supported` checks).

Cost model (v5e-class: ~0.8 TB/s HBM, ~0.35 us per grid step): at 64k context, B=1, Hkv=4 the
step reads 5.6k tokens x 4 heads x 2 x 256 B = 11.5 MB (~15 us of HBM) over 4 x (32 + 25) = 228
grid steps (~80 us of step overhead if serial on one core): step overhead dominates at B=1, which
is why the splits are as large as the cache padding allows (CMP_SPLIT=128 keys, one l' block).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_partials import merge_partials, merge_selected_and_window
from pallas_kernels.decode_partials import window_tiles
from pallas_kernels.tpu.tile_math import dot_nn, dot_nt

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES = 128
CMP_SPLIT = 128  # compressed keys per grid step


def supported(slc_block: int, cache_len: int, cmp_cache_len: int) -> bool:
  """Whether the kernels take these sizes (else use the XLA decode path)."""
  return (slc_block % 8 == 0 and cache_len % slc_block == 0 and cmp_cache_len > 0
          and cmp_cache_len % CMP_SPLIT == 0)


def group_rows(q_t, num_kv_heads: int):
  """`[B, Hq, D]` -> `[B, Hkv, Gp, D]`, the G heads of a group padded to a multiple of 8 rows."""
  b, hq, d = q_t.shape
  group = hq // num_kv_heads
  rows = -(-group // 8) * 8
  q = q_t.reshape(b, num_kv_heads, group, d)
  return jnp.pad(q, [(0, 0), (0, 0), (0, rows - group), (0, 0)])


def _interpret(interpret):
  return pltpu.InterpretParams(detect_races=True) if interpret else False


def _write_partial(scores, visible, v, acc_ref, m_ref, l_ref):
  """Softmax partial of masked log2-domain `scores [Gp, K]` over `v [K, Dv]`."""
  row_max = jnp.max(scores, axis=1, keepdims=True)  # [Gp, 1]
  probs = jnp.where(visible, jnp.exp2(scores - row_max), 0.0)
  row_sum = jnp.sum(probs, axis=1, keepdims=True)
  acc_ref[...] = dot_nn(probs.astype(v.dtype), v)
  m_ref[...] = jnp.broadcast_to(jnp.where(row_sum > 0, row_max, -jnp.inf), m_ref.shape)
  l_ref[...] = jnp.broadcast_to(row_sum, l_ref.shape)


def _write_empty(acc_ref, m_ref, l_ref):
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
  m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)


def _cmp_kernel(count_ref, q_ref, k_ref, v_ref, s_ref, acc_ref, m_ref, l_ref, *, scale):
  base = pl.program_id(2) * CMP_SPLIT
  count = count_ref[0]

  @pl.when(base < count)
  def _attend():
    visible = base + jax.lax.broadcasted_iota(jnp.int32, (1, CMP_SPLIT), 1) < count
    scores = dot_nt(q_ref[...], k_ref[...]) * (scale * LOG2E)
    scores = jnp.where(visible, scores, MASK_VALUE)
    s_ref[...] = scores
    _write_partial(scores, visible, v_ref[...], acc_ref, m_ref, l_ref)

  @pl.when(base >= count)
  def _skip():
    s_ref[...] = jnp.full(s_ref.shape, MASK_VALUE, jnp.float32)
    _write_empty(acc_ref, m_ref, l_ref)


def _last_visible_split(count_ref):
  return jnp.maximum(count_ref[0] - 1, 0) // CMP_SPLIT


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def compressed_decode(q_rows, k_cmp, v_cmp, count, *, scale: float, interpret: bool = False):
  """Compressed-branch attention of one query per sequence, and its per-head probabilities.

  Args:
    q_rows: `[B, Hkv, Gp, Dk]` (`group_rows`).
    k_cmp, v_cmp: `[B, Hkv, Sc, Dk]` / `[B, Hkv, Sc, Dv]`, Sc a multiple of CMP_SPLIT.
    count: int32 scalar, compressed blocks the query sees (the first `count`).
    scale: softmax scale.
    interpret: run under the TPU interpreter (CPU) with race detection.

  Returns:
    `(out [B, Hkv, Gp, Dv] float32, probs [B, Hkv, Gp, Sc] float32)`.
  """
  b, hkv, rows, dk = q_rows.shape
  num_cmp, dv = k_cmp.shape[2], v_cmp.shape[3]
  splits = num_cmp // CMP_SPLIT
  keys = lambda d: pl.BlockSpec(
      (None, None, CMP_SPLIT, d),
      lambda i, j, s, count_ref: (i, j, jnp.minimum(s, _last_visible_split(count_ref)), 0))
  part = lambda width: pl.BlockSpec((None, None, None, rows, width),
                                    lambda i, j, s, count_ref: (i, j, s, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b, hkv, splits),
      in_specs=[pl.BlockSpec((None, None, rows, dk), lambda i, j, s, count_ref: (i, j, 0, 0)),
                keys(dk), keys(dv)],
      out_specs=[pl.BlockSpec((None, None, rows, CMP_SPLIT),
                              lambda i, j, s, count_ref: (i, j, 0, s)),
                 part(dv), part(LANES), part(LANES)])
  partial_shape = lambda width: jax.ShapeDtypeStruct((b, hkv, splits, rows, width), jnp.float32)
  scores, acc, row_max, row_sum = pl.pallas_call(
      functools.partial(_cmp_kernel, scale=scale),
      grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, hkv, rows, num_cmp), jnp.float32),
                 partial_shape(dv), partial_shape(LANES), partial_shape(LANES)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=_interpret(interpret),
      name="nsa_decode_compressed",
  )(jnp.reshape(count, (1,)).astype(jnp.int32), q_rows, k_cmp, v_cmp)
  out, lse2 = merge_partials(acc, row_max[..., 0], row_sum[..., 0], axis=2)
  probs = jnp.where(jnp.arange(num_cmp) < count, jnp.exp2(scores - lse2[..., None]), 0.0)
  return out, probs


def _step_block(step, pos, slot_block, *, block, window, num_selected):
  """The selection block step `step` attends (may be -1 or past the cache: then masked)."""
  first_window_block = jnp.maximum(pos - window + 1, 0) // block
  return jnp.where(step < num_selected, slot_block, first_window_block + step - num_selected)


def _sparse_kernel(pos_ref, idx_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, scale, block,
                   window, num_selected, num_blocks):
  b, h, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  pos = pos_ref[0]
  slot = jnp.minimum(step, num_selected - 1)
  slot_block = idx_ref[(b * pl.num_programs(1) + h) * num_selected + slot]
  block_id = _step_block(step, pos, slot_block, block=block, window=window,
                         num_selected=num_selected)
  key_pos = block_id * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
  visible = ((block_id >= 0) & (block_id < num_blocks) & (key_pos <= pos)
             & ((step < num_selected) | (key_pos > pos - window)))
  scores = dot_nt(q_ref[...], k_ref[...]) * (scale * LOG2E)
  _write_partial(jnp.where(visible, scores, MASK_VALUE), visible, v_ref[...], acc_ref, m_ref,
                 l_ref)


@functools.partial(jax.jit, static_argnames=("block", "window", "scale", "interpret"))
def sparse_decode(q_rows, k, v, block_indices, position, *, block: int, window: int,
                  scale: float, interpret: bool = False):
  """Selected-block and sliding-window attention of one query per sequence (TPU).

  Args:
    q_rows: `[B, Hkv, Gp, Dk]`.
    k, v: caches `[B, Hkv, S, Dk]` / `[B, Hkv, S, Dv]`, S a multiple of `block`.
    block_indices: int32 `[B, Hkv, n]`, -1 for unused slots (distinct blocks).
    position: int32 scalar, the query's position (its token is in the cache).
    block: `l'`; window: `w`; scale: softmax scale.
    interpret: run under the TPU interpreter (CPU) with race detection.

  Returns:
    `(o_slc, o_swa)`, each `[B, Hkv, Gp, Dv]` float32.
  """
  b, hkv, rows, dk = q_rows.shape
  num_blocks, dv = k.shape[2] // block, v.shape[3]
  n = block_indices.shape[-1]
  steps = n + window_tiles(window, block)

  def kv_index(i, j, step, pos_ref, idx_ref):
    slot_block = idx_ref[(i * hkv + j) * n + jnp.minimum(step, n - 1)]
    block_id = _step_block(step, pos_ref[0], slot_block, block=block, window=window,
                           num_selected=n)
    return i, j, jnp.clip(block_id, 0, num_blocks - 1), 0

  kv = lambda d: pl.BlockSpec((None, None, block, d), kv_index)
  part = lambda width: pl.BlockSpec((None, None, None, rows, width),
                                    lambda i, j, step, pos_ref, idx_ref: (i, j, step, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, hkv, steps),
      in_specs=[pl.BlockSpec((None, None, rows, dk),
                             lambda i, j, step, pos_ref, idx_ref: (i, j, 0, 0)),
                kv(dk), kv(dv)],
      out_specs=[part(dv), part(LANES), part(LANES)])
  partial_shape = lambda width: jax.ShapeDtypeStruct((b, hkv, steps, rows, width), jnp.float32)
  acc, row_max, row_sum = pl.pallas_call(
      functools.partial(_sparse_kernel, scale=scale, block=block, window=window,
                        num_selected=n, num_blocks=num_blocks),
      grid_spec=grid_spec,
      out_shape=[partial_shape(dv), partial_shape(LANES), partial_shape(LANES)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=_interpret(interpret),
      name="nsa_decode_sparse",
  )(jnp.reshape(position, (1,)).astype(jnp.int32),
    block_indices.astype(jnp.int32).reshape(-1), q_rows, k, v)
  return merge_selected_and_window(acc, row_max[..., 0], row_sum[..., 0], n)  # lanes replicated

"""NSA decode kernels on GPU (Pallas, Triton lowering): one query token per sequence.

Decoding reads little (the compressed cache, n selected blocks and the window: 5.6k tokens per
step at 64k instead of 64k), so the kernels are about spreading those reads over the SMs: with
B=1 and Hkv=4 a grid of (batch, KV head) alone would use 4 SMs. Both kernels split the keys over a
third grid axis and write per-split softmax partials (flash-decoding), merged by
`pallas_kernels.decode_partials.merge_partials`.
The G query heads of a KV group are the matmul rows (padded to 16), as in the prefill kernels.

- `compressed_decode`: grid (B, Hkv, Sc / CMP_SPLIT). Each program scores CMP_SPLIT compressed keys
  in tiles of CMP_TILE, keeps an online softmax for the branch output and writes the raw scores,
  from which the caller's merge gets the probabilities the selection needs (exp(s - lse), summed
  over the group) without recomputing `q . k_cmp`.
- `sparse_decode`: grid (B, Hkv, n + window tiles). Program i < n attends selected block
  `idx[i]` (cut at the query), the others one `l'`-aligned tile of the window `(t - w, t]`.

Layout: caches head-major `[B, Hkv, S, D]` (one head's tokens contiguous); q rows
`[B, Hkv, Gp, Dk]`. Needs Dk, Dv and `l'` powers of two >= 16 and S, Sc multiples of CMP_SPLIT and
`l'` (the caller checks `supported` and falls back otherwise).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_partials import merge_partials, merge_selected_and_window
from pallas_kernels.decode_partials import window_tiles
from pallas_kernels.gpu.tile_math import LOG2E, MASK_VALUE, pow2
from pallas_kernels.gpu.tile_math import dot as _dot

CMP_SPLIT = 128  # compressed keys per program
CMP_TILE = 64  # compressed keys per dot
NUM_WARPS = 4


def _is_pow2(x: int) -> bool:
  return pow2(x, 16) == x


def supported(head_dim: int, head_dim_v: int, slc_block: int, cache_len: int,
              cmp_cache_len: int) -> bool:
  """Whether the kernels take these sizes (else use the XLA decode path)."""
  return (_is_pow2(head_dim) and _is_pow2(head_dim_v) and _is_pow2(slc_block)
          and cache_len % slc_block == 0 and cmp_cache_len > 0
          and cmp_cache_len % CMP_SPLIT == 0)


def group_rows(q_t, num_kv_heads: int):
  """`[B, Hq, D]` -> `[B, Hkv, Gp, D]`, the G heads of a group padded with zero rows to Gp."""
  b, hq, d = q_t.shape
  group = hq // num_kv_heads
  rows = pow2(group, 16)
  q = q_t.reshape(b, num_kv_heads, group, d)
  return jnp.pad(q, [(0, 0), (0, 0), (0, rows - group), (0, 0)])


def _cmp_kernel(count_ref, q_ref, k_ref, v_ref, s_ref, acc_ref, m_ref, l_ref, *, scale):
  count = count_ref[0]  # compressed blocks visible to the query
  base = pl.program_id(2) * CMP_SPLIT
  q = q_ref[...]  # [Gp, Dk]
  num_tiles = jnp.clip((count - base + CMP_TILE - 1) // CMP_TILE, 0, CMP_SPLIT // CMP_TILE)

  def body(i, carry):
    acc, row_max, row_sum = carry
    start = base + i * CMP_TILE
    visible = start + jnp.arange(CMP_TILE) < count
    scores = _dot(q, k_ref[pl.ds(start, CMP_TILE), :], trans_b=True) * (scale * LOG2E)
    scores = jnp.where(visible[None, :], scores, MASK_VALUE)
    s_ref[:, pl.ds(i * CMP_TILE, CMP_TILE)] = scores
    new_max = jnp.maximum(row_max, jnp.max(scores, axis=1))
    correction = jnp.exp2(row_max - new_max)
    probs = jnp.where(visible[None, :], jnp.exp2(scores - new_max[:, None]), 0.0)
    v = v_ref[pl.ds(start, CMP_TILE), :]
    acc = acc * correction[:, None] + _dot(probs.astype(v.dtype), v)
    return acc, new_max, row_sum * correction + jnp.sum(probs, axis=1)

  rows = q.shape[0]
  init = (jnp.zeros((rows, acc_ref.shape[1]), jnp.float32),
          jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32))
  acc, row_max, row_sum = jax.lax.fori_loop(0, num_tiles, body, init)
  acc_ref[...] = acc
  m_ref[...] = row_max
  l_ref[...] = row_sum


@functools.partial(jax.jit, static_argnames=("scale", "interpret"))
def compressed_decode(q_rows, k_cmp, v_cmp, count, *, scale: float, interpret: bool = False):
  """Compressed-branch attention of one query per sequence, and its group-summed probabilities.

  Args:
    q_rows: `[B, Hkv, Gp, Dk]` (`group_rows`); padded rows are zeros.
    k_cmp, v_cmp: `[B, Hkv, Sc, Dk]` / `[B, Hkv, Sc, Dv]`, Sc a multiple of CMP_SPLIT.
    count: int32 scalar, compressed blocks the query sees (the first `count`).
    scale: softmax scale.
    interpret: Pallas interpret mode (CPU).

  Returns:
    `(out [B, Hkv, Gp, Dv] float32, probs [B, Hkv, Gp, Sc] float32)`; rows with nothing visible
    are zeros.
  """
  b, hkv, rows, dk = q_rows.shape
  num_cmp, dv = k_cmp.shape[2], v_cmp.shape[3]
  splits = num_cmp // CMP_SPLIT
  whole = lambda d: pl.BlockSpec((None, None, num_cmp, d), lambda i, j, s: (i, j, 0, 0))
  part = lambda *shape: pl.BlockSpec((None, None, None) + shape,
                                     lambda i, j, s: (i, j, s) + (0,) * len(shape))
  scores, acc, row_max, row_sum = pl.pallas_call(
      functools.partial(_cmp_kernel, scale=scale),
      grid=(b, hkv, splits),
      in_specs=[pl.BlockSpec((1,), lambda i, j, s: (0,)),
                pl.BlockSpec((None, None, rows, dk), lambda i, j, s: (i, j, 0, 0)),
                whole(dk), whole(dv)],
      out_specs=[pl.BlockSpec((None, None, rows, CMP_SPLIT), lambda i, j, s: (i, j, 0, s)),
                 part(rows, dv), part(rows), part(rows)],
      out_shape=[jax.ShapeDtypeStruct((b, hkv, rows, num_cmp), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, splits, rows, dv), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, splits, rows), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=2),
      interpret=interpret,
      name="nsa_decode_compressed",
  )(jnp.reshape(count, (1,)).astype(jnp.int32), q_rows, k_cmp, v_cmp)
  out, lse2 = merge_partials(acc, row_max, row_sum, axis=2)
  visible = jnp.arange(num_cmp) < count  # scores past `count` were never written
  probs = jnp.where(visible, jnp.exp2(scores - lse2[..., None]), 0.0)
  return out, probs


def _sparse_kernel(pos_ref, idx_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *, scale,
                   block, window, num_selected):
  program = pl.program_id(2)
  pos = pos_ref[0]
  selected = program < num_selected
  slot_block = idx_ref[jnp.minimum(program, num_selected - 1)]
  first_window_block = jnp.maximum(pos - window + 1, 0) // block
  block_id = jnp.where(selected, slot_block, first_window_block + program - num_selected)
  key_pos = block_id * block + jnp.arange(block)
  visible = (block_id >= 0) & (key_pos <= pos) & (selected | (key_pos > pos - window))
  # Blocks that lie past the cache are wholly after the query (masked): load any in-range one.
  start = jnp.clip(block_id * block, 0, k_ref.shape[0] - block)
  q = q_ref[...]
  scores = _dot(q, k_ref[pl.ds(start, block), :], trans_b=True) * (scale * LOG2E)
  scores = jnp.where(visible[None, :], scores, MASK_VALUE)
  row_max = jnp.max(scores, axis=1)
  probs = jnp.where(visible[None, :], jnp.exp2(scores - row_max[:, None]), 0.0)
  v = v_ref[pl.ds(start, block), :]
  acc_ref[...] = _dot(probs.astype(v.dtype), v)
  row_sum = jnp.sum(probs, axis=1)
  m_ref[...] = jnp.where(row_sum > 0, row_max, -jnp.inf)
  l_ref[...] = row_sum


@functools.partial(jax.jit, static_argnames=("block", "window", "scale", "interpret"))
def sparse_decode(q_rows, k, v, block_indices, position, *, block: int, window: int,
                  scale: float, interpret: bool = False):
  """Selected-block and sliding-window attention of one query per sequence.

  Args:
    q_rows: `[B, Hkv, Gp, Dk]`.
    k, v: caches `[B, Hkv, S, Dk]` / `[B, Hkv, S, Dv]`, S a multiple of `block`.
    block_indices: int32 `[B, Hkv, n]`, -1 for unused slots (distinct blocks).
    position: int32 scalar, the query's position (its token is in the cache).
    block: `l'`; window: `w`; scale: softmax scale.
    interpret: Pallas interpret mode (CPU).

  Returns:
    `(o_slc, o_swa)`, each `[B, Hkv, Gp, Dv]` float32.
  """
  b, hkv, rows, dk = q_rows.shape
  size, dv = k.shape[2], v.shape[3]
  n = block_indices.shape[-1]
  slots = 1 << (n - 1).bit_length()  # Triton loads power-of-two shapes: pad with -1
  block_indices = jnp.pad(block_indices.astype(jnp.int32), [(0, 0), (0, 0), (0, slots - n)],
                          constant_values=-1)
  programs = n + window_tiles(window, block)
  whole = lambda d: pl.BlockSpec((None, None, size, d), lambda i, j, p: (i, j, 0, 0))
  part = lambda *shape: pl.BlockSpec((None, None, None) + shape,
                                     lambda i, j, p: (i, j, p) + (0,) * len(shape))
  acc, row_max, row_sum = pl.pallas_call(
      functools.partial(_sparse_kernel, scale=scale, block=block, window=window,
                        num_selected=n),
      grid=(b, hkv, programs),
      in_specs=[pl.BlockSpec((1,), lambda i, j, p: (0,)),
                pl.BlockSpec((None, None, slots), lambda i, j, p: (i, j, 0)),
                pl.BlockSpec((None, None, rows, dk), lambda i, j, p: (i, j, 0, 0)),
                whole(dk), whole(dv)],
      out_specs=[part(rows, dv), part(rows), part(rows)],
      out_shape=[jax.ShapeDtypeStruct((b, hkv, programs, rows, dv), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, programs, rows), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, programs, rows), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="nsa_decode_sparse",
  )(jnp.reshape(position, (1,)).astype(jnp.int32), block_indices, q_rows, k, v)
  return merge_selected_and_window(acc, row_max, row_sum, n)

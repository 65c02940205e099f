"""The selection-score pass on Mosaic GPU (Hopper: TMA + wgmma), beside Triton's.

`nsa_selection_scores` (`compressed_attention.selection_scores_from_lse`) recomputes the
compressed branch's probabilities `p = exp(q . k_cmp * scale - lse)` from a given log-sum-exp,
sums them over a position's heads and maps them onto selection blocks (SPEC.md section 2, steps
1-3). Here one CTA takes `R` query rows (`P = R / heads` positions of one KV group) and walks the
compressed keys 64 at a time, three products a tile, each with 64 on wgmma's M:

  - `S^T = K Q^T` (`[64 keys, R rows]`), then `P^T` from it and the rows' lse (a column
    vector), masked to the keys each row sees;
  - the sum over each position's heads, `P^T E` (`E [R, P]` 0/1): `[64 keys, P]`;
  - the overlap map (Eq. 9) onto the tile's `owned = 64 d / l'` selection blocks and the next
    tile's first, `A^T (P^T E)` (`A^T [64, 64 keys]`, its rows past `owned` zero): `[64 blocks,
    P]`, whose spill row is carried into the next tile's first block.

The float32 operands of the last two products are split in three bfloat16 pieces
(`tile_math.split3`: exact to float32, as the Triton kernel's dots): ~40% more MMA work than
`S^T` alone at G = 16. The scores come out block-major (a tile's `[owned, P]` is one TMA box),
so the caller transposes them for the top-n. After the last tile come its spill, then zeros up
to the tile's last position's own block (the candidates no visible key reaches), as the Triton
pass leaves them.

Measured (H100, 2026-12-06, paper config, G = 16, B = 1, Hkv = 4): 20.4 ms at 64k against the
Triton pass's 8.2, both with their layout transposes. A CTA's step is a serial chain (`S^T`, three
head-sum products, three map products, each after a register-to-SMEM store and fence, then the
TMA store), ~4.9 us a key tile where its MMA work is ~0.9 us, and its ~150 KB of SMEM leaves one
CTA per SM, so nothing hides the chain's latency. Overlapping the score stores (two slots, no
wait for the GMEM writes; tried, not kept) did not shorten it: 12.2 ms over Triton's alone with
it, 12.1 in NSA on a trained selection without. What would: two consumer warpgroups a CTA taking
alternate key tiles, or CTAs small enough to share an SM. Not the default (`SCORES`). Smaller
CTAs do not come from `MAX_ROWS` alone: at 128 rows (8 positions at G = 16; ~96 KiB, two an SM)
the kernel does not lower (H100, 2026-12-06), as `E`'s and the heads' sums' 32-byte swizzle needs
16 positions a tile (a tiling of (8, 16)); they need those operands padded to 16 columns.

Scope (`supported`): half-precision q / k_cmp, Dk a multiple of 64, `l` and `l'` multiples of `d`
with `l <= l' + d` (one spill block) and `64 d` a multiple of `l'`, unpacked rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.decode_partials import block_sums_apply
from pallas_kernels.gpu.selected_attention_mgpu import SMEM_BYTES, _smem_transforms, _times
from pallas_kernels.gpu.tile_math import block_overlaps, split3
from pallas_kernels.row_layout import pow2

LOG2E = math.log2(math.e)
KEYS = 64  # compressed keys a tile, and selection blocks a map product: wgmma's M
MAX_ROWS = 256  # query rows a CTA: wgmma's largest N
STAGES = 2  # key tiles in flight
PIECES = jnp.bfloat16  # `split3`'s pieces, and the 0/1 and overlap matrices


def rows_for(heads: int) -> int:
  """Query rows a CTA: MAX_ROWS, fewer where they would hold more than 64 positions."""
  return min(MAX_ROWS, KEYS * heads)


def owned_blocks(stride: int, slc_block: int) -> int:
  """Selection blocks a key tile owns."""
  return KEYS * stride // slc_block


def _smem_bytes(heads: int, dk: int, dtype) -> int:
  rows = rows_for(heads)
  positions = rows // heads
  item = jnp.dtype(dtype).itemsize
  return ((rows + STAGES * KEYS) * dk * item + (KEYS * rows + rows * positions + KEYS * KEYS
                                                 + KEYS * positions) * 2
          + KEYS * positions * 4 + rows * 4)


def supported(q, k_cmp, block: int, stride: int, slc_block: int) -> bool:
  """Whether `selection_scores` takes these inputs (else the Triton score pass does)."""
  dk = q.shape[3]
  heads = pow2(q.shape[2] // k_cmp.shape[2])
  return (q.dtype in (jnp.bfloat16, jnp.float16) and k_cmp.dtype == q.dtype and dk % 64 == 0
          and block % stride == 0 and slc_block % stride == 0
          and (KEYS * stride) % slc_block == 0
          and owned_blocks(stride, slc_block) + (block > stride) <= KEYS  # + a spill row
          and block_sums_apply(block // stride, slc_block // stride)
          and _smem_bytes(heads, dk, q.dtype) <= SMEM_BYTES)


def overlap_map(block: int, stride: int, slc_block: int):
  """`A^T [64, KEYS]`: overlap / d of tile block `j` (row; `j = owned` is the next tile's first,
  later rows zero) with tile key `i` (column). Small integers: exact in bfloat16."""
  overlap = block_overlaps(KEYS, 0, KEYS, block // stride, slc_block // stride).T
  row = jnp.arange(KEYS)[:, None]
  return jnp.where(row <= owned_blocks(stride, slc_block), overlap, 0).astype(PIECES)


def selection_scores(q_rows, k_keys, lse_rows, *, seq_len: int, num_cmp: int, scale: float,
                     block: int, stride: int, slc_block: int, heads: int, num_score_rows: int,
                     interpret=False):
  """Selection scores from a given log-sum-exp, block-major, on Mosaic GPU.

  Args:
    q_rows: `[B, Hkv, T_pad * heads, Dk]`, position-major rows (`heads` a power of two >= G,
      padded heads zero), `T_pad` a multiple of `rows_for(heads) // heads`.
    k_keys: `[B, Hkv, Tc_pad, Dk]`, compressed keys, `Tc_pad` a multiple of KEYS.
    lse_rows: float32 `[B, Hkv, T_pad * heads]`, base-2 log-sum-exp, +inf for rows that see
      nothing (padding included).
    seq_len, num_cmp: T and Tc. scale: softmax scale. block, stride, slc_block: l, d, l'.
    num_score_rows: rows of the result: at least `Tc_pad / KEYS * owned + owned` and Ts, a
      multiple of 8 (a TMA store's GMEM rows).
    interpret: False, or `plgpu.InterpretGPUParams` (CPU).

  Returns:
    float32 `[B, Hkv, num_score_rows, T_pad]`: position `t`'s score of block `j` at `[j, t]`,
    defined for the blocks `j <= t // l'` (the top-n's candidates) only.
  """
  b, hkv, num_rows, dk = q_rows.shape
  dtype = q_rows.dtype
  rows = rows_for(heads)
  positions = rows // heads
  owned = owned_blocks(stride, slc_block)
  shift = heads.bit_length() - 1  # heads: a power of two

  def kernel(q_ref, k_ref, lse_ref, map_ref, score_ref, q_smem, lse_smem, map_smem, k_smem,
             p_smem, heads_smem, g_smem, out_smem, barriers, k_barriers):
    pair, tile = lax.axis_index("pair"), lax.axis_index("tile")
    bi, hi = pair // hkv, pair % hkv
    row_span = pl.ds(tile * rows, rows)
    plgpu.copy_gmem_to_smem(q_ref.at[bi, hi, row_span], q_smem, barriers.at[0])
    plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, row_span], lse_smem, barriers.at[1])
    plgpu.copy_gmem_to_smem(map_ref, map_smem, barriers.at[2])
    # E [R, P]: row r is position r // heads's (its padded heads see q = 0 and lse = +inf).
    e_row = plgpu.broadcasted_iota(jnp.int32, (rows, positions), 0, layout=plgpu.Layout.WGMMA)
    e_col = plgpu.broadcasted_iota(jnp.int32, (rows, positions), 1, layout=plgpu.Layout.WGMMA)
    heads_smem[...] = (lax.shift_right_logical(e_row, shift) == e_col).astype(PIECES)
    plgpu.commit_smem()
    # Key tiles the tile's last position sees.
    last = jnp.minimum((tile + 1) * positions, seq_len) - 1
    seen = jnp.where(last >= block - 1, (last - block + 1) // stride + 1, 0)
    num_tiles = pl.cdiv(jnp.minimum(seen, num_cmp), KEYS)
    key_iota = plgpu.broadcasted_iota(jnp.int32, (KEYS, rows), 0, layout=plgpu.Layout.WGMMA)
    row_iota = plgpu.broadcasted_iota(jnp.int32, (KEYS, rows), 1, layout=plgpu.Layout.WGMMA)
    row_pos = tile * positions + lax.shift_right_logical(row_iota, shift)
    out_row = plgpu.broadcasted_iota(jnp.int32, (KEYS, positions), 0, layout=plgpu.Layout.WGMMA)
    for i in range(3):
      plgpu.barrier_wait(barriers.at[i])
    row_lse = plgpu.load(lse_smem, layout=plgpu.Layout.WGMMA.reduce(0))

    def fetch(kt, buffer):  # kt < num_tiles where it runs; the clamp keeps traced slices in bounds
      keys = pl.ds(jnp.minimum(kt, k_keys.shape[2] // KEYS - 1) * KEYS, KEYS)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, hi, keys], k_smem.at[buffer], k_barriers.at[buffer])

    for s in range(STAGES):
      pl.when(s < num_tiles)(functools.partial(fetch, s, s))

    def store_scores(values, first_block):  # values [64, P]: rows 0 .. owned - 1 stored
      out_smem[...] = values
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, owned)],
                              score_ref.at[bi, hi, pl.ds(first_block, owned),
                                           pl.ds(tile * positions, positions)])
      plgpu.wait_smem_to_gmem(0)

    def step(kt, carry):
      buffer = lax.rem(kt, STAGES)
      plgpu.barrier_wait(k_barriers.at[buffer])
      s_t = _times(k_smem.at[buffer], q_smem.T, (KEYS, rows)) * (scale * LOG2E)
      pl.when(kt + STAGES < num_tiles)(functools.partial(fetch, kt + STAGES, buffer))
      key = kt * KEYS + key_iota
      visible = (key * stride + block - 1 <= row_pos) & (key < num_cmp)
      p_t = jnp.where(visible, jnp.exp2(s_t - lax.broadcast_in_dim(row_lse, s_t.shape, [1])),
                      0.0)
      summed = 0.0  # [KEYS, P]: each position's probabilities summed over its heads
      for piece in split3(p_t):
        p_smem[...] = piece
        plgpu.commit_smem()
        summed = summed + _times(p_smem, heads_smem, (KEYS, positions))
      scores = 0.0  # [64, P]: the tile's blocks, then the spill into the next tile's first
      for piece in split3(summed):
        g_smem[...] = piece
        plgpu.commit_smem()
        scores = scores + _times(map_smem, g_smem, (KEYS, positions))
      scores = scores + jnp.where(out_row == 0, lax.broadcast_in_dim(carry, scores.shape, [1]),
                                  0.0)
      store_scores(scores, kt * owned)
      return jnp.sum(jnp.where(out_row == owned, scores, 0.0), axis=0)

    zero = plgpu.layout_cast(jnp.zeros((positions,), jnp.float32), plgpu.Layout.WGMMA.reduce(0))
    carry = lax.fori_loop(0, num_tiles, step, zero)
    # The last tile's spill, then zeros up to the tile's last own block.
    end = last // slc_block + 1
    tail = jnp.where(out_row == 0, lax.broadcast_in_dim(carry, (KEYS, positions), [1]), 0.0)

    def tail_step(i, values):
      store_scores(values, (num_tiles + i) * owned)
      return jnp.zeros_like(values)

    lax.fori_loop(0, pl.cdiv(jnp.maximum(end - num_tiles * owned, 1), owned), tail_step, tail)

  # A wgmma's two SMEM operands share a swizzle, and `E`'s and the heads' sums' rows are P wide
  # (16 at G = 16): the 32-byte swizzle for all four operands of the two small products.
  narrow = (plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32))
  pieces = lambda shape: plgpu.SMEM(shape, PIECES, transforms=narrow)
  scratch = (
      plgpu.SMEM((rows, dk), dtype, transforms=_smem_transforms(dk, dtype)),
      plgpu.SMEM((rows,), jnp.float32), pieces((KEYS, KEYS)),
      plgpu.SMEM((STAGES, KEYS, dk), dtype, transforms=_smem_transforms(dk, dtype)),
      pieces((KEYS, rows)), pieces((rows, positions)), pieces((KEYS, positions)),
      plgpu.SMEM((KEYS, positions), jnp.float32),
      plgpu.Barrier(num_barriers=3), plgpu.Barrier(num_barriers=STAGES))
  out_type = jax.ShapeDtypeStruct((b, hkv, num_score_rows, num_rows // heads), jnp.float32)
  return plgpu.kernel(kernel, out_type=out_type, grid=(b * hkv, num_rows // rows),
                      grid_names=("pair", "tile"), scratch_types=scratch,
                      compiler_params=plgpu.CompilerParams(approx_math=True),
                      interpret=interpret)(q_rows, k_keys, lse_rows,
                                           overlap_map(block, stride, slc_block))

"""Compressed-branch attention on GPU (Pallas, Triton lowering), with the selection scores fused.

Compressed attention is a dense attention of `T * G` query rows over `Tc` compressed keys with a
staircase mask (query `t` sees block `i` iff `i*d + l - 1 <= t`). One program handles `R` rows:
`R / Gc` consecutive positions times the `Gc` heads of one KV group, which all see the same keys.

Forward in two passes over the visible key tiles: pass 1 finds each row's log-sum-exp; pass 2
accumulates the output with the exact probabilities `p = exp(s - lse)` and, when asked, the
selection scores (SPEC.md section 2, steps 1-3) from those same probabilities, so `q . k_cmp` is
never recomputed outside the kernel:
  - group sum over the `G` heads of a position: the rows are position-major, so `p [R, BK]`
    reshaped to `[R / Gc, Gc, BK]` and summed over the heads (padded heads masked);
  - onto selection blocks (Eq. 9): where `l <= l' + d`, block j of the `BS = BK * d / l'` a key
    tile owns scores `c V_j - U_j + U_{j-1}` from two sums of its own keys (`_block_sum_scores`,
    `U` of the tile's last block carried to the next; in the score pass, with `TAILS_APART`,
    `U_j` stored one column right in an array of its own for the top-n kernel to add);
    otherwise an overlap map `p_grp @ A`, `A [BK, BS]`, `A[i, j] = |block i ∩ block j| / d`,
    plus a carry `@ A_next` for the overlap that spills into the next tile's first blocks, as a
    float32 product-sum over a small 3D tile or tensor-core dots when the tile has many
    positions (`_map_blocks`).
Every pass walks the key tiles that all its rows see whole without a mask (`_full_tile_count`;
all but the last one or two of a walk), then the rest masked. A third kernel,
`nsa_selection_scores` (`selection_scores_from_lse`), is pass 2 without the values, for a
log-sum-exp computed elsewhere (cuDNN's, with the branch's output: `nsa_jax.cudnn_compressed`),
on larger tiles (`SCORE_ROWS`, `SCORE_KEYS`).
Backward: a dQ kernel over the row tiles and a dK/dV kernel over (key tile, chunk of row tiles)
with float32 partials summed afterwards (both recompute `p` from the saved log-sum-exp), the
flash-attention split with the long causal walks of the first key tiles cut into chunks.

Packed rows (`compressed_attention(document_starts=...)`, output and log-sum-exp): block `i` of
the document starting at `s` sits in slot `s // d + i` (SPEC.md), so row `t` sees slot `c` iff
`c >= s // d` and `c*d + l - 1 + s % d <= t`: each row's start rides along as a row vector and
every tile is masked; a row tile's walks start at its first document's slots (`_first_tile`) and
a key tile's dK/dV walk ends with the last document that can own it (`_packed_row_stops`), so a
row of documents costs about its documents' own compressed attention. Their selection
(`packed_selection_from_lse`) is a score pass of its own (`nsa_packed_selection_scores`), since
a document's selection blocks are the aligned ones shifted by its start.

Layout inside: query rows `[B, Hkv, T_pad * Gc, Dp]` (position-major), compressed keys / values
`[B, Hkv, Tc_pad, Dp]`; `Gc = pow2(G)`, head dims padded to powers of two >= 16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plmgpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import row_layout
from pallas_kernels.block_maps import positions_before_key_tiles
from pallas_kernels.decode_partials import block_sums_apply, tail_weight
from pallas_kernels.gpu.tile_math import LOG2E, MASK_VALUE, masked_split_loop
from pallas_kernels.gpu.tile_math import dot as _dot
from pallas_kernels.gpu.tile_math import block_overlaps, rows_within, split3
from pallas_kernels.gpu import selection_scores_mgpu
from pallas_kernels.gpu.top_n import top_n_blocks
from pallas_kernels.row_layout import pow2 as _pow2

ROWS = 64  # query rows per program (positions x heads)
KEYS = 32  # compressed keys per tile (swept on an H200: 22 ms vs 28 ms for 64 at T=64k)
NUM_WARPS = 4
NUM_STAGES = 2
# Compressed keys per tile of the forward's log-sum-exp pass (divides DKV_KEYS). H200, T=64k, fused
# forward: 28.8 / 27.1 / 37.5 ms for 32 / 64 / 128.
LSE_KEYS = 64
DKV_KEYS = 64  # compressed keys per dK/dV program (a multiple of KEYS)
# The selection-score pass from a given log-sum-exp (`selection_scores_from_lse`: no values, so
# larger tiles fit): most rows a program (fewer where their q would pass SCORE_Q_BYTES of shared
# memory, and at most BLOCK_SUM_MAX_POSITIONS positions), keys a tile (a multiple of KEYS
# dividing DKV_KEYS), warps. H200, T=64k, G=16, ms: 64 rows / 32 keys / 4 warps 10.5,
# 64 / 64 / 4 9.6, 128 / 64 / 8 9.1, 256 / 64 / 8 8.5, 256 / 64 / 16 10.3, 128 / 64 / 4 9.2,
# 128 / 32 / 8 10.3, 64 / 128 / 4 11.4, 64 / 64 / 8 15.5; 3 stages 9.5 (128 / 64 / 8).
SCORE_ROWS = 256
SCORE_KEYS = 64
SCORE_NUM_WARPS = 8
SCORE_Q_BYTES = 64 * 1024
# That pass on "triton" (`_scores_kernel`) or "mosaic" (`selection_scores_mgpu`: wgmma, the keys on
# M; where it takes the call, else Triton's). The Mosaic one passes the GPU suite but is 2.5x
# slower (H100, 2026-12-06, paper config, G = 16: 20.4 against 8.2 ms at 64k, 1.57 against 0.75 at
# 16k): one warpgroup walks a serial chain of seven wgmma groups a key tile (BENCHMARKS.md, "What
# is left on Triton"), so the default stays Triton's.
SCORES = "triton"
# The Triton score pass after cuDNN's folded compressed branch reads cuDNN's folded queries and
# log-sum-exp as they are (`selection_from_folded`), where a chunk's `d * G` heads of a KV group
# are exactly a program's rows: no rows copy of q is written beside the fold (1 GB at 64k,
# paper config) and the log-sum-exp is not unfolded. H100, NSA forward / forward+backward ms,
# with `TAILS_APART`, on against off (97ad7ca; BENCHMARKS.md changelog 2026-12-07, "the fold
# read in place"): 64k on an LM's selection 33.7-34.0 / 94.5-95.1 against 34.6 / 94.7-94.8;
# 8k on an LM's 2.39 / 7.6 against 2.46 / 7.7; 16k random 6.02 / 17.83 against 6.24 / 18.01.
# The pass alone at 64k: 7.27 ms against 8.03 (beside the shifted tails the fold loses: 9.32
# against 8.21).
FOLDED_SCORES = True
DKV_NUM_WARPS = 4
DKV_PROGRAMS = 2048  # dK/dV programs to aim for when cutting long row walks into chunks
MIN_DKV_CHUNK = 64  # row tiles
DKV_STEP_BYTES = 64 * 1024  # most bytes of q and dO rows one dK/dV step loads (shared memory)


@dataclasses.dataclass(frozen=True)
class _Layout:
  batch: int
  seq_len: int
  num_kv_heads: int
  group: int  # G
  heads: int  # Gc = pow2(G), rows per position
  rows: int  # R, rows per program
  positions: int  # R / Gc, positions per program
  seq_pad: int  # T padded to a multiple of `positions` (past `first_position`)
  num_cmp: int  # Tc
  cmp_pad: int  # Tc padded to a multiple of DKV_KEYS (at least one tile)
  head_dim: int
  head_dim_v: int
  head_dim_pad: int
  head_dim_v_pad: int
  block: int  # l
  stride: int  # d
  # Row tile 0's first position: 0, or `l - 1` for the score pass over folded queries
  # (`selection_from_folded`), whose chunk c holds positions `l - 1 + c*d ...`.
  first_position: int = 0

  @property
  def num_row_tiles(self) -> int:
    return (self.seq_pad - self.first_position) // self.positions


def _layout(q, k_cmp, v_cmp, block, stride, rows=None) -> _Layout:
  b, t, hq, dk = q.shape
  hkv = k_cmp.shape[2]
  heads = _pow2(hq // hkv)
  rows = max(rows or ROWS, heads)
  positions = rows // heads
  num_cmp = k_cmp.shape[1]
  return _Layout(batch=b, seq_len=t, num_kv_heads=hkv, group=hq // hkv, heads=heads, rows=rows,
                 positions=positions, seq_pad=-(-t // positions) * positions, num_cmp=num_cmp,
                 cmp_pad=max(1, -(-num_cmp // DKV_KEYS)) * DKV_KEYS, head_dim=dk,
                 head_dim_v=v_cmp.shape[3], head_dim_pad=_pow2(dk, 16),
                 head_dim_v_pad=_pow2(v_cmp.shape[3], 16), block=block, stride=stride)


def _to_rows(x, lay: _Layout, dim_pad):
  """`[B, T, Hq, D]` -> `[B, Hkv, T_pad * Gc, Dp]`."""
  rows = row_layout.to_rows(x, lay.num_kv_heads, lay.seq_pad, lay.heads, dim_pad)
  return rows.reshape(lay.batch, lay.num_kv_heads, lay.seq_pad * lay.heads, dim_pad)


def _from_rows(x, lay: _Layout, dim):
  """`[B, Hkv, T_pad * Gc, ...]` -> `[B, T, Hq, ...]` (a trailing dim `dim` is cut to size)."""
  x = x.reshape(lay.batch, lay.num_kv_heads, lay.seq_pad, lay.heads, *x.shape[3:])
  return row_layout.from_rows(x, lay.seq_len, lay.group, dim)


def _to_keys(x, lay: _Layout, dim_pad):
  """`[B, Tc, Hkv, D]` -> `[B, Hkv, Tc_pad, Dp]`."""
  x = jnp.pad(x, [(0, 0), (0, lay.cmp_pad - x.shape[1]), (0, 0), (0, dim_pad - x.shape[3])])
  return x.transpose(0, 2, 1, 3)


def _num_visible(pos, lay: _Layout):
  """Compressed blocks visible to position `pos`: `i*d + l - 1 <= pos`, at most Tc."""
  seen = jnp.where(pos >= lay.block - 1, (pos - lay.block + 1) // lay.stride + 1, 0)
  return jnp.minimum(seen, lay.num_cmp)


def _tile_start(tile, lay: _Layout):
  """The row tile's first position."""
  start = tile * lay.positions
  return start + lay.first_position if lay.first_position else start


def _row_positions(tile, lay: _Layout):
  return _tile_start(tile, lay) + jnp.arange(lay.rows) // lay.heads  # [R]


def _scores(q, k, key_start, row_pos, lay: _Layout, scale, masked=True, starts=None):
  """`scale * log2(e) * q . k` of one key tile: `[R, keys]`, and its visibility mask.

  `masked=False` for tiles that every row sees whole (`_full_tile_count`): no mask is built or
  applied (the elementwise mask costs about as much as a matmul per tile), and None is returned.
  `starts [R]`: packed rows, each row's document start (its blocks' slots and offset).
  """
  s = _dot(q, k, trans_b=True) * (scale * LOG2E)
  if not masked:
    return s, None
  key = key_start + jnp.arange(k.shape[0])
  if starts is None:
    visible = key[None, :] * lay.stride + lay.block - 1 <= row_pos[:, None]
  else:
    first, shift = starts // lay.stride, starts % lay.stride
    visible = (key[None, :] >= first[:, None]) & (
        key[None, :] * lay.stride + lay.block - 1 + shift[:, None] <= row_pos[:, None])
  visible = visible & (key[None, :] < lay.num_cmp)
  return jnp.where(visible, s, MASK_VALUE), visible


def _tile_count(tile, lay: _Layout, keys=None):
  """Key tiles of `keys` (default KEYS) that the row tile's last position sees."""
  last = jnp.minimum(_tile_start(tile + 1, lay) - 1, lay.seq_len - 1)
  return pl.cdiv(_num_visible(last, lay), keys or KEYS)


def _full_tile_count(tile, lay: _Layout, keys=None):
  """Leading key tiles that every row of the row tile sees whole (its first position sees them:
  keys seen by a position are seen by all later ones). The rest of its walk is 1 or 2 tiles."""
  return _num_visible(_tile_start(tile, lay), lay) // (keys or KEYS)


def _lse_pass(q, k_ref, row_pos, num_full, num_tiles, lay, scale, starts=None, first=0):
  """Pass 1 over tiles of LSE_KEYS keys `[first, num_tiles)` (the first `num_full` unmasked):
  each row's base-2 log-sum-exp."""
  def body(kt, carry, masked):
    row_max, row_sum = carry
    keys = pl.ds(kt * LSE_KEYS, LSE_KEYS)
    s, visible = _scores(q, k_ref[keys, :], kt * LSE_KEYS, row_pos, lay, scale, masked, starts)
    new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
    p = jnp.exp2(s - new_max[:, None])
    if masked:  # masked entries count 0 even in a row that sees nothing yet (max MASK_VALUE)
      p = jnp.where(visible, p, 0.0)
    return new_max, row_sum * jnp.exp2(row_max - new_max) + jnp.sum(p, axis=1)

  init = (jnp.full((lay.rows,), MASK_VALUE, jnp.float32), jnp.zeros((lay.rows,), jnp.float32))
  row_max, row_sum = masked_split_loop(num_full, num_tiles, body, init, first)
  # Rows that see nothing get +inf, so exp2(s - lse) = 0 in pass 2 and the backward.
  return jnp.where(row_sum > 0, row_max + jnp.log2(jnp.where(row_sum > 0, row_sum, 1.0)), jnp.inf)


def _overlap(num_rows_keys, first_slc, num_cols, lay: _Layout, slc_block):
  """`[KEYS, num_cols]`: overlap / d of key `i` (tile-local) with selection block `first + j`."""
  return block_overlaps(num_rows_keys, first_slc, num_cols, lay.block // lay.stride,
                        slc_block // lay.stride).astype(jnp.float32)


def _score_maps(lay: _Layout, slc_block, slc_cols, slc_spill, keys):
  """`A [keys, C]` (overlap with the tile's own blocks), `A_next [keys, C]` (with the next's)."""
  owned = keys * lay.stride // slc_block
  cols = jnp.arange(slc_cols)[None, :]
  own_map = jnp.where(cols < owned, _overlap(keys, 0, slc_cols, lay, slc_block), 0.0)
  spill_map = jnp.where(cols < slc_spill, _overlap(keys, owned, slc_cols, lay, slc_block), 0.0)
  return own_map, spill_map


# Score maps of a few positions a tile (G >= 8) are sums of products over a [P, KEYS, C] tile on
# the CUDA cores: exact float32, with none of the operand-layout shuffles (through shared memory)
# that tensor-core dots need; measured 32 ms of the 54 ms kernel at T=64k, G=16 when they were
# dots. From 16 positions a tile (G <= 4) they are tensor-core dots with the float32 side split in
# three bfloat16 pieces (the 0/1 and overlap-count matrices are exact in bfloat16): the 3D tile
# grows with P (G=4, T=64k, H200: fused forward 47.7 ms as products, 38.9 ms as dots).
MIN_DOT_POSITIONS = 16


def _maps_by_dot(positions):
  return positions >= MIN_DOT_POSITIONS


# Where `l <= l' + d` (the paper's and fla-core's configs) the selection scores come from two sums
# per selection block of the tile's own keys, as in the decode kernels
# (`decode_partials.tail_weight`): block j scores `c V_j - U_j + U_{j-1}`, a reshape and two row
# sums instead of the overlap maps, for tiles of up to this many positions (0: never). H200, fused
# forward ms, maps vs block sums: G=16 (4 positions) at 64k 23.2 / 20.2, G=4 (16) 30.1 / 27.0;
# at 16k G=8 (8) 2.38 / 1.90, G=2 (32) 2.72 / 2.14, but G=1 (64 positions, maps as dots) 3.08 /
# 4.57.
BLOCK_SUM_MAX_POSITIONS = 32


def _scores_by_block_sums(lay: _Layout, slc_block) -> bool:
  return (lay.positions <= BLOCK_SUM_MAX_POSITIONS
          and block_sums_apply(lay.block // lay.stride, slc_block // lay.stride))


def _block_sum_parts(p_grp, lay: _Layout, slc_block):
  """`p_grp [P, keys]` -> `c V_j - U_j` and the tail sums `U_j` (None where `l = d`: no
  compressed block reaches into the next selection block) of the tile's own selection blocks,
  `[P, keys / m]`: block j scores `c V_j - U_j + U_{j-1}`."""
  per_cmp, per_slc = lay.block // lay.stride, slc_block // lay.stride
  by_block = p_grp.reshape(p_grp.shape[0], p_grp.shape[1] // per_slc, per_slc)
  sums = jnp.sum(by_block, axis=2)
  if per_cmp == 1:
    return sums, None
  tails = jnp.sum(by_block * tail_weight(jnp.arange(per_slc), per_cmp, per_slc)[None, None, :],
                  axis=2)
  return per_cmp * sums - tails, tails


def _block_sum_scores(p_grp, carry, lay: _Layout, slc_block):
  """`p_grp [P, keys]` -> the scores of the tile's own selection blocks `[P, keys / m]` and the
  next tile's carry: its last block's tail sum `U [P]`, which the next block's score adds."""
  own, tails = _block_sum_parts(p_grp, lay, slc_block)
  if tails is None:
    return own, carry
  previous, last = _shift_one_block(tails, carry)
  return own + previous, last


# The score pass stores each block's `c V_j - U_j` and, one column right in an array of its own,
# `U_j`, which the top-n kernel adds as it reads a row (the same float32 sum as shifting the tails
# by one block in the pass, bit for bit): a second `[B, Hkv, T, width]` array written and read
# (~1.1 GB at 64k, half of it causally live) for the shift's `[P, owned, owned]` product. H100,
# 64k, LM selection, NSA forward / forward+backward ms: shifted 34.2-34.3 / 94.6-95.0, apart
# 33.7-33.8 / 94.1-94.4, apart and `FOLDED_SCORES` 33.6 / 93.3-94.0 (BENCHMARKS.md changelog
# 2026-12-07; the shift as a product over the other axis, by halves or by tensor-core dots made
# the pass 21-39% slower, not faster).
TAILS_APART = True


def _shift_one_block(x, carry):
  """`x [P, owned]` moved one column right, `carry [P]` (the previous tile's last column) in
  column 0; and the new carry, `x`'s last column. No cross-column moves in the Triton lowering
  but splits and joins of a last axis of 2, so by a product with the shift-by-one matrix."""
  owned = x.shape[1]
  col = jnp.arange(owned)
  shift = (col[:, None] + 1 == col[None, :]).astype(jnp.float32)  # [from, to]
  previous = jnp.sum(x[:, :, None] * shift[None, :, :], axis=1)
  previous = previous + jnp.where(col[None, :] == 0, carry[:, None], 0.0)
  return previous, jnp.sum(jnp.where(col[None, :] == owned - 1, x, 0.0), axis=1)


def _group_sum(p, lay: _Layout):
  """`[R, keys]` -> `[P, keys]`: each position's probabilities summed over its group's heads.
  Rows of padded heads (G not a power of two) see q = 0, so they have p > 0 and are masked."""
  if lay.heads != lay.group:
    p = jnp.where((jnp.arange(lay.rows) % lay.heads < lay.group)[:, None], p, 0.0)
  return jnp.sum(p.reshape(lay.positions, lay.heads, p.shape[1]), axis=1)


def _map_blocks(p_grp, overlap):
  """`p_grp [P, keys] @ overlap [keys, C]` -> `[P, C]` to float32 precision."""
  if _maps_by_dot(p_grp.shape[0]):
    return sum(plgpu.dot(piece, overlap.astype(jnp.bfloat16)) for piece in split3(p_grp))
  return jnp.sum(p_grp[:, :, None] * overlap[None, :, :], axis=1)


def _store_scores(score_ref, values, tile, first_col, num_cols, lay: _Layout):
  """Stores `values [P, C]` at the tile's positions, columns `[first_col, first_col + num_cols)`."""
  width = values.shape[1]
  mask = jnp.broadcast_to((jnp.arange(width) < num_cols)[None, :], values.shape)
  rows = pl.ds(_tile_start(tile, lay), lay.positions)
  plgpu.store(score_ref.at[rows, pl.ds(first_col, width)], values, mask=mask)


class _ScoreWriter:
  """The selection-score side of a pass over the key tiles: `update` turns a tile's
  probabilities into its blocks' scores and stores them, `finish` stores the last tile's spill
  into the next block (the spill is the loop carry). With `tails_ref` (block sums only) a
  block's score is stored without the previous block's tail sum, which goes one column right
  into `tails_ref` instead (`TAILS_APART`): nothing is carried."""

  def __init__(self, score_ref, tile, lay: _Layout, slc_block, slc_cols, slc_spill, keys=None,
               tails_ref=None):
    self.score_ref, self.tile, self.lay, self.tails_ref = score_ref, tile, lay, tails_ref
    self.slc_block, self.slc_cols, self.slc_spill = slc_block, slc_cols, slc_spill
    self.owned = (keys or KEYS) * lay.stride // slc_block
    self.block_sums = _scores_by_block_sums(lay, slc_block)
    if not self.block_sums:
      self.own_map, self.spill_map = _score_maps(lay, slc_block, slc_cols, slc_spill,
                                                 keys or KEYS)

  def init(self):
    shape = (self.lay.positions,) if self.block_sums else (self.lay.positions, self.slc_cols)
    return jnp.zeros(shape, jnp.float32)

  def update(self, kt, p, spill):
    """Stores the scores of key tile `kt`'s own blocks from its probabilities `p [R, keys]`;
    returns the new spill."""
    p_grp = _group_sum(p, self.lay)
    store = lambda values: _store_scores(self.score_ref, values, self.tile, kt * self.owned,
                                         self.owned, self.lay)
    if self.tails_ref is not None:
      own, tails = _block_sum_parts(p_grp, self.lay, self.slc_block)
      store(own)
      _store_scores(self.tails_ref, tails, self.tile, kt * self.owned + 1, self.owned, self.lay)
      return spill
    if self.block_sums:
      tile_scores, spill = _block_sum_scores(p_grp, spill, self.lay, self.slc_block)
      store(tile_scores)
      return spill
    store(_map_blocks(p_grp, self.own_map) + spill)
    return _map_blocks(p_grp, self.spill_map)  # overlap with the next tile's first blocks

  def finish(self, num_tiles, spill):
    if self.tails_ref is not None:
      # Block 0 has no previous block; the spill block's own part is empty (its tail part came
      # from the last tile).
      zero = jnp.zeros((self.lay.positions, 1), jnp.float32)
      _store_scores(self.tails_ref, zero, self.tile, 0, 1, self.lay)
      _store_scores(self.score_ref, zero, self.tile, num_tiles * self.owned, 1, self.lay)
    elif self.block_sums:
      if self.slc_spill:  # the last tile's tail reaches the next block (none when l = d)
        _store_scores(self.score_ref, spill[:, None], self.tile, num_tiles * self.owned, 1,
                      self.lay)
    else:
      _store_scores(self.score_ref, spill, self.tile, num_tiles * self.owned, self.slc_spill,
                    self.lay)


def _sub_blocks_within(offset, per_cmp, lo, hi):
  """How many of the `per_cmp` sub-blocks `[offset, offset + per_cmp)` of a compressed key lie in
  `[lo, hi)` (sub-block units, broadcasting), float32."""
  return jnp.maximum(jnp.minimum(offset + per_cmp, hi) - jnp.maximum(offset, lo),
                     0).astype(jnp.float32)


class _PhaseSums:
  """One part of packed rows' scores (`_packed_scores_kernel`): per aligned selection block,
  the probability mass its sub-blocks `[lo, hi)` receive (`lo`, `hi` per position, `[P]`),
  weighted by overlap as in SPEC.md Eq. 9. With `l <= l' + d` a key reaches its own block and
  the next only, so it is two weighted sums over each block's keys (as `_block_sum_scores`):
  into its own window and into the next block's, carried across tiles."""

  def __init__(self, ref, tile, lay: _Layout, slc_block, lo, hi, keys):
    self.ref, self.tile, self.lay = ref, tile, lay
    per_cmp, self.per_slc = lay.block // lay.stride, slc_block // lay.stride
    self.owned = keys * lay.stride // slc_block
    offset = jnp.arange(self.per_slc)[None, :]
    lo, hi = lo[:, None], hi[:, None]
    self.own = _sub_blocks_within(offset, per_cmp, lo, hi)  # [P, m]
    self.next = _sub_blocks_within(offset, per_cmp, lo + self.per_slc, hi + self.per_slc)

  def update(self, kt, p_grp, carry):
    by_block = p_grp.reshape(p_grp.shape[0], self.owned, self.per_slc)
    own = jnp.sum(by_block * self.own[:, None, :], axis=2)
    previous, carry = _shift_one_block(jnp.sum(by_block * self.next[:, None, :], axis=2), carry)
    _store_scores(self.ref, own + previous, self.tile, kt * self.owned, self.owned, self.lay)
    return carry

  def finish(self, num_tiles, carry):  # the last tile's keys reaching the next block
    _store_scores(self.ref, carry[:, None], self.tile, num_tiles * self.owned, 1, self.lay)


def _packed_scores_kernel(q_ref, k_ref, lse_ref, starts_ref, _, __, suffix_ref, prefix_ref, *,
                          lay, scale, slc_block):
  """Packed rows' selection scores from a given log-sum-exp, in two parts.

  Document-local selection block `j` of a row whose document starts at `s` covers sub-blocks
  (stride-`d` units of the slots) `[j m + sigma, (j + 1) m + sigma)`, `sigma = s // d`,
  `m = l' / d`: with `sigma = a m + b`, the sub-blocks `[b, m)` of aligned block `j + a` and
  `[0, b)` of block `j + a + 1`. This kernel stores both parts per aligned block (`suffix` on
  `[b, m)`, `prefix` on `[0, b)`, each a sum of non-negative terms, so a block no visible key
  reaches scores exactly 0, as in the oracle); `packed_selection_from_lse` adds them up."""
  tile = pl.program_id(0)
  q, lse, starts = q_ref[...], lse_ref[...], starts_ref[...]
  row_pos = _row_positions(tile, lay)
  per_slc = slc_block // lay.stride
  first = _first_tile(starts_ref, lay, SCORE_KEYS)  # tiles before: no row's; their blocks 0
  # Every row of a position has its start; padded heads' rows may hold 0.
  phase = jnp.max(starts.reshape(lay.positions, lay.heads), axis=1) // lay.stride % per_slc
  zero = jnp.zeros_like(phase)
  parts = (_PhaseSums(suffix_ref, tile, lay, slc_block, phase, zero + per_slc, SCORE_KEYS),
           _PhaseSums(prefix_ref, tile, lay, slc_block, zero, phase, SCORE_KEYS))

  def body(kt, carries, masked):
    keys = pl.ds(kt * SCORE_KEYS, SCORE_KEYS)
    s, _ = _scores(q, k_ref[keys, :], kt * SCORE_KEYS, row_pos, lay, scale, masked, starts)
    p_grp = _group_sum(jnp.exp2(s - lse[:, None]), lay)
    return tuple(part.update(kt, p_grp, carry) for part, carry in zip(parts, carries))

  num_tiles = _tile_count(tile, lay, SCORE_KEYS)
  init = (jnp.zeros((lay.positions,), jnp.float32),) * 2
  carries = masked_split_loop(0, num_tiles, body, init, first)
  for part, carry in zip(parts, carries):
    part.finish(num_tiles, carry)


def _first_tile(starts_ref, lay: _Layout, keys=None):
  """Packed rows: the first key tile (of `keys`, default KEYS) that any row of the program sees.
  A document's rows see only its own slots (`>= s // d`), and the program's first row (a real
  position's first head) has the earliest start, starts never decreasing along positions; rows
  of later documents skip the earlier documents' slots, so a row tile walks its documents' keys
  only. 0 for unpacked rows."""
  if starts_ref is None:
    return 0
  return starts_ref[0] // lay.stride // (keys or KEYS)


def _num_full(tile, lay, keys=None, documents=False):
  """`_full_tile_count`, or 0 for packed rows (every tile masked)."""
  return 0 if documents else _full_tile_count(tile, lay, keys)


def _forward_kernel(q_ref, k_ref, v_ref, *refs, lay, scale, slc_block, slc_cols, slc_spill,
                    documents=False):
  """Pass 1 (lse), then pass 2 (output and, with `slc_block`, the selection scores)."""
  starts_ref = refs[0] if documents else None  # packed rows: each row's document start
  starts = starts_ref[...] if documents else None
  refs = refs[1:] if documents else refs
  if slc_block:
    _, o_ref, lse_ref, score_ref = refs  # refs[0]: the zeros aliased to score_ref
  else:
    o_ref, lse_ref = refs
  tile = pl.program_id(0)
  q = q_ref[...]
  row_pos = _row_positions(tile, lay)
  num_tiles = _tile_count(tile, lay)
  lse = _lse_pass(q, k_ref, row_pos, _num_full(tile, lay, LSE_KEYS, documents),
                  _tile_count(tile, lay, LSE_KEYS), lay, scale, starts,
                  _first_tile(starts_ref, lay, LSE_KEYS))
  writer = slc_block and _ScoreWriter(score_ref, tile, lay, slc_block, slc_cols, slc_spill)

  def body(kt, carry, masked):
    acc, spill = carry
    s, _ = _scores(q, k_ref[pl.ds(kt * KEYS, KEYS), :], kt * KEYS, row_pos, lay, scale, masked,
                   starts)
    # Masked scores are MASK_VALUE and empty rows have lse = +inf: p is 0 there without a mask.
    p = jnp.exp2(s - lse[:, None])
    v = v_ref[pl.ds(kt * KEYS, KEYS), :]
    acc = acc + _dot(p.astype(v.dtype), v)
    return acc, (writer.update(kt, p, spill) if slc_block else spill)

  init = (jnp.zeros((lay.rows, o_ref.shape[1]), jnp.float32),
          writer.init() if slc_block else jnp.zeros((1,), jnp.float32))
  acc, spill = masked_split_loop(_num_full(tile, lay, documents=documents), num_tiles, body,
                                 init, _first_tile(starts_ref, lay))
  o_ref[...] = acc.astype(o_ref.dtype)
  lse_ref[...] = lse
  if slc_block:
    writer.finish(num_tiles, spill)


def _scores_kernel(q_ref, k_ref, lse_ref, score_ref, tails_ref=None, *, lay, scale, slc_block,
                   slc_cols, slc_spill, exp2=lambda x, kt: jnp.exp2(x), writer=None):
  """The selection scores alone, from a given log-sum-exp (base 2, +inf where a row sees
  nothing): pass 2 of `_forward_kernel` without the values; with `tails_ref`, their tail sums
  apart (`_ScoreWriter`). (`exp2(x, key_tile)` and the `writer` class: the probe
  `experiments.probes.score_floor` swaps in others.)"""
  tile = pl.program_id(0)
  q, lse = q_ref[...], lse_ref[...]
  row_pos = _row_positions(tile, lay)
  num_tiles = _tile_count(tile, lay, SCORE_KEYS)
  writer = (writer or _ScoreWriter)(score_ref, tile, lay, slc_block, slc_cols, slc_spill,
                                    SCORE_KEYS, tails_ref=tails_ref)

  def body(kt, spill, masked):
    keys = pl.ds(kt * SCORE_KEYS, SCORE_KEYS)
    s, _ = _scores(q, k_ref[keys, :], kt * SCORE_KEYS, row_pos, lay, scale, masked)
    return writer.update(kt, exp2(s - lse[:, None], kt), spill)

  spill = masked_split_loop(_full_tile_count(tile, lay, SCORE_KEYS), num_tiles, body,
                            writer.init())
  writer.finish(num_tiles, spill)
  for ref in (score_ref, tails_ref):
    if ref is not None:
      _zero_unscored(ref, tile, num_tiles * writer.owned + slc_spill, lay, slc_block, slc_cols)
      if lay.first_position:
        pl.when(tile == 0)(lambda ref=ref: _zero_rows_before(ref, lay, slc_block))


def _zero_rows_before(score_ref, lay: _Layout, slc_block):
  """Zeros in the rows before row tile 0 (`first_position`: folded queries), at the columns
  the top-n kernel reads there (blocks `<= t // slc_block`): those positions see no key."""
  num_rows, num_cols = lay.first_position, (lay.first_position - 1) // slc_block + 1
  rows, cols = _pow2(num_rows), _pow2(num_cols)
  mask = (jnp.arange(rows) < num_rows)[:, None] & (jnp.arange(cols) < num_cols)[None, :]
  plgpu.store(score_ref.at[pl.ds(0, rows), pl.ds(0, cols)], jnp.zeros((rows, cols), jnp.float32),
              mask=mask)


def _zero_unscored(score_ref, tile, first_col, lay: _Layout, slc_block, width):
  """Zeros in columns `[first_col, own block of the tile's last query]`: the candidate blocks
  that no visible compressed key reaches (none in the paper's config), which the top-n kernel
  reads. The score buffer is not zero-filled (1.1 GB at T = 64k), so only these are defined."""
  last = jnp.minimum(_tile_start(tile + 1, lay), lay.seq_len) - 1
  end = last // slc_block + 1
  zeros = jnp.zeros((lay.positions, width), jnp.float32)

  def body(step, carry):
    col = first_col + step * width
    _store_scores(score_ref, zeros, tile, col, end - col, lay)
    return carry

  jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(end - first_col, 0), width), body, 0)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, lay, scale,
               documents=False):
  starts_ref, (dq_ref,) = (refs[0], refs[1:]) if documents else (None, refs)
  starts = starts_ref[...] if documents else None
  tile = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  row_pos = _row_positions(tile, lay)

  def body(kt, dq, masked):
    k = k_ref[pl.ds(kt * KEYS, KEYS), :]
    s, _ = _scores(q, k, kt * KEYS, row_pos, lay, scale, masked, starts)
    p = jnp.exp2(s - lse[:, None])  # 0 where masked (MASK_VALUE) or the row is empty (+inf)
    ds = p * (_dot(do, v_ref[pl.ds(kt * KEYS, KEYS), :], trans_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = masked_split_loop(_num_full(tile, lay, documents=documents), _tile_count(tile, lay), body,
                          jnp.zeros(q.shape, jnp.float32), _first_tile(starts_ref, lay))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, lay, scale, chunk,
                num_chunks, step_rows, documents=False):
  """One key tile's dK/dV over one chunk of row tiles (float32 partials, summed outside).

  Each step loads `step_rows` rows: a whole row tile, or a part of one for wide float32 heads.
  Packed rows: the rows' document starts (`starts_ref`) mask every step, and the walk ends at
  the row tile `row_stop_ref` names (`_packed_row_stops`: later documents do not see the tile).
  """
  if documents:
    starts_ref, row_stop_ref, dk_ref, dv_ref = refs
  else:
    (dk_ref, dv_ref), starts_ref = refs, None
  key_tile, first_row_tile = pl.program_id(0) // num_chunks, pl.program_id(0) % num_chunks * chunk
  k, v = k_ref[...], v_ref[...]
  key_start = key_tile * DKV_KEYS
  # The first position that sees this tile's first key, and its row tile.
  first_tile = jnp.minimum(key_start * lay.stride + lay.block - 1, lay.seq_pad) // lay.positions
  steps_per_tile = lay.rows // step_rows

  def body(step, carry, masked):
    dk, dv = carry
    rows = pl.ds(step * step_rows, step_rows)
    q, do = q_ref[rows, :], do_ref[rows, :]
    row_pos = (step * step_rows + jnp.arange(step_rows)) // lay.heads
    starts = None if starts_ref is None else starts_ref[rows]
    s, _ = _scores(q, k, key_start, row_pos, lay, scale, masked, starts)
    p = jnp.exp2(s - lse_ref[rows][:, None])  # [rows, DKV_KEYS], 0 where masked
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (_dot(do, v, trans_b=True) - delta_ref[rows][:, None])
    return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

  init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
  start = jnp.maximum(first_tile, first_row_tile) * steps_per_tile
  stop_tile = jnp.minimum(first_row_tile + chunk, lay.num_row_tiles)
  if documents:
    stop_tile = jnp.minimum(stop_tile, row_stop_ref[0])
  stop = stop_tile * steps_per_tile
  # Steps from the first whose first row sees the tile's last key walk unmasked; a tile with
  # padded keys (past Tc) is masked throughout.
  last_key = key_start + DKV_KEYS - 1
  all_seen = jnp.where(last_key < lay.num_cmp, last_key * lay.stride + lay.block - 1, lay.seq_pad)
  first_full = stop if documents else jnp.clip(pl.cdiv(all_seen * lay.heads, step_rows), start,
                                                stop)
  carry = jax.lax.fori_loop(start, first_full, lambda i, c: body(i, c, True), init)
  dk, dv = jax.lax.fori_loop(first_full, stop, lambda i, c: body(i, c, False), carry)
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def _dkv_step_rows(lay: _Layout, dtype) -> int:
  """Rows one dK/dV step loads: a row tile, or part of one where its q and dO rows would pass
  `DKV_STEP_BYTES` (`tile_math.rows_within`)."""
  row_bytes = (lay.head_dim_pad + lay.head_dim_v_pad) * jnp.dtype(dtype).itemsize
  return rows_within(lay.rows, row_bytes, DKV_STEP_BYTES)


def _dkv_chunks(lay: _Layout):
  """`(row tiles per chunk, chunks)` of the dK/dV kernel.

  A key tile is seen by every row tile after its first: the first key tiles by the whole sequence.
  One program per key tile would leave a few programs walking all T rows while the rest of the GPU
  idles (T=64k: 56 ms). Chunks of at most `chunk` row tiles, sized for about `DKV_PROGRAMS`
  non-empty programs, bound every program's walk.
  """
  pairs = lay.num_row_tiles * (lay.cmp_pad // DKV_KEYS) // 2 * lay.batch * lay.num_kv_heads
  chunk = min(lay.num_row_tiles, max(MIN_DKV_CHUNK, pl.cdiv(pairs, DKV_PROGRAMS)))
  return chunk, pl.cdiv(lay.num_row_tiles, chunk)


def _params(num_warps=None):
  return plgpu.CompilerParams(num_warps=num_warps or NUM_WARPS, num_stages=NUM_STAGES)


def _specs(lay: _Layout):
  rows = lambda d: pl.BlockSpec((None, None, lay.rows, d), lambda i, b, g: (b, g, i, 0))
  row_vector = pl.BlockSpec((None, None, lay.rows), lambda i, b, g: (b, g, i))
  keys = lambda d: pl.BlockSpec((None, None, lay.cmp_pad, d), lambda i, b, g: (b, g, 0, 0))
  return rows, row_vector, keys


def _slc_geometry(lay: _Layout, slc_block, keys=None):
  """Columns per score store and selection blocks the overlap spills into (0 without scores),
  for key tiles of `keys` (default KEYS)."""
  if not slc_block:
    return 0, 0
  per_slc = slc_block // lay.stride
  spill = -(-(lay.block // lay.stride - 1) // per_slc)
  cols = _pow2(max((keys or KEYS) * lay.stride // slc_block, spill))
  return (max(cols, 16) if _maps_by_dot(lay.positions) else cols), spill


def _score_layout(lay: _Layout, slc_block, slc_cols, keys=None):
  """The score matrix's shape and block spec (the whole matrix per (b, g)).

  Columns: what the stores reach (every key tile's owned blocks, then the last tile's spill,
  `slc_cols` wide; `_zero_unscored`'s stores from a column `< Ts`, as wide), and at least the
  power of two >= Ts that the top-n kernel reads a row as. (Rounding the whole width up to a
  power of two doubled it at T = 64k: 2 GB more zeros.)"""
  num_slc = -(-lay.seq_len // slc_block)
  keys = keys or KEYS
  width = max(_pow2(num_slc), num_slc + slc_cols,
              lay.cmp_pad // keys * (keys * lay.stride // slc_block) + slc_cols)
  shape = (lay.batch, lay.num_kv_heads, lay.seq_pad, width)
  return shape, pl.BlockSpec((None, None) + shape[2:], lambda i, b, g: (b, g, 0, 0))


def _score_buffer(lay: _Layout, slc_block, slc_cols, keys=None):
  """Zeros for the score stores to land in (unvisited blocks keep them), and their spec."""
  shape, whole = _score_layout(lay, slc_block, slc_cols, keys)
  return jnp.zeros(shape, jnp.float32), whole


def _forward(q, k, v, lay: _Layout, scale, slc_block, interpret, starts=None):
  rows, row_vector, keys = _specs(lay)
  slc_cols, slc_spill = _slc_geometry(lay, slc_block)
  kernel = functools.partial(_forward_kernel, lay=lay, scale=scale, slc_block=slc_block,
                             slc_cols=slc_cols, slc_spill=slc_spill,
                             documents=starts is not None)
  num_rows = lay.seq_pad * lay.heads
  in_specs = [rows(lay.head_dim_pad), keys(lay.head_dim_pad), keys(lay.head_dim_v_pad)]
  in_specs += [] if starts is None else [row_vector]
  out_specs = [rows(lay.head_dim_v_pad), row_vector]
  out_shape = [
      # float32: the backward's delta needs it (see `_compressed_bwd`).
      jax.ShapeDtypeStruct((lay.batch, lay.num_kv_heads, num_rows, lay.head_dim_v_pad),
                           jnp.float32),
      jax.ShapeDtypeStruct((lay.batch, lay.num_kv_heads, num_rows), jnp.float32)]
  args = [q, k, v] + ([] if starts is None else [starts])
  aliases = {}
  if slc_block:
    if starts is not None:
      raise ValueError("the fused forward scores unpacked rows only; packed rows' selection "
                       "comes from packed_selection_from_lse")
    zeros, whole = _score_buffer(lay, slc_block, slc_cols)
    in_specs.append(whole)
    out_specs.append(whole)
    out_shape.append(jax.ShapeDtypeStruct(zeros.shape, jnp.float32))
    args.append(zeros)
    aliases = {3: 2}
  return pl.pallas_call(
      kernel, grid=(lay.num_row_tiles, lay.batch, lay.num_kv_heads), in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape, input_output_aliases=aliases,
      compiler_params=_params(), interpret=interpret, name="nsa_compressed_fwd")(*args)


def _tails_apart(lay: _Layout, slc_block) -> bool:
  """Whether the score pass stores the tail sums apart (`TAILS_APART`, where there are any)."""
  return (TAILS_APART and _scores_by_block_sums(lay, slc_block)
          and lay.block // lay.stride > 1)


def _scores_only(q, k, lse2, lay: _Layout, scale, slc_block, interpret):
  """`_scores_kernel` over the rows layout, or over folded queries `[B, C, Hkv * R, Dp]` (chunk
  `c` of KV group `g`: rows `g*R ... (g+1)*R - 1`) where `lay.first_position`: `(scores,
  tails)`, `[B, Hkv, T_pad, width]` float32 each (`tails` None unless `_tails_apart`; else the
  scores are their sum), row `t` defined in the columns of blocks `<= t // slc_block` (the top-n
  kernel's candidates) only."""
  rows, row_vector, keys = _specs(lay)
  if lay.first_position:
    rows = lambda d: pl.BlockSpec((None, None, lay.rows, d), lambda i, b, g: (b, i, g, 0))
  slc_cols, slc_spill = _slc_geometry(lay, slc_block, SCORE_KEYS)
  shape, whole = _score_layout(lay, slc_block, slc_cols, SCORE_KEYS)
  kernel = functools.partial(_scores_kernel, lay=lay, scale=scale, slc_block=slc_block,
                             slc_cols=slc_cols, slc_spill=slc_spill)
  num_out = 2 if _tails_apart(lay, slc_block) else 1
  out = pl.pallas_call(
      kernel, grid=(lay.num_row_tiles, lay.batch, lay.num_kv_heads),
      in_specs=[rows(lay.head_dim_pad), keys(lay.head_dim_pad), row_vector],
      out_specs=[whole] * num_out, out_shape=[jax.ShapeDtypeStruct(shape, jnp.float32)] * num_out,
      compiler_params=_params(SCORE_NUM_WARPS), interpret=interpret,
      name="nsa_selection_scores")(q, k, lse2)
  return out[0], (out[1] if num_out == 2 else None)


def _packed_scores_only(q, k, lse2, starts, lay: _Layout, scale, slc_block, interpret):
  """`_packed_scores_kernel` over the rows layout: `(suffix, prefix)`, each
  `[B, Hkv, T_pad, width]` float32."""
  rows, row_vector, keys = _specs(lay)
  slc_cols, _ = _slc_geometry(lay, slc_block, SCORE_KEYS)
  zeros, whole = _score_buffer(lay, slc_block, slc_cols, SCORE_KEYS)
  kernel = functools.partial(_packed_scores_kernel, lay=lay, scale=scale, slc_block=slc_block)
  return pl.pallas_call(
      kernel, grid=(lay.num_row_tiles, lay.batch, lay.num_kv_heads),
      in_specs=[rows(lay.head_dim_pad), keys(lay.head_dim_pad), row_vector, row_vector, whole,
                whole],
      out_specs=[whole, whole], out_shape=[jax.ShapeDtypeStruct(zeros.shape, jnp.float32)] * 2,
      input_output_aliases={4: 0, 5: 1}, compiler_params=_params(SCORE_NUM_WARPS),
      interpret=interpret, name="nsa_packed_selection_scores")(q, k, lse2, starts, zeros, zeros)


def _packed_row_stops(starts, lay: _Layout):
  """Packed rows: `int32 [B, key tiles of DKV_KEYS]`, the row tiles that can see a key tile
  (those holding a position of `block_maps.positions_before_key_tiles`), which end its walk."""
  seen_by = positions_before_key_tiles(starts, lay.stride, DKV_KEYS, lay.cmp_pad // DKV_KEYS)
  return pl.cdiv(seen_by, lay.positions).astype(jnp.int32)


def _backward(q, k, v, do, lse, delta, lay: _Layout, scale, interpret, starts=None,
              row_stops=None):
  rows, row_vector, keys = _specs(lay)
  documents = starts is not None
  packed = [] if starts is None else [starts]  # packed rows: the rows' document starts
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, lay=lay, scale=scale, documents=documents),
      grid=(lay.num_row_tiles, lay.batch, lay.num_kv_heads),
      in_specs=[rows(lay.head_dim_pad), keys(lay.head_dim_pad), keys(lay.head_dim_v_pad),
                rows(lay.head_dim_v_pad), row_vector, row_vector] + [row_vector] * len(packed),
      out_specs=rows(lay.head_dim_pad), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(), interpret=interpret, name="nsa_compressed_dq",
  )(q, k, v, do, lse, delta, *packed)
  num_rows = lay.seq_pad * lay.heads
  chunk, num_chunks = _dkv_chunks(lay)
  whole_rows = lambda d: pl.BlockSpec((None, None, num_rows, d), lambda i, b, g: (b, g, 0, 0))
  whole_vector = pl.BlockSpec((None, None, num_rows), lambda i, b, g: (b, g, 0))
  key_tile = lambda d: pl.BlockSpec((None, None, DKV_KEYS, d),
                                    lambda i, b, g: (b, g, i // num_chunks, 0))
  partial = lambda d: pl.BlockSpec((None, None, None, DKV_KEYS, d),
                                   lambda i, b, g: (i % num_chunks, b, g, i // num_chunks, 0))
  partial_shape = lambda x: jax.ShapeDtypeStruct((num_chunks,) + x.shape, jnp.float32)
  row_stop = pl.BlockSpec((None, 1), lambda i, b, g: (b, i // num_chunks))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, lay=lay, scale=scale, chunk=chunk, num_chunks=num_chunks,
                        step_rows=_dkv_step_rows(lay, q.dtype), documents=documents),
      grid=(lay.cmp_pad // DKV_KEYS * num_chunks, lay.batch, lay.num_kv_heads),
      in_specs=[whole_rows(lay.head_dim_pad), key_tile(lay.head_dim_pad),
                key_tile(lay.head_dim_v_pad), whole_rows(lay.head_dim_v_pad), whole_vector,
                whole_vector] + [whole_vector, row_stop] * len(packed),
      out_specs=[partial(lay.head_dim_pad), partial(lay.head_dim_v_pad)],
      out_shape=[partial_shape(k), partial_shape(v)],
      compiler_params=plgpu.CompilerParams(num_warps=DKV_NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret, name="nsa_compressed_dkv",
  )(q, k, v, do, lse, delta, *packed, *([row_stops] if documents else []))
  dk, dv = jnp.sum(dk, axis=0).astype(k.dtype), jnp.sum(dv, axis=0).astype(v.dtype)
  return dq, dk, dv


def _natural_lse(lse2):
  """Base-2 lse with +inf for empty rows -> natural log with -inf (the public convention)."""
  return jnp.where(jnp.isinf(lse2), -jnp.inf, lse2 / LOG2E)


def _base2_lse(lse):
  """`_natural_lse`'s inverse: natural log with -inf -> base 2 with +inf (so p = 0 there)."""
  return jnp.where(jnp.isneginf(lse), jnp.inf, lse * LOG2E)


def _starts_rows(starts, lay: _Layout):
  """Packed rows' document starts `[B, T]` -> the row vector `[B, Hkv, T_pad * Gc]` (None
  stays None)."""
  if starts is None:
    return None
  per_head = jnp.broadcast_to(starts[:, :, None, None].astype(jnp.int32),
                              starts.shape + (lay.num_kv_heads * lay.group, 1))
  return _to_rows(per_head, lay, 1)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _compressed(q, k_cmp, v_cmp, starts, scale, block, stride, slc_block, interpret):
  return _compressed_fwd(q, k_cmp, v_cmp, starts, scale, block, stride, slc_block, interpret)[0]


def _compressed_fwd(q, k_cmp, v_cmp, starts, scale, block, stride, slc_block, interpret):
  lay = _layout(q, k_cmp, v_cmp, block, stride)
  outs = _forward(_to_rows(q, lay, lay.head_dim_pad), _to_keys(k_cmp, lay, lay.head_dim_pad),
                  _to_keys(v_cmp, lay, lay.head_dim_v_pad), lay, scale, slc_block, interpret,
                  _starts_rows(starts, lay))
  out_rows, lse2 = outs[0], outs[1]
  out = _from_rows(out_rows, lay, lay.head_dim_v)  # float32 [B, T, Hq, Dv]
  lse = _from_rows(_natural_lse(lse2)[..., None], lay, None)[..., 0]
  scores = outs[2] if slc_block else None  # [B, Hkv, rows >= T, width >= Ts], query t in row t
  return (out.astype(q.dtype), lse, scores), (q, k_cmp, v_cmp, starts, out, lse2)


def _compressed_bwd(scale, block, stride, slc_block, interpret, residuals, cotangents):
  q, k_cmp, v_cmp, starts, out, lse2 = residuals
  d_out, d_lse, _ = cotangents  # the scores feed the (non-differentiable) selection
  lay = _layout(q, k_cmp, v_cmp, block, stride)
  d_out = d_out.astype(q.dtype)
  do_rows = _to_rows(d_out, lay, lay.head_dim_v_pad)
  # delta = rowsum(dO * O) from the float32 output (as in the selected kernel's backward: from a
  # bfloat16-rounded output its error can exceed a small dq).
  # d lse / d s = p: folded into delta (ds = p * (dp - delta + d_lse)).
  delta = jnp.sum(out * d_out.astype(jnp.float32), axis=-1) - d_lse  # [B, T, Hq]
  delta = _to_rows(delta[..., None], lay, 1)[..., 0]
  dq, dk, dv = _backward(_to_rows(q, lay, lay.head_dim_pad),
                         _to_keys(k_cmp, lay, lay.head_dim_pad),
                         _to_keys(v_cmp, lay, lay.head_dim_v_pad), do_rows, lse2, delta, lay, scale,
                         interpret, _starts_rows(starts, lay),
                         None if starts is None else _packed_row_stops(starts, lay))
  dq = _from_rows(dq, lay, lay.head_dim)
  unkeys = lambda x, d: x.transpose(0, 2, 1, 3)[:, :lay.num_cmp, :, :d]
  return dq, unkeys(dk, lay.head_dim), unkeys(dv, lay.head_dim_v), None


_compressed.defvjp(_compressed_fwd, _compressed_bwd)


def compressed_attention(q, k_cmp, v_cmp, *, block: int, stride: int, scale: float,
                         interpret: bool = False, document_starts=None):
  """Attention over the compressed blocks inside each query's prefix.

  Args:
    q: `[B, T, Hq, Dk]`; k_cmp: `[B, Tc, Hkv, Dk]`; v_cmp: `[B, Tc, Hkv, Dv]`.
    block, stride: `l` and `d` of the compression. scale: softmax scale (a Python float).
    interpret: Pallas interpret mode (CPU).
    document_starts: int32 `[B, T]` or None: packed rows (SPEC.md), each position's document
      start; `k_cmp, v_cmp` then hold block `i` of the document starting at `s` in slot
      `s // d + i`.

  Returns:
    `(out [B, T, Hq, Dv] in q.dtype, lse [B, T, Hq] float32)`, `lse = -inf` where nothing is
    visible; differentiable in q, k_cmp, v_cmp (through both outputs).
  """
  out, lse, _ = _compressed(q, k_cmp, v_cmp, document_starts, float(scale), block, stride, 0,
                            interpret)
  return out, lse


def compressed_attention_with_scores(q, k_cmp, v_cmp, *, block: int, stride: int, slc_block: int,
                                     scale: float, interpret: bool = False):
  """`compressed_attention` plus the selection scores of SPEC.md section 2, steps 1-3.

  Needs `(KEYS * stride) % slc_block == 0` (each key tile owns whole selection blocks).

  Returns:
    `(out, lse, scores)`, `scores [B, Hkv, T, Ts]` float32 (no gradient flows through them).
  """
  _check_fusable(stride, slc_block)
  out, lse, scores = _compressed(q, k_cmp, v_cmp, None, float(scale), block, stride, slc_block,
                                 interpret)
  return out, lse, scores[:, :, :q.shape[1], :-(-q.shape[1] // slc_block)]


def compressed_attention_and_selection(q, k_cmp, v_cmp, *, block: int, stride: int,
                                       slc_block: int, num_selected: int, num_initial: int,
                                       num_local: int, scale: float, ascending: bool = True,
                                       interpret: bool = False):
  """The fused compressed branch: its output and the selected blocks of every query.

  Returns:
    `(out [B, T, Hq, Dv], lse [B, T, Hq], block_indices int32 [B, T, Hkv, n])` with the indices of
    SPEC.md section 2 (ascending, -1 padded; with `ascending=False` in the top-n kernel's pick
    order, for the selected-attention kernels); out and lse are differentiable.
  """
  _check_fusable(stride, slc_block)
  out, lse, scores = _compressed(q, k_cmp, v_cmp, None, float(scale), block, stride, slc_block,
                                 interpret)
  block_indices = top_n_blocks(jax.lax.stop_gradient(scores), seq_len=q.shape[1],
                               num_selected=num_selected, slc_block=slc_block,
                               num_initial=num_initial, num_local=num_local,
                               ascending=ascending, interpret=interpret)
  return out, lse, block_indices


def _lse_rows(lse, lay: _Layout):
  """Natural log-sum-exp `[B, T, Hq]` (-inf where nothing is visible) -> the kernels' base-2
  rows `[B, Hkv, T_pad * Gc]`, +inf there and in the padding (so p = 0)."""
  x = _base2_lse(lse).reshape(lay.batch, lay.seq_len, lay.num_kv_heads, lay.group)
  x = jnp.pad(x, [(0, 0), (0, lay.seq_pad - lay.seq_len), (0, 0), (0, lay.heads - lay.group)],
              constant_values=jnp.inf)
  return x.transpose(0, 2, 1, 3).reshape(lay.batch, lay.num_kv_heads, -1)


def _score_rows(q, num_kv_heads) -> int:
  """Rows a score-pass program takes: SCORE_ROWS, fewer where their q would pass SCORE_Q_BYTES
  (`tile_math.rows_within`) or they would hold more than BLOCK_SUM_MAX_POSITIONS positions (the
  scores would take the overlap maps); `_layout` raises it to one position's rows."""
  rows = rows_within(SCORE_ROWS, _pow2(q.shape[3], 16) * q.dtype.itemsize, SCORE_Q_BYTES)
  if BLOCK_SUM_MAX_POSITIONS:
    rows = min(rows, _pow2(q.shape[2] // num_kv_heads) * BLOCK_SUM_MAX_POSITIONS)
  return rows


def selection_scores_from_lse(q, k_cmp, lse, *, block: int, stride: int, slc_block: int,
                              scale: float, interpret: bool = False):
  """The selection scores (SPEC.md section 2, steps 1-3) from the compressed branch's
  log-sum-exp computed elsewhere (e.g. by cuDNN with the branch's output): one pass of
  `q . k_cmp` (`nsa_selection_scores`, pass 2 of the fused forward without the values).

  Args:
    q: `[B, T, Hq, Dk]`; k_cmp: `[B, Tc, Hkv, Dk]`.
    lse: float32 `[B, T, Hq]`, natural log of `sum exp(scale * q . k_cmp)` over the visible
      compressed blocks, -inf where none is visible (`compressed_attention`'s second output).

  Returns:
    float32 `[B, Hkv, rows >= T, width >= pow2(Ts)]`, query `t`'s scores in row `t` (what
    `top_n.top_n_blocks` reads), defined in the columns of blocks `j <= t // slc_block` only
    (later blocks are in the future: the top-n kernel never reads them); no gradient flows
    through them.
  """
  scores, tails = selection_score_parts(q, k_cmp, lse, block=block, stride=stride,
                                        slc_block=slc_block, scale=scale, interpret=interpret)
  return scores if tails is None else scores + tails


def selection_score_parts(q, k_cmp, lse, *, block: int, stride: int, slc_block: int,
                          scale: float, interpret: bool = False):
  """`selection_scores_from_lse` as the pass stores it: `(scores, tails)`, the scores their
  sum where `tails` is not None (`TAILS_APART`), which `top_n.top_n_blocks(tails=...)` adds as
  it reads a row."""
  _check_fusable(stride, slc_block)
  if lse.shape != q.shape[:3]:
    raise ValueError(f"lse must be [B, T, Hq] = {q.shape[:3]}, got {lse.shape}")
  q, k_cmp, lse = (jax.lax.stop_gradient(x) for x in (q, k_cmp, lse))
  if SCORES not in ("triton", "mosaic"):
    raise ValueError(f"compressed_attention.SCORES must be 'triton' or 'mosaic', got {SCORES!r}")
  if SCORES == "mosaic" and selection_scores_mgpu.supported(q, k_cmp, block, stride, slc_block):
    return _mosaic_scores(q, k_cmp, lse, block, stride, slc_block, float(scale), interpret), None
  lay = _layout(q, k_cmp, k_cmp, block, stride, rows=_score_rows(q, k_cmp.shape[2]))
  return _scores_only(_to_rows(q, lay, lay.head_dim_pad), _to_keys(k_cmp, lay, lay.head_dim_pad),
                      _lse_rows(lse, lay), lay, float(scale), slc_block, interpret)


def _mosaic_scores(q, k_cmp, lse, block, stride, slc_block, scale, interpret):
  """`selection_scores_from_lse` on Mosaic GPU: its block-major scores transposed to the
  top-n's rows `[B, Hkv, T_pad, width]`."""
  heads = _pow2(q.shape[2] // k_cmp.shape[2])
  lay = _layout(q, k_cmp, k_cmp, block, stride, rows=selection_scores_mgpu.rows_for(heads))
  num_slc = -(-lay.seq_len // slc_block)
  owned = selection_scores_mgpu.owned_blocks(stride, slc_block)
  num_score_rows = row_layout.round_up(  # a TMA store's GMEM rows: a multiple of 8
      max(_pow2(num_slc), num_slc + owned,
          lay.cmp_pad // selection_scores_mgpu.KEYS * owned + owned), 8)
  block_major = selection_scores_mgpu.selection_scores(
      _to_rows(q, lay, lay.head_dim_pad), _to_keys(k_cmp, lay, lay.head_dim_pad),
      _lse_rows(lse, lay), seq_len=lay.seq_len, num_cmp=lay.num_cmp, scale=scale, block=block,
      stride=stride, slc_block=slc_block, heads=lay.heads, num_score_rows=num_score_rows,
      interpret=plmgpu.InterpretGPUParams() if interpret else False)
  return block_major.transpose(0, 1, 3, 2)


def selection_from_lse(q, k_cmp, lse, *, block: int, stride: int, slc_block: int,
                       num_selected: int, num_initial: int, num_local: int, scale: float,
                       ascending: bool = True, interpret: bool = False):
  """`selection_scores_from_lse`, then the top-n kernel: `block_indices int32 [B, T, Hkv, n]`
  as `compressed_attention_and_selection` gives them (not differentiable)."""
  scores, tails = selection_score_parts(q, k_cmp, lse, block=block, stride=stride,
                                        slc_block=slc_block, scale=scale, interpret=interpret)
  return top_n_blocks(scores, seq_len=q.shape[1], num_selected=num_selected,
                      slc_block=slc_block, num_initial=num_initial, num_local=num_local,
                      ascending=ascending, interpret=interpret, tails=tails)


def folded_selection_applies(q, num_kv_heads: int, stride: int) -> bool:
  """Whether `selection_from_folded` takes `q [B, T, Hq, Dk]` (and is on, `FOLDED_SCORES`):
  the Triton score pass, G a power of two, Dk a power of two >= 16, and a chunk's `d * G` rows of
  a KV group exactly a program's rows (`SCORE_ROWS` where they fit: the paper's G = d = 16)."""
  group, head_dim = q.shape[2] // num_kv_heads, q.shape[3]
  return (FOLDED_SCORES and SCORES == "triton" and group == _pow2(group)
          and head_dim == _pow2(head_dim, 16) and stride * group == _score_rows(q, num_kv_heads))


def folded_score_parts(qf, k_cmp, lse, *, seq_len: int, block: int, stride: int, slc_block: int,
                       scale: float, interpret: bool = False):
  """`selection_score_parts` from the compressed branch's folded queries and log-sum-exp as
  cuDNN takes and gives them (`nsa_jax.cudnn_compressed`), read in place
  (`folded_selection_applies`).

  Args:
    qf: `[B, C, Hkv * d * G, Dk]`: chunk `c`'s head `(g, j, h)` is head `h` of KV group `g` at
      position `l - 1 + c*d + j` (zeros past `seq_len`).
    k_cmp: `[B, Tc, Hkv, Dk]`.
    lse: float32 `[B, Hkv * d * G, C]`, natural log of `sum exp(scale * q . k_cmp)` over the
      blocks each row sees (chunk `c` sees blocks `0..c`).
    seq_len: T.

  Returns:
    `(scores, tails)` as `selection_score_parts` gives them, rows `l - 1 + C*d >= T`.
  """
  _check_fusable(stride, slc_block)
  b, chunks, num_rows, head_dim = qf.shape
  hkv = k_cmp.shape[2]
  group = num_rows // (hkv * stride)
  if lse.shape != (b, num_rows, chunks):
    raise ValueError(f"lse must be [B, Hkv * d * G, C] = {(b, num_rows, chunks)}, "
                     f"got {lse.shape}")
  qf, k_cmp, lse = (jax.lax.stop_gradient(x) for x in (qf, k_cmp, lse))
  q_like = jax.ShapeDtypeStruct((b, seq_len, hkv * group, head_dim), qf.dtype)
  lay = dataclasses.replace(_layout(q_like, k_cmp, k_cmp, block, stride, rows=stride * group),
                            seq_pad=block - 1 + chunks * stride, first_position=block - 1)
  if lay.rows != stride * group or lay.head_dim_pad != head_dim:
    raise ValueError(f"the folded queries {qf.shape} do not make whole score rows of a chunk")
  lse2 = _base2_lse(lse).reshape(b, hkv, stride * group, chunks).transpose(0, 1, 3, 2)
  lse2 = lse2.reshape(b, hkv, -1)
  return _scores_only(qf, _to_keys(k_cmp, lay, head_dim), lse2, lay, float(scale), slc_block,
                      interpret)


def selection_from_folded(qf, k_cmp, lse, *, seq_len: int, block: int, stride: int,
                          slc_block: int, num_selected: int, num_initial: int, num_local: int,
                          scale: float, ascending: bool = True, interpret: bool = False):
  """`folded_score_parts`, then the top-n kernel: `block_indices int32 [B, T, Hkv, n]` as
  `selection_from_lse` gives them."""
  scores, tails = folded_score_parts(qf, k_cmp, lse, seq_len=seq_len, block=block,
                                     stride=stride, slc_block=slc_block, scale=scale,
                                     interpret=interpret)
  return top_n_blocks(scores, seq_len=seq_len, num_selected=num_selected, slc_block=slc_block,
                      num_initial=num_initial, num_local=num_local, ascending=ascending,
                      interpret=interpret, tails=tails)


def packed_selection_applies(block: int, stride: int, slc_block: int) -> bool:
  """Whether `packed_selection_from_lse` takes the config: `fusable`, and `l <= l' + d` (a
  compressed block reaches its own selection block and the next only)."""
  return fusable(stride, slc_block) and block_sums_apply(block // stride, slc_block // stride)


def packed_selection_from_lse(q, k_cmp, lse, document_starts, *, block: int, stride: int,
                              slc_block: int, num_selected: int, num_initial: int,
                              num_local: int, scale: float, ascending: bool = True,
                              interpret: bool = False):
  """`selection_from_lse` on packed rows (SPEC.md): each query's document-local block indices.

  Args:
    q: `[B, T, Hq, Dk]`; k_cmp: `[B, Tc, Hkv, Dk]` with block `i` of the document starting at
      `s` in slot `s // d + i`.
    lse: float32 `[B, T, Hq]`, the packed compressed branch's log-sum-exp
      (`compressed_attention(document_starts=...)`'s second output).
    document_starts: int32 `[B, T]`, each position's document start.

  Returns:
    int32 `[B, T, Hkv, n]`: document-local blocks `j <= (t - s) // l'`, ascending (or in pick
    order), -1 padded; not differentiable.
  """
  if not packed_selection_applies(block, stride, slc_block):
    raise ValueError(f"packed selection scores need slc_block ({slc_block}) to divide {KEYS} * "
                     f"cmp_stride ({KEYS * stride}) and cmp_block ({block}) <= slc_block + "
                     f"cmp_stride")
  if lse.shape != q.shape[:3]:
    raise ValueError(f"lse must be [B, T, Hq] = {q.shape[:3]}, got {lse.shape}")
  q, k_cmp, lse = (jax.lax.stop_gradient(x) for x in (q, k_cmp, lse))
  t = q.shape[1]
  lay = _layout(q, k_cmp, k_cmp, block, stride, rows=_score_rows(q, k_cmp.shape[2]))
  suffix, prefix = _packed_scores_only(
      _to_rows(q, lay, lay.head_dim_pad), _to_keys(k_cmp, lay, lay.head_dim_pad),
      _lse_rows(lse, lay), _starts_rows(document_starts, lay), lay, float(scale), slc_block,
      interpret)
  # Document block j = aligned block j + a (its sub-blocks from b on) + the next (up to b);
  # a = (s // d) // (l' / d) = s // l'. The top-n reads both in place.
  query_blocks = (jnp.arange(t) - document_starts) // slc_block
  return top_n_blocks(suffix, seq_len=t, num_selected=num_selected, slc_block=slc_block,
                      num_initial=num_initial, num_local=num_local, ascending=ascending,
                      interpret=interpret, query_blocks=query_blocks,
                      first_columns=document_starts // slc_block, tails=prefix)


def fusable(stride: int, slc_block: int) -> bool:
  """Whether a key tile of `KEYS` compressed blocks owns whole selection blocks."""
  return (KEYS * stride) % slc_block == 0


def _check_fusable(stride, slc_block):
  if not fusable(stride, slc_block):
    raise ValueError(f"the fused selection scores need slc_block ({slc_block}) to divide "
                     f"{KEYS} * cmp_stride ({KEYS * stride})")

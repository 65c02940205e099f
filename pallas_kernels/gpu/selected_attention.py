"""Selected-block attention on GPU (Pallas, Triton lowering): forward, dQ and dK/dV kernels.

Group-centric (the paper's kernel design): the `G` query heads of one KV group select the same
blocks, so one program loads the `G` rows of one query position as the matmul M dimension and loops
over that position's selected key/value blocks with an online softmax. The backward pass has a dQ
kernel that mirrors the forward and a dK/dV kernel driven by the inverse map block -> queries
(`pallas_kernels.block_maps.inverse_block_map`), whose per-item partial sums are added by a segment
sum: no atomics, no scan over all queries per block. Each of its steps gathers the rows of several
queries of the item (64 rows), so small groups still give the matmuls an M of 64.

Small groups (G < 16) pack positions (`PACK_ROWS`, default 16 rows): a forward / dQ program takes
several consecutive positions (4 positions x 4 heads = 16 rows) and loops over the union of their
blocks, each row masked to the blocks its own position chose.

On Hopper the forward and dQ run on Mosaic GPU by default (`FORWARD`, `DQ`: "auto", Mosaic on
Hopper only; "triton" or "mosaic" to force one; `selected_attention_mgpu`: 64-row tiles over
their union of blocks, TMA + wgmma) wherever those kernels take the call; its forward returns
the same output and lse, so any forward feeds any dQ and the dK/dV kernel below. The dK/dV
(`DKV`, the same per-item partials on either kernel) runs on Mosaic GPU too where G >= 8.

Packed rows (`document_starts`), chosen at run time: where every document starts on a multiple
of `l'`, its blocks are whole blocks of the row and the unpacked kernels run on them
(`WHOLE_BLOCK_DOCUMENTS`); else, where it fits (`PADDED_ROWS`), the row is spread into a
slightly longer one in which every document starts on a multiple of `l'` (`packed_rows`), the
unpacked kernels run there and the output is read back. Otherwise a document's selection block
`j` is the upper part (offsets `>= r`, `r = s % l'`) of aligned block `s // l' + j` and the
lower part of the next one (`block_maps.document_block_halves`): the Triton kernels walk
aligned blocks as unpacked (up to `2n` a position) and mask each row's keys by its position's
`r` and the code of the part(s) its position chose; the block maps and the dK/dV sums stay per
aligned block.

Layout inside (set up by `selected_attention`): queries as rows `[B, Hkv, T_pad * Gp, Dp]`
(position `t`'s heads are rows `t*Gp .. t*Gp + Gp - 1`; `Gp = pow2(G)`, at least 16 unless
positions are packed), keys / values `[B, Hkv, Ts * l' + pad, Dp]`. `Dp` and the loaded block
length `Lp` are powers of two >= 16 (Triton's dot) with zero padding; a block of `l'` tokens is
loaded as `Lp >= l'` rows and the extra rows are masked.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plmgpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import packed_rows
from pallas_kernels import row_layout
from pallas_kernels.block_maps import LOWER, UPPER, document_block_halves, inverse_block_map
from pallas_kernels.block_maps import distinct_ascending, sorted_causal_block_indices, span_blocks
from pallas_kernels.gpu import selected_attention_mgpu as selected_mgpu
from pallas_kernels.gpu.tile_math import LOG2E, MASK_VALUE
from pallas_kernels.gpu.tile_math import dot as _dot
from pallas_kernels.gpu.tile_math import online_softmax_init, online_softmax_step, rows_within
from pallas_kernels.row_layout import pow2

# Triton launch settings per kernel (swept with `experiments.probes.tune_gpu --variants`).
FWD_NUM_WARPS, FWD_NUM_STAGES = 4, 2
# dQ: H200, T=64k, G=16, selected fwd+bwd with 1 / 2 / 4 / 8 warps 48.0 / 47.3 / 48.9 / 55.2 ms.
DQ_NUM_WARPS, DQ_NUM_STAGES = 2, 2
# Most bytes of q and dO rows one dQ program holds: past it, one position's rows are split over
# several programs (float32 Dk = Dv = 256 at G = 64 asked for 272 KB of shared memory at 64 rows).
DQ_PROGRAM_BYTES = 64 * 1024
DKV_NUM_WARPS, DKV_NUM_STAGES = 4, 2
# Most queries one dK/dV work item handles. Fewer, longer items write fewer float32 partials
# for `_sum_parts` to add up (at G = 4, 64k, 256 made 5.4 GB of them). H100, 64k, NSA fwd+bwd
# ms, 256 -> 512 in one run: G = 4 193.18 -> 190.22, G = 8 138.34 -> 137.54, the LM's 64k
# selection (G = 16) 95.19 -> 93.35 (BENCHMARKS.md changelog 2026-12-07).
DKV_CHUNK = 512
DKV_ROWS = 64  # query rows per dK/dV step (several queries gathered when G is small)
DKV_STEP_BYTES = 64 * 1024  # most bytes of q and dO rows one step loads (shared-memory budget)
# Forward and dQ programs: 0 = one query position each (its G rows padded to 16). A power of two
# >= 16: max(1, PACK_ROWS // pow2(G)) consecutive positions a program, looping over the union of
# their blocks with each row masked to its own position's, so that small groups fill the rows and
# every K/V block load serves all the positions that chose it. G >= 16 is the same either way.
# H200, selected fwd / fwd+bwd ms, 0 vs 16: G=4 at 64k 65.6 / 190.0 vs 55.6 / 131.9; G=1 at 16k
# 63.3 / 178.8 vs 26.7 / 61.9; G=8 at 16k 8.4 / 23.8 vs 7.7 / 19.3. 32 was slower (G=4: 74.0 /
# 166.4; G=16: 24.6 / 60.2 vs 17.4 / 48.7).
PACK_ROWS = 16
# Forward and dQ kernels: "triton" (`_forward_kernel`, `_dq_kernel`), "mosaic"
# (`selected_attention_mgpu`: Hopper TMA + wgmma over tiles of 64 rows; half precision, l' of 64
# or 128, unpacked rows; other calls stay on Triton) or "auto": Mosaic on a Hopper GPU (compute
# capability 9.x), Triton elsewhere and in interpret mode. Mosaic is the faster on Hopper (H100,
# 2026-12-05, BENCHMARKS.md): forward at least as fast at every group size timed (64k: G = 4
# 57.7 vs 62.5 ms, G = 8 34.0 vs 35.0, G = 16 tied; 16k: 4.31 vs 4.65), 1.29x on a trained LM's
# selection; in NSA's fwd+bwd the Mosaic forward and dQ take 9-11% off Triton's (8k 8.43 vs
# 9.46 ms, 16k 18.70 vs 19.90, 64k on a trained selection 95.81 vs 105.41; H100, 2026-12-06,
# both with Triton's dK/dV); its kernel tests pass on the GPU (33 of 33), as do the
# end-to-end GPU tests under "auto" (drawn property cases in three dtypes, nsa_attention,
# decoding, T = 1 .. 129 in bfloat16; H100, 2026-12-05), so "auto" is the default.
KERNEL_CHOICES = ("auto", "triton", "mosaic")
FORWARD = "auto"
DQ = "auto"
# dK/dV, the same choices: "mosaic" is `selected_attention_mgpu.selected_attention_dkv` (keys on
# wgmma's M, a work item's query rows by TMA, a query's heads padded to >= 8 rows; unpacked
# rows); "auto" takes it on Hopper where no head is padded (G >= 8; a smaller group's padding
# multiplies its MMA work: at G = 4, 64k, NSA's fwd+bwd took 209.73 ms with it against 199.73
# with Triton's, H100, 2026-12-06). Its GPU tests pass (G = 1 .. 64, T = 1 .. 64k; drawn property
# cases and nsa_attention end to end), and in NSA's forward+backward it is faster than Triton's
# dK/dV (H100, 2026-12-06: 8k 8.06 vs 8.43 ms, 16k 17.97 vs 18.70, 64k on a trained LM's selection
# 94.51 vs 95.81, G = 8 141.79 vs 142.60), and off the Triton lowering that JAX 0.11 deprecates.
DKV = "auto"
# Packed rows whose documents all start on a multiple of l' (checked at run time:
# `packed_rows.route`) have whole blocks: the unpacked kernels run on them, Mosaic GPU on
# Hopper, instead of the Triton kernels with halves (False: halves always). On an H100
# (2026-12-07, bd6558c), a 64k row of 8 x 8k documents 36.54 / 92.60 -> 28.00 / 76.59 ms fwd /
# fwd+bwd with it and `top_n.PACKED_NARROW_WIDTHS` (BENCHMARKS "Packed rows"); the GPU tests
# (`pytest -m gpu tests/test_packing.py`, which set it) passed on an H100 at 3c1342e.
WHOLE_BLOCK_DOCUMENTS = True
# Packed rows whose documents do not all start on a multiple of l' (files as they come): with
# WHOLE_BLOCK_DOCUMENTS, the row is spread into one `packed_rows.EXTRA` longer in which every
# document starts on the next multiple of l' (`packed_rows.padded_row`), the unpacked kernels
# run there on whole blocks, and the output is read back at each position's place; rows whose
# documents need more padding than that take the halves (False: the halves always). On an H100
# (2026-12-07, d4faddb), a 64k row of 8 documents one token off the boundaries 41.02 / 112.32 ->
# 29.88 / 84.22 ms fwd / fwd+bwd (64 documents: 19.43 / 61.15; BENCHMARKS "Packed rows"); the GPU
# tests (`pytest -m gpu tests/test_packing.py`, which set it) passed on the same H100.
PADDED_ROWS = True


def _visible(block_start, query_pos, loaded, block):
  """`[Lp]`: rows of the loaded block that are in the block and not after the query."""
  offsets = jnp.arange(loaded)
  return (offsets < block) & (block_start + offsets <= query_pos)


def _log2_scores(q, k, visible, scale):
  """`scale * log2(e) * q . k`, masked by `visible [1 or R, Lp]`: `[R, Lp]` float32."""
  scores = _dot(q, k, trans_b=True) * (scale * LOG2E)
  return jnp.where(visible, scores, MASK_VALUE)


def _num_valid(idx_ref):
  """Slots in use: the sorted indices put them first."""
  return jnp.sum((idx_ref[...] >= 0).astype(jnp.int32))


def _program_rows(own_ref, positions, heads, split=1):
  """What a forward / dQ program needs to mask a block, read before its loop: one position a
  program (or `split` programs a position), `(position, None)` (every slot is its own); packed,
  the position of each row `[R]` and the block list of each row's position `[R, n_pad]` (a gather
  from the `[P, n_pad]` table)."""
  if own_ref is None:
    return pl.program_id(0) // split, None
  local = jnp.arange(positions * heads) // heads
  return pl.program_id(0) * positions + local, own_ref[local, :]


def _block_mask(block_id, rows, loaded, block, halves=None):
  """`[1 or R, Lp]`: the keys of block `block_id` each row sees (in the block, not after the
  row's position and, packed, only in rows whose position chose the block; in packed documents,
  only the chosen part, `halves = (code, r)` of `_slot_halves`)."""
  start = block_id * block
  row_pos, own = rows
  offsets = jnp.arange(loaded)
  if own is None:
    mask = _visible(start, row_pos, loaded, block)[None, :]
  else:
    chosen = jnp.max(jnp.where(own == block_id, 1, 0), axis=1) > 0  # [R]
    mask = (chosen[:, None] & (offsets < block)[None, :]
            & (start + offsets[None, :] <= row_pos[:, None]))
  if halves is not None:
    code, r = halves  # [1 or R, 1]
    mask = mask & jnp.where(offsets[None, :] < r, (code & LOWER) != 0, (code & UPPER) != 0)
  return mask


def _program_halves(refs, own, positions, heads):
  """Packed documents, read before the loop: `(codes, r)`, one position a program the refs
  themselves (`codes [n_pad]` of its slots, `r [1]`); packed positions each row's `[R, n_pad]`
  codes and `[R, 1]` r (gathers from the `[P, n_pad]` and `[P]` tables). None unpacked."""
  if refs is None:
    return None
  codes_ref, r_ref = refs
  if own is None:
    return codes_ref, r_ref
  local = jnp.arange(positions * heads) // heads
  return codes_ref[local, :], r_ref[local][:, None]


def _slot_halves(halves, slot, block_id, own):
  """`(code, r)` of this slot's block for `_block_mask`, or None unpacked."""
  if halves is None:
    return None
  codes, r = halves
  if own is None:
    return jnp.full((1, 1), codes[slot], jnp.int32), jnp.full((1, 1), r[0], jnp.int32)
  return jnp.sum(jnp.where(own == block_id, codes, 0), axis=1)[:, None], r


def _split_own(refs, positions, documents=False):
  """`(own_ref or None, halves refs or None, *the other refs)`: packed kernels get the
  per-position block table, kernels over packed documents the codes and offsets r."""
  own, refs = (refs[0], refs[1:]) if positions > 1 else (None, refs)
  halves, refs = ((refs[0], refs[1]), refs[2:]) if documents else (None, refs)
  return (own, halves, *refs)


def _forward_kernel(idx_ref, *refs, scale, block, loaded, positions, heads, documents):
  own_ref, halves_refs, q_ref, k_ref, v_ref, o_ref, lse_ref = _split_own(refs, positions,
                                                                         documents)
  q = q_ref[...]  # [R, Dkp]
  rows = _program_rows(own_ref, positions, heads)
  halves = _program_halves(halves_refs, rows[1], positions, heads)

  def body(slot, carry):
    block_id = idx_ref[slot]
    start = block_id * block
    k = k_ref[pl.ds(start, loaded), :]
    visible = _block_mask(block_id, rows, loaded, block,
                          _slot_halves(halves, slot, block_id, rows[1]))
    scores = _log2_scores(q, k, visible, scale)
    # Packed, a row may see nothing of a block (not its position's, or after it): zero it exactly.
    return online_softmax_step(carry, scores, lambda: v_ref[pl.ds(start, loaded), :],
                               None if own_ref is None else visible)

  init = online_softmax_init(q.shape[0], o_ref.shape[1])
  _store_output(o_ref, lse_ref, *jax.lax.fori_loop(0, _num_valid(idx_ref), body, init))


def _store_output(o_ref, lse_ref, acc, row_max, row_sum):
  """The forward's end: the normalized output and the base-2 lse (0 for rows that saw nothing)."""
  nonempty = row_sum > 0
  safe_sum = jnp.where(nonempty, row_sum, 1.0)
  o_ref[...] = (acc / safe_sum[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(nonempty, row_max + jnp.log2(safe_sum), 0.0)  # base 2


def _dq_kernel(idx_ref, *refs, scale, block, loaded, positions, heads, split, documents):
  (own_ref, halves_refs, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
   dq_ref) = _split_own(refs, positions, documents)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  rows = _program_rows(own_ref, positions, heads, split)
  halves = _program_halves(halves_refs, rows[1], positions, heads)

  def body(slot, dq):
    block_id = idx_ref[slot]
    start = block_id * block
    k = k_ref[pl.ds(start, loaded), :]
    visible = _block_mask(block_id, rows, loaded, block,
                          _slot_halves(halves, slot, block_id, rows[1]))
    probs = jnp.where(visible, jnp.exp2(_log2_scores(q, k, visible, scale) - lse[:, None]), 0.0)
    dp = _dot(do, v_ref[pl.ds(start, loaded), :], trans_b=True)  # [R, Lp]
    ds = probs * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(0, _num_valid(idx_ref), body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(items_ref, queries_ref, *refs, scale, block, loaded, rows, num_blocks, step_rows,
                documents):
  """One work item: `count` queries of one block, `(block, start, count)` in `items_ref`.

  The item's query rows (`rows` a query) are walked `step_rows` at a time (`DKV_ROWS`, fewer for
  wide float32 heads): the rows of several queries for small groups, so the dots have M, K >= 64,
  part of one query's for wide ones. Rows past the item's last query repeat it and are masked.
  Packed documents: each query's code of this block (`codes_ref`, beside `queries_ref`) and its r
  (`r_ref`, by position).
  """
  _, halves_refs, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = _split_own(
      refs, 1, documents)
  block_id = jnp.minimum(items_ref[0], num_blocks - 1)  # unused items: any block, no queries
  first, count = items_ref[1], items_ref[2]
  start = block_id * block
  k = k_ref[pl.ds(start, loaded), :]
  v = v_ref[pl.ds(start, loaded), :]
  offsets = jnp.arange(loaded)

  def body(step, carry):
    dk, dv = carry
    item_row = step * step_rows + jnp.arange(step_rows)
    slot, head = item_row // rows, item_row % rows
    entry = first + jnp.minimum(slot, count - 1)
    query_pos = queries_ref[entry]  # [M]
    gathered = query_pos * rows + head
    q, do = q_ref[gathered, :], do_ref[gathered, :]
    lse, delta = lse_ref[gathered], delta_ref[gathered]
    visible = ((slot < count)[:, None] & (offsets < block)[None, :]
               & (start + offsets[None, :] <= query_pos[:, None]))
    if halves_refs is not None:
      code, r = halves_refs[0][entry][:, None], halves_refs[1][query_pos][:, None]
      visible = visible & jnp.where(offsets[None, :] < r, (code & LOWER) != 0,
                                    (code & UPPER) != 0)
    scores = _dot(q, k, trans_b=True) * (scale * LOG2E)
    probs = jnp.where(visible, jnp.exp2(scores - lse[:, None]), 0.0)  # [M, Lp]
    dv = dv + _dot(probs.astype(do.dtype), do, trans_a=True)  # [Lp, Dvp]
    ds = probs * (_dot(do, v, trans_b=True) - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)  # [Lp, Dkp]
    return dk, dv

  init = (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32))
  dk, dv = jax.lax.fori_loop(0, pl.cdiv(count * rows, step_rows), body, init)
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Padded sizes of one call (all static)."""
  batch: int
  seq_len: int
  num_kv_heads: int
  group: int  # G = Hq // Hkv
  heads: int  # rows per position: pow2(G), and >= 16 unless positions are packed
  positions: int  # query positions per forward / dQ program (PACK_ROWS)
  seq_pad: int  # T padded to a multiple of `positions`
  head_dim: int
  head_dim_v: int
  head_dim_pad: int
  head_dim_v_pad: int
  block: int  # l'
  loaded: int  # Lp: rows loaded per block
  num_blocks: int  # Ts
  num_slots: int  # n padded to a power of two

  @property
  def rows(self) -> int:  # rows per forward / dQ program
    return self.positions * self.heads

  @property
  def num_tiles(self) -> int:  # forward / dQ programs per (batch, KV head)
    return self.seq_pad // self.positions

  @property
  def kv_len(self) -> int:  # every loaded block stays in bounds
    return self.num_blocks * self.block + self.loaded - self.block


def _layout(q, v, block_indices, block) -> _Layout:
  b, t, hq, dk = q.shape
  hkv = v.shape[2]
  if PACK_ROWS and (PACK_ROWS < 16 or pow2(PACK_ROWS) != PACK_ROWS):
    raise ValueError(f"PACK_ROWS must be 0 or a power of two >= 16, got {PACK_ROWS}")
  # Triton's dot wants power-of-two sides >= 16 (packed: positions x heads >= PACK_ROWS >= 16);
  # the slot list only a power of two.
  heads = pow2(hq // hkv) if PACK_ROWS else pow2(hq // hkv, 16)
  positions = max(1, PACK_ROWS // heads)
  return _Layout(batch=b, seq_len=t, num_kv_heads=hkv, group=hq // hkv, heads=heads,
                 positions=positions, seq_pad=-(-t // positions) * positions, head_dim=dk,
                 head_dim_v=v.shape[3], head_dim_pad=pow2(dk, 16),
                 head_dim_v_pad=pow2(v.shape[3], 16), block=block, loaded=pow2(block, 16),
                 num_blocks=-(-t // block), num_slots=pow2(block_indices.shape[-1]))


def _to_rows(x, lay: _Layout, dim_pad):
  """`[B, T, Hq, D]` -> `[B, Hkv, T_pad * heads, Dp]`."""
  rows = row_layout.to_rows(x, lay.num_kv_heads, lay.seq_pad, lay.heads, dim_pad)
  return rows.reshape(lay.batch, lay.num_kv_heads, lay.seq_pad * lay.heads, dim_pad)


def _from_rows(x, lay: _Layout, dim):
  """`[B, Hkv, T_pad * heads, Dp]` -> `[B, T, Hq, D]`."""
  x = x.reshape(lay.batch, lay.num_kv_heads, lay.seq_pad, lay.heads, -1)
  return row_layout.from_rows(x, lay.seq_len, lay.group, dim)


def _to_blocks(x, lay: _Layout, dim_pad):
  """`[B, T, Hkv, D]` -> `[B, Hkv, kv_len, Dp]`, zero padded."""
  x = jnp.pad(x, [(0, 0), (0, lay.kv_len - lay.seq_len), (0, 0), (0, dim_pad - x.shape[3])])
  return x.transpose(0, 2, 1, 3)


def _slots(sorted_idx, lay: _Layout, fill=-1):
  """`[B, T, Hkv, n]` -> `[B, Hkv, T_pad, n_pad]`, padded with `fill`."""
  pad = lay.num_slots - sorted_idx.shape[-1]
  idx = jnp.pad(sorted_idx, [(0, 0), (0, lay.seq_pad - lay.seq_len), (0, 0), (0, pad)],
                constant_values=fill)
  return idx.transpose(0, 2, 1, 3)


def _halves_slots(halves, lay: _Layout):
  """Packed documents' `(codes [B, T, Hkv, n], r [B, T])` -> `(codes [B, Hkv, T_pad, n_pad],
  r [B, T_pad])` (padding: code 0, r 0); None stays None."""
  if halves is None:
    return None
  codes, r = halves
  return _slots(codes, lay, fill=0), jnp.pad(r, [(0, 0), (0, lay.seq_pad - lay.seq_len)])


def _program_slots(slots, lay: _Layout):
  """Each forward / dQ program's block list: `[B, Hkv, tiles, P * n_pad]`, the distinct blocks
  its positions chose, ascending, -1 last (packed), else `slots` itself."""
  if lay.positions == 1:
    return slots
  b, hkv = slots.shape[:2]
  return distinct_ascending(
      slots.reshape(b, hkv, lay.num_tiles, lay.positions * lay.num_slots))


def _params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _per_program_specs(lay: _Layout, split=1, documents=False):
  """BlockSpecs of the grid `(tiles * split, B, Hkv)`: the program's block list (and, packed, the
  block table of its positions; for packed documents, their codes and r), its rows (`1 / split`
  of its tile's), whole K and V, its row vectors."""
  program_list = pl.BlockSpec((None, None, None, lay.positions * lay.num_slots),
                              lambda t, b, g: (b, g, t // split, 0))
  position_table = pl.BlockSpec((None, None, lay.positions, lay.num_slots),
                                lambda t, b, g: (b, g, t, 0))
  slot_specs = [program_list] + ([position_table] if lay.positions > 1 else [])
  if documents:
    slot_specs += [position_table if lay.positions > 1 else program_list,
                   pl.BlockSpec((None, lay.positions), lambda t, b, g: (b, t // split))]
  num_rows = lay.rows // split
  rows = lambda d: pl.BlockSpec((None, None, num_rows, d), lambda t, b, g: (b, g, t, 0))
  whole = lambda d: pl.BlockSpec((None, None, lay.kv_len, d), lambda t, b, g: (b, g, 0, 0))
  row_vector = pl.BlockSpec((None, None, num_rows), lambda t, b, g: (b, g, t))
  return slot_specs, rows, whole, row_vector


def _slot_args(slots, lay: _Layout, halves=None):
  args = [_program_slots(slots, lay)] + ([slots] if lay.positions > 1 else [])
  return args + ([] if halves is None else list(halves))


def _forward(q, k, v, slots, lay: _Layout, scale, interpret, halves=None):
  slot_specs, rows, whole, row_vector = _per_program_specs(lay, documents=halves is not None)
  kernel = functools.partial(_forward_kernel, scale=scale, block=lay.block, loaded=lay.loaded,
                             positions=lay.positions, heads=lay.heads,
                             documents=halves is not None)
  num_rows = lay.seq_pad * lay.heads
  return pl.pallas_call(
      kernel,
      grid=(lay.num_tiles, lay.batch, lay.num_kv_heads),
      in_specs=slot_specs + [rows(lay.head_dim_pad), whole(lay.head_dim_pad),
                             whole(lay.head_dim_v_pad)],
      out_specs=[rows(lay.head_dim_v_pad), row_vector],
      out_shape=[
          jax.ShapeDtypeStruct((lay.batch, lay.num_kv_heads, num_rows, lay.head_dim_v_pad),
                               jnp.float32),  # float32: the backward's delta needs it
          jax.ShapeDtypeStruct((lay.batch, lay.num_kv_heads, num_rows), jnp.float32),
      ],
      compiler_params=_params(FWD_NUM_WARPS, FWD_NUM_STAGES),
      interpret=interpret,
      name="nsa_selected_fwd",
  )(*_slot_args(slots, lay, halves), q, k, v)


def _dq_split(lay: _Layout, dtype) -> int:
  """dQ programs per forward tile: 1, or (one position a program) as many as keep each program's
  q and dO rows within `DQ_PROGRAM_BYTES` (`tile_math.rows_within`; e.g. 2 for float32
  Dk = Dv = 256 at G = 64). Packed tiles have at most PACK_ROWS rows and are not split."""
  if lay.positions > 1:
    return 1
  row_bytes = (lay.head_dim_pad + lay.head_dim_v_pad) * jnp.dtype(dtype).itemsize
  return lay.rows // rows_within(lay.rows, row_bytes, DQ_PROGRAM_BYTES)


def _dq(q, k, v, do, lse, delta, slots, lay: _Layout, scale, interpret, halves=None):
  split = _dq_split(lay, q.dtype)
  slot_specs, rows, whole, row_vector = _per_program_specs(lay, split, halves is not None)
  kernel = functools.partial(_dq_kernel, scale=scale, block=lay.block, loaded=lay.loaded,
                             positions=lay.positions, heads=lay.heads, split=split,
                             documents=halves is not None)
  return pl.pallas_call(
      kernel,
      grid=(lay.num_tiles * split, lay.batch, lay.num_kv_heads),
      in_specs=slot_specs + [rows(lay.head_dim_pad), whole(lay.head_dim_pad),
                             whole(lay.head_dim_v_pad), rows(lay.head_dim_v_pad), row_vector,
                             row_vector],
      out_specs=rows(lay.head_dim_pad),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(DQ_NUM_WARPS, DQ_NUM_STAGES),
      interpret=interpret,
      name="nsa_selected_dq",
  )(*_slot_args(slots, lay, halves), q, k, v, do, lse, delta)


def _dkv_step_rows(lay: _Layout, dtype) -> int:
  """Query rows one dK/dV step gathers: `DKV_ROWS`, fewer where their q and dO rows would pass
  `DKV_STEP_BYTES` (`tile_math.rows_within`): whole queries or, for G = 64, part of one."""
  row_bytes = (lay.head_dim_pad + lay.head_dim_v_pad) * jnp.dtype(dtype).itemsize
  return rows_within(DKV_ROWS, row_bytes, DKV_STEP_BYTES)


def _dkv(q, k, v, do, lse, delta, queries, items, lay: _Layout, scale, interpret, halves=None):
  """`halves`, packed documents: `(codes [B, Hkv, T*n]` of the `queries` entries, r
  `[B, T_pad])`."""
  num_items = items.shape[2]
  num_rows = lay.seq_pad * lay.heads
  whole_rows = lambda d: pl.BlockSpec((None, None, num_rows, d), lambda e, b, g: (b, g, 0, 0))
  whole_kv = lambda d: pl.BlockSpec((None, None, lay.kv_len, d), lambda e, b, g: (b, g, 0, 0))
  row_vector = pl.BlockSpec((None, None, num_rows), lambda e, b, g: (b, g, 0))
  part = lambda d: pl.BlockSpec((None, None, None, lay.loaded, d),
                                lambda e, b, g: (b, g, e, 0, 0))
  kernel = functools.partial(_dkv_kernel, scale=scale, block=lay.block, loaded=lay.loaded,
                             rows=lay.heads, num_blocks=lay.num_blocks,
                             step_rows=_dkv_step_rows(lay, q.dtype), documents=halves is not None)
  query_list = pl.BlockSpec((None, None, queries.shape[-1]), lambda e, b, g: (b, g, 0))
  halves_specs = [] if halves is None else [
      query_list, pl.BlockSpec((None, lay.seq_pad), lambda e, b, g: (b, 0))]
  parts_shape = lambda d: jax.ShapeDtypeStruct(
      (lay.batch, lay.num_kv_heads, num_items, lay.loaded, d), jnp.float32)
  return pl.pallas_call(
      kernel,
      grid=(num_items, lay.batch, lay.num_kv_heads),
      in_specs=[pl.BlockSpec((None, None, None, 4), lambda e, b, g: (b, g, e, 0)),
                query_list, *halves_specs, whole_rows(lay.head_dim_pad), whole_kv(lay.head_dim_pad),
                whole_kv(lay.head_dim_v_pad), whole_rows(lay.head_dim_v_pad), row_vector,
                row_vector],
      out_specs=[part(lay.head_dim_pad), part(lay.head_dim_v_pad)],
      out_shape=[parts_shape(lay.head_dim_pad), parts_shape(lay.head_dim_v_pad)],
      compiler_params=_params(DKV_NUM_WARPS, DKV_NUM_STAGES),
      interpret=interpret,
      name="nsa_selected_dkv",
  )(items, queries, *(() if halves is None else halves), q, k, v, do, lse, delta)


def _sum_parts(parts, items, lay: _Layout, dim):
  """Work-item partials `[B, Hkv, I, Lp, Dp]` -> per-token gradient `[B, T, Hkv, D]`."""
  segment_sum = lambda p, ids: jax.ops.segment_sum(p, ids, num_segments=lay.num_blocks + 1)
  per_block = jax.vmap(jax.vmap(segment_sum))(parts, items[..., 0])[:, :, :lay.num_blocks]
  per_token = per_block[:, :, :, :lay.block, :dim].reshape(
      lay.batch, lay.num_kv_heads, lay.num_blocks * lay.block, dim)
  return per_token[:, :, :lay.seq_len].transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _selected_attention(q, k, v, sorted_idx, halves, scale, block, interpret, kernels):
  return _selected_attention_fwd(q, k, v, sorted_idx, halves, scale, block, interpret,
                                 kernels)[0]


def _mosaic_layout(lay: _Layout, num_selected: int, heads: int | None = None) -> _Layout:
  """The Mosaic GPU kernels' layout: 64-row tiles of `ROWS // heads` positions, heads padded to
  `heads` (default `rows_per_position(G)`), no head-dim padding."""
  heads = heads or selected_mgpu.rows_per_position(lay.group)
  positions = selected_mgpu.ROWS // heads
  return dataclasses.replace(
      lay, heads=heads, positions=positions, seq_pad=row_layout.round_up(lay.seq_len, positions),
      head_dim_pad=lay.head_dim, head_dim_v_pad=lay.head_dim_v, loaded=lay.block,
      num_slots=num_selected)


def _mosaic_tiles(lay: _Layout, sorted_idx):
  """`_mosaic_layout` and its tiles' `tile_unions`."""
  tiles = _mosaic_layout(lay, sorted_idx.shape[-1])
  return tiles, selected_mgpu.tile_unions(_slots(sorted_idx, tiles), tiles.positions)


def _mosaic_args(lay: _Layout, interpret):
  return dict(block=lay.block, heads=lay.heads,
              natural=selected_mgpu.natural_layout(lay.group, lay.heads),
              interpret=plmgpu.InterpretGPUParams() if interpret else False)


def _mosaic_rows(x, lay: _Layout):
  """q or dO as the Mosaic kernels of `lay` read it: as it is where they read the natural
  layout (`selected_mgpu.natural_layout`), else in `lay`'s rows."""
  if selected_mgpu.natural_layout(lay.group, lay.heads):
    return x
  return _to_rows(x, lay, x.shape[3])


def _mosaic_forward(q, k, v, sorted_idx, lay: _Layout, scale, interpret):
  """The forward on Mosaic GPU: `(out float32 rows, lse)`, the output in the Mosaic layout
  (`_mosaic_layout(lay, n)`), lse in this module's rows (`lay`), as the Triton forward leaves it
  for the backward."""
  tiles, unions = _mosaic_tiles(lay, sorted_idx)
  out_rows, lse_rows = selected_mgpu.selected_attention_forward(
      _mosaic_rows(q, tiles), _to_blocks(k, tiles, lay.head_dim),
      _to_blocks(v, tiles, lay.head_dim_v), *unions, scale=scale, **_mosaic_args(tiles, interpret))
  lse = _from_rows(lse_rows[..., None], tiles, 1)  # [B, T, Hq, 1]
  return out_rows, _to_rows(lse, lay, 1)[..., 0]


def _mosaic_dq(q, k, v, d_out, lse_rows, delta, sorted_idx, lay: _Layout, scale, interpret):
  """dQ on Mosaic GPU, `[B, T, Hq, Dk]`: `lse_rows` in `lay`'s rows, `delta [B, T, Hq]`."""
  tiles, unions = _mosaic_tiles(lay, sorted_idx)
  per_tile_row = lambda x: _to_rows(x[..., None], tiles, 1)[..., 0]
  dq_rows = selected_mgpu.selected_attention_dq(
      _mosaic_rows(q, tiles), _to_blocks(k, tiles, lay.head_dim),
      _to_blocks(v, tiles, lay.head_dim_v), _mosaic_rows(d_out, tiles),
      per_tile_row(_from_rows(lse_rows[..., None], lay, 1)[..., 0]), per_tile_row(delta),
      *unions, scale=scale, **_mosaic_args(tiles, interpret))
  return _from_rows(dq_rows, tiles, lay.head_dim)


def _mosaic_dkv(q, k, v, d_out, lse_rows, delta, queries, items, lay: _Layout, scale,
                interpret):
  """dK / dV partials on Mosaic GPU, as `_dkv` gives them (`[B, Hkv, I, l', D]` float32):
  `lse_rows` in `lay`'s rows, `delta [B, T, Hq]`, `queries` / `items` of `inverse_block_map`.
  A query's heads are padded to `selected_mgpu.dkv_heads(G)` rows."""
  tiles = _mosaic_layout(lay, 0, selected_mgpu.dkv_heads(lay.group))
  b, hkv, num_entries = queries.shape

  def per_entry(x):  # [B, T, Hq] -> each `queries` entry's rows, padded by a step of entries
    rows = _to_rows(x[..., None], tiles, 1)[..., 0].reshape(b, hkv, tiles.seq_pad, tiles.heads)
    picked = jnp.take_along_axis(rows, queries[..., None], axis=2)
    picked = jnp.pad(picked, [(0, 0), (0, 0), (0, tiles.positions), (0, 0)])
    return picked.reshape(b, hkv, (num_entries + tiles.positions) * tiles.heads)

  return selected_mgpu.selected_attention_dkv(
      _mosaic_rows(q, tiles), _to_blocks(k, tiles, lay.head_dim),
      _to_blocks(v, tiles, lay.head_dim_v), _mosaic_rows(d_out, tiles),
      per_entry(_from_rows(lse_rows[..., None], lay, 1)[..., 0]), per_entry(delta), queries,
      items, scale=scale, **_mosaic_args(tiles, interpret))


@functools.cache
def _hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x)."""
  device = jax.devices()[0]
  capability = str(getattr(device, "compute_capability", ""))
  return device.platform == "gpu" and capability.startswith("9")


def _on_mosaic(choice, q, k, v, halves, block, interpret) -> bool:
  """Whether a kernel set to `choice` (`KERNEL_CHOICES`) runs on Mosaic GPU for this call (else
  on Triton)."""
  if choice not in KERNEL_CHOICES:
    raise ValueError(f"selected_attention.FORWARD / DQ / DKV must be one of {KERNEL_CHOICES}, got "
                     f"{choice!r}")
  if choice == "auto":
    choice = "triton" if interpret or not _hopper() else "mosaic"
  return choice == "mosaic" and halves is None and selected_mgpu.supported(q, k, v, block)


def _dkv_on_mosaic(q, k, v, halves, block, interpret) -> bool:
  """Whether the dK/dV runs on Mosaic GPU (`DKV`; unpacked rows only, as `_on_mosaic`; "auto"
  only where the Mosaic dK/dV pads no head: `dkv_heads(G) == rows_per_position(G)`)."""
  if not (_on_mosaic(DKV, q, k, v, halves, block, interpret)
          and selected_mgpu.dkv_supported(q, k, v, block)):
    return False
  group = q.shape[2] // k.shape[2]
  return DKV == "mosaic" or (selected_mgpu.dkv_heads(group)
                             == selected_mgpu.rows_per_position(group))


class _Kernels(NamedTuple):
  """Which of a call's kernels run on Mosaic GPU (else Triton). Chosen once, when the call is
  traced: its backward is traced later (when JAX transposes), after a caller that set `DQ` or
  `DKV` around the call may have set them back."""
  forward: bool
  dq: bool
  dkv: bool


def _kernels(q, k, v, halves, block, interpret) -> _Kernels:
  return _Kernels(forward=_on_mosaic(FORWARD, q, k, v, halves, block, interpret),
                  dq=_on_mosaic(DQ, q, k, v, halves, block, interpret),
                  dkv=_dkv_on_mosaic(q, k, v, halves, block, interpret))


def _selected_attention_fwd(q, k, v, sorted_idx, halves, scale, block, interpret, kernels):
  lay = _layout(q, v, sorted_idx, block)
  if kernels.forward:
    out_rows, lse = _mosaic_forward(q, k, v, sorted_idx, lay, scale, interpret)
  else:
    out_rows, lse = _forward(_to_rows(q, lay, lay.head_dim_pad),
                             _to_blocks(k, lay, lay.head_dim_pad),
                             _to_blocks(v, lay, lay.head_dim_v_pad), _slots(sorted_idx, lay),
                             lay, scale, interpret, _halves_slots(halves, lay))
  out = _from_rows(out_rows, _forward_layout(lay, sorted_idx, kernels), lay.head_dim_v)
  # The kernel's float32 rows are the residual, not `out` [B, T, Hq, Dv]: that would be a second
  # float32 copy, written here and read once by the backward's delta.
  return out.astype(q.dtype), (q, k, v, sorted_idx, halves, out_rows, lse)


def _forward_layout(lay: _Layout, sorted_idx, kernels: _Kernels) -> _Layout:
  """The layout of the forward's output rows."""
  return _mosaic_layout(lay, sorted_idx.shape[-1]) if kernels.forward else lay


def _triton_operands(q, k, v, d_out, delta_per_head, lay: _Layout):
  """The Triton dQ's and dK/dV's operands in `lay`'s rows and blocks: `(q, K, V, dO, delta)`."""
  return (_to_rows(q, lay, lay.head_dim_pad), _to_blocks(k, lay, lay.head_dim_pad),
          _to_blocks(v, lay, lay.head_dim_v_pad), _to_rows(d_out, lay, lay.head_dim_v_pad),
          _to_rows(delta_per_head[..., None], lay, 1)[..., 0])


def _selected_attention_bwd(scale, block, interpret, kernels, residuals, d_out):
  q, k, v, sorted_idx, halves, out_rows, lse = residuals
  lay = _layout(q, v, sorted_idx, block)
  d_out = d_out.astype(q.dtype)
  # delta = rowsum(dO * O) from the float32 output: from the output rounded to bfloat16 its error,
  # ~2^-9 |dO| |O|, enters every dS = P (dP - delta) and can exceed a small dq (2026-12-04: bf16,
  # T = 2, G = 4: dq 1.8e-2 relative error against the float64 oracle, 2.4e-3 from float32).
  out = _from_rows(out_rows, _forward_layout(lay, sorted_idx, kernels), lay.head_dim_v)
  delta_per_head = jnp.sum(out * d_out.astype(jnp.float32), axis=-1)  # [B, T, Hq]
  # Only a Triton kernel takes these (built eagerly, an un-jitted gradient would pay for them).
  triton = (None if kernels.dq and kernels.dkv
            else _triton_operands(q, k, v, d_out, delta_per_head, lay))
  slots = _slots(sorted_idx, lay)
  halves = _halves_slots(halves, lay)
  if kernels.dq:
    dq = _mosaic_dq(q, k, v, d_out, lse, delta_per_head, sorted_idx, lay, scale, interpret)
  else:
    q_rows, k_blocks, v_blocks, do_rows, delta = triton
    dq = _from_rows(_dq(q_rows, k_blocks, v_blocks, do_rows, lse, delta, slots, lay, scale,
                        interpret, halves), lay, lay.head_dim)
  per_position = lambda x: x[:, :, :lay.seq_len].transpose(0, 2, 1, 3)  # [B, T, Hkv, n_pad]
  if halves is None:
    queries, items = inverse_block_map(per_position(slots), lay.num_blocks, DKV_CHUNK)
    dkv_halves = None
  else:
    queries, items, codes = inverse_block_map(per_position(slots), lay.num_blocks, DKV_CHUNK,
                                              payload=per_position(halves[0]))
    dkv_halves = (codes, halves[1])
  if kernels.dkv:
    dk_parts, dv_parts = _mosaic_dkv(q, k, v, d_out, lse, delta_per_head, queries, items, lay,
                                     scale, interpret)
  else:
    q_rows, k_blocks, v_blocks, do_rows, delta = triton
    dk_parts, dv_parts = _dkv(q_rows, k_blocks, v_blocks, do_rows, lse, delta, queries, items,
                              lay, scale, interpret, dkv_halves)
  dk = _sum_parts(dk_parts, items, lay, lay.head_dim).astype(k.dtype)
  dv = _sum_parts(dv_parts, items, lay, lay.head_dim_v).astype(v.dtype)
  return dq, dk, dv, None, None


_selected_attention.defvjp(_selected_attention_fwd, _selected_attention_bwd)


def selected_attention(q, k, v, block_indices, *, block: int, scale: float,
                       interpret: bool = False, indices_sorted: bool = False,
                       document_starts=None):
  """Attention of each query over the tokens `s <= t` of its KV group's selected blocks.

  Args:
    q: `[B, T, Hq, Dk]`, float32 / bfloat16 / float16.
    k: `[B, T, Hkv, Dk]`.
    v: `[B, T, Hkv, Dv]`.
    block_indices: int `[B, T, Hkv, n]`; -1, out-of-range, future and repeated blocks are ignored.
    block: tokens per selection block `l'`.
    scale: softmax scale (a Python float).
    indices_sorted: the indices are already distinct and causal (no block past the query's own)
      with the unused places (-1) last, in any order otherwise (e.g. a top-n selection's output,
      or `sorted_causal_block_indices`'): skip cleaning them up.
    interpret: run the kernels in Pallas interpret mode (CPU).
    document_starts: int32 `[B, T]` or None: packed rows (SPEC.md), each position's document
      start; `block_indices` are then document-local (block `j` of a document starting at `s`
      holds tokens `[s + j*l', s + (j+1)*l')`). Chosen at run time: where every document
      starts on a multiple of `l'` (`WHOLE_BLOCK_DOCUMENTS`), those are whole blocks of the row
      and the unpacked kernels run on them (Mosaic GPU on Hopper); else on a row padded so
      that they are (`PADDED_ROWS`, where `packed_rows.EXTRA` of T holds the padding); else the
      kernels walk aligned blocks with halves (Triton) and `indices_sorted` is ignored.

  Returns:
    `[B, T, Hq, Dv]` in q.dtype; differentiable in q, k and v.
  """
  if document_starts is not None:
    unpacked = lambda q, k, v, blocks: _unpacked_call(q, k, v, blocks, block, scale, interpret,
                                                      indices_sorted)
    return packed_rows.selection(
        unpacked,
        lambda: _halves_attention(q, k, v, *document_block_halves(block_indices, document_starts,
                                                                  block), block, scale, interpret),
        q, k, v, block_indices, document_starts, block, whole_blocks=WHOLE_BLOCK_DOCUMENTS,
        padded_rows=PADDED_ROWS)
  return _unpacked_call(q, k, v, block_indices, block, scale, interpret, indices_sorted)


def _halves_attention(q, k, v, aligned, codes, offsets, block, scale, interpret):
  """Packed rows whose blocks straddle aligned ones: the kernels over aligned blocks with halves
  (`document_block_halves`, `span_blocks`; Triton only)."""
  return _selected_attention(q, k, v, aligned, (codes, offsets), float(scale), block, interpret,
                             _kernels(q, k, v, (codes, offsets), block, interpret))


def _unpacked_call(q, k, v, block_indices, block, scale, interpret, indices_sorted):
  if not indices_sorted:
    block_indices = sorted_causal_block_indices(block_indices, block)
  return _selected_attention(q, k, v, block_indices, None, float(scale), block, interpret,
                             _kernels(q, k, v, None, block, interpret))


def span_attention(q, k, v, first, *, width: int, block: int, scale: float,
                   interpret: bool = False):
  """Attention of each query `t` over its keys `first[t] .. t` (`first int32 [B, T]`, past `t`:
  none; `width >= (t - first[t]) // block + 2` aligned blocks a position): the selected-attention
  kernels over the span's aligned blocks (`block_maps.span_blocks`), forward and backward.
  Packed rows' window, which cuDNN's public entry point cannot mask per document. Chosen at run
  time as in `selected_attention`: where every span starts on a block boundary (or is empty)
  the unpacked kernels on its whole blocks; else, where every non-empty span starts at a
  position that starts its own span (a document's first token), on the padded row; else the
  kernels with halves (Triton).
  Returns `[B, T, Hq, Dv]` in q.dtype."""
  first = first.astype(jnp.int32)
  aligned, codes, offsets = span_blocks(first, k.shape[2], width, block)
  unpacked = lambda q, k, v, blocks: _unpacked_call(q, k, v, blocks, block, scale, interpret,
                                                    indices_sorted=True)
  return packed_rows.route(
      first, block,
      lambda: unpacked(q, k, v, aligned),
      lambda: packed_rows.on_padded_row(
          unpacked, q, k, v, first, block,
          lambda padded, inverse: span_blocks(packed_rows.padded_span_starts(
              first, padded, inverse), k.shape[2], width, block)[0]),
      lambda: _halves_attention(q, k, v, aligned, codes, offsets, block, scale, interpret),
      whole_blocks=WHOLE_BLOCK_DOCUMENTS, padded_rows=PADDED_ROWS)

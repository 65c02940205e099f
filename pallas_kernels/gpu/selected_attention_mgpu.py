"""Selected-block attention on Mosaic GPU (Hopper: TMA + wgmma), beside Triton's: the forward
and dQ over tiles of query positions, and the dK/dV over blocks (`selected_attention_dkv`).

One CTA (one warpgroup) takes a tile of `P = 64 // Gp` consecutive query positions of one KV
group, `Gp = rows_per_position(G)` rows each: the 64 rows are wgmma's native M. It loops over
the union of the tile's selected blocks (ascending, from the XLA pre-pass `tile_unions`), so
each K / V block is brought in once by TMA for every position of the tile that chose it; each
row is masked to the blocks its own position chose (a bit mask per union slot) and to keys not
after it. `STAGES` blocks are in flight (one TMA barrier each for K and V); the loop's trip
count is the tile's union size (`_stream_union`, shared by both kernels).

- forward: `S = Q K^T`, online softmax, `O += P V` (two wgmmas a block).
- dQ: `P` from the forward's lse, `dP = dO V^T`, `dS = P (dP - delta)`, `dQ += dS K` (three).
- dK/dV (its own loop, over a block's queries): `S^T = K Q^T`, `dP^T = V dO^T`, `dV += P^T
  dO`, `dK += dS^T Q` (four).

Why: the Triton kernels give each position (16 rows at G = 16) its own program and load its n
blocks, so a K / V block chosen by several neighbouring positions is loaded once per position,
and 16-row matmuls leave Hopper's 64-row wgmma idle. Here 4 positions (G = 16) share the loads
of their union at the price of masked MMA work over it: a trade that pays where neighbours
share blocks (a trained selection's vertical runs), hardly on random inputs (a 4-position union
of ~55 blocks at 64k against 64 loads, for 3.4x the MMA work). `experiments/BENCHMARKS.md` has
the cost model and the timings: on random inputs a tie with Triton at G = 16 (64k forward 19.2
against 19.0 ms, H100, 2026-12-05) and ahead at G = 4 and 8; the default on Hopper since then
(`selected_attention.FORWARD`, `DQ`), 7% faster again since 2026-12-06 with the probabilities
and dS as wgmma's register operand (`PROBS_IN_REGISTERS`).

q and dO: where a position's rows are exactly its G heads (G a power of two >= 8:
`natural_layout`), the kernels read them in their natural layout `[B, T, Hq, D]`, one TMA copy
of a position's `[G, D]` block into the tile's rows (consecutive in SMEM as in the rows layout),
so the caller transposes neither; elsewhere they take the rows layout `[B, Hkv, T_pad * heads,
D]`. The outputs are always rows.

Scope: half-precision q / k / v, `Dk`, `Dv` multiples of 64 whose tiles fit SMEM (256 with
`l'` = 64), `l'` 64 or 128, `G <= 64`, unpacked rows. `supported` says whether a call fits;
the rest stays on Triton. The forward's output and lse have the Triton forward's meaning
(float32 output, base-2 lse, 0 for a row that sees nothing), so either forward feeds either dQ
and either dK/dV (`selected_attention.FORWARD`, `DQ`, `DKV`; `selected_attention_dkv` is the
default dK/dV on Hopper for G >= 8 since 2026-12-06, 0.6-4% faster than Triton's in NSA's step).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_maps import union_and_owners
from pallas_kernels.row_layout import pow2

LOG2E = math.log2(math.e)
ROWS = 64  # query rows a CTA: one warpgroup's wgmma M
# K / V blocks in flight. 2 rather than 3: at 64k (G = 16, Dk = Dv = 128, l' = 64) the forward
# took 19.2 ms with 2 and 28.9 ms with 3 on an H100 (2026-12-05). At that shape 2 stages take
# ~88 KiB of SMEM a CTA, so two CTAs share an SM; 3 take ~120 KiB, one CTA an SM.
STAGES = 2
# The forward's probabilities and the dQ's dS as wgmma's register A operand (as JAX's Mosaic GPU
# flash attention does), or stored to SMEM first. The GPU interpreter (CPU tests) runs only the
# SMEM form: interpret mode uses it whatever this says; the register form is checked by lowering
# here and on a GPU. With the probabilities in registers the forward's SMEM is q and the K / V
# buffers alone, and at one stage (48 KiB at the shape above) more CTAs share an SM, which pays
# where a tile's union walk is short (few positions a tile): H100, 2026-12-06, random inputs,
# selected forward at 64k, G = 16 (4 positions a tile): 19.16 ms (SMEM form, 2 stages) -> 18.17
# (registers, 2) -> 17.52 (registers, 1), at 16k 4.23 -> 3.96 -> 3.78; G = 8 (8 positions):
# 34.96 at 1 stage against 32.77 at 2; G = 4 (16): 58.49 against 56.16. The dQ keeps STAGES.
PROBS_IN_REGISTERS = True
ONE_STAGE_MAX_POSITIONS = 4  # tiles of at most this many positions: the register forward at 1
# Most query positions a tile (a power of two <= 32: one bit each in `tile_unions`' masks).
# Small groups fill the 64 rows with up to this many positions; fewer (the heads padded) keep
# the tile's union of blocks, and the masked MMA work over it, smaller.
MAX_POSITIONS = 32
SMEM_BYTES = 200 * 1024  # of the H100 / H200's 227 KiB a CTA, with room for barriers


def supported(q, k, v, block: int) -> bool:
  """Whether these kernels take these inputs (else the Triton kernels do)."""
  group, dk, dv = q.shape[2] // k.shape[2], q.shape[3], v.shape[3]
  return (q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype and v.dtype == q.dtype
          and dk % 64 == 0 and dv % 64 == 0 and block in (64, 128) and group <= ROWS
          and max_stages(dk, dv, block, q.dtype, ROWS * (dk + dv + block)) >= 1)  # dQ's, the most


def rows_per_position(group: int) -> int:
  """A position's rows in a tile: `pow2(G)`, padded so that a tile has at most `MAX_POSITIONS`."""
  if MAX_POSITIONS not in (1, 2, 4, 8, 16, 32):
    raise ValueError(f"MAX_POSITIONS must be a power of two in [1, 32], got {MAX_POSITIONS}")
  return max(pow2(group), ROWS // MAX_POSITIONS)


def natural_layout(group: int, heads: int) -> bool:
  """Whether the kernels read q and dO in their natural layout `[B, T, Hq, D]` (`natural=True`)
  rather than as rows `[B, Hkv, T_pad * heads, D]` transposed by the caller: where a position's
  rows are exactly its G heads (no padded head), consecutive in the natural layout, and fill
  whole 8-row SMEM tiles. One TMA copy a position then lands them in the tile, and the caller's
  transpose (a pass over q and one over dO at HBM speed) is gone."""
  return heads == group and group % 8 == 0


def _copy_positions(src, bi, hi, first, count: int, heads: int, dst, barrier, natural: bool):
  """TMA copies of the rows of `count` positions from `first` on of KV head `hi` into
  consecutive rows of `dst`: from rows `src [B, Hkv, T_pad * heads, D]` one copy for all, from
  natural `src [B, T, Hq, D]` one a position (`_arrivals`). Natural positions past the last (a
  tile's padding) read the last: their rows are masked or dropped."""
  if not natural:
    plgpu.copy_gmem_to_smem(src.at[bi, hi, pl.ds(first * heads, count * heads)], dst, barrier)
    return
  last = src.shape[1] - 1
  for p in range(count):
    position = jnp.minimum(first + p, last)
    plgpu.copy_gmem_to_smem(src.at[bi, position, pl.ds(hi * heads, heads)],
                            dst.at[pl.ds(p * heads, heads)], barrier)


def _arrivals(count: int, natural: bool) -> int:
  """Barrier arrivals of one `_copy_positions` of `count` positions."""
  return count if natural else 1


def tile_unions(sorted_idx, positions: int):
  """The blocks each tile of `positions` consecutive queries needs, and who chose each.

  Args:
    sorted_idx: int32 `[B, Hkv, T_pad, n]`, each query's distinct causal blocks, -1 for none.
    positions: queries a tile (`T_pad` a multiple of it, at most 32).

  Returns:
    `(union int32 [B, Hkv, tiles, P*n]` ascending then -1, `count int32 [B, Hkv, tiles]`,
    `member int32 [B, Hkv, tiles, P*n]`: bit `p` set when the tile's query `p` chose the block).
  """
  b, hkv, t_pad, n = sorted_idx.shape
  per_tile = sorted_idx.reshape(b, hkv, t_pad // positions, positions * n)
  union, (member,) = union_and_owners(per_tile, positions)
  return union, jnp.sum(union >= 0, axis=-1, dtype=jnp.int32), member


def max_stages(dk: int, dv: int, block: int, dtype, tile_elements: int) -> int:
  """Most K / V blocks in flight that fit `SMEM_BYTES` beside the kernel's other SMEM tiles
  (`tile_elements` of them: q, the probabilities staged for wgmma, and dO for dQ)."""
  item = jnp.dtype(dtype).itemsize
  return (SMEM_BYTES - tile_elements * item) // (block * (dk + dv) * item)


def _smem_transforms(minor: int, dtype):
  """Tiling + swizzle of a half-precision SMEM tile whose minor dimension is `minor`."""
  item = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(minor * item * 8)
  return plgpu.TilingTransform((8, swizzle // item)), plgpu.SwizzleTransform(swizzle)


def _row_positions(tile, positions: int, heads: int, block: int):
  """`(key offset, row's position in the tile, row's query position)`, each `[64, l']` in the
  wgmma accumulator's layout."""
  row = plgpu.broadcasted_iota(jnp.int32, (ROWS, block), 0, layout=plgpu.Layout.WGMMA)
  key = plgpu.broadcasted_iota(jnp.int32, (ROWS, block), 1, layout=plgpu.Layout.WGMMA)
  local = lax.shift_right_logical(row, heads.bit_length() - 1)  # heads: a power of two
  return key, local, tile * positions + local


def _visible(member, block_id, rows, block: int):
  """`[64, l']`: keys of block `block_id` each row sees (its position chose the block, bit
  `local` of `member`, and the key is not after it)."""
  key, local, query_pos = rows
  chosen = lax.shift_right_logical(member, local) & 1
  return (chosen != 0) & (block_id * block + key <= query_pos)


def _stream_union(step, init, *, num_used, block_of, kv_refs, buffers, stages: int, block: int):
  """`lax.fori_loop` of `step(slot, buffer, carry)` over the tile's `num_used` union slots, the
  slot's K and V blocks brought into SMEM `buffer` by TMA `stages` slots ahead.

  `kv_refs = (k, v)` GMEM rows of the (batch, KV head); `buffers = (k_smem, v_smem, k_barriers,
  v_barriers)`; `block_of(slot)` the slot's block. `step` waits on the buffer's K / V barrier
  before reading it and must have finished with both (its wgmmas done) when it returns: the
  buffer is refilled right after.
  """
  k_ref, v_ref = kv_refs
  k_smem, v_smem, k_barriers, v_barriers = buffers

  def fetch(slot, buffer):
    keys = pl.ds(block_of(slot) * block, block)
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[buffer], k_barriers.at[buffer])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[buffer], v_barriers.at[buffer])

  for slot in range(stages):
    pl.when(slot < num_used)(functools.partial(fetch, slot, slot))

  def body(slot, carry):
    buffer = lax.rem(slot, stages)
    carry = step(slot, buffer, carry)
    pl.when(slot + stages < num_used)(functools.partial(fetch, slot + stages, buffer))
    return carry

  return lax.fori_loop(0, num_used, body, init)


def _kv_buffers(stages: int, block: int, dk: int, dv: int, dtype):
  """SMEM of `_stream_union`: K and V buffers and their barriers."""
  return (plgpu.SMEM((stages, block, dk), dtype, transforms=_smem_transforms(dk, dtype)),
          plgpu.SMEM((stages, block, dv), dtype, transforms=_smem_transforms(dv, dtype)),
          plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages))


def _times(a_smem, b_smem, shape):
  """`a @ b` of two SMEM operands by wgmma into a fresh float32 accumulator of `shape`."""
  def product(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, b_smem)
    return acc_ref[...]
  return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))


def _grid_call(kernel, out_type, scratch, grid, interpret):
  return plgpu.kernel(kernel, out_type=out_type, grid=grid, grid_names=("pair", "tile"),
                      scratch_types=scratch,
                      compiler_params=plgpu.CompilerParams(approx_math=True),
                      interpret=interpret)


def _stages(stages, width, dk, dv, block, dtype, tile_elements):
  return max(1, min(stages, width, max_stages(dk, dv, block, dtype, tile_elements)))


def selected_attention_forward(q, k_blocks, v_blocks, union, count, member, *, scale: float,
                               block: int, heads: int, stages: int | None = None,
                               natural: bool = False, interpret=False):
  """Forward over tiles of 64 query rows.

  Args:
    q: `[B, Hkv, T_pad * heads, Dk]`, position `t`'s heads in rows `t*heads ..`; half
      precision; `heads = rows_per_position(G)` (padded heads are computed and ignored). With
      `natural` (where `natural_layout(G, heads)`): q as it is, `[B, T, Hq, Dk]`.
    k_blocks, v_blocks: `[B, Hkv, Ts * block, Dk / Dv]`, whole blocks (zero padded).
    union, count, member: `tile_unions` of the tiles' `64 // heads` positions.
    scale: softmax scale; block: `l'`; stages: K / V blocks in flight (default 1 with the
      probabilities in registers and at most `ONE_STAGE_MAX_POSITIONS` positions a tile, else
      `STAGES`).
    interpret: False, or `plgpu.InterpretGPUParams` (CPU).

  Returns:
    `(out float32 [B, Hkv, T_pad * heads, Dv], lse float32 [B, Hkv, T_pad * heads])`, lse in
    base 2; a row that sees no key gets output 0 and lse 0.
  """
  b, hkv = k_blocks.shape[:2]
  num_rows, dk = union.shape[2] * ROWS, q.shape[3]
  dv, dtype = v_blocks.shape[3], q.dtype
  positions = ROWS // heads
  probs_in_registers = PROBS_IN_REGISTERS and not interpret
  p_tile = () if probs_in_registers else (
      plgpu.SMEM((ROWS, block), dtype, transforms=_smem_transforms(block, dtype)),)
  one_stage = probs_in_registers and positions <= ONE_STAGE_MAX_POSITIONS
  default_stages = 1 if one_stage else STAGES
  stages = _stages(stages or default_stages, union.shape[-1], dk, dv, block, dtype,
                   ROWS * (dk + block * len(p_tile)))

  def kernel(union_ref, count_ref, member_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem,
             *p_smem_and_barrier):
    *p_smem, q_barrier = p_smem_and_barrier  # the probabilities' SMEM tile, unless in registers
    pair, tile = lax.axis_index("pair"), lax.axis_index("tile")
    bi, hi = pair // hkv, pair % hkv
    rows = pl.ds(tile * ROWS, ROWS)
    _copy_positions(q_ref, bi, hi, tile * positions, positions, heads, q_smem, q_barrier,
                    natural)
    positions_of_rows = _row_positions(tile, positions, heads, block)
    block_of = lambda slot: union_ref[bi, hi, tile, slot]

    def attend(k_smem, v_smem, k_barriers, v_barriers):
      plgpu.barrier_wait(q_barrier)

      def step(slot, buffer, carry):
        acc, row_max, row_sum = carry
        visible = _visible(member_ref[bi, hi, tile, slot], block_of(slot), positions_of_rows,
                           block)
        plgpu.barrier_wait(k_barriers.at[buffer])
        s = _times(q_smem, k_smem.at[buffer].T, (ROWS, block))
        s = jnp.where(visible, s * (scale * LOG2E), -jnp.inf)
        new_max = jnp.maximum(row_max, s.max(axis=1))
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)  # rows that saw nothing yet
        correction = jnp.exp2(row_max - safe_max)
        probs = jnp.exp2(s - lax.broadcast_in_dim(safe_max, s.shape, [0]))
        row_sum = row_sum * correction + probs.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
        if probs_in_registers:  # wgmma's register A operand, accumulating onto `acc`
          plgpu.barrier_wait(v_barriers.at[buffer])
          acc = pl.run_state(lambda acc_ref: plgpu.wgmma(
              acc_ref, probs.astype(dtype), v_smem.at[buffer]))(plgpu.ACC.init(acc))
        else:  # through SMEM into a fresh accumulator: what the GPU interpreter can run
          p_smem[0][...] = probs.astype(dtype)
          plgpu.commit_smem()
          plgpu.barrier_wait(v_barriers.at[buffer])
          acc = acc + _times(p_smem[0], v_smem.at[buffer], (ROWS, dv))
        return acc, new_max, row_sum

      init = (plgpu.layout_cast(jnp.zeros((ROWS, dv), jnp.float32), plgpu.Layout.WGMMA),
              plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32),
                                plgpu.Layout.WGMMA.reduce(1)),
              plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
      return _stream_union(step, init, num_used=count_ref[bi, hi, tile], block_of=block_of,
                           kv_refs=(k_ref.at[bi, hi], v_ref.at[bi, hi]),
                           buffers=(k_smem, v_smem, k_barriers, v_barriers), stages=stages,
                           block=block)

    acc, row_max, row_sum = pl.run_scoped(attend, *_kv_buffers(stages, block, dk, dv, dtype))

    def store(o_smem, lse_smem):  # after the loop: its buffers' SMEM is free again
      nonempty = row_sum > 0
      safe_sum = jnp.where(nonempty, row_sum, 1.0)
      o_smem[...] = acc / lax.broadcast_in_dim(safe_sum, acc.shape, [0])
      lse_smem[...] = jnp.where(nonempty, row_max + jnp.log2(safe_sum), 0.0)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, hi, rows])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, rows])
      plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(store, plgpu.SMEM((ROWS, dv), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32))

  out_type = (jax.ShapeDtypeStruct((b, hkv, num_rows, dv), jnp.float32),
              jax.ShapeDtypeStruct((b, hkv, num_rows), jnp.float32))
  scratch = (plgpu.SMEM((ROWS, dk), dtype, transforms=_smem_transforms(dk, dtype)), *p_tile,
             plgpu.Barrier(num_arrivals=_arrivals(positions, natural), num_barriers=1))
  return _grid_call(kernel, out_type, scratch, (b * hkv, num_rows // ROWS), interpret)(
      union, count, member, q, k_blocks, v_blocks)


def selected_attention_dq(q, k_blocks, v_blocks, do, lse, delta, union, count, member, *,
                          scale: float, block: int, heads: int, stages: int | None = None,
                          natural: bool = False, interpret=False):
  """dQ over the forward's tiles: `dQ = scale * sum over blocks of dS K`, `dS = P (dO V^T -
  delta)`, `P` from the forward's base-2 lse.

  Args:
    q, k_blocks, v_blocks, union, count, member, scale, block, heads, stages, natural,
      interpret: as `selected_attention_forward`.
    do: the output's cotangent (q's dtype), in q's layout: `[B, Hkv, T_pad * heads, Dv]`, or
      `[B, T, Hq, Dv]` with `natural`.
    lse, delta: float32 `[B, Hkv, T_pad * heads]`: the forward's lse and `rowsum(dO * O)`.

  Returns:
    `[B, Hkv, T_pad * heads, Dk]` in q's dtype.
  """
  b, hkv = k_blocks.shape[:2]
  num_rows, dk = union.shape[2] * ROWS, q.shape[3]
  dv, dtype = v_blocks.shape[3], q.dtype
  positions = ROWS // heads
  ds_in_registers = PROBS_IN_REGISTERS and not interpret
  ds_tile = () if ds_in_registers else (
      plgpu.SMEM((ROWS, block), dtype, transforms=_smem_transforms(block, dtype)),)
  stages = _stages(stages or STAGES, union.shape[-1], dk, dv, block, dtype,
                   ROWS * (dk + dv + block * len(ds_tile)))

  def kernel(union_ref, count_ref, member_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
             dq_ref, q_smem, do_smem, *ds_smem_and_rest):
    *ds_smem, lse_smem, delta_smem, barriers = ds_smem_and_rest  # dS's SMEM, unless in registers
    pair, tile = lax.axis_index("pair"), lax.axis_index("tile")
    bi, hi = pair // hkv, pair % hkv
    rows = pl.ds(tile * ROWS, ROWS)
    for src, dst in ((q_ref, q_smem), (do_ref, do_smem)):
      _copy_positions(src, bi, hi, tile * positions, positions, heads, dst, barriers, natural)
    for src, dst in ((lse_ref, lse_smem), (delta_ref, delta_smem)):
      plgpu.copy_gmem_to_smem(src.at[bi, hi, rows], dst, barriers)
    positions_of_rows = _row_positions(tile, positions, heads, block)
    block_of = lambda slot: union_ref[bi, hi, tile, slot]

    def gradient(k_smem, v_smem, k_barriers, v_barriers):
      plgpu.barrier_wait(barriers)
      row_lse = plgpu.load(lse_smem, layout=plgpu.Layout.WGMMA.reduce(1))
      row_delta = plgpu.load(delta_smem, layout=plgpu.Layout.WGMMA.reduce(1))

      def step(slot, buffer, dq):
        visible = _visible(member_ref[bi, hi, tile, slot], block_of(slot), positions_of_rows,
                           block)
        plgpu.barrier_wait(k_barriers.at[buffer])
        s = _times(q_smem, k_smem.at[buffer].T, (ROWS, block)) * (scale * LOG2E)
        probs = jnp.where(
            visible, jnp.exp2(s - lax.broadcast_in_dim(row_lse, s.shape, [0])), 0.0)
        plgpu.barrier_wait(v_barriers.at[buffer])
        dp = _times(do_smem, v_smem.at[buffer].T, (ROWS, block))
        ds = probs * (dp - lax.broadcast_in_dim(row_delta, dp.shape, [0]))
        if ds_in_registers:  # wgmma's register A operand, accumulating onto `dq`
          return pl.run_state(lambda acc_ref: plgpu.wgmma(
              acc_ref, ds.astype(dtype), k_smem.at[buffer]))(plgpu.ACC.init(dq))
        ds_smem[0][...] = ds.astype(dtype)
        plgpu.commit_smem()
        return dq + _times(ds_smem[0], k_smem.at[buffer], (ROWS, dk))

      init = plgpu.layout_cast(jnp.zeros((ROWS, dk), jnp.float32), plgpu.Layout.WGMMA)
      return _stream_union(step, init, num_used=count_ref[bi, hi, tile], block_of=block_of,
                           kv_refs=(k_ref.at[bi, hi], v_ref.at[bi, hi]),
                           buffers=(k_smem, v_smem, k_barriers, v_barriers), stages=stages,
                           block=block)

    dq = pl.run_scoped(gradient, *_kv_buffers(stages, block, dk, dv, dtype))

    def store(dq_smem):
      dq_smem[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[bi, hi, rows])
      plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(store, plgpu.SMEM((ROWS, dk), dtype))

  scratch = (plgpu.SMEM((ROWS, dk), dtype, transforms=_smem_transforms(dk, dtype)),
             plgpu.SMEM((ROWS, dv), dtype, transforms=_smem_transforms(dv, dtype)), *ds_tile,
             plgpu.SMEM((ROWS,), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32),
             plgpu.Barrier(num_arrivals=2 * _arrivals(positions, natural) + 2))  # all 4 copies
  out_type = jax.ShapeDtypeStruct((b, hkv, num_rows, dk), dtype)
  return _grid_call(kernel, out_type, scratch, (b * hkv, num_rows // ROWS), interpret)(
      union, count, member, q, k_blocks, v_blocks, do, lse, delta)


def dkv_stages(dk: int, dv: int, block: int, dtype) -> int:
  """Steps of query rows the dK/dV kernel holds at once: 2 (the next step's rows load while
  this one's products run) where their SMEM fits beside K, V and the staged `P`, `dS`, else 1."""
  item = jnp.dtype(dtype).itemsize
  fixed = (block * (dk + dv) + 2 * ROWS * block) * item
  per_stage = ROWS * (dk + dv) * item + 2 * ROWS * 4
  return 2 if fixed + 2 * per_stage <= SMEM_BYTES else 1


# Fewest rows a query's copy may fill: SMEM tiles are 8 rows (the swizzle's tiling), and a
# query's rows land in a slice of the step's tile.
MIN_DKV_HEADS = 8


def dkv_heads(group: int) -> int:
  """A query's rows in the dK/dV's steps: `rows_per_position(G)`, at least MIN_DKV_HEADS (the
  padded heads' q, dO, lse and delta are zero, so their `dS` is 0 and their dO adds nothing)."""
  return max(rows_per_position(group), MIN_DKV_HEADS)


def dkv_supported(q, k, v, block: int) -> bool:
  """Whether `selected_attention_dkv` takes these inputs (else the Triton dK/dV does): those of
  the forward whose SMEM fits one step."""
  item = jnp.dtype(q.dtype).itemsize
  dk, dv = q.shape[3], v.shape[3]
  one_stage = (block * (dk + dv) + 2 * ROWS * block + ROWS * (dk + dv)) * item + 2 * ROWS * 4
  return supported(q, k, v, block) and one_stage <= SMEM_BYTES


def selected_attention_dkv(q, k_blocks, v_blocks, do, lse_entries, delta_entries, queries, items,
                           *, scale: float, block: int, heads: int, natural: bool = False,
                           interpret=False):
  """dK / dV partial sums of each work item of `block_maps.inverse_block_map`.

  One CTA takes a work item (one block, up to `DKV_CHUNK` of the queries that chose it) and
  walks its queries `64 // heads` at a time, the block's `l'` keys on wgmma's M throughout:
  `S^T = K Q^T` and `dP^T = V dO^T` (64 query rows a step on N), then `dV += P^T dO` and `dK +=
  dS^T Q` (the rows on K), `P^T` and `dS^T` as wgmma's register operand (`PROBS_IN_REGISTERS`;
  staged in SMEM in interpret mode). A step's rows come by one TMA copy of q and of dO a query
  (its heads are consecutive rows; Hopper's TMA gathers no rows), its lse and delta by one copy
  each from the per-entry arrays the caller gathers. Rows of queries past the item's count
  repeat its last query and are masked.

  Args:
    q, k_blocks, v_blocks, do, natural: as `selected_attention_dq` (`heads = dkv_heads(G)`).
    lse_entries, delta_entries: float32 `[B, Hkv, (L + 64 // heads) * heads]`: the forward's
      base-2 lse and `rowsum(dO * O)` of the rows of each entry of `queries`, entry `e`'s heads
      at `e * heads ..`, padded by a step.
    queries: int32 `[B, Hkv, L]`, the query positions of each block (`inverse_block_map`).
    items: int32 `[B, Hkv, I, 4]`, `(block, first entry, count, 0)`; unused items count 0.
    scale, block, heads, interpret: as `selected_attention_forward`.

  Returns:
    `(dk float32 [B, Hkv, I, l', Dk], dv float32 [B, Hkv, I, l', Dv])`, dk scaled.
  """
  b, hkv = k_blocks.shape[:2]
  dk, dv, dtype = q.shape[3], v_blocks.shape[3], q.dtype
  num_items, num_blocks = items.shape[2], k_blocks.shape[2] // block
  per_step = ROWS // heads
  stages = dkv_stages(dk, dv, block, dtype)
  in_registers = PROBS_IN_REGISTERS and not interpret

  def kernel(items_ref, queries_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
             dv_ref):
    pair, item = lax.axis_index("pair"), lax.axis_index("item")
    bi, hi = pair // hkv, pair % hkv
    block_id = jnp.minimum(items_ref[bi, hi, item, 0], num_blocks - 1)  # unused: no queries
    first, count = items_ref[bi, hi, item, 1], items_ref[bi, hi, item, 2]
    num_steps = pl.cdiv(count, per_step)
    # `[l', 64]`: the keys on axis 0, a step's query rows on axis 1.
    key = plgpu.broadcasted_iota(jnp.int32, (block, ROWS), 0, layout=plgpu.Layout.WGMMA)
    row = plgpu.broadcasted_iota(jnp.int32, (block, ROWS), 1, layout=plgpu.Layout.WGMMA)
    local = lax.shift_right_logical(row, heads.bit_length() - 1)  # the row's query in a step

    def gradients(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_barriers,
                  row_barriers, *staged):  # staged: P^T's and dS^T's SMEM, unless in registers
      keys = pl.ds(block_id * block, block)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, hi, keys], k_smem, kv_barriers.at[0])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, hi, keys], v_smem, kv_barriers.at[1])

      def entry(step, i):  # the step's i-th query, clamped to the item's last
        return first + jnp.minimum(step * per_step + i, count - 1)

      def fetch(step, buffer):
        barrier = row_barriers.at[buffer]
        for i in range(per_step):
          query = queries_ref[bi, hi, entry(step, i)]
          own = pl.ds(i * heads, heads)
          for src, dst in ((q_ref, q_smem), (do_ref, do_smem)):
            _copy_positions(src, bi, hi, query, 1, heads, dst.at[buffer, own], barrier, natural)
        stats = pl.ds((first + step * per_step) * heads, ROWS)
        plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, stats], lse_smem.at[buffer], barrier)
        plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, stats], delta_smem.at[buffer], barrier)

      pl.when(num_steps > 0)(functools.partial(fetch, 0, 0))
      plgpu.barrier_wait(kv_barriers.at[0])
      plgpu.barrier_wait(kv_barriers.at[1])

      def step(s, carry):
        dk_acc, dv_acc = carry
        buffer = lax.rem(s, stages)
        if stages == 2:  # the other buffer's products finished in the last step
          pl.when(s + 1 < num_steps)(functools.partial(fetch, s + 1, 1 - buffer))
        query_pos = jnp.zeros((block, ROWS), jnp.int32)
        for i in range(per_step):
          query_pos = jnp.where(local == i, queries_ref[bi, hi, entry(s, i)], query_pos)
        visible = (local < count - s * per_step) & (block_id * block + key <= query_pos)
        plgpu.barrier_wait(row_barriers.at[buffer])
        row_lse = plgpu.load(lse_smem.at[buffer], layout=plgpu.Layout.WGMMA.reduce(0))
        row_delta = plgpu.load(delta_smem.at[buffer], layout=plgpu.Layout.WGMMA.reduce(0))
        q_tile, do_tile = q_smem.at[buffer], do_smem.at[buffer]
        scores_t = _times(k_smem, q_tile.T, (block, ROWS)) * (scale * LOG2E)
        probs_t = jnp.where(
            visible, jnp.exp2(scores_t - lax.broadcast_in_dim(row_lse, scores_t.shape, [1])),
            0.0)
        dp_t = _times(v_smem, do_tile.T, (block, ROWS))
        ds_t = probs_t * (dp_t - lax.broadcast_in_dim(row_delta, dp_t.shape, [1]))
        if in_registers:  # wgmma's register A operand, accumulating onto dV and dK
          dv_acc = pl.run_state(lambda acc_ref: plgpu.wgmma(
              acc_ref, probs_t.astype(dtype), do_tile))(plgpu.ACC.init(dv_acc))
          dk_acc = pl.run_state(lambda acc_ref: plgpu.wgmma(
              acc_ref, ds_t.astype(dtype), q_tile))(plgpu.ACC.init(dk_acc))
        else:  # through SMEM into fresh accumulators: what the GPU interpreter can run
          p_smem, ds_smem = staged
          p_smem[...] = probs_t.astype(dtype)
          ds_smem[...] = ds_t.astype(dtype)
          plgpu.commit_smem()
          dv_acc = dv_acc + _times(p_smem, do_tile, (block, dv))
          dk_acc = dk_acc + _times(ds_smem, q_tile, (block, dk))
        if stages == 1:
          pl.when(s + 1 < num_steps)(functools.partial(fetch, s + 1, 0))
        return dk_acc, dv_acc

      init = tuple(plgpu.layout_cast(jnp.zeros((block, d), jnp.float32), plgpu.Layout.WGMMA)
                   for d in (dk, dv))
      return lax.fori_loop(0, num_steps, step, init)

    row_tile = lambda d: plgpu.SMEM((stages, ROWS, d), dtype, transforms=_smem_transforms(d, dtype))
    staged = () if in_registers else (
        plgpu.SMEM((block, ROWS), dtype, transforms=_smem_transforms(ROWS, dtype)),) * 2
    dk_acc, dv_acc = pl.run_scoped(
        gradients,
        plgpu.SMEM((block, dk), dtype, transforms=_smem_transforms(dk, dtype)),
        plgpu.SMEM((block, dv), dtype, transforms=_smem_transforms(dv, dtype)),
        row_tile(dk), row_tile(dv), plgpu.SMEM((stages, ROWS), jnp.float32),
        plgpu.SMEM((stages, ROWS), jnp.float32), plgpu.Barrier(num_barriers=2),
        plgpu.Barrier(num_arrivals=2 * per_step + 2, num_barriers=stages), *staged)

    def store(dk_smem, dv_smem):  # after the loop: its buffers' SMEM is free again
      dk_smem[...] = dk_acc * scale
      dv_smem[...] = dv_acc
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[bi, hi, item])
      plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[bi, hi, item])
      plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(store, plgpu.SMEM((block, dk), jnp.float32),
                  plgpu.SMEM((block, dv), jnp.float32))

  out_type = (jax.ShapeDtypeStruct((b, hkv, num_items, block, dk), jnp.float32),
              jax.ShapeDtypeStruct((b, hkv, num_items, block, dv), jnp.float32))
  return plgpu.kernel(kernel, out_type=out_type, grid=(b * hkv, num_items),
                      grid_names=("pair", "item"),
                      compiler_params=plgpu.CompilerParams(approx_math=True),
                      interpret=interpret)(
      items, queries, q, k_blocks, v_blocks, do, lse_entries, delta_entries)

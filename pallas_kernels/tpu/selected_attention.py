"""Selected-block attention on TPU (Pallas Mosaic): forward, dQ and dK/dV kernels.

The `G` query heads of a KV group share the selected blocks and are stacked as matmul rows
(`Gp = pow2(G)`, at least 8 sublanes; head dims padded to 128 lanes).

- forward / dQ: grid `(B, Hkv, tiles)`, one step per tile of `P = TILE_ROWS // Gp` consecutive
  positions (`R = P * Gp` rows, 128 by default: the MXU's rows). A step walks the union of its
  positions' blocks (distinct, ascending), `KV_BLOCKS` at a time: it DMAs them by hand from HBM
  (`pltpu.make_async_copy`, double-buffered: the next group's copies run while this group is
  computed) into one `[KV_BLOCKS * l', Dp]` tile, so a step does one `[R, KV_BLOCKS * l']` score
  matmul, and each row keeps only the blocks its own position chose (a bit mask per union entry).
  A block that several positions of the tile chose is fetched once. The union list, its length
  and the masks reach the kernel by scalar prefetch (SMEM).
- dK/dV: grid `(B, Hkv, items)` over the inverse map block -> queries
  (`pallas_kernels.block_maps.inverse_block_map`): a work item is one block and up to
  `C = DKV_CHUNK` of the queries that chose it, one step. The block stays in VMEM while the
  queries' q and dO rows are DMAed by hand, `P` queries (`R` rows) a group, double-buffered;
  their log-sum-exp and `delta` entries are gathered per item by XLA beforehand (one lane-dense
  `[1, R]` row a group). Each item's partial dK/dV is summed per block outside (a segment sum,
  no atomics).
- SMEM: the prefetched tables grow with T (`2 * T * Hkv * n` int32 for the tiles), so every call
  covers a chunk of queries (or work items) sized to `SMEM_BUDGET_BYTES`, and a `lax.map` walks
  the chunks. A call holds the tables of every (sequence, KV head) for its chunk, so a batch too
  large for even one tile's tables is cut into several calls (`selected_attention`).

Packed rows (`document_starts`), chosen at run time (`packed_rows.route`): where every document
starts on a multiple of `l'` its blocks are whole blocks of the row and the kernels run as for
unpacked rows (`WHOLE_BLOCK_DOCUMENTS`); else, where the padding fits, on the row spread so that
every document does (`PADDED_ROWS`, `packed_rows.on_padded_row`). Otherwise a document's block
`j` is the upper part (offsets `>= r`, `r = s % l'`) of aligned block `s // l' + j` and the
lower part of the next (`block_maps.document_block_halves`): the tiles walk aligned blocks as
unpacked, with a second bit mask per union entry (the positions that chose its lower part) and
each position's `r`; a dK/dV item's queries carry their code and `r` beside them in SMEM. Cost
model (not measured on a TPU): halves put up to `2n` blocks a position in the tile unions, up to
twice the K/V DMAs and MXU work of whole blocks; the padded row instead moves q, the output, dO
and dQ once more through HBM (`8 G D` elements a position, read and written) and adds 1/8
positions that choose nothing. At the paper's sizes (n = 16, l' = 64, G = 16: 8 positions a
tile) the halves' extra K/V DMA alone is up to `2 n l' D / 8 = 256 D` elements a position, the
padded row's `128 D`, before the halves' extra MXU work.

Layout inside: queries `[B, Hkv, T_pad * Gp, Dp]` (position `t`'s heads are rows `t*Gp ..`),
keys / values `[B, Hkv, Ts * l', Dp]`, the log-sum-exp and `delta` rows `[B, Hkv, 1, T_pad * Gp]`
(heads on the lanes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import packed_rows
from pallas_kernels import row_layout
from pallas_kernels.block_maps import LOWER, UPPER, document_block_halves
from pallas_kernels.block_maps import inverse_block_map, union_and_owners
from pallas_kernels.block_maps import sorted_causal_block_indices
from pallas_kernels.row_layout import pow2 as _pow2
from pallas_kernels.row_layout import round_up as _round_up
from pallas_kernels.tpu.tile_math import dot_nn, dot_nt, dot_tn, double_buffered_loop
from pallas_kernels.tpu.tile_math import softmax_backward_tile

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES = 128
SMEM_BUDGET_BYTES = 256 * 1024  # prefetched int32 tables per call (SMEM is 1 MiB or less)
DKV_CHUNK = 64  # queries per dK/dV work item
TILE_ROWS = 128  # query rows (positions x Gp) per forward / dQ step; a multiple of 128
KV_BLOCKS = 4  # selected blocks per inner-loop step of the forward / dQ (one DMA group)
# Packed rows: the unpacked kernels on whole blocks where every document starts on a multiple
# of l', else on the padded row where it fits (`packed_rows.route`); False: halves always.
WHOLE_BLOCK_DOCUMENTS = True
PADDED_ROWS = True


@dataclasses.dataclass(frozen=True)
class _Layout:
  batch: int
  seq_len: int
  num_kv_heads: int
  group: int
  rows: int  # Gp: pow2(G), at least 8 (sublanes)
  positions: int  # P: positions per forward / dQ tile
  head_dim: int
  head_dim_v: int
  head_dim_pad: int  # multiple of 128 (lanes)
  head_dim_v_pad: int
  block: int
  num_blocks: int
  num_slots: int
  union_len: int  # U: entries of a tile's block list, P * n rounded up to KV_BLOCKS
  query_chunk: int  # positions per call (SMEM budget), a multiple of P
  documents: bool  # packed rows: the tables carry the halves (lower masks, r, item codes)

  @property
  def tile_rows(self) -> int:  # R = P * Gp
    return self.positions * self.rows

  @property
  def seq_pad(self) -> int:
    return _round_up(self.seq_len, self.query_chunk)

  @property
  def tiles_per_call(self) -> int:
    return self.query_chunk // self.positions


def _table_bytes(union_len: int, positions: int = 1, documents: bool = False) -> int:
  """SMEM bytes per (sequence, KV head) of one forward / dQ tile's tables (union, masks, count;
  packed documents also the lower masks and the positions' r; int32) or, if larger, of one
  dK/dV work item's (block, count, queries; packed documents also their codes and r)."""
  if documents:
    return 4 * max(3 * union_len + 1 + positions, 3 * DKV_CHUNK + 2)
  return 4 * max(2 * union_len + 1, DKV_CHUNK + 2)


def _batch_per_call(num_kv_heads: int, union_len: int, positions: int = 1,
                    documents: bool = False) -> int:
  """Sequences one call's prefetched tables hold (each call holds every sequence's and KV
  head's tables of at least one tile or work item)."""
  return SMEM_BUDGET_BYTES // (num_kv_heads * _table_bytes(union_len, positions, documents))


def _layout(q, v, num_slots, block, documents=False) -> _Layout:
  b, t, hq, dk = q.shape
  hkv = v.shape[2]
  if block % 8:
    raise ValueError(f"the TPU kernels need slc_block to be a multiple of 8, got {block}")
  if TILE_ROWS % LANES:
    raise ValueError(f"TILE_ROWS must be a multiple of {LANES}, got {TILE_ROWS}")
  rows = max(8, _pow2(hq // hkv))
  positions = max(1, min(32, TILE_ROWS // rows))  # one int32 mask bit a position
  union_len = _round_up(positions * num_slots, KV_BLOCKS)
  table_bytes = _table_bytes(union_len, positions, documents)
  if b > _batch_per_call(hkv, union_len, positions, documents):  # the caller splits the batch
    raise ValueError(f"the SMEM tables of one tile for {b} sequences x {hkv} KV heads "
                     f"({b * hkv * table_bytes} bytes; q {q.shape}, {num_slots} "
                     f"slots) exceed SMEM_BUDGET_BYTES = {SMEM_BUDGET_BYTES}")
  per_tile = b * hkv * table_bytes
  tiles = max(1, min(-(-t // positions), SMEM_BUDGET_BYTES // per_tile))
  return _Layout(batch=b, seq_len=t, num_kv_heads=hkv, group=hq // hkv, rows=rows,
                 positions=positions, head_dim=dk, head_dim_v=v.shape[3],
                 head_dim_pad=_round_up(dk, LANES), head_dim_v_pad=_round_up(v.shape[3], LANES),
                 block=block, num_blocks=-(-t // block), num_slots=num_slots,
                 union_len=union_len, query_chunk=tiles * positions, documents=documents)


def _to_rows(x, lay: _Layout, dim_pad):
  """`[B, T, Hq, D]` -> `[B, Hkv, T_pad * Gp, Dp]`."""
  rows = row_layout.to_rows(x, lay.num_kv_heads, lay.seq_pad, lay.rows, dim_pad)
  return rows.reshape(lay.batch, lay.num_kv_heads, lay.seq_pad * lay.rows, dim_pad)


def _from_rows(x, lay: _Layout, dim):
  """`[B, Hkv, T_pad * Gp, Dp]` -> `[B, T, Hq, D]`."""
  x = x.reshape(lay.batch, lay.num_kv_heads, lay.seq_pad, lay.rows, -1)
  return row_layout.from_rows(x, lay.seq_len, lay.group, dim)


def _to_blocks(x, lay: _Layout, dim_pad):
  """`[B, T, Hkv, D]` -> `[B, Hkv, Ts * l', Dp]`."""
  pad = [(0, 0), (0, lay.num_blocks * lay.block - lay.seq_len), (0, 0), (0, dim_pad - x.shape[3])]
  return jnp.pad(x, pad).transpose(0, 2, 1, 3)


def _tile_tables(sorted_idx, lay: _Layout, halves=None):
  """Per chunk of queries, the scalar-prefetch tables of the forward / dQ tiles:
  `union [NC, B*Hkv*tiles*U]` (the distinct blocks the tile's positions chose, ascending; entries
  past the count repeat the last block, so their copies stay in bounds and are masked out),
  `members` (bit p set: position p of the tile chose that block; packed documents: its upper
  part) and `count [NC, B*Hkv*tiles]`; with `halves = (codes [B, T, Hkv, n], r [B, T])` also
  `lower` (bit p: position p chose the block's lower part) and `r [NC, B*Hkv*tiles*P]`."""
  b, hkv, p, n = lay.batch, lay.num_kv_heads, lay.positions, lay.num_slots
  pad_positions = lambda x, value: jnp.pad(
      x, [(0, 0), (0, lay.seq_pad - lay.seq_len)] + [(0, 0)] * (x.ndim - 2),
      constant_values=value)
  tiles = lay.seq_pad // p
  per_tile = lambda x, value: pad_positions(x, value).transpose(0, 2, 1, 3).reshape(
      b, hkv, tiles, p * n)
  lists = per_tile(sorted_idx, -1)
  if halves is None:
    union, owned = union_and_owners(lists, p)
  else:
    codes = per_tile(halves[0], 0)
    union, owned = union_and_owners(lists, p, marks=((codes & UPPER) != 0, (codes & LOWER) != 0))
  to_union_len = lambda x, value: jnp.pad(
      x, [(0, 0)] * 3 + [(0, lay.union_len - p * n)], constant_values=value)
  union, owned = to_union_len(union, -1), [to_union_len(x, 0) for x in owned]
  count = jnp.sum(union >= 0, axis=-1).astype(jnp.int32)  # [B, Hkv, tiles]

  chunks = lay.seq_pad // lay.query_chunk
  per_chunk = lambda x: jnp.moveaxis(
      x.reshape(b, hkv, chunks, lay.tiles_per_call, *x.shape[3:]), 2, 0).reshape(chunks, -1)
  last = jnp.take_along_axis(union, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  in_bounds = jnp.where(union >= 0, union, jnp.maximum(last, 0))
  if halves is None:
    return per_chunk(in_bounds), per_chunk(owned[0]), per_chunk(count)
  upper, lower = owned
  r = jnp.broadcast_to(pad_positions(halves[1], 0).reshape(b, 1, tiles, p), (b, hkv, tiles, p))
  return (per_chunk(in_bounds), per_chunk(upper), per_chunk(count), per_chunk(lower),
          per_chunk(r.astype(jnp.int32)))


def _tile_position_of_rows(lay: _Layout):
  """`[R, 1]`: which of the tile's `P` positions each row belongs to."""
  return jax.lax.broadcasted_iota(jnp.int32, (lay.tile_rows, 1), 0) // lay.rows


def _walk_union(union_ref, members_ref, count_ref, k_hbm, v_hbm, k_buf, v_buf, sems, *, lay,
                compute, halves=None):
  """Calls `compute(k [KV_BLOCKS * l', Dkp], v [KV_BLOCKS * l', Dvp], token [1, KV_BLOCKS * l'],
  chosen [R, KV_BLOCKS * l'])` for each group of `KV_BLOCKS` entries of this step's union list,
  the next group's DMAs in flight meanwhile (two buffers). `halves`: packed documents' `(lower
  masks, r)` refs: a row chooses a key at offset `o < r` of its position by the lower mask."""
  b, g, tile = (pl.program_id(i) for i in range(3))
  flat = (b * lay.num_kv_heads + g) * lay.tiles_per_call + tile
  groups = pl.cdiv(count_ref[flat], KV_BLOCKS)
  width = KV_BLOCKS * lay.block

  def copies(group, slot):
    out = []
    for j in range(KV_BLOCKS):
      start = union_ref[flat * lay.union_len + group * KV_BLOCKS + j] * lay.block
      for which, (src, dst) in enumerate([(k_hbm, k_buf), (v_hbm, v_buf)]):
        out.append(pltpu.make_async_copy(
            src.at[b, g, pl.ds(start, lay.block), :],
            dst.at[slot, pl.ds(j * lay.block, lay.block), :], sems.at[which, slot, j]))
    return out

  local = _tile_position_of_rows(lay)
  column = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
  if halves is not None:
    lower_ref, r_ref = halves
    below_r = jnp.zeros((lay.tile_rows, 1), jnp.int32)  # each row's position's r
    for p in range(lay.positions):
      below_r = jnp.where(local == p, r_ref[flat * lay.positions + p], below_r)
    below_r = (column % lay.block) < below_r  # [R, width]

  def body(group, slot, carry):
    token = jnp.zeros((1, width), jnp.int32)
    chosen = jnp.zeros((lay.tile_rows, width), jnp.bool_)
    for j in range(KV_BLOCKS):
      entry = flat * lay.union_len + group * KV_BLOCKS + j
      in_block = (column // lay.block) == j  # [1, width]
      token = jnp.where(in_block, union_ref[entry] * lay.block + column % lay.block, token)
      row_chose = ((members_ref[entry] >> local) & 1) == 1  # [R, 1]
      if halves is not None:
        row_chose = jnp.where(below_r, ((lower_ref[entry] >> local) & 1) == 1, row_chose)
      chosen = jnp.where(in_block, row_chose, chosen)
    compute(k_buf[slot], v_buf[slot], token, chosen)
    return carry

  double_buffered_loop(groups, copies, body, 0)


def _row_positions(offset_ref, lay: _Layout):
  """`[R, 1]`: the query position of each row of this step's tile."""
  return offset_ref[0] + pl.program_id(2) * lay.positions + _tile_position_of_rows(lay)


def _halves_refs(refs, lay: _Layout):
  """`(lower masks and r refs, or None, the other refs)`: packed documents' prefetched tables
  follow the query offset."""
  return ((refs[0], refs[1]), refs[2:]) if lay.documents else (None, refs)


def _forward_kernel(union_ref, members_ref, count_ref, offset_ref, *refs, lay, scale):
  halves, refs = _halves_refs(refs, lay)
  (q_ref, k_hbm, v_hbm, o_ref, lse_ref, k_buf, v_buf, sems, m_scratch, l_scratch,
   acc_scratch) = refs
  m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
  l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
  acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)
  q = q_ref[...]  # [R, Dkp]
  query_pos = _row_positions(offset_ref, lay)

  def compute(k, v, token, chosen):
    visible = chosen & (token <= query_pos)  # a row may see nothing of a group: zero it exactly
    s = jnp.where(visible, dot_nt(q, k) * scale, MASK_VALUE)
    m_prev = m_scratch[...]  # [R, 128], lanes replicated
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_new[:, :1]), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_scratch[...] = alpha * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_scratch[...] = acc_scratch[...] * alpha[:, :1] + dot_nn(p.astype(v.dtype), v)
    m_scratch[...] = m_new

  _walk_union(union_ref, members_ref, count_ref, k_hbm, v_hbm, k_buf, v_buf, sems, lay=lay,
              compute=compute, halves=halves)
  l = l_scratch[...][:, :1]
  nonempty = l > 0
  safe = jnp.where(nonempty, l, 1.0)
  o_ref[...] = (acc_scratch[...] / safe).astype(o_ref.dtype)
  lse = jnp.where(nonempty, m_scratch[...][:, :1] + jnp.log(safe), jnp.inf)  # [R, 1]
  lse_ref[...] = lse.T  # [1, R]: rows on the lanes


def _dq_kernel(union_ref, members_ref, count_ref, offset_ref, *refs, lay, scale):
  halves, refs = _halves_refs(refs, lay)
  (q_ref, k_hbm, v_hbm, do_ref, lse_ref, delta_ref, dq_ref, k_buf, v_buf, sems,
   dq_scratch) = refs
  dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]  # [1, R]
  query_pos = _row_positions(offset_ref, lay)

  def compute(k, v, token, chosen):
    visible = chosen & (token <= query_pos)
    s = jnp.where(visible, dot_nt(q, k) * scale, MASK_VALUE)
    _, ds = softmax_backward_tile(s, visible, lse, delta, do, v)  # [R, KV_BLOCKS * l']
    dq_scratch[...] += dot_nn(ds.astype(k.dtype), k)

  _walk_union(union_ref, members_ref, count_ref, k_hbm, v_hbm, k_buf, v_buf, sems, lay=lay,
              compute=compute, halves=halves)
  dq_ref[...] = (dq_scratch[...] * scale).astype(dq_ref.dtype)


def _tiled_call(kernel, name, lay: _Layout, tables, row_operands, k, v, out_dims, scratch,
                interpret):
  """One pallas_call (named `name`, as profiles show it) per query chunk, walked by `lax.map`.

  `row_operands`: `(array, kind)` with `kind` "rows" (`[B, Hkv, T_pad * Gp, d]`) or "vector"
  (`[B, Hkv, 1, T_pad * Gp]`), sliced per chunk; `k`, `v` stay in HBM whole. `out_dims`:
  `(kind, d, dtype)` per output. Returns the outputs over all chunks.
  """
  union, members, count, *halves = tables  # packed documents: lower masks and r
  rows_per_call = lay.query_chunk * lay.rows
  r = lay.tile_rows

  def spec(kind, d=None):
    if kind == "rows":
      return pl.BlockSpec((None, None, r, d), lambda b, g, t, *_: (b, g, t, 0))
    return pl.BlockSpec((None, None, 1, r), lambda b, g, t, *_: (b, g, 0, t))

  def out_shape(kind, d, dtype):
    shape = (rows_per_call, d) if kind == "rows" else (1, rows_per_call)
    return jax.ShapeDtypeStruct((lay.batch, lay.num_kv_heads) + shape, dtype)

  in_specs = [spec(kind, x.shape[-1]) for x, kind in row_operands]
  any_space = pl.BlockSpec(memory_space=pl.ANY)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4 + len(halves),
      grid=(lay.batch, lay.num_kv_heads, lay.tiles_per_call),
      in_specs=in_specs[:1] + [any_space, any_space] + in_specs[1:],
      out_specs=[spec(kind, d) for kind, d, _ in out_dims],
      scratch_shapes=[pltpu.VMEM((2, KV_BLOCKS * lay.block, lay.head_dim_pad), k.dtype),
                      pltpu.VMEM((2, KV_BLOCKS * lay.block, lay.head_dim_v_pad), v.dtype),
                      pltpu.SemaphoreType.DMA((2, 2, KV_BLOCKS))] + scratch)
  call = pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=[out_shape(*dims) for dims in out_dims],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=pltpu.InterpretParams(detect_races=True) if interpret else False,
      name=name)

  def one_chunk(c):
    offset = (c * lay.query_chunk)[None].astype(jnp.int32)
    chunk_ops = [jax.lax.dynamic_slice_in_dim(x, c * rows_per_call, rows_per_call,
                                              axis=2 if kind == "rows" else 3)
                 for x, kind in row_operands]
    return call(union[c], members[c], count[c], offset, *(x[c] for x in halves), chunk_ops[0],
                k, v, *chunk_ops[1:])

  outs = jax.lax.map(one_chunk, jnp.arange(lay.seq_pad // lay.query_chunk))  # [NC, B, Hkv, ...]
  joined = []
  for o, (kind, _, _) in zip(outs, out_dims):
    axis = 2 if kind == "rows" else 3
    o = jnp.moveaxis(o, 0, axis)  # chunk axis next to the rows it holds
    joined.append(o.reshape(*o.shape[:axis], -1, *o.shape[axis + 2:]))
  return joined


def _dkv_kernel(item_block_ref, item_count_ref, item_query_ref, *refs, lay, scale,
                items_per_call):
  """One work item (a block and up to DKV_CHUNK of the queries that chose it) a step: the block
  stays in VMEM while the queries' q and dO rows are DMAed by hand from HBM, `P` queries
  (`R = P * Gp` rows) a group, two buffers (the next group's copies overlap this group's math).
  Packed documents: each item query's code of the block and its r follow in SMEM."""
  halves, refs = _halves_refs(refs, lay)
  (q_hbm, k_ref, v_ref, do_hbm, lse_ref, delta_ref, dk_ref, dv_ref, q_buf, do_buf,
   sems) = refs
  b, g, item = (pl.program_id(axis) for axis in range(3))
  flat_item = (b * lay.num_kv_heads + g) * items_per_call + item
  count = item_count_ref[flat_item]
  groups = pl.cdiv(count, lay.positions)
  block_id = jnp.minimum(item_block_ref[flat_item], lay.num_blocks - 1)
  k, v = k_ref[...], v_ref[...]  # [l', Dp]

  def query(group, j, table=item_query_ref):  # places past the count repeat the item's last
    return table[flat_item * DKV_CHUNK + group * lay.positions + j]  # query (in bounds)

  def copies(group, slot):
    out = []
    for j in range(lay.positions):
      rows = pl.ds(query(group, j) * lay.rows, lay.rows)
      for which, (src, dst) in enumerate([(q_hbm, q_buf), (do_hbm, do_buf)]):
        out.append(pltpu.make_async_copy(src.at[b, g, rows, :],
                                         dst.at[slot, pl.ds(j * lay.rows, lay.rows), :],
                                         sems.at[which, slot, j]))
    return out

  local = _tile_position_of_rows(lay)  # here: which of the group's queries
  offset = jax.lax.broadcasted_iota(jnp.int32, (1, lay.block), 1)
  token = block_id * lay.block + offset

  def body(group, slot, carry):
    dk, dv = carry
    query_pos = jnp.zeros((lay.tile_rows, 1), jnp.int32)
    for j in range(lay.positions):
      query_pos = jnp.where(local == j, query(group, j), query_pos)
    in_item = group * lay.positions + local < count  # [R, 1]
    visible = in_item & (token <= query_pos)  # [R, l']
    if halves is not None:
      code, r = jnp.zeros_like(query_pos), jnp.zeros_like(query_pos)
      for j in range(lay.positions):
        code = jnp.where(local == j, query(group, j, halves[0]), code)
        r = jnp.where(local == j, query(group, j, halves[1]), r)
      visible = visible & jnp.where(offset < r, (code & LOWER) != 0, (code & UPPER) != 0)
    q, do = q_buf[slot], do_buf[slot]
    s = jnp.where(visible, dot_nt(q, k) * scale, MASK_VALUE)
    p, ds = softmax_backward_tile(s, visible, lse_ref[pl.ds(group, 1), :],
                                  delta_ref[pl.ds(group, 1), :], do, v)  # [R, l']
    return dk + dot_tn(ds.astype(q.dtype), q), dv + dot_tn(p.astype(do.dtype), do)

  dk, dv = double_buffered_loop(
      groups, copies, body,
      (jnp.zeros(dk_ref.shape, jnp.float32), jnp.zeros(dv_ref.shape, jnp.float32)))
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def _item_tables(sorted_idx, lay: _Layout, halves=None):
  """Work items of the inverse map: `(block, count, queries)` per SMEM chunk (packed documents:
  and each item query's code and r), the item -> block ids `[B, Hkv, I_pad]` for the segment
  sum, each item's queries `[B, Hkv, I_pad, C]` and the items per call."""
  if halves is None:
    query_list, items = inverse_block_map(sorted_idx, lay.num_blocks, DKV_CHUNK)
  else:
    query_list, items, code_list = inverse_block_map(sorted_idx, lay.num_blocks, DKV_CHUNK,
                                                     payload=halves[0])
  block, start, count = items[..., 0], items[..., 1], items[..., 2]  # [B, Hkv, I]
  # Each item's queries; places past `count` repeat its last query (their rows stay in bounds
  # and are masked).
  offset = jnp.minimum(jnp.arange(DKV_CHUNK), jnp.maximum(count - 1, 0)[..., None])
  position = jnp.minimum(start[..., None] + offset, query_list.shape[-1] - 1)  # unused items too
  queries = jnp.take_along_axis(query_list[:, :, None, :], position, axis=-1)  # [B, Hkv, I, C]
  extra = []
  if halves is not None:
    codes = jnp.take_along_axis(code_list[:, :, None, :], position, axis=-1)
    r = jnp.take_along_axis(halves[1][:, None, None, :], queries, axis=-1)
    extra = [codes, r.astype(jnp.int32)]
  per_item = lay.batch * lay.num_kv_heads * ((3 if extra else 1) * DKV_CHUNK + 2) * 4
  items_per_call = max(1, min(block.shape[-1], SMEM_BUDGET_BYTES // per_item))
  num_items = _round_up(block.shape[-1], items_per_call)
  pad = lambda x, value: jnp.pad(x, [(0, 0), (0, 0), (0, num_items - x.shape[2])] +
                                 [(0, 0)] * (x.ndim - 3), constant_values=value)
  block, count, queries = pad(block, lay.num_blocks), pad(count, 0), pad(queries, 0)
  extra = [pad(x, 0) for x in extra]
  chunks = num_items // items_per_call
  per_chunk = lambda x: jnp.moveaxis(
      x.reshape(lay.batch, lay.num_kv_heads, chunks, items_per_call, *x.shape[3:]), 2, 0
  ).reshape(chunks, -1)
  tables = (per_chunk(block), per_chunk(count), per_chunk(queries), *map(per_chunk, extra))
  return tables, block, queries, items_per_call


def _item_vectors(x, queries, lay: _Layout):
  """Row vector `[B, Hkv, 1, T_pad * Gp]` (lse, delta) -> each item's queries' entries as
  `[B, Hkv, I_pad, C / P, R]`: one lane-dense row per group of P queries (an XLA gather, so the
  kernel reads them with plain aligned loads)."""
  per_query = x.reshape(lay.batch, lay.num_kv_heads, lay.seq_pad, lay.rows)
  b, hkv, num_items, chunk = queries.shape
  gathered = jnp.take_along_axis(per_query[:, :, None, :, :], queries[..., None], axis=3)
  return gathered.reshape(b, hkv, num_items, chunk // lay.positions, lay.tile_rows)


def _dkv(q_rows, k, v, do_rows, lse, delta, sorted_idx, lay: _Layout, scale, interpret,
         halves=None):
  """dK and dV `[B, T, Hkv, D]` (float32) from the rows `[B, Hkv, T_pad * Gp, Dp]`, the blocks
  and the row vectors `[B, Hkv, 1, T_pad * Gp]` (packed documents: `halves = (codes, r)`)."""
  if DKV_CHUNK % lay.positions:
    raise ValueError(f"DKV_CHUNK ({DKV_CHUNK}) must be a multiple of the {lay.positions} "
                     "positions of a tile")
  tables, item_block, item_queries, items_per_call = _item_tables(sorted_idx, lay, halves)
  vectors = [_item_vectors(x, item_queries, lay) for x in (lse, delta)]
  kv = lambda d: pl.BlockSpec(
      (None, None, lay.block, d),
      lambda b, g, e, blk, *_: (
          b, g, jnp.minimum(blk[(b * lay.num_kv_heads + g) * items_per_call + e],
                            lay.num_blocks - 1), 0))
  vector = pl.BlockSpec((None, None, None, DKV_CHUNK // lay.positions, lay.tile_rows),
                        lambda b, g, e, *_: (b, g, e, 0, 0))
  part = lambda d: pl.BlockSpec((None, None, None, lay.block, d),
                                lambda b, g, e, *_: (b, g, e, 0, 0))
  any_space = pl.BlockSpec(memory_space=pl.ANY)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(tables), grid=(lay.batch, lay.num_kv_heads, items_per_call),
      in_specs=[any_space, kv(lay.head_dim_pad), kv(lay.head_dim_v_pad), any_space, vector,
                vector],
      out_specs=[part(lay.head_dim_pad), part(lay.head_dim_v_pad)],
      scratch_shapes=[pltpu.VMEM((2, lay.tile_rows, lay.head_dim_pad), q_rows.dtype),
                      pltpu.VMEM((2, lay.tile_rows, lay.head_dim_v_pad), do_rows.dtype),
                      pltpu.SemaphoreType.DMA((2, 2, lay.positions))])
  parts_shape = lambda d: jax.ShapeDtypeStruct(
      (lay.batch, lay.num_kv_heads, items_per_call, lay.block, d), jnp.float32)
  call = pl.pallas_call(
      functools.partial(_dkv_kernel, lay=lay, scale=scale, items_per_call=items_per_call),
      grid_spec=grid_spec, out_shape=[parts_shape(lay.head_dim_pad),
                                      parts_shape(lay.head_dim_v_pad)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=pltpu.InterpretParams(detect_races=True) if interpret else False,
      name="nsa_selected_dkv_tpu")
  per_call = lambda x, c: jax.lax.dynamic_slice_in_dim(x, c * items_per_call, items_per_call,
                                                       axis=2)
  dk_parts, dv_parts = jax.lax.map(
      lambda c: call(*(x[c] for x in tables), q_rows, k, v, do_rows,
                     per_call(vectors[0], c), per_call(vectors[1], c)),
      jnp.arange(tables[0].shape[0]))  # [NC, B, Hkv, Ic, l', Dp]

  def per_token(parts, dim):
    parts = jnp.moveaxis(parts, 0, 2).reshape(lay.batch, lay.num_kv_heads, -1, lay.block,
                                              parts.shape[-1])
    segment_sum = lambda p, ids: jax.ops.segment_sum(p, ids, num_segments=lay.num_blocks + 1)
    per_block = jax.vmap(jax.vmap(segment_sum))(parts, item_block)[:, :, :lay.num_blocks]
    tokens = per_block[..., :dim].reshape(lay.batch, lay.num_kv_heads, -1, dim)
    return tokens[:, :, :lay.seq_len].transpose(0, 2, 1, 3)

  return per_token(dk_parts, lay.head_dim), per_token(dv_parts, lay.head_dim_v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _selected_attention(q, k, v, sorted_idx, halves, scale, block, interpret):
  return _selected_attention_fwd(q, k, v, sorted_idx, halves, scale, block, interpret)[0]


def _selected_attention_fwd(q, k, v, sorted_idx, halves, scale, block, interpret):
  lay = _layout(q, v, sorted_idx.shape[-1], block, halves is not None)
  k_blocks = _to_blocks(k, lay, lay.head_dim_pad)
  v_blocks = _to_blocks(v, lay, lay.head_dim_v_pad)
  out_rows, lse = _tiled_call(
      functools.partial(_forward_kernel, lay=lay, scale=scale), "nsa_selected_fwd_tpu", lay,
      _tile_tables(sorted_idx, lay, halves), [(_to_rows(q, lay, lay.head_dim_pad), "rows")],
      k_blocks,
      # float32 output rows: the backward's delta = rowsum(dO * O) needs them unrounded (a
      # bfloat16-rounded O puts ~2^-9 |dO| |O| into every dS, which can exceed a small dq).
      v_blocks, [("rows", lay.head_dim_v_pad, jnp.float32), ("vector", None, jnp.float32)],
      [pltpu.VMEM((lay.tile_rows, LANES), jnp.float32),
       pltpu.VMEM((lay.tile_rows, LANES), jnp.float32),
       pltpu.VMEM((lay.tile_rows, lay.head_dim_v_pad), jnp.float32)], interpret)
  out = _from_rows(out_rows, lay, lay.head_dim_v).astype(q.dtype)
  return out, (q, k, v, sorted_idx, halves, out_rows, lse)


def _selected_attention_bwd(scale, block, interpret, residuals, d_out):
  q, k, v, sorted_idx, halves, out_rows, lse = residuals
  lay = _layout(q, v, sorted_idx.shape[-1], block, halves is not None)
  q_rows = _to_rows(q, lay, lay.head_dim_pad)
  k_blocks = _to_blocks(k, lay, lay.head_dim_pad)
  v_blocks = _to_blocks(v, lay, lay.head_dim_v_pad)
  do_rows = _to_rows(d_out.astype(q.dtype), lay, lay.head_dim_v_pad)
  delta = jnp.sum(out_rows.astype(jnp.float32) * do_rows.astype(jnp.float32), axis=-1)
  delta = delta[:, :, None, :]  # [B, Hkv, 1, T_pad * Gp], like lse
  (dq_rows,) = _tiled_call(
      functools.partial(_dq_kernel, lay=lay, scale=scale), "nsa_selected_dq_tpu", lay,
      _tile_tables(sorted_idx, lay, halves),
      [(q_rows, "rows"), (do_rows, "rows"), (lse, "vector"), (delta, "vector")], k_blocks,
      v_blocks, [("rows", lay.head_dim_pad, q.dtype)],
      [pltpu.VMEM((lay.tile_rows, lay.head_dim_pad), jnp.float32)], interpret)
  dk, dv = _dkv(q_rows, k_blocks, v_blocks, do_rows, lse, delta, sorted_idx, lay, scale,
                interpret, halves)
  return (_from_rows(dq_rows, lay, lay.head_dim), dk.astype(k.dtype), dv.astype(v.dtype), None,
          None)


_selected_attention.defvjp(_selected_attention_fwd, _selected_attention_bwd)


def selected_attention(q, k, v, block_indices, *, block: int, scale: float,
                       interpret: bool = False, indices_sorted: bool = False,
                       document_starts=None):
  """Attention of each query over the tokens `s <= t` of its KV group's selected blocks (TPU).

  Args:
    q: `[B, T, Hq, Dk]`; k: `[B, T, Hkv, Dk]`; v: `[B, T, Hkv, Dv]`.
    block_indices: int `[B, T, Hkv, n]`; -1, out-of-range, future and repeated blocks are ignored.
    block: tokens per selection block `l'`, a multiple of 8.
    scale: softmax scale (a Python float).
    indices_sorted: the indices are already what `sorted_causal_block_indices` makes (distinct,
      ascending, causal, -1 last; e.g. a top-n selection's output): skip re-sorting them.
    interpret: run under the TPU interpreter (CPU) with race detection.
    document_starts: int32 `[B, T]` or None: packed rows (SPEC.md), each position's document
      start; `block_indices` are then document-local (block `j` of a document starting at `s`
      holds tokens `[s + j*l', s + (j+1)*l')`) and `indices_sorted` is ignored; the kernels
      run on whole blocks, on the padded row or with halves (module docstring).

  Returns:
    `[B, T, Hq, Dv]` in q.dtype; differentiable in q, k and v.
  """
  if document_starts is not None:
    unpacked = lambda q, k, v, blocks: _in_calls(
        q, k, v, sorted_causal_block_indices(blocks, block), None, scale, block, interpret)

    def on_halves():
      aligned, codes, offsets = document_block_halves(block_indices, document_starts, block)
      return _in_calls(q, k, v, aligned, (codes, offsets), scale, block, interpret)

    return packed_rows.selection(unpacked, on_halves, q, k, v, block_indices, document_starts,
                                 block, whole_blocks=WHOLE_BLOCK_DOCUMENTS,
                                 padded_rows=PADDED_ROWS)
  if not indices_sorted:
    block_indices = sorted_causal_block_indices(block_indices, block)
  return _in_calls(q, k, v, block_indices, None, scale, block, interpret)


def _in_calls(q, k, v, block_indices, halves, scale, block, interpret):
  """`_selected_attention` on clean indices, the batch cut into calls whose tables fit SMEM."""
  documents = halves is not None
  # Raises if one sequence's tables are too many.
  lay = _layout(q[:1], v[:1], block_indices.shape[-1], block, documents)
  per_call = _batch_per_call(lay.num_kv_heads, lay.union_len, lay.positions, documents)
  # A large batch is cut into calls whose tables fit SMEM (each is differentiable on its own).
  cut = lambda x, i: None if x is None else jax.tree.map(lambda a: a[i:i + per_call], x)
  parts = [_selected_attention(q[i:i + per_call], k[i:i + per_call], v[i:i + per_call],
                               block_indices[i:i + per_call], cut(halves, i), float(scale),
                               block, interpret)
           for i in range(0, q.shape[0], per_call)]
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)

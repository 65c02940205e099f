"""Selected-block attention on TPU (Pallas Mosaic): forward, dQ and dK/dV kernels.

The block indices reach the kernels by scalar prefetch (`pltpu.PrefetchScalarGridSpec`): the index
maps read them to choose which key/value block the pipeline DMAs next, so a grid step never loads
a block it does not use. The `G` query heads of a KV group share the blocks and are stacked as the
matmul rows (`[Gp, Dp]` per query position, `Gp` a multiple of 8, `Dp` of 128).

- forward / dQ: grid `(B, Hkv, Tq, n)`, the slot axis innermost and "arbitrary" (the output block
  of a position is revisited on consecutive steps while the online softmax accumulates in VMEM).
  Unused slots repeat the last used block, so the pipeline skips their DMA, and `pl.when` skips
  their compute.
- dK/dV: grid `(B, Hkv, items, C)` over the inverse map block -> queries
  (`pallas_kernels.block_maps.inverse_block_map`): a work item is one block and up to `C` of the
  queries that chose it; the block stays resident while the queries stream past, and each item's
  partial dK/dV is summed per block outside (a segment sum, no atomics).
- SMEM: the prefetched tables grow with T (`T * Hkv * n` int32 = 32 MiB at T=128k, Hkv=4, n=16),
  so every call covers a chunk of queries (or work items) sized to `SMEM_BUDGET_BYTES`, and a
  `lax.map` walks the chunks.

Layout inside: queries `[B, Hkv, T, Gp, Dp]`, keys / values `[B, Hkv, Ts * l', Dp]`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_maps import inverse_block_map, sorted_causal_block_indices
from pallas_kernels.tpu.tile_math import dot_nn, dot_nt, dot_tn, softmax_backward_tile

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES = 128
SMEM_BUDGET_BYTES = 256 * 1024  # prefetched int32 tables per call (SMEM is 1 MiB or less)
DKV_CHUNK = 64  # queries per dK/dV work item


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class _Layout:
  batch: int
  seq_len: int
  num_kv_heads: int
  group: int
  rows: int  # Gp: G rounded up to a multiple of 8 (sublanes)
  head_dim: int
  head_dim_v: int
  head_dim_pad: int  # multiple of 128 (lanes)
  head_dim_v_pad: int
  block: int
  num_blocks: int
  num_slots: int
  query_chunk: int  # positions per call (SMEM budget)

  @property
  def seq_pad(self) -> int:
    return _round_up(self.seq_len, self.query_chunk)


def _layout(q, v, num_slots, block) -> _Layout:
  b, t, hq, dk = q.shape
  hkv = v.shape[2]
  if block % 8:
    raise ValueError(f"the TPU kernels need slc_block to be a multiple of 8, got {block}")
  per_position = b * hkv * (num_slots + 1) * 4  # slot table + count, int32
  query_chunk = max(1, min(t, SMEM_BUDGET_BYTES // per_position))
  return _Layout(batch=b, seq_len=t, num_kv_heads=hkv, group=hq // hkv,
                 rows=_round_up(hq // hkv, 8), head_dim=dk, head_dim_v=v.shape[3],
                 head_dim_pad=_round_up(dk, LANES), head_dim_v_pad=_round_up(v.shape[3], LANES),
                 block=block, num_blocks=-(-t // block), num_slots=num_slots,
                 query_chunk=query_chunk)


def _to_rows(x, lay: _Layout, dim_pad):
  """`[B, T, Hq, D]` -> `[B, Hkv, T_pad, Gp, Dp]`."""
  b, t, _, d = x.shape
  x = x.reshape(b, t, lay.num_kv_heads, lay.group, d)
  x = jnp.pad(x, [(0, 0), (0, lay.seq_pad - t), (0, 0), (0, lay.rows - lay.group),
                  (0, dim_pad - d)])
  return x.transpose(0, 2, 1, 3, 4)


def _from_rows(x, lay: _Layout, dim):
  """`[B, Hkv, T_pad, Gp, Dp]` -> `[B, T, Hq, D]`."""
  x = x[:, :, :lay.seq_len, :lay.group, :dim].transpose(0, 2, 1, 3, 4)
  return x.reshape(lay.batch, lay.seq_len, lay.num_kv_heads * lay.group, dim)


def _to_blocks(x, lay: _Layout, dim_pad):
  """`[B, T, Hkv, D]` -> `[B, Hkv, Ts * l', Dp]`."""
  pad = [(0, 0), (0, lay.num_blocks * lay.block - lay.seq_len), (0, 0), (0, dim_pad - x.shape[3])]
  return jnp.pad(x, pad).transpose(0, 2, 1, 3)


def _slot_tables(sorted_idx, lay: _Layout):
  """Per chunk: `slot_block [NC, B*Hkv*Tq*n]` (unused slots repeat the last used block, so the
  pipeline skips their DMA) and `num_valid [NC, B*Hkv*Tq]`."""
  idx = jnp.pad(sorted_idx, [(0, 0), (0, lay.seq_pad - lay.seq_len), (0, 0), (0, 0)],
                constant_values=-1).transpose(0, 2, 1, 3)  # [B, Hkv, T_pad, n]
  num_valid = jnp.sum(idx >= 0, axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(idx, jnp.maximum(num_valid - 1, 0)[..., None], axis=-1)
  filled = jnp.where(idx >= 0, idx, jnp.maximum(last, 0))
  chunks = lay.seq_pad // lay.query_chunk
  per_chunk = lambda x: jnp.moveaxis(
      x.reshape(lay.batch, lay.num_kv_heads, chunks, lay.query_chunk, *x.shape[3:]), 2, 0
  ).reshape(chunks, -1)
  return per_chunk(filled), per_chunk(num_valid)


def _scores(q, k, block_id, query_pos, scale, block):
  """Masked `scale * q . k` of one block: `[Gp, l']` float32."""
  s = dot_nt(q, k) * scale
  token = block_id * block + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
  return jnp.where(token <= query_pos, s, MASK_VALUE), token <= query_pos


def _row_and_slot(lay: _Layout):
  b, g, t, slot = (pl.program_id(i) for i in range(4))
  return ((b * lay.num_kv_heads + g) * lay.query_chunk + t), t, slot


def _forward_kernel(slot_block_ref, num_valid_ref, offset_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                    m_scratch, l_scratch, acc_scratch, *, lay, scale):
  row, t, slot = _row_and_slot(lay)

  @pl.when(slot == 0)
  def _init():
    m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  @pl.when(slot < num_valid_ref[row])
  def _accumulate():
    block_id = slot_block_ref[row * lay.num_slots + slot]
    s, _ = _scores(q_ref[...], k_ref[...], block_id, offset_ref[0] + t, scale, lay.block)
    m_prev = m_scratch[...]  # [Gp, 128], lanes replicated
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new[:, :1])
    alpha = jnp.exp(m_prev - m_new)
    l_scratch[...] = alpha * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_scratch[...] = acc_scratch[...] * alpha[:, :1] + dot_nn(p.astype(v.dtype), v)
    m_scratch[...] = m_new

  @pl.when(slot == lay.num_slots - 1)
  def _finish():
    l = l_scratch[...][:, :1]
    nonempty = l > 0
    safe = jnp.where(nonempty, l, 1.0)
    o_ref[...] = (acc_scratch[...] / safe).astype(o_ref.dtype)
    lse = jnp.where(nonempty, m_scratch[...][:, :1] + jnp.log(safe), jnp.inf)  # [Gp, 1]
    lse_ref[...] = lse.T  # [1, Gp]: heads on the lanes


def _dq_kernel(slot_block_ref, num_valid_ref, offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, dq_scratch, *, lay, scale):
  row, t, slot = _row_and_slot(lay)

  @pl.when(slot == 0)
  def _init():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  @pl.when(slot < num_valid_ref[row])
  def _accumulate():
    block_id = slot_block_ref[row * lay.num_slots + slot]
    k = k_ref[...]
    s, visible = _scores(q_ref[...], k, block_id, offset_ref[0] + t, scale, lay.block)
    _, ds = softmax_backward_tile(s, visible, lse_ref[...], delta_ref[...], do_ref[...],
                                  v_ref[...])  # [Gp, l']
    dq_scratch[...] += dot_nn(ds.astype(k.dtype), k)

  @pl.when(slot == lay.num_slots - 1)
  def _finish():
    dq_ref[...] = (dq_scratch[...] * scale).astype(dq_ref.dtype)


def _per_query_call(kernel, name, lay: _Layout, tables, operands, in_block_dims, out_shapes,
                    scratch, interpret):
  """One pallas_call (named `name`, as profiles show it) per query chunk, walked by `lax.map`.

  `operands`: arrays, each either per query `[B, Hkv, T_pad, ...]` (sliced per chunk) or keys /
  values `[B, Hkv, S, Dp]` (whole); `in_block_dims[i]` is the block of operand i: ("rows", d) for
  `[Gp, d]` rows of one position, ("vector",) for `[1, Gp]`, ("kv", d) for one `[l', d]` block.
  """
  slot_block, num_valid = tables
  nc, tq = lay.seq_pad // lay.query_chunk, lay.query_chunk

  def spec(kind):
    if kind[0] == "rows":
      return pl.BlockSpec((None, None, None, lay.rows, kind[1]),
                          lambda b, g, t, s, *_: (b, g, t, 0, 0))
    if kind[0] == "vector":
      return pl.BlockSpec((None, None, None, 1, lay.rows), lambda b, g, t, s, *_: (b, g, t, 0, 0))
    return pl.BlockSpec(
        (None, None, lay.block, kind[1]),
        lambda b, g, t, s, blocks, counts, offset: (
            b, g, blocks[((b * lay.num_kv_heads + g) * tq + t) * lay.num_slots + s], 0))

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(lay.batch, lay.num_kv_heads, tq, lay.num_slots),
      in_specs=[spec(kind) for kind in in_block_dims],
      out_specs=[spec(kind) for kind, _ in out_shapes], scratch_shapes=scratch)
  call = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((lay.batch, lay.num_kv_heads, tq) + tail, dtype)
                 for _, (tail, dtype) in out_shapes],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams(detect_races=True) if interpret else False,
      name=name)

  def one_chunk(c):
    chunk_ops = [jax.lax.dynamic_slice_in_dim(x, c * tq, tq, axis=2) if kind[0] != "kv" else x
                 for x, kind in zip(operands, in_block_dims)]
    return call(slot_block[c], num_valid[c], (c * tq)[None].astype(jnp.int32), *chunk_ops)

  outs = jax.lax.map(one_chunk, jnp.arange(nc))  # each [NC, B, Hkv, Tq, ...]
  return [jnp.moveaxis(o, 0, 2).reshape(o.shape[1], o.shape[2], nc * tq, *o.shape[4:])
          for o in outs]


def _dkv_kernel(item_block_ref, item_count_ref, item_query_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, dk_scratch, dv_scratch, *, lay, scale,
                items_per_call):
  b, g, item, i = (pl.program_id(axis) for axis in range(4))
  flat_item = (b * lay.num_kv_heads + g) * items_per_call + item

  @pl.when(i == 0)
  def _init():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  @pl.when(i < item_count_ref[flat_item])
  def _accumulate():
    query_pos = item_query_ref[flat_item * DKV_CHUNK + i]
    q, do = q_ref[...], do_ref[...]
    k, v = k_ref[...], v_ref[...]
    block_id = jnp.minimum(item_block_ref[flat_item], lay.num_blocks - 1)
    s, visible = _scores(q, k, block_id, query_pos, scale, lay.block)
    p, ds = softmax_backward_tile(s, visible, lse_ref[...], delta_ref[...], do, v)  # [Gp, l']
    dv_scratch[...] += dot_tn(p.astype(do.dtype), do)
    dk_scratch[...] += dot_tn(ds.astype(q.dtype), q)

  @pl.when(i == DKV_CHUNK - 1)
  def _finish():
    dk_ref[...] = dk_scratch[...] * scale
    dv_ref[...] = dv_scratch[...]


def _item_tables(sorted_idx, lay: _Layout):
  """Work items of the inverse map, chunked for SMEM: `(block, count, queries)` per chunk and the
  item -> block ids `[B, Hkv, I_pad]` for the segment sum."""
  query_list, items = inverse_block_map(sorted_idx, lay.num_blocks, DKV_CHUNK)
  block, start, count = items[..., 0], items[..., 1], items[..., 2]  # [B, Hkv, I]
  # Each item's queries; places past `count` repeat its last query, so their DMA is skipped.
  offset = jnp.minimum(jnp.arange(DKV_CHUNK), jnp.maximum(count - 1, 0)[..., None])
  position = jnp.minimum(start[..., None] + offset, query_list.shape[-1] - 1)  # unused items too
  queries = jnp.take_along_axis(query_list[:, :, None, :], position, axis=-1)  # [B, Hkv, I, C]
  per_item = lay.batch * lay.num_kv_heads * (DKV_CHUNK + 2) * 4
  items_per_call = max(1, min(block.shape[-1], SMEM_BUDGET_BYTES // per_item))
  num_items = _round_up(block.shape[-1], items_per_call)
  pad = lambda x, value: jnp.pad(x, [(0, 0), (0, 0), (0, num_items - x.shape[2])] +
                                 [(0, 0)] * (x.ndim - 3), constant_values=value)
  block, count, queries = pad(block, lay.num_blocks), pad(count, 0), pad(queries, 0)
  chunks = num_items // items_per_call
  per_chunk = lambda x: jnp.moveaxis(
      x.reshape(lay.batch, lay.num_kv_heads, chunks, items_per_call, *x.shape[3:]), 2, 0
  ).reshape(chunks, -1)
  return (per_chunk(block), per_chunk(count), per_chunk(queries)), block, items_per_call


def _dkv(q, k, v, do, lse, delta, sorted_idx, lay: _Layout, scale, interpret):
  (blocks, counts, queries), item_block, items_per_call = _item_tables(sorted_idx, lay)
  rows = lambda d: pl.BlockSpec(
      (None, None, None, lay.rows, d),
      lambda b, g, e, i, blk, cnt, qry: (
          b, g, qry[((b * lay.num_kv_heads + g) * items_per_call + e) * DKV_CHUNK + i], 0, 0))
  vector = pl.BlockSpec(
      (None, None, None, 1, lay.rows),
      lambda b, g, e, i, blk, cnt, qry: (
          b, g, qry[((b * lay.num_kv_heads + g) * items_per_call + e) * DKV_CHUNK + i], 0, 0))
  kv = lambda d: pl.BlockSpec(
      (None, None, lay.block, d),
      lambda b, g, e, i, blk, cnt, qry: (
          b, g, jnp.minimum(blk[(b * lay.num_kv_heads + g) * items_per_call + e],
                            lay.num_blocks - 1), 0))
  part = lambda d: pl.BlockSpec((None, None, None, lay.block, d),
                                lambda b, g, e, i, *_: (b, g, e, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(lay.batch, lay.num_kv_heads, items_per_call, DKV_CHUNK),
      in_specs=[rows(lay.head_dim_pad), kv(lay.head_dim_pad), kv(lay.head_dim_v_pad),
                rows(lay.head_dim_v_pad), vector, vector],
      out_specs=[part(lay.head_dim_pad), part(lay.head_dim_v_pad)],
      scratch_shapes=[pltpu.VMEM((lay.block, lay.head_dim_pad), jnp.float32),
                      pltpu.VMEM((lay.block, lay.head_dim_v_pad), jnp.float32)])
  parts_shape = lambda d: jax.ShapeDtypeStruct(
      (lay.batch, lay.num_kv_heads, items_per_call, lay.block, d), jnp.float32)
  call = pl.pallas_call(
      functools.partial(_dkv_kernel, lay=lay, scale=scale, items_per_call=items_per_call),
      grid_spec=grid_spec, out_shape=[parts_shape(lay.head_dim_pad),
                                      parts_shape(lay.head_dim_v_pad)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams(detect_races=True) if interpret else False,
      name="nsa_selected_dkv_tpu")
  dk_parts, dv_parts = jax.lax.map(
      lambda c: call(blocks[c], counts[c], queries[c], q, k, v, do, lse, delta),
      jnp.arange(blocks.shape[0]))  # [NC, B, Hkv, Ic, l', Dp]

  def per_token(parts, dim):
    parts = jnp.moveaxis(parts, 0, 2).reshape(lay.batch, lay.num_kv_heads, -1, lay.block,
                                              parts.shape[-1])
    segment_sum = lambda p, ids: jax.ops.segment_sum(p, ids, num_segments=lay.num_blocks + 1)
    per_block = jax.vmap(jax.vmap(segment_sum))(parts, item_block)[:, :, :lay.num_blocks]
    tokens = per_block[..., :dim].reshape(lay.batch, lay.num_kv_heads, -1, dim)
    return tokens[:, :, :lay.seq_len].transpose(0, 2, 1, 3)

  return per_token(dk_parts, lay.head_dim), per_token(dv_parts, lay.head_dim_v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _selected_attention(q, k, v, sorted_idx, scale, block, interpret):
  return _selected_attention_fwd(q, k, v, sorted_idx, scale, block, interpret)[0]


def _selected_attention_fwd(q, k, v, sorted_idx, scale, block, interpret):
  lay = _layout(q, v, sorted_idx.shape[-1], block)
  q_rows = _to_rows(q, lay, lay.head_dim_pad)
  out_rows, lse = _per_query_call(
      functools.partial(_forward_kernel, lay=lay, scale=scale), "nsa_selected_fwd_tpu", lay,
      _slot_tables(sorted_idx, lay),
      [q_rows, _to_blocks(k, lay, lay.head_dim_pad), _to_blocks(v, lay, lay.head_dim_v_pad)],
      [("rows", lay.head_dim_pad), ("kv", lay.head_dim_pad), ("kv", lay.head_dim_v_pad)],
      [(("rows", lay.head_dim_v_pad), ((lay.rows, lay.head_dim_v_pad), q.dtype)),
       (("vector",), ((1, lay.rows), jnp.float32))],
      [pltpu.VMEM((lay.rows, LANES), jnp.float32), pltpu.VMEM((lay.rows, LANES), jnp.float32),
       pltpu.VMEM((lay.rows, lay.head_dim_v_pad), jnp.float32)], interpret)
  return _from_rows(out_rows, lay, lay.head_dim_v), (q, k, v, sorted_idx, out_rows, lse)


def _selected_attention_bwd(scale, block, interpret, residuals, d_out):
  q, k, v, sorted_idx, out_rows, lse = residuals
  lay = _layout(q, v, sorted_idx.shape[-1], block)
  q_rows = _to_rows(q, lay, lay.head_dim_pad)
  k_blocks = _to_blocks(k, lay, lay.head_dim_pad)
  v_blocks = _to_blocks(v, lay, lay.head_dim_v_pad)
  do_rows = _to_rows(d_out.astype(q.dtype), lay, lay.head_dim_v_pad)
  delta = jnp.sum(out_rows.astype(jnp.float32) * do_rows.astype(jnp.float32), axis=-1)
  delta = delta[:, :, :, None, :]  # [B, Hkv, T_pad, 1, Gp], like lse
  (dq_rows,) = _per_query_call(
      functools.partial(_dq_kernel, lay=lay, scale=scale), "nsa_selected_dq_tpu", lay,
      _slot_tables(sorted_idx, lay),
      [q_rows, k_blocks, v_blocks, do_rows, lse, delta],
      [("rows", lay.head_dim_pad), ("kv", lay.head_dim_pad), ("kv", lay.head_dim_v_pad),
       ("rows", lay.head_dim_v_pad), ("vector",), ("vector",)],
      [(("rows", lay.head_dim_pad), ((lay.rows, lay.head_dim_pad), q.dtype))],
      [pltpu.VMEM((lay.rows, lay.head_dim_pad), jnp.float32)], interpret)
  dk, dv = _dkv(q_rows, k_blocks, v_blocks, do_rows, lse, delta, sorted_idx, lay, scale, interpret)
  return _from_rows(dq_rows, lay, lay.head_dim), dk.astype(k.dtype), dv.astype(v.dtype), None


_selected_attention.defvjp(_selected_attention_fwd, _selected_attention_bwd)


def selected_attention(q, k, v, block_indices, *, block: int, scale: float,
                       interpret: bool = False, indices_sorted: bool = False):
  """Attention of each query over the tokens `s <= t` of its KV group's selected blocks (TPU).

  Args:
    q: `[B, T, Hq, Dk]`; k: `[B, T, Hkv, Dk]`; v: `[B, T, Hkv, Dv]`.
    block_indices: int `[B, T, Hkv, n]`; -1, out-of-range, future and repeated blocks are ignored.
    block: tokens per selection block `l'`, a multiple of 8.
    scale: softmax scale (a Python float).
    indices_sorted: the indices are already what `sorted_causal_block_indices` makes (distinct,
      ascending, causal, -1 last; e.g. a top-n selection's output): skip re-sorting them.
    interpret: run under the TPU interpreter (CPU) with race detection.

  Returns:
    `[B, T, Hq, Dv]` in q.dtype; differentiable in q, k and v.
  """
  if not indices_sorted:
    block_indices = sorted_causal_block_indices(block_indices, block)
  return _selected_attention(q, k, v, block_indices, float(scale), block, interpret)

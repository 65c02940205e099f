"""Index metadata shared by the block-sparse kernels (GPU and TPU): plain JAX, computed per call.

- `sorted_causal_block_indices`: the selected blocks of each query as a clean, ascending list, so a
  kernel loops over the first `count` slots and every slot it visits has at least one visible key
  (`distinct_ascending` also makes the union lists of packed programs; `union_and_owners` those
  lists with who chose each entry).
- `inverse_block_map`: the transpose, block -> queries that selected it, in CSR form split into
  work items of at most `chunk` queries, for the dK/dV kernels (no scan over all queries per block,
  and no block with thousands of queries serialised in one program).
- `document_block_halves`: packed rows' document-local blocks as parts of aligned blocks, so the
  same lists and maps serve them; `span_blocks`: a contiguous span of keys (the packed window)
  in the same form.
- `positions_before_key_tiles`: packed rows' compressed-key tiles against the positions whose
  documents start before each tile ends (the compressed kernels' dK/dV walks end there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def sorted_causal_block_indices(block_indices, block: int):
  """Distinct blocks `j` with `0 <= j <= t // block`, ascending, then -1.

  Blocks past the query's own contribute nothing (all their keys are in the future), so dropping
  them keeps the selection's meaning and guarantees every kept block has a visible key.

  Args:
    block_indices: int `[B, T, H, n]`, any values.
    block: tokens per selection block.

  Returns:
    int32 `[B, T, H, n]`.
  """
  t = block_indices.shape[1]
  last_block = (jnp.arange(t) // block)[None, :, None, None]
  idx = block_indices.astype(jnp.int32)
  return distinct_ascending(jnp.where(idx <= last_block, idx, -1))


LOWER, UPPER = 1, 2  # `document_block_halves` codes: which part of an aligned block is chosen


def document_block_halves(block_indices, document_starts, block: int):
  """Document-local selections of packed rows as aligned blocks with halves.

  Block `j` of a document starting at `s` holds tokens `[s + j*l', s + (j+1)*l')`: with
  `r = s % l'` and `a = s // l' + j`, the tokens at offsets `>= r` of aligned block `a` (its upper
  part) and at offsets `< r` of block `a + 1` (its lower part). The kernels load aligned blocks
  and mask each row's keys by its position's `r` and the block's code (a key at offset `o` is
  chosen if `o < r` and the code has LOWER, or `o >= r` and it has UPPER), so their block maps,
  bounded by the row's blocks, serve packed rows too.

  Args:
    block_indices: int `[B, T, H, n]` document-local blocks; -1, past the query's own block in its
      document, and repeats are ignored.
    document_starts: int32 `[B, T]`: each position's document start.
    block: `l'`.

  Returns:
    `(aligned int32 [B, T, H, 2n]` (distinct, causal, ascending, then -1, as
    `sorted_causal_block_indices`), `codes int32 [B, T, H, 2n]` (LOWER | UPPER bits, 0 for -1),
    `offsets int32 [B, T]` (`r`)).
  """
  starts = document_starts[:, :, None, None].astype(jnp.int32)
  position = jnp.arange(block_indices.shape[1], dtype=jnp.int32)[None, :, None, None]
  idx = block_indices.astype(jnp.int32)
  idx = jnp.where((idx >= 0) & (idx <= (position - starts) // block), idx, -1)
  base, offset = starts // block, starts % block
  upper = jnp.where(idx >= 0, base + idx, -1)
  lower = jnp.where((idx >= 0) & (offset > 0), base + idx + 1, -1)
  aligned = sorted_causal_block_indices(jnp.concatenate([upper, lower], axis=-1), block)
  chosen = lambda j: jnp.any((idx[..., None, :] == j[..., None]) & (idx[..., None, :] >= 0), -1)
  local = aligned - base  # the document-local block whose upper part this block holds
  codes = jnp.where(aligned >= 0, LOWER * chosen(local - 1) + UPPER * chosen(local), 0)
  return aligned, codes.astype(jnp.int32), (document_starts % block).astype(jnp.int32)


def span_blocks(first, num_kv_heads: int, width: int, block: int):
  """Each position's keys `first[t] .. t` as aligned blocks with the codes of
  `document_block_halves` (the packed window: `first = max(s, t - w + 1)`).

  The aligned blocks `first // l'` to `t // l'` (at most `width` of them), the first one's keys
  from offset `r = first % l'` on (UPPER), the others whole (LOWER | UPPER); keys past `t` are
  the kernels' causal mask. Half the entries of `document_block_halves` on a virtual document
  starting at `first` (which splits every block in two when `r > 0`).

  Args:
    first: int32 `[B, T]`, each position's first key; past the position: an empty span (no
      block).
    num_kv_heads: H of the returned arrays (the same span for every head).
    width: entries a position, `>= (t - first) // l' + 2` for every `t` (e.g. `ceil(w / l') + 1`).
    block: `l'`.

  Returns:
    `(aligned int32 [B, T, H, width]` (ascending, then -1), `codes int32 [B, T, H, width]`,
    `offsets int32 [B, T]` (`r`)).
  """
  first = first.astype(jnp.int32)
  position = jnp.arange(first.shape[1], dtype=jnp.int32)[None, :, None]
  entry = jnp.arange(width, dtype=jnp.int32)[None, None, :]
  aligned = first[..., None] // block + entry  # [B, T, width]
  aligned = jnp.where((aligned <= position // block) & (first[..., None] <= position), aligned,
                      -1)
  codes = jnp.where(aligned < 0, 0, jnp.where(entry == 0, UPPER, LOWER | UPPER))
  spread = lambda x: jnp.broadcast_to(x[:, :, None], x.shape[:2] + (num_kv_heads, width))
  return spread(aligned), spread(codes).astype(jnp.int32), first % block


def document_block_columns(x, document_starts, block: int, shift: int = 0, width=None):
  """Per-row values on aligned blocks -> on each row's document blocks (packed selection scores).

  Entry `j` of row `t` is `x[..., t, j + s // l' + shift]` (`s`: its document start, so
  `s // l'` is the aligned block that holds the document's first token), 0 past the last column.

  Args:
    x: `[B, H, T, W]`.
    document_starts: int32 `[B, T]`.
    block: `l'`.
    shift: columns further on (a layout that keeps block `j` of a document one column later).
    width: entries a row (default W).

  Returns:
    `[B, H, T, width]`.
  """
  width = x.shape[-1] if width is None else width
  column = (document_starts // block + shift)[:, None, :, None] + jnp.arange(width)
  last = x.shape[-1] - 1
  index = jnp.broadcast_to(jnp.minimum(column, last), x.shape[:3] + (width,))
  return jnp.where(column <= last, jnp.take_along_axis(x, index, axis=-1), 0)


def positions_before_key_tiles(document_starts, stride: int, tile_keys: int, num_tiles: int):
  """int32 `[B, num_tiles]`: how many positions of a packed row belong to a document whose first
  compressed slot (`s // stride`, block `i` of the document starting at `s` sits at `s // stride
  + i`) lies before the end of each tile of `tile_keys` slots. Only those positions can see a
  key of the tile, and they are a prefix of the row (starts never decrease along it)."""
  first_slot = document_starts // stride
  tile_ends = (jnp.arange(num_tiles, dtype=jnp.int32) + 1) * tile_keys
  return jax.vmap(lambda slots: jnp.searchsorted(slots, tile_ends, side="left"))(
      first_slot).astype(jnp.int32)


def ascending(block_indices):
  """The non-negative entries of each row (last axis), ascending, then -1. int32. Repeats stay
  (`distinct_ascending` drops them): one sort, for rows whose entries are already distinct."""
  missing = jnp.iinfo(jnp.int32).max
  idx = block_indices.astype(jnp.int32)
  idx = jnp.sort(jnp.where(idx >= 0, idx, missing), axis=-1)
  return jnp.where(idx == missing, -1, idx)


def distinct_ascending(block_indices):
  """The distinct non-negative entries of each row (last axis), ascending, then -1. int32."""
  idx = ascending(block_indices)
  repeated = jnp.concatenate(
      [jnp.zeros_like(idx[..., :1], bool), idx[..., 1:] == idx[..., :-1]], axis=-1)
  return ascending(jnp.where(repeated, -1, idx))


def union_and_owners(lists, owners: int, marks=None):
  """Each row's distinct non-negative entries, ascending then -1, and who chose each.

  A row is `owners` lists of equal length side by side, each of distinct entries (a tile's
  positions' selected blocks). Two sorts and a few elementwise passes: no comparison of every
  entry against every union slot (quadratic in the row: 4.4 ms of the 64k forward on the GPU at
  16 positions a tile, G = 4).

  Args:
    lists: int `[..., owners * m]`, -1 (or any negative) for none; owner `i // m` wrote entry
      `i`; at most 32 owners.
    marks: None, or a sequence of bool `[..., owners * m]`: which entries each owner mask counts
      (packed rows: an entry's upper or lower part chosen); None counts every entry.

  Returns:
    `(union int32 [..., owners * m]` ascending then -1, `owned`: one int32 `[..., owners * m]` a
    mark (one for None), bit `o` set where owner `o` chose the union's entry with the mark, 0
    past the union).
  """
  width = lists.shape[-1]
  if width % owners or not 1 <= owners <= 32:
    raise ValueError(f"union_and_owners: {owners} owners (1 .. 32) of a row of {width}")
  missing = jnp.iinfo(jnp.int32).max
  idx = lists.astype(jnp.int32)
  owner_bit = jnp.left_shift(jnp.int32(1), jnp.arange(width, dtype=jnp.int32) // (width // owners))
  bits = ([jnp.broadcast_to(owner_bit, idx.shape)] if marks is None
          else [jnp.where(mark, owner_bit, 0) for mark in marks])
  axis = idx.ndim - 1
  keys, *bits = lax.sort((jnp.where(idx >= 0, idx, missing), *bits), dimension=axis, num_keys=1)
  # An entry's run of equal keys is at most `owners` long (each owner's entries are distinct):
  # doubling steps OR each entry's bits with those of the equal keys before it, so a run's last
  # entry holds the run's bits.
  shift = 1
  while shift < owners:
    same = keys[..., shift:] == keys[..., :-shift]
    bits = [x | jnp.concatenate([jnp.zeros_like(x[..., :shift]),
                                 jnp.where(same, x[..., :-shift], 0)], axis=-1) for x in bits]
    shift *= 2
  run_end = jnp.concatenate([keys[..., 1:] != keys[..., :-1],
                             jnp.ones_like(keys[..., :1], bool)], axis=-1) & (keys != missing)
  union, *owned = lax.sort((jnp.where(run_end, keys, missing),
                            *(jnp.where(run_end, x, 0) for x in bits)),
                           dimension=axis, num_keys=1)
  return jnp.where(union == missing, -1, union), owned


def max_work_items(seq_len: int, num_selected: int, num_blocks: int, chunk: int) -> int:
  """Upper bound on the work items of `inverse_block_map`: `sum_j ceil(c_j / chunk)`."""
  return -(-seq_len * num_selected // chunk) + num_blocks


def inverse_block_map(sorted_indices, num_blocks: int, chunk: int, payload=None):
  """Block -> queries map of `sorted_causal_block_indices` output, split into work items.

  Args:
    sorted_indices: int32 `[B, T, H, n]`, -1 for unused slots.
    num_blocks: selection blocks `Ts`.
    chunk: most queries one work item covers.

  Returns:
    `query_list int32 [B, H, T*n]`: the query positions of each block, blocks in ascending
      order, queries ascending within a block (entries past the valid ones are padding);
    `items int32 [B, H, I, 4]` with `I = max_work_items(...)`: `(block, start, count, 0)`, a run
      `query_list[start : start + count]` of queries of `block`; unused items have `count = 0` and
      `block = num_blocks` (a segment the caller drops);
    with `payload` (int `[B, T, H, n]`, e.g. `document_block_halves`' codes) also
      `payload_list int32 [B, H, T*n]`: each `query_list` entry's payload.
  """
  b, t, h, n = sorted_indices.shape
  num_items = max_work_items(t, n, num_blocks, chunk)

  def one_group(idx, extra):  # idx, extra [T, n]
    flat = jnp.where(idx >= 0, idx, num_blocks).reshape(-1)  # [T*n]
    order = jnp.argsort(flat, stable=True)
    query_list = (order // n).astype(jnp.int32)
    payload_list = extra.reshape(-1)[order].astype(jnp.int32)
    # Each block's run in the sorted list, found by a binary search of its edges: a scatter-add
    # of T*n ones took 0.69 ms at T = 64k (Hkv = 4, n = 16; H100, 2026-12-06).
    edges = jnp.searchsorted(flat[order], jnp.arange(num_blocks + 1), side="left",
                             method="scan_unrolled").astype(jnp.int32)
    starts, counts = edges[:-1], edges[1:] - edges[:-1]
    items_per_block = -(-counts // chunk)
    items_end = jnp.cumsum(items_per_block)
    item = jnp.arange(num_items)
    item_block = jnp.searchsorted(items_end, item, side="right")  # num_blocks past the end
    safe_block = jnp.minimum(item_block, num_blocks - 1)
    part = item - (items_end[safe_block] - items_per_block[safe_block])
    start = starts[safe_block] + part * chunk
    count = jnp.where(item_block < num_blocks,
                      jnp.clip(counts[safe_block] - part * chunk, 0, chunk), 0)
    items = jnp.stack([item_block, start, count, jnp.zeros_like(count)], axis=-1)
    return query_list, items.astype(jnp.int32), payload_list

  per_group = jax.vmap(jax.vmap(one_group, in_axes=1), in_axes=0)  # over B, then H
  query_list, items, payload_list = per_group(
      sorted_indices, jnp.zeros_like(sorted_indices) if payload is None else payload)
  return (query_list, items) if payload is None else (query_list, items, payload_list)

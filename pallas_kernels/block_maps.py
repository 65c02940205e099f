"""Index metadata shared by the block-sparse kernels (GPU and TPU): plain JAX, computed per call.

- `sorted_causal_block_indices`: the selected blocks of each query as a clean, ascending list, so a
  kernel loops over the first `count` slots and every slot it visits has at least one visible key
  (`distinct_ascending` also makes the union lists of packed programs).
- `inverse_block_map`: the transpose, block -> queries that selected it, in CSR form split into
  work items of at most `chunk` queries, for the dK/dV kernels (no scan over all queries per block,
  and no block with thousands of queries serialised in one program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def max_work_items(seq_len: int, num_selected: int, num_blocks: int, chunk: int) -> int:
  """Upper bound on the work items of `inverse_block_map`: `sum_j ceil(c_j / chunk)`."""
  return -(-seq_len * num_selected // chunk) + num_blocks


def inverse_block_map(sorted_indices, num_blocks: int, chunk: int):
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
      `block = num_blocks` (a segment the caller drops).
  """
  b, t, h, n = sorted_indices.shape
  num_items = max_work_items(t, n, num_blocks, chunk)

  def one_group(idx):  # idx [T, n]
    flat = jnp.where(idx >= 0, idx, num_blocks).reshape(-1)  # [T*n]
    order = jnp.argsort(flat, stable=True)
    query_list = (order // n).astype(jnp.int32)
    counts = jnp.zeros(num_blocks + 1, jnp.int32).at[flat].add(1)[:num_blocks]
    starts = jnp.cumsum(counts) - counts
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
    return query_list, items.astype(jnp.int32)

  per_group = jax.vmap(jax.vmap(one_group, in_axes=1), in_axes=0)  # over B, then H
  return per_group(sorted_indices)

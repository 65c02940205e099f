"""The index metadata of the block-sparse kernels (`pallas_kernels.block_maps`), against NumPy."""

import numpy as np
import pytest

from pallas_kernels import block_maps


@pytest.mark.parametrize("seq_len,block,chunk", [(1, 4, 2), (37, 4, 3), (64, 8, 5)])
def test_inverse_block_map_lists_each_blocks_queries_once_in_chunks(seq_len, block, chunk):
  rng = np.random.default_rng(seq_len)
  b, h, n = 2, 3, 5
  num_blocks = -(-seq_len // block)
  raw = rng.integers(-1, num_blocks, size=(b, seq_len, h, n))
  idx = np.asarray(block_maps.sorted_causal_block_indices(raw, block))
  query_list, items = map(np.asarray, block_maps.inverse_block_map(idx, num_blocks, chunk))
  assert items.shape[2] == block_maps.max_work_items(seq_len, n, num_blocks, chunk)
  for bi in range(b):
    for hi in range(h):
      expected = {j: sorted(t for t in range(seq_len) if j in idx[bi, t, hi])
                  for j in range(num_blocks)}
      seen = {j: [] for j in range(num_blocks)}
      previous_block = -1
      for block_id, start, count, _ in items[bi, hi]:
        if count == 0:  # unused items: the dropped segment past the last block
          assert block_id == num_blocks
          continue
        assert 0 < count <= chunk and block_id >= previous_block  # blocks ascending
        previous_block = block_id
        seen[block_id] += list(query_list[bi, hi, start:start + count])
      assert seen == expected


@pytest.mark.parametrize("owners,m", [(1, 5), (3, 4), (8, 5), (32, 3)])
def test_union_and_owners_against_brute_force(owners, m):
  # Each owner's list: distinct blocks in any order, -1s among them; two marks per entry.
  rng = np.random.default_rng(owners * 100 + m)
  rows, num_blocks = 40, 2 * m + 3
  lists = np.stack([np.concatenate([rng.permutation(num_blocks)[:m] for _ in range(owners)])
                    for _ in range(rows)])
  lists = np.where(rng.random(lists.shape) < 0.2, -1, lists).reshape(2, rows // 2, owners * m)
  marks = rng.random((2,) + lists.shape) < 0.5
  union, owned = map(np.asarray, block_maps.union_and_owners(lists, owners))
  union_m, owned_m = block_maps.union_and_owners(lists, owners, marks=tuple(marks))
  np.testing.assert_array_equal(np.asarray(union_m), union)
  bits = lambda x: np.asarray(x).view(np.uint32)  # owner 31's bit is int32's sign bit
  for row in np.ndindex(lists.shape[:-1]):
    entries = lists[row]
    want = sorted(set(entries[entries >= 0]))
    np.testing.assert_array_equal(union[row], want + [-1] * (entries.size - len(want)))

    def owner_mask(block, mark=None):
      chose = (entries == block) & (True if mark is None else mark[row])
      return sum(1 << o for o in range(owners) if chose[o * m:(o + 1) * m].any())

    past_union = [0] * (entries.size - len(want))
    for counted, mark in [(owned[0], None), (owned_m[0], marks[0]), (owned_m[1], marks[1])]:
      np.testing.assert_array_equal(bits(counted)[row],
                                    [owner_mask(j, mark) for j in want] + past_union)


def test_union_and_owners_rejects_owners_that_do_not_split_the_row():
  with pytest.raises(ValueError, match="3 owners"):
    block_maps.union_and_owners(np.zeros((2, 10), np.int32), 3)
  with pytest.raises(ValueError, match="64 owners"):
    block_maps.union_and_owners(np.zeros((2, 64), np.int32), 64)

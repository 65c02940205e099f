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

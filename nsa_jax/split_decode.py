"""The TPU decode step around the Mosaic decode kernels (`pallas_kernels/tpu/decode.py`).

The step: the compressed kernel (branch output and per-head selection-block scores), their group
sum, a top-n (`top_n` argument; `lax.top_k` on TPU), then the selected + window kernel, and the
gated sum, with XLA between the kernels. The GPU step
(`nsa_jax.pallas_gpu._decode_jit`) fuses all of this into kernels; the TPU one could follow it
(the per-step XLA ops cost a launch each there too).
"""

from __future__ import annotations

from typing import Callable

import jax

from nsa_jax.attention_math import combine_branches
from nsa_jax.block_selection import num_cmp_visible
from nsa_jax.config import NSAConfig

# (scores [B, Hkv, num_slc], position, config) -> int32 [B, Hkv, n]
TopN = Callable[[jax.Array, jax.Array, NSAConfig], jax.Array]


def split_decode_attention(q_t, cache, position, gates, *, config: NSAConfig, scale: float,
                           kernels, top_n: TopN, interpret: bool):
  """Row `position` of NSA over a `DecodeCache` holding that token: `[B, Hq, Dv]` in q_t.dtype.

  Args:
    q_t: `[B, Hq, Dk]`; cache: the `DecodeCache`; position: int32 scalar; gates: `[B, Hq, 3]` or
      None; config, scale: as in `nsa_decode_step` (scale a Python float).
    kernels: a module with `group_rows`, `compressed_decode` and `sparse_decode`.
    top_n: the backend's top-n of the selection scores.
    interpret: run the kernels in interpret mode.
  """
  b, hq, _ = q_t.shape
  hkv = cache.k.shape[1]
  group = hq // hkv
  q_rows = kernels.group_rows(q_t, hkv)  # [B, Hkv, Gp, Dk]
  num_slc = cache.k.shape[2] // config.slc_block
  o_cmp, head_scores = kernels.compressed_decode(
      q_rows, cache.k_cmp, cache.v_cmp, num_cmp_visible(position, config), scale=scale,
      cmp_block=config.cmp_block, cmp_stride=config.cmp_stride, slc_block=config.slc_block,
      num_slc=num_slc, interpret=interpret)
  scores = head_scores[:, :, :group].sum(2)  # [B, Hkv, num_slc]: the group sum
  block_indices = top_n(scores, position, config)
  o_slc, o_swa = kernels.sparse_decode(q_rows, cache.k, cache.v, block_indices, position,
                                       block=config.slc_block, window=config.window,
                                       scale=scale, interpret=interpret)
  ungroup = lambda o: o[:, :, :group].reshape(b, 1, hq, -1)  # [B, 1, Hq, Dv] for combine
  gates = None if gates is None else gates[:, None]
  out = combine_branches(ungroup(o_cmp), ungroup(o_slc), ungroup(o_swa), gates)
  return out[:, 0].astype(q_t.dtype)

"""Selection-branch index arithmetic shared by the memory-efficient paths and the kernels.

The oracle (`nsa_jax.reference`) writes the same rules with dense matrices; these versions are
O(Tc) per query and are what the XLA path and the Pallas wrappers use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.config import NSAConfig


def slc_scores_from_cmp_probs(p_grp, config: NSAConfig, num_slc: int):
  """SPEC.md selection step 3 without the `[Tc, Ts]` overlap matrix.

  With `l % d == 0` and `l' % d == 0`, overlaps are whole stride-`d` sub-blocks: compressed block
  `i` covers sub-blocks `[i, i + l/d)` and selection block `j` covers `[j*l'/d, (j+1)*l'/d)`, so
  `score[j] = sum over sub-blocks u of j of sum_{i = u - l/d + 1}^{u} p_grp[i]`.

  Args:
    p_grp: float32 `[..., Tc]`, group-summed compressed probabilities.
    config: the NSA config.
    num_slc: `Ts = ceil(T / l')`.

  Returns:
    float32 `[..., Ts]`.
  """
  per_cmp = config.cmp_block // config.cmp_stride  # sub-blocks per compressed block
  per_slc = config.slc_block // config.cmp_stride  # sub-blocks per selection block
  num_sub = num_slc * per_slc  # >= Tc + per_cmp - 1, since (Tc - 1) * d + l <= T
  num_cmp = p_grp.shape[-1]
  # padded[x] = p_grp[x - (per_cmp - 1)], zero outside [0, Tc).
  pad = [(0, 0)] * (p_grp.ndim - 1) + [(per_cmp - 1, num_sub - num_cmp)]
  padded = jnp.pad(p_grp, pad)
  per_sub = sum(padded[..., r:r + num_sub] for r in range(per_cmp))  # [..., num_sub]
  return per_sub.reshape(*p_grp.shape[:-1], num_slc, per_slc).sum(-1)


def top_n_blocks(score, query_pos, config: NSAConfig):
  """SPEC.md selection steps 4-5: forced blocks, then the best candidates.

  Args:
    score: float32 `[..., Ts]` (non-negative), the selection scores of each query.
    query_pos: int `[...]` query positions, broadcastable against `score[..., 0]`.
    config: the NSA config.

  Returns:
    int32 `[..., n]`: ascending block numbers, unused places -1 at the end.
  """
  num_slc, n = score.shape[-1], config.num_selected
  block = jnp.arange(num_slc)
  query_block = (query_pos // config.slc_block)[..., None]
  candidate = block <= query_block
  forced = candidate & ((block < config.num_initial) | (block > query_block - config.num_local))
  # Forced blocks outrank every score; non-candidates rank below all. top_k breaks ties towards
  # the lower index, which is SPEC.md's rule.
  key = jnp.where(forced, jnp.inf, jnp.where(candidate, score, -jnp.inf))
  if num_slc < n:
    key = jnp.pad(key, [(0, 0)] * (key.ndim - 1) + [(0, n - num_slc)], constant_values=-jnp.inf)
  top_key, top_block = jax.lax.top_k(key, n)
  top_block = jnp.where(top_key > -jnp.inf, top_block, num_slc)
  ascending = jnp.sort(top_block, axis=-1)
  return jnp.where(ascending < num_slc, ascending, -1).astype(jnp.int32)


def canonical_block_indices(block_indices, num_slc: int):
  """Maps indices that select nothing to -1: out of `[0, Ts)`, or repeating an earlier slot.

  SPEC.md treats the indices as a set of blocks; kernels that loop over slots must not count a
  repeated block twice. `block_indices int [..., n]` -> int32 `[..., n]` (order kept).
  """
  idx = block_indices.astype(jnp.int32)
  idx = jnp.where((idx >= 0) & (idx < num_slc), idx, -1)
  n = idx.shape[-1]
  earlier = jnp.arange(n)[:, None] > jnp.arange(n)[None, :]  # [slot, other]: other < slot
  repeated = jnp.any((idx[..., :, None] == idx[..., None, :]) & earlier, axis=-1)
  return jnp.where(repeated, -1, idx)


def num_cmp_visible(position, config: NSAConfig):
  """Compressed blocks query `position` sees (those complete at it); works on traced positions."""
  made = (position + 1 - config.cmp_block) // config.cmp_stride + 1
  return jnp.maximum(made, 0)


def decode_selection(p_grp, position, config: NSAConfig, num_slc: int):
  """Block indices `int32 [..., n]` from group-summed compressed probabilities `p_grp [..., Sc]`."""
  score = slc_scores_from_cmp_probs(p_grp, config, num_slc)  # [..., num_slc]
  return top_n_blocks(score, position, config)

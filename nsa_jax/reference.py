"""The oracle: SPEC.md written with dense `[T, T]` / `[T, Tc]` masks, O(T^2) time and memory.

Kept as plain as possible so that it can be read against SPEC.md line by line; every other
implementation is tested against it. Arguments are assumed validated by `nsa_jax.ops`.
Layout inside: queries as `[B, Hkv, G, T, D]` so the heads of a KV group share one mask.

Packed rows (`segment_ids`, SPEC.md): the masks take `starts [B, T]`, the first position of each
query's document, and count every block from it; `starts=None` is one document per row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax.attention_math import accum_dtype, attention_scores, combine_branches
from nsa_jax.attention_math import masked_attention
from nsa_jax.attention_math import masked_softmax
from nsa_jax.config import NSAConfig, num_cmp_blocks
from nsa_jax.segments import document_local_slots, document_starts_or_none, pool_documents


def _group_queries(q, num_kv_heads):
  """`[B, T, Hq, D]` -> `[B, Hkv, G, T, D]`."""
  b, t, hq, d = q.shape
  return q.reshape(b, t, num_kv_heads, hq // num_kv_heads, d).transpose(0, 2, 3, 1, 4)


def _ungroup(x):
  """`[B, Hkv, G, T, ...]` -> `[B, T, Hq, ...]`."""
  b, hkv, g, t = x.shape[:4]
  x = jnp.moveaxis(x, 3, 1)  # [B, T, Hkv, G, ...]
  return x.reshape(b, t, hkv * g, *x.shape[4:])


def _heads_first(k):
  """`[B, T, Hkv, D]` -> `[B, Hkv, 1, T, D]`, broadcasting over the G heads of a group."""
  return k.transpose(0, 2, 1, 3)[:, :, None]


def _attend(q, k, v, mask, scale):
  """Grouped attention with `mask` broadcastable to `[B, Hkv, 1, T, S]`; returns `[B, T, Hq, Dv]`."""
  out, lse = masked_attention(_group_queries(q, k.shape[2]), _heads_first(k), _heads_first(v),
                              mask, scale)
  return _ungroup(out), _ungroup(lse)


def compress_kv(k, v, block, stride, segment_ids=None):
  """Mean of each compressed block `[i*d, i*d + l)`: `[B, T, Hkv, D]` -> `[B, Tc, Hkv, D]`.

  Packed: block `i` of the document starting at `s` pools `[s + i*d, s + i*d + l)` into slot
  `s // d + i`; slots without a block are zero (SPEC.md)."""
  num_blocks = num_cmp_blocks(k.shape[1], block, stride)
  if segment_ids is None:
    tokens = jnp.arange(num_blocks)[:, None] * stride + jnp.arange(block)[None, :]  # [Tc, l]
    pool = lambda x: jnp.mean(x[:, tokens].astype(accum_dtype(x)), axis=2).astype(x.dtype)
    return pool(k), pool(v)
  return (pool_documents(k, block, stride, segment_ids),
          pool_documents(v, block, stride, segment_ids))


def _query_starts(starts, seq_len):
  """`[B or 1, T]` document starts of the queries (zeros: one document per row)."""
  return jnp.zeros((1, seq_len), jnp.int32) if starts is None else starts


def _cmp_visible(seq_len, num_blocks, block, stride, starts=None):
  """`[T, Tc]` (`starts=None`) or `[B, T, Tc]`: query `t` of the document starting at `s` sees
  slot `c` iff `c >= s // d` and `(c - s//d)*d + l - 1 <= t - s`."""
  if starts is None:
    last_token = jnp.arange(num_blocks) * stride + block - 1
    return last_token[None, :] <= jnp.arange(seq_len)[:, None]
  first_slot = (starts // stride)[..., None]  # [B, T, 1]
  local_block = jnp.arange(num_blocks) - first_slot  # [B, T, Tc]
  local_query = (jnp.arange(seq_len) - starts)[..., None]
  return (local_block >= 0) & (local_block * stride + block - 1 <= local_query)


def _per_row(mask):
  """A `[B, T, S]` mask as `[B, 1, 1, T, S]` (broadcast over KV heads and group heads)."""
  return mask[:, None, None]


def _compressed(q, k_cmp, v_cmp, scale, block, stride, starts=None):
  """`(out [B, T, Hq, Dv], lse [B, T, Hq])`, both in `accum_dtype` (float32 unless float64)."""
  visible = _cmp_visible(q.shape[1], k_cmp.shape[1], block, stride, starts)
  return _attend(q, k_cmp, v_cmp, visible if starts is None else _per_row(visible), scale)


@functools.partial(jax.jit, static_argnames=("block", "stride"))
def compressed_attention(q, k_cmp, v_cmp, scale, *, block, stride, segment_ids=None):
  """Returns `(out [B, T, Hq, Dv] in q.dtype, lse [B, T, Hq] float32)`."""
  starts = document_starts_or_none(segment_ids)
  out, lse = _compressed(q, k_cmp, v_cmp, scale, block, stride, starts)
  return out.astype(q.dtype), lse


def _overlap_matrix(num_cmp, num_slc, block, stride, slc_block):
  """`[Tc, Ts]`: `|[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d` (SPEC.md, selection step 3)."""
  cmp_start = jnp.arange(num_cmp)[:, None] * stride
  slc_start = jnp.arange(num_slc)[None, :] * slc_block
  overlap = (jnp.minimum(cmp_start + block, slc_start + slc_block)
             - jnp.maximum(cmp_start, slc_start))
  return jnp.maximum(overlap, 0) // stride  # exact: both intervals start and end on multiples of d


def selection_scores(q, k_cmp, scale, config: NSAConfig, starts=None):
  """`score [B, T, Hkv, Ts]` in `accum_dtype` (SPEC.md, selection steps 1-3); packed, over the
  document-local selection blocks of each query's document."""
  seq_len, num_kv_heads = q.shape[1], k_cmp.shape[2]
  num_cmp, num_slc = k_cmp.shape[1], config.num_slc_blocks(seq_len)
  visible = _cmp_visible(seq_len, num_cmp, config.cmp_block, config.cmp_stride, starts)
  scores = attention_scores(_group_queries(q, num_kv_heads), _heads_first(k_cmp), scale)
  p_cmp, _ = masked_softmax(scores, visible if starts is None else _per_row(visible))
  p_grp = jnp.sum(p_cmp, axis=2)  # [B, Hkv, T, Tc]
  if starts is not None:  # slot s//d + i -> the document's block i
    p_grp = document_local_slots(p_grp, (starts // config.cmp_stride)[:, None])
  overlap = _overlap_matrix(num_cmp, num_slc, config.cmp_block, config.cmp_stride,
                            config.slc_block)
  score = jnp.einsum("bhti,ij->bhtj", p_grp, overlap.astype(p_grp.dtype),
                     precision=jax.lax.Precision.HIGHEST)
  return score.transpose(0, 2, 1, 3)


def _select_blocks(q, k_cmp, scale, config: NSAConfig, starts=None):
  seq_len, n = q.shape[1], config.num_selected
  num_slc = config.num_slc_blocks(seq_len)
  score = jax.lax.stop_gradient(selection_scores(q, k_cmp, scale, config, starts))

  block = jnp.arange(num_slc)
  # The query's block, counted from its document's start: [B or 1, T, 1].
  query_block = ((jnp.arange(seq_len) - _query_starts(starts, seq_len)) // config.slc_block)
  query_block = query_block[..., None]
  candidate = block <= query_block  # [B or 1, T, Ts]
  forced = candidate & ((block < config.num_initial) | (block > query_block - config.num_local))
  open_candidate = (candidate & ~forced)[:, :, None, :]  # [B or 1, T, 1, Ts]
  # Rank the non-forced candidates by score, ties to the lower index (stable sort).
  order = jnp.argsort(jnp.where(open_candidate, -score, jnp.inf), axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)  # rank[j]: position of block j in that order
  places_left = n - jnp.sum(forced, axis=-1)[..., None, None]  # [B or 1, T, 1, 1]
  chosen = forced[:, :, None, :] | (open_candidate & (rank < places_left))  # [B, T, Hkv, Ts]

  # Chosen block numbers in ascending order, unused places -1.
  ascending = jnp.sort(jnp.where(chosen, block, num_slc), axis=-1)
  if num_slc < n:
    pad = jnp.full(ascending.shape[:-1] + (n - num_slc,), num_slc, ascending.dtype)
    ascending = jnp.concatenate([ascending, pad], axis=-1)
  ascending = ascending[..., :n]
  return jnp.where(ascending < num_slc, ascending, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config",))
def select_blocks(q, k_cmp, scale, *, config: NSAConfig, segment_ids=None):
  """`int32 [B, T, Hkv, n]`: forced blocks plus the top-scoring candidates, ascending, `-1`
  padded; packed, document-local block numbers."""
  return _select_blocks(q, k_cmp, scale, config, document_starts_or_none(segment_ids))


def compressed_attention_and_selection(q, k_cmp, v_cmp, scale, *, config: NSAConfig,
                                       segment_ids=None):
  """`(compressed_attention(...)[0], select_blocks(...))`: the oracle computes them apart."""
  out, _ = compressed_attention(q, k_cmp, v_cmp, scale, block=config.cmp_block,
                                stride=config.cmp_stride, segment_ids=segment_ids)
  return out, select_blocks(q, k_cmp, scale, config=config, segment_ids=segment_ids)


def _selected(q, k, v, block_indices, scale, block, starts=None):
  """Each query attends the tokens `u <= t` of its group's chosen blocks (packed: blocks of its
  document, counted from its start); `[B, T, Hq, Dv]`."""
  seq_len = q.shape[1]
  num_slc = -(-seq_len // block)
  # chosen[b, t, g, j]: block j is among the (valid) indices; -1 and j >= Ts match nothing.
  chosen = jnp.any(block_indices[..., None] == jnp.arange(num_slc), axis=-2)  # [B, T, Hkv, Ts]
  causal = jnp.arange(seq_len)[None, :] <= jnp.arange(seq_len)[:, None]  # [T, S]
  if starts is None:
    token_block = jnp.arange(seq_len) // block
    mask = chosen[..., token_block] & causal[None, :, None, :]  # [B, T, Hkv, S]
  else:  # key u is in block (u - s) // l' of query t's document when u >= s
    local_key = jnp.arange(seq_len) - starts[..., None]  # [B, T, S]
    token_block = jnp.clip(local_key // block, 0, num_slc - 1)
    in_chosen = jnp.take_along_axis(chosen, token_block[:, :, None, :], axis=-1)
    mask = in_chosen & ((local_key >= 0) & causal)[:, :, None, :]  # [B, T, Hkv, S]
  mask = mask.transpose(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, T, S]
  return _attend(q, k, v, mask, scale)[0]


def _window(q, k, v, scale, window, starts=None):
  """Query `t` attends `t - w < u <= t` (packed: and `u >= s`); `[B, T, Hq, Dv]` in
  `accum_dtype`."""
  t = jnp.arange(q.shape[1])
  mask = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
  if starts is not None:
    mask = _per_row(mask & (t >= starts[..., None]))
  return _attend(q, k, v, mask, scale)[0]


@functools.partial(jax.jit, static_argnames=("block",))
def selected_attention(q, k, v, block_indices, scale, *, block, segment_ids=None):
  starts = document_starts_or_none(segment_ids)
  return _selected(q, k, v, block_indices, scale, block, starts).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("window",))
def sliding_window_attention(q, k, v, scale, *, window, segment_ids=None):
  return _window(q, k, v, scale, window, document_starts_or_none(segment_ids)).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("config",))
def nsa_attention(q, k, v, gates, k_cmp, v_cmp, scale, *, config: NSAConfig, segment_ids=None):
  """The three branches mixed per head (SPEC.md); `[B, T, Hq, Dv]` in q.dtype."""
  starts = document_starts_or_none(segment_ids)
  o_cmp, _ = _compressed(q, k_cmp, v_cmp, scale, config.cmp_block, config.cmp_stride, starts)
  block_indices = _select_blocks(q, k_cmp, scale, config, starts)
  o_slc = _selected(q, k, v, block_indices, scale, config.slc_block, starts)
  o_swa = _window(q, k, v, scale, config.window, starts)
  return combine_branches(o_cmp, o_slc, o_swa, gates).astype(q.dtype)

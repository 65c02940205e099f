"""Memory-efficient NSA in pure JAX: the default on CPU and the fallback on every backend.

Every branch is written as a function of one query chunk of one KV head group, `q_chunk [C, G, Dk]`
(the G query heads of a group share keys and selected blocks), vmapped over batch and KV heads and
mapped over chunks with `lax.map`. Each chunk body is rematerialised (`jax.checkpoint`), so the
backward pass also holds one chunk's intermediates at a time: peak memory is O(T * (n*l' + w + Tc))
per chunk of C queries instead of O(T^2). Arguments are assumed validated by `nsa_jax.ops`.

Packed rows (`segment_ids`, SPEC.md): each chunk also takes its queries' document starts `[C]`
(keyword `doc_start`) and counts blocks, the selection and the window from them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax.attention_math import accum_dtype, combine_branches, masked_attention
from nsa_jax.attention_math import attention_scores
from nsa_jax.attention_math import masked_softmax
from nsa_jax.block_selection import canonical_block_indices, slc_scores_from_cmp_probs
from nsa_jax.block_selection import decode_selection, num_cmp_visible, top_n_blocks
from nsa_jax.config import NSAConfig, num_cmp_blocks
from nsa_jax.segments import document_local_slots, document_starts_or_none, pool_documents

# Queries per chunk: large enough to keep the matmuls efficient, small enough that one chunk's
# gathered selected keys ([C, n*l', D], 32 MiB in float32 at the paper config, D=128) stay modest.
QUERY_CHUNK = 128


def _chunk_size(seq_len: int, query_chunk: int) -> int:
  return min(query_chunk, seq_len)


def _chunk_queries(q, num_kv_heads, chunk):
  """`[B, T, Hq, D]` -> `[B, Hkv, NC, C, G, D]`, T zero-padded to `NC * C`."""
  b, t, hq, d = q.shape
  num_chunks = -(-t // chunk)
  q = jnp.pad(q, [(0, 0), (0, num_chunks * chunk - t), (0, 0), (0, 0)])
  q = q.reshape(b, num_chunks, chunk, num_kv_heads, hq // num_kv_heads, d)
  return q.transpose(0, 3, 1, 2, 4, 5)


def _unchunk(x, seq_len):
  """`[B, Hkv, NC, C, G, ...]` -> `[B, T, Hq, ...]`."""
  b, hkv, nc, c, g = x.shape[:5]
  x = jnp.moveaxis(x, 1, 3)  # [B, NC, C, Hkv, G, ...]
  return x.reshape(b, nc * c, hkv * g, *x.shape[5:])[:, :seq_len]


def _chunk_rows(x, chunk):
  """Per-query data `[B, T, Hkv, ...]` -> `[B, Hkv, NC, C, ...]`, T padded to `NC * C`."""
  b, t, hkv = x.shape[:3]
  num_chunks = -(-t // chunk)
  x = jnp.pad(x, [(0, 0), (0, num_chunks * chunk - t)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(b, num_chunks, chunk, hkv, *x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def _heads_first(x):
  """`[B, S, Hkv, D]` -> `[B, Hkv, S, D]`."""
  return x.transpose(0, 2, 1, 3)


def _map_query_chunks(chunk_fn, q_chunks, per_chunk=(), per_group=()):
  """Runs `chunk_fn(chunk_index, q_chunk, *per_chunk_c, *per_group_g)` over all (b, g, chunk).

  Args:
    chunk_fn: a function of one chunk of one KV group; returns a pytree of arrays.
    q_chunks: `[B, Hkv, NC, C, G, Dk]`.
    per_chunk: arrays `[B, Hkv, NC, ...]` sliced per chunk.
    per_group: arrays `[B, Hkv, ...]` shared by all chunks of a group (keys, values).

  Returns:
    `chunk_fn`'s outputs stacked as `[B, Hkv, NC, ...]`.
  """
  num_chunks = q_chunks.shape[2]
  # Every chunk adds to the gradient of the shared keys and values: hold them in float32 so that
  # the sum over chunks is not rounded to bfloat16 / float16 per chunk. The values do not change
  # (the chunk math upcasts anyway) and the cost is one float32 copy of K/V, O(T).
  per_group = tuple(x.astype(accum_dtype(x)) for x in per_group)

  def one_group(q_group, chunk_args, group_args):
    @jax.checkpoint
    def body(xs):
      chunk_index, q_chunk, chunk_vals = xs
      return chunk_fn(chunk_index, q_chunk, *chunk_vals, *group_args)
    return jax.lax.map(body, (jnp.arange(num_chunks), q_group, chunk_args))

  return jax.vmap(jax.vmap(one_group))(q_chunks, tuple(per_chunk), tuple(per_group))


def _map_chunks(chunk_fn, q_chunks, starts, per_chunk=(), per_group=()):
  """`_map_query_chunks`, giving `chunk_fn` its queries' document starts as the keyword
  `doc_start [C]` when `starts [B, T]` is not None (packed rows)."""
  if starts is None:
    return _map_query_chunks(chunk_fn, q_chunks, per_chunk, per_group)
  b, num_kv_heads, num_chunks, chunk = q_chunks.shape[:4]
  starts = jnp.broadcast_to(starts[:, :, None], (b, starts.shape[1], num_kv_heads))
  with_starts = lambda chunk_index, q_chunk, doc_start, *rest: chunk_fn(
      chunk_index, q_chunk, *rest, doc_start=doc_start)
  return _map_query_chunks(with_starts, q_chunks, (_chunk_rows(starts, chunk),) + tuple(per_chunk),
                           per_group)


# ---------------------------------------------------------------------------------------------
# Compression branch (and the selection scores that reuse its probabilities)


def compress_kv(k, v, block, stride, segment_ids=None):
  """Mean pooling through stride-`d` sub-block sums: O(T) memory. `[B, T, Hkv, D]` ->
  `[B, Tc, ...]`. Packed rows: each document's blocks in its slots (`segments.pool_documents`)."""
  if segment_ids is not None:
    return (pool_documents(k, block, stride, segment_ids),
            pool_documents(v, block, stride, segment_ids))
  num_blocks = num_cmp_blocks(k.shape[1], block, stride)
  per_block = block // stride

  def pool(x):
    if num_blocks == 0:
      return jnp.zeros((x.shape[0], 0) + x.shape[2:], x.dtype)
    num_sub = num_blocks + per_block - 1  # sub-blocks touched by the compressed blocks
    sub_sums = x[:, :num_sub * stride].astype(accum_dtype(x))
    sub_sums = sub_sums.reshape(x.shape[0], num_sub, stride, *x.shape[2:]).sum(2)
    total = sum(sub_sums[:, r:r + num_blocks] for r in range(per_block))
    return (total / block).astype(x.dtype)

  return pool(k), pool(v)


def _cmp_probs(chunk_index, q_chunk, k_cmp, scale, block, stride, doc_start=None):
  """Probabilities of one chunk over the compressed blocks: `([C, G, Tc], lse [C, G])`."""
  chunk = q_chunk.shape[0]
  query_pos = chunk_index * chunk + jnp.arange(chunk)  # [C]
  if doc_start is None:
    last_token = jnp.arange(k_cmp.shape[0]) * stride + block - 1  # [Tc]
    visible = last_token[None, :] <= query_pos[:, None]  # [C, Tc]
  else:  # slot c holds block c - s//d of the query's document
    local_block = jnp.arange(k_cmp.shape[0]) - (doc_start // stride)[:, None]
    visible = (local_block >= 0) & (local_block * stride + block - 1
                                    <= (query_pos - doc_start)[:, None])
  return masked_softmax(attention_scores(q_chunk, k_cmp, scale), visible[:, None, :])


def _chunk_block_indices(chunk_index, probs, config, num_slc, doc_start=None):
  """Block indices `[C, n]` from one chunk's compressed probabilities `probs [C, G, Tc]`
  (packed: document-local blocks)."""
  chunk = probs.shape[0]
  p_grp = probs.sum(axis=1)  # group sum -> [C, Tc]
  query_pos = chunk_index * chunk + jnp.arange(chunk)
  if doc_start is not None:
    p_grp = document_local_slots(p_grp, doc_start // config.cmp_stride)
    query_pos = query_pos - doc_start
  return top_n_blocks(slc_scores_from_cmp_probs(p_grp, config, num_slc), query_pos, config)


def _selection_chunk(chunk_index, q_chunk, k_cmp, scale, config, num_slc, doc_start=None):
  probs, _ = _cmp_probs(chunk_index, q_chunk, k_cmp, scale, config.cmp_block, config.cmp_stride,
                        doc_start)
  return _chunk_block_indices(chunk_index, jax.lax.stop_gradient(probs), config, num_slc,
                              doc_start)


def _compressed_chunk(chunk_index, q_chunk, k_cmp, v_cmp, scale, block, stride, select, num_slc,
                      doc_start=None):
  """`(out [C, G, Dv], lse [C, G])`, plus the block indices `[C, n]` when `select` is a config."""
  probs, lse = _cmp_probs(chunk_index, q_chunk, k_cmp, scale, block, stride, doc_start)
  out = jnp.einsum("cgi,id->cgd", probs, v_cmp.astype(probs.dtype),
                   precision=jax.lax.Precision.HIGHEST)
  if select is None:
    return out, lse
  # The fusion: selection reuses these probabilities instead of recomputing q . k_cmp.
  return out, lse, _chunk_block_indices(chunk_index, jax.lax.stop_gradient(probs), select,
                                        num_slc, doc_start)


def _empty_selection(b, t, num_kv_heads, config, starts=None):
  """T < l: every score is 0, so the forced blocks and then the lowest candidates are chosen."""
  score = jnp.zeros((b, t, num_kv_heads, config.num_slc_blocks(t)))
  query_pos = jnp.arange(t) if starts is None else jnp.arange(t) - starts
  return top_n_blocks(score, query_pos[..., None], config)


def _unchunk_indices(idx, t):
  """`[B, Hkv, NC, C, n]` -> `[B, T, Hkv, n]`."""
  b, hkv, nc, c, n = idx.shape
  return jnp.moveaxis(idx, 1, 3).reshape(b, nc * c, hkv, n)[:, :t]


def _compressed(q, k_cmp, v_cmp, scale, block, stride, query_chunk, select=None, starts=None):
  """`(out [B, T, Hq, Dv], lse [B, T, Hq])` in `accum_dtype`, and `block_indices` if `select`."""
  b, t, hq, _ = q.shape
  num_kv_heads = k_cmp.shape[2]
  if k_cmp.shape[1] == 0:  # T < l: no query sees a block
    dtype = accum_dtype(q, k_cmp, v_cmp)
    out = jnp.zeros((b, t, hq, v_cmp.shape[-1]), dtype)
    lse = jnp.full((b, t, hq), -jnp.inf, dtype)
    return (out, lse) if select is None else (
        out, lse, _empty_selection(b, t, num_kv_heads, select, starts))
  chunk = _chunk_size(t, query_chunk)
  num_slc = None if select is None else select.num_slc_blocks(t)
  fn = functools.partial(_compressed_chunk, scale=scale, block=block, stride=stride,
                         select=select, num_slc=num_slc)
  results = _map_chunks(fn, _chunk_queries(q, num_kv_heads, chunk), starts,
                        per_group=(_heads_first(k_cmp), _heads_first(v_cmp)))
  out, lse = _unchunk(results[0], t), _unchunk(results[1], t)
  return (out, lse) if select is None else (out, lse, _unchunk_indices(results[2], t))


@functools.partial(jax.jit, static_argnames=("config", "query_chunk"))
def compressed_attention_and_selection(q, k_cmp, v_cmp, scale, config: NSAConfig,
                                       query_chunk=QUERY_CHUNK, segment_ids=None):
  """The fused compressed branch: `(o_cmp [B, T, Hq, Dv] in accum dtype, block_indices)`."""
  starts = document_starts_or_none(segment_ids)
  out, _, block_indices = _compressed(q, k_cmp, v_cmp, scale, config.cmp_block, config.cmp_stride,
                                      query_chunk, select=config, starts=starts)
  return out, block_indices


@functools.partial(jax.jit, static_argnames=("block", "stride", "query_chunk"))
def compressed_attention(q, k_cmp, v_cmp, scale, *, block, stride, query_chunk=QUERY_CHUNK,
                         segment_ids=None):
  out, lse = _compressed(q, k_cmp, v_cmp, scale, block, stride, query_chunk,
                         starts=document_starts_or_none(segment_ids))
  return out.astype(q.dtype), lse


@functools.partial(jax.jit, static_argnames=("config", "query_chunk"))
def select_blocks(q, k_cmp, scale, *, config: NSAConfig, query_chunk=QUERY_CHUNK,
                  segment_ids=None):
  b, t = q.shape[:2]
  num_kv_heads = k_cmp.shape[2]
  starts = document_starts_or_none(segment_ids)
  if k_cmp.shape[1] == 0:
    return _empty_selection(b, t, num_kv_heads, config, starts)
  chunk = _chunk_size(t, query_chunk)
  fn = functools.partial(_selection_chunk, scale=scale, config=config,
                         num_slc=config.num_slc_blocks(t))
  idx = _map_chunks(fn, _chunk_queries(q, num_kv_heads, chunk), starts,
                    per_group=(_heads_first(k_cmp),))
  return _unchunk_indices(idx, t)


# ---------------------------------------------------------------------------------------------
# Selection branch


def _selected_chunk(chunk_index, q_chunk, idx_chunk, k_padded, v_padded, scale, block,
                    doc_start=None):
  """One chunk `q_chunk [C, G, Dk]` over its gathered blocks `idx_chunk [C, n]` -> `[C, G, Dv]`
  (packed: blocks counted from each query's document start)."""
  chunk = q_chunk.shape[0]
  query_pos = chunk_index * chunk + jnp.arange(chunk)  # [C]
  tokens = idx_chunk[:, :, None] * block + jnp.arange(block)  # [C, n, l']
  if doc_start is not None:
    tokens = tokens + doc_start[:, None, None]
  keep = (idx_chunk[:, :, None] >= 0) & (tokens <= query_pos[:, None, None])
  # Tokens past the query may lie past the padding when blocks start mid-row: gather token 0.
  tokens = jnp.where(idx_chunk[:, :, None] >= 0 if doc_start is None else keep, tokens, 0)
  tokens = tokens.reshape(chunk, -1)  # [C, n*l']
  out, _ = masked_attention(q_chunk, k_padded[tokens], v_padded[tokens],
                            keep.reshape(chunk, 1, -1), scale)
  return out


def _selected(q, k, v, block_indices, scale, block, query_chunk, starts=None):
  b, t = q.shape[:2]
  num_slc = -(-t // block)
  chunk = _chunk_size(t, query_chunk)
  idx = canonical_block_indices(block_indices, num_slc)
  pad = [(0, 0), (0, num_slc * block - t), (0, 0), (0, 0)]  # every selected block is whole
  fn = functools.partial(_selected_chunk, scale=scale, block=block)
  out = _map_chunks(fn, _chunk_queries(q, k.shape[2], chunk), starts,
                    per_chunk=(_chunk_rows(idx, chunk),),
                    per_group=(_heads_first(jnp.pad(k, pad)), _heads_first(jnp.pad(v, pad))))
  return _unchunk(out, t)


@functools.partial(jax.jit, static_argnames=("block", "query_chunk"))
def selected_attention(q, k, v, block_indices, scale, *, block, query_chunk=QUERY_CHUNK,
                       segment_ids=None):
  return _selected(q, k, v, block_indices, scale, block, query_chunk,
                   document_starts_or_none(segment_ids)).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Sliding-window branch


def _window_chunk(chunk_index, q_chunk, k_padded, v_padded, scale, window, doc_start=None):
  """One chunk over the keys `[c0 - w + 1, c0 + C)` it can see; `k_padded` has `w - 1` zeros first."""
  chunk, heads = q_chunk.shape[:2]
  span = chunk + window - 1
  start = chunk_index * chunk  # in padded coordinates: absolute position start - (w - 1)
  k_span = jax.lax.dynamic_slice_in_dim(k_padded, start, span)
  v_span = jax.lax.dynamic_slice_in_dim(v_padded, start, span)
  key_pos = start - (window - 1) + jnp.arange(span)  # [S]
  query_pos = start + jnp.arange(chunk)  # [C]
  keep = ((key_pos[None, :] >= 0) & (key_pos[None, :] <= query_pos[:, None])
          & (key_pos[None, :] > query_pos[:, None] - window))  # [C, S]
  if doc_start is not None:
    keep = keep & (key_pos[None, :] >= doc_start[:, None])
  q_rows = q_chunk.reshape(chunk * heads, -1)  # the whole chunk shares one key span
  out, _ = masked_attention(q_rows, k_span, v_span, jnp.repeat(keep, heads, axis=0), scale)
  return out.reshape(chunk, heads, -1)


def _window(q, k, v, scale, window, query_chunk, starts=None):
  b, t = q.shape[:2]
  window = min(window, t)  # a longer window sees the same keys
  chunk = _chunk_size(t, query_chunk)
  num_chunks = -(-t // chunk)
  pad = [(0, 0), (window - 1, num_chunks * chunk - t), (0, 0), (0, 0)]
  fn = functools.partial(_window_chunk, scale=scale, window=window)
  out = _map_chunks(fn, _chunk_queries(q, k.shape[2], chunk), starts,
                    per_group=(_heads_first(jnp.pad(k, pad)), _heads_first(jnp.pad(v, pad))))
  return _unchunk(out, t)


@functools.partial(jax.jit, static_argnames=("window", "query_chunk"))
def sliding_window_attention(q, k, v, scale, *, window, query_chunk=QUERY_CHUNK,
                             segment_ids=None):
  starts = document_starts_or_none(segment_ids)
  return _window(q, k, v, scale, window, query_chunk, starts).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# All three


@functools.partial(jax.jit, static_argnames=("config", "query_chunk"))
def nsa_attention(q, k, v, gates, k_cmp, v_cmp, scale, *, config: NSAConfig,
                  query_chunk=QUERY_CHUNK, segment_ids=None):
  starts = document_starts_or_none(segment_ids)
  o_cmp, _, block_indices = _compressed(q, k_cmp, v_cmp, scale, config.cmp_block,
                                        config.cmp_stride, query_chunk, select=config,
                                        starts=starts)
  o_slc = _selected(q, k, v, block_indices, scale, config.slc_block, query_chunk, starts)
  o_swa = _window(q, k, v, scale, config.window, query_chunk, starts)
  return combine_branches(o_cmp, o_slc, o_swa, gates).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Decoding: one query per sequence over a `nsa_jax.decode.DecodeCache`, the G heads of a KV group
# together.


def _decode_compressed(q, k_cmp, v_cmp, position, scale, config: NSAConfig, max_len: int,
                       num_slc: int):
  """The compressed branch of the grouped query `q [B, Hkv, G, Dk]` and the blocks its scores
  select: `(o_cmp [B, Hkv, G, Dv], block_indices [B, Hkv, n])`."""
  num_cmp = k_cmp.shape[2]
  visible = (jnp.arange(num_cmp) < num_cmp_visible(position, config))[None, None, None, :]
  probs, _ = masked_softmax(attention_scores(q, k_cmp, scale), visible)
  o_cmp = jnp.einsum("bhgi,bhid->bhgd", probs, v_cmp.astype(probs.dtype),
                     precision=jax.lax.Precision.HIGHEST)
  p_grp = probs.sum(2)[..., :config.num_cmp_blocks(max_len)]  # cut the cache's padding
  return o_cmp, decode_selection(jax.lax.stop_gradient(p_grp), position, config, num_slc)


def _decode_selected(q, k, v, block_indices, position, scale, slc_block: int):
  """Selected blocks: their tokens gathered, the query's own block cut at the query."""
  b, hkv = q.shape[:2]
  tokens = block_indices[..., None] * slc_block + jnp.arange(slc_block)
  keep = (block_indices[..., None] >= 0) & (tokens <= position)  # [B, Hkv, n, l']
  tokens = jnp.where(keep, tokens, 0).reshape(b, hkv, -1)  # [B, Hkv, n*l']
  gather = lambda x: jnp.take_along_axis(x, tokens[..., None], axis=2)
  out, _ = masked_attention(q, gather(k), gather(v), keep.reshape(b, hkv, 1, -1), scale)
  return out


def _decode_window(q, k, v, position, scale, window: int):
  """Sliding window: the last `w` tokens, read as one span that stays inside the cache."""
  size = k.shape[2]
  span = min(window, size)
  start = jnp.clip(position + 1 - span, 0, size - span)
  window_slice = lambda x: jax.lax.dynamic_slice_in_dim(x, start, span, axis=2)
  key_pos = start + jnp.arange(span)
  in_window = (key_pos <= position) & (key_pos > position - window)
  out, _ = masked_attention(q, window_slice(k), window_slice(v), in_window[None, None, None, :],
                            scale)
  return out


def _decode_combine(q_t, branches, gates):
  """`[B, Hq, Dv]` in q_t's dtype from the three grouped branch outputs `[B, Hkv, G, Dv]`."""
  b, hq = q_t.shape[:2]
  ungroup = lambda o: o.reshape(b, hq, -1)[:, None]
  gates = None if gates is None else gates[:, None]  # combine_branches wants [B, T, Hq, 3]
  return combine_branches(*map(ungroup, branches), gates)[:, 0].astype(q_t.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def decode_attention(q_t, cache, position, gates, scale, *, config: NSAConfig,
                     interpret: bool = False):
  """Row `position` of NSA over the cache (which already holds that token): `[B, Hq, Dv]`."""
  del interpret  # the XLA path has no interpret mode
  b, hq, dk = q_t.shape
  hkv, size = cache.k.shape[1], cache.k.shape[2]
  q = q_t.reshape(b, hkv, hq // hkv, dk)  # [B, Hkv, G, Dk]
  o_cmp, block_indices = _decode_compressed(q, cache.k_cmp, cache.v_cmp, position, scale, config,
                                            cache.max_len, size // config.slc_block)
  o_slc = _decode_selected(q, cache.k, cache.v, block_indices, position, scale, config.slc_block)
  o_swa = _decode_window(q, cache.k, cache.v, position, scale, config.window)
  return _decode_combine(q_t, (o_cmp, o_slc, o_swa), gates)


@functools.partial(jax.jit, static_argnames=("config",))
def decode_attention_separate_kv(q_t, cmp_cache, slc_kv, swa_kv, position, gates, scale, *,
                                 config: NSAConfig):
  """`decode_attention` with a K/V set per branch: the compressed cache of `cmp_cache` (a
  `DecodeCache`), the selected blocks from `slc_kv = (k, v)`, the window from `swa_kv`, each
  `[B, Hkv, S, D]` with S a multiple of `slc_block`."""
  b, hq, dk = q_t.shape
  hkv = cmp_cache.k.shape[1]
  q = q_t.reshape(b, hkv, hq // hkv, dk)
  o_cmp, block_indices = _decode_compressed(q, cmp_cache.k_cmp, cmp_cache.v_cmp, position, scale,
                                            config, cmp_cache.max_len,
                                            slc_kv[0].shape[2] // config.slc_block)
  o_slc = _decode_selected(q, *slc_kv, block_indices, position, scale, config.slc_block)
  o_swa = _decode_window(q, *swa_kv, position, scale, config.window)
  return _decode_combine(q_t, (o_cmp, o_slc, o_swa), gates)

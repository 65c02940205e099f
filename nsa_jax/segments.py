"""Packed rows: where each position's document starts and ends (SPEC.md, packed sequences).

A document is a maximal run of equal consecutive `segment_ids [B, T]`; ids may repeat later in
the row (only changes matter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.attention_math import accum_dtype
from nsa_jax.config import num_cmp_blocks


def _boundaries(segment_ids):
  """`bool [B, T]`: a document starts at position t (t = 0 always does)."""
  first = jnp.ones(segment_ids.shape[:1] + (1,), bool)
  return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def document_starts(segment_ids):
  """`int32 [B, T]`: the first position of each position's document."""
  positions = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  return jax.lax.cummax(jnp.where(_boundaries(segment_ids), positions, 0), axis=1)


def document_index(segment_ids):
  """`int32 [B, T]`: each position's document counted from 0 in its row (ids that repeat
  further on become different documents): one id per document, for kernels that mask by equal
  ids (splash attention, cuDNN)."""
  return jnp.cumsum(_boundaries(segment_ids), axis=1, dtype=jnp.int32) - 1


def document_starts_or_none(segment_ids):
  """`document_starts(segment_ids)`, or None for unpacked rows (`segment_ids=None`)."""
  return None if segment_ids is None else document_starts(segment_ids)


def document_ends(segment_ids):
  """`int32 [B, T]`: one past the last position of each position's document."""
  seq_len = segment_ids.shape[1]
  positions = jnp.arange(seq_len, dtype=jnp.int32)
  starts_next = jnp.concatenate(
      [_boundaries(segment_ids)[:, 1:], jnp.ones(segment_ids.shape[:1] + (1,), bool)], axis=1)
  return jax.lax.cummin(jnp.where(starts_next, positions + 1, seq_len), axis=1, reverse=True)


def document_positions(segment_ids):
  """`int32 [B, T]`: each position counted from its document's start (RoPE's positions)."""
  return jnp.arange(segment_ids.shape[1], dtype=jnp.int32) - document_starts(segment_ids)


def document_blocks(segment_ids, block: int, stride: int):
  """The compressed blocks of a packed row by slot (SPEC.md): `(tokens int32 [B, Tc, l], exists
  bool [B, Tc])`. Block `i` of the document starting at `s` sits in slot `s // d + i` and holds
  tokens `[s + i*d, s + i*d + l)`; `exists` is False for slots without a block (their tokens
  are clipped into the row and meaningless)."""
  seq_len = segment_ids.shape[1]
  num_blocks = num_cmp_blocks(seq_len, block, stride)
  # Slot c belongs to the document holding token c*d + d - 1 (or the last token), if any.
  owner = jnp.minimum(jnp.arange(num_blocks) * stride + stride - 1, seq_len - 1)  # [Tc]
  start = document_starts(segment_ids)[:, owner]  # [B, Tc]
  first = start + (jnp.arange(num_blocks) - start // stride) * stride  # the block's first token
  exists = (first >= start) & (first + block <= document_ends(segment_ids)[:, owner])
  tokens = jnp.clip(first[..., None] + jnp.arange(block), 0, seq_len - 1)
  return tokens.astype(jnp.int32), exists


def gather_blocks(x, tokens):
  """`x [B, T, ...]` at `tokens int [B, Tc, l]` -> `[B, Tc, l, ...]`."""
  return jax.vmap(lambda x_b, tokens_b: x_b[tokens_b])(x, tokens)


def pool_documents(x, block: int, stride: int, segment_ids):
  """Mean pooling of a packed row: `[B, T, Hkv, D]` -> `[B, Tc, Hkv, D]`, each document's blocks
  in its slots, slots without a block zero; O(T * l / d) memory (one gather per slot)."""
  tokens, exists = document_blocks(segment_ids, block, stride)
  mean = jnp.mean(gather_blocks(x, tokens).astype(accum_dtype(x)), axis=2)
  return jnp.where(exists[..., None, None], mean, 0).astype(x.dtype)


def document_local_slots(p, first_slot):
  """`p [..., Tc]` over compressed slots -> over the document's own blocks: entry `i` is
  `p[first_slot + i]` (0 past the last slot); `first_slot` is `s // d`, broadcastable to
  `p[..., 0]`."""
  num_slots = p.shape[-1]
  slot = first_slot[..., None] + jnp.arange(num_slots)
  local = jnp.take_along_axis(p, jnp.minimum(slot, num_slots - 1), axis=-1)
  return jnp.where(slot < num_slots, local, 0)

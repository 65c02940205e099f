"""Packed rows: where each position's document starts and ends (SPEC.md, packed sequences).

A document is a maximal run of equal consecutive `segment_ids [B, T]`; ids may repeat later in
the row (only changes matter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _boundaries(segment_ids):
  """`bool [B, T]`: a document starts at position t (t = 0 always does)."""
  first = jnp.ones(segment_ids.shape[:1] + (1,), bool)
  return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def document_starts(segment_ids):
  """`int32 [B, T]`: the first position of each position's document."""
  positions = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  return jax.lax.cummax(jnp.where(_boundaries(segment_ids), positions, 0), axis=1)


def document_ends(segment_ids):
  """`int32 [B, T]`: one past the last position of each position's document."""
  seq_len = segment_ids.shape[1]
  positions = jnp.arange(seq_len, dtype=jnp.int32)
  starts_next = jnp.concatenate(
      [_boundaries(segment_ids)[:, 1:], jnp.ones(segment_ids.shape[:1] + (1,), bool)], axis=1)
  return jax.lax.cummin(jnp.where(starts_next, positions + 1, seq_len), axis=1, reverse=True)

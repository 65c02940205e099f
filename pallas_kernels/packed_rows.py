"""Packed rows (SPEC.md: documents in one row) on the unpacked block-sparse kernels, GPU and TPU.

A document's selection block `j` holds tokens `[s + j*l', s + (j+1)*l')` (`s`: its start). It is
a whole block of the row only where `s` is a multiple of `l'`; else it straddles two aligned
blocks, which the kernels can walk as halves (`block_maps.document_block_halves`: up to twice
the blocks). `route` picks, at run time, one of three ways for a row:
- every document starts on a multiple of `l'`: document blocks are row blocks
  (`document_blocks`), the unpacked kernels as they are;
- else, where `padded_length(T)` (`T` plus `EXTRA`) holds the padding: the row spread so that
  every document starts on a multiple of `l'` (`padded_row`), the unpacked kernels there, the
  output read back (`on_padded_row`; both moves are gathers, each the other's transpose);
- else the caller's halves.
`selection` applies it to document-local block indices. The same holds for spans of keys that
start at a document's first token (the packed window's early positions on the GPU): a
position's first key `first[t]`, past `t` for an empty span.

Plain JAX, computed per call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EXTRA = 1 / 8  # the padded row's positions beyond T, as a share of T


def route(first, block: int, on_whole_blocks, on_padded_row, on_halves, *,
          whole_blocks: bool = True, padded_rows: bool = True):
  """`on_whole_blocks()` where every non-empty span starts on a multiple of `block` (`first
  int32 [B, T]`: each position's first key, its document's start for a selection), else
  `on_padded_row()` where the padded row holds the row, else `on_halves()`: one `lax.switch`,
  decided at run time. `whole_blocks` / `padded_rows` False leave a route out."""
  if not whole_blocks:
    return on_halves()
  position = jnp.arange(first.shape[1], dtype=first.dtype)
  whole = jnp.all((first % block == 0) | (first > position))
  if not padded_rows:
    return jax.lax.cond(whole, on_whole_blocks, on_halves)
  # Each non-empty span must start at a start of its own (`first[first[t]] == first[t]`, as a
  # document's first token does), which the padded row puts on a whole block.
  anchored = (first > position) | (
      jnp.take_along_axis(first, jnp.minimum(first, position), axis=1) == first)
  fits = jnp.all(anchored) & jnp.all(
      padded_row(first, block)[0][:, -1] < padded_length(first.shape[1], block))
  choice = jnp.where(whole, 0, jnp.where(fits, 1, 2))
  return jax.lax.switch(choice, [on_whole_blocks, on_padded_row, on_halves])


def selection(attend, on_halves, q, k, v, block_indices, document_starts, block: int,
              **switches):
  """`route` for document-local `block_indices [B, T, Hkv, n]`: `attend(q, k, v, blocks)` (the
  unpacked kernels) on whole blocks of the row or of the padded row, else `on_halves()`;
  `switches` as `route`'s."""
  return route(
      document_starts, block,
      lambda: attend(q, k, v, document_blocks(block_indices, document_starts, block)),
      lambda: on_padded_row(
          attend, q, k, v, document_starts, block,
          lambda padded, inverse: padded_document_blocks(block_indices, document_starts, block,
                                                         padded, inverse)),
      on_halves, **switches)


def document_blocks(block_indices, document_starts, block: int):
  """Document-local blocks as the row's blocks where every document starts on a block boundary:
  block `j` of a document starting at `s` is then block `s // l' + j` of the row, whole (entries
  `< 0` stay -1; future ones stay future, which the kernels' clean-up drops)."""
  shift = (document_starts // block)[:, :, None, None]
  return jnp.where(block_indices >= 0, block_indices + shift, -1).astype(jnp.int32)


def padded_length(seq_len: int, block: int) -> int:
  """Positions of the padded row (`padded_row`): T plus EXTRA of it, whole blocks."""
  return -(-int(seq_len * (1 + EXTRA)) // block) * block + block


def padded_row(first, block: int):
  """`(padded int32 [B, T], inverse int32 [B, T'])`: each position's place in a row where every
  position that starts its own keys (`first[t] == t`: a document's first token) lies on a
  multiple of `block`, moved on by the padding it and the starts before it needed; `inverse`
  maps the padded row's places back (-1: padding). Places past `T' = padded_length(T)` (a row
  that needs more padding) are dropped."""
  b, t = first.shape
  position = jnp.arange(t, dtype=jnp.int32)
  start = (first == position) & (position > 0)
  last_start = jax.lax.cummax(jnp.where(start, position, 0), axis=1)
  previous = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), last_start[:, :-1]], axis=1)
  # The previous start lies on a multiple of l' already: this one needs its distance's rest.
  padding = jnp.where(start, -(position - previous) % block, 0)
  padded = position + jnp.cumsum(padding, axis=1, dtype=jnp.int32)
  rows = jnp.arange(b, dtype=jnp.int32)[:, None]
  inverse = jnp.full((b, padded_length(t, block)), -1, jnp.int32).at[rows, padded].set(
      position, mode="drop")
  return padded, inverse


def take_rows(x, rows, fill=0):
  """`x[b, rows[b, i]]` for `x [B, N, ...]` and int `rows [B, M]` (-1: `fill`)."""
  index = jnp.maximum(rows, 0).reshape(rows.shape + (1,) * (x.ndim - 2))
  taken = jnp.take_along_axis(x, index, axis=1)
  return jnp.where((rows >= 0).reshape(index.shape), taken, fill)


@jax.custom_vjp
def moved_rows(x, rows, back):
  """`take_rows(x, rows)` where `back` maps the result's rows back (`rows` one-to-one, -1 on
  both sides where nothing moves): its transpose is the gather by `back`, not the scatter-add
  XLA would make of it. Spreads a row to the padded row (`rows = inverse`, zeros at the padding)
  and reads it back (`rows = padded`)."""
  del back
  return take_rows(x, rows)


def _moved_rows_fwd(x, rows, back):
  return moved_rows(x, rows, back), (rows, back)


def _moved_rows_bwd(residuals, d_moved):
  _, back = residuals
  return take_rows(d_moved, back), None, None


moved_rows.defvjp(_moved_rows_fwd, _moved_rows_bwd)


def padded_document_blocks(block_indices, document_starts, block: int, padded, inverse):
  """The padded row's blocks `[B, T', Hkv, n]` for document-local `block_indices [B, T, Hkv,
  n]`: block `j` of a document is block `S' // l' + j` (`S'`: its start in the padded row), -1
  at the padding."""
  start = padded - (jnp.arange(padded.shape[1]) - document_starts)  # S', on a whole block
  moved = jnp.where(block_indices >= 0, block_indices + (start // block)[..., None, None], -1)
  return take_rows(moved, inverse, fill=-1)


def padded_span_starts(first, padded, inverse):
  """Each padded position's first key `[B, T']`: a span's start moves as its position (no
  document starts inside a span), empty spans and the padding stay empty (past the position)."""
  position = jnp.arange(first.shape[1], dtype=jnp.int32)
  moved = jnp.where(first > position, padded + 1, first + padded - position)
  return jnp.where(inverse >= 0, take_rows(moved, inverse),
                   jnp.arange(inverse.shape[1], dtype=jnp.int32) + 1)


def on_padded_row(attend, q, k, v, first, block: int, padded_blocks):
  """`attend(q, k, v, blocks)` (the unpacked kernels) on the row spread so that every position
  that starts its own keys (a document's first token) starts a whole block (`padded_row`),
  read back at each position's place. `padded_blocks(padded, inverse)` gives the padded row's
  blocks (`[B, T', Hkv, n]`, -1 at the padding). The padding's queries choose no block; no
  query reaches a padding key (they follow their document's last token: the causal mask)."""
  padded, inverse = padded_row(first, block)
  spread = lambda x: moved_rows(x, inverse, padded)
  out = attend(spread(q), spread(k), spread(v), padded_blocks(padded, inverse))
  return moved_rows(out, padded, inverse)

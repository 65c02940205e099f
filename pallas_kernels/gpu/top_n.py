"""Top-n block selection on GPU (Pallas, Triton lowering): SPEC.md section 2, steps 4-5.

One program per (query, batch, KV head) row of selection scores: the forced blocks (the first
`num_initial`, the `num_local` most recent) are taken first, non-candidates (blocks after the
query's own, padding) are never chosen, and the rest are taken by repeated arg-max, which breaks
ties towards the lower block index exactly as SPEC.md asks; a program reads only as many columns
as its launch's rows can choose from (`row_buckets`). `lax.top_k` over the same rows in XLA
sorts every row and was the slowest part of the forward pass (45 ms of 91 at T=64k, H200).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import block_maps

_NOT_CANDIDATE = -1.0  # below any score (scores are >= 0)
_TAKEN = -2.0
NUM_WARPS = 1  # one warp per row: the arg-max reductions stay in warp shuffles
DECODE_NUM_WARPS = 4  # decoding has a few rows of ~1k blocks: latency, not throughput


def pick_top_n(scores, query_block, num_picks, *, num_selected, num_slc, num_initial,
                num_local):
  """Forced blocks, then the best candidates by repeated arg-max: int32 `[num_picks]`, -1 padded.

  `scores [width]` are the query's selection scores; its own block is `query_block`
  (`< num_slc`). The forced blocks are known without looking at the scores, so they fill the
  first slots directly (initial blocks ascending, then the local ones from the query's own
  down) and only the remaining `n - forced` slots cost an arg-max pass over the row each (one
  fused value-and-index reduction)."""
  width = scores.shape[0]
  block = jnp.arange(width)
  candidate = (block <= query_block) & (block < num_slc)
  forced = candidate & ((block < num_initial) | (block > query_block - num_local))
  num_forced_initial = jnp.minimum(num_initial, query_block + 1)
  first_local = jnp.maximum(num_initial, query_block - num_local + 1)
  num_forced = num_forced_initial + jnp.maximum(query_block - first_local + 1, 0)
  slots = jnp.arange(num_picks)
  picks = jnp.where(slots < num_forced_initial, slots,
                    jnp.where(slots < num_forced, query_block - (slots - num_forced_initial), -1))
  key = jnp.where(forced, _TAKEN, jnp.where(candidate, scores, _NOT_CANDIDATE))

  def pick(slot, carry):
    key, picks = carry
    # One (value, index) reduction; ties go to the lowest index, as SPEC.md asks. While `slot` is
    # below the number of candidates an untaken one is left, and it beats every non-candidate.
    chosen = jnp.argmax(key).astype(jnp.int32)
    picks = jnp.where(slots == slot, chosen, picks)
    return jnp.where(block == chosen, _TAKEN, key), picks

  num_candidates = jnp.minimum(query_block + 1, num_slc)
  _, picks = jax.lax.fori_loop(num_forced, jnp.minimum(num_selected, num_candidates), pick,
                               (key, picks.astype(jnp.int32)))
  return picks


def _top_n_kernel(score_ref, *refs, slc_block, first_row, **config):
  *tails_ref, idx_ref = refs  # the scores' tail sums, where they come apart
  query_block = (pl.program_id(0) + first_row) // slc_block  # a program per query position
  scores = score_ref[...] + tails_ref[0][...] if tails_ref else score_ref[...]
  idx_ref[...] = pick_top_n(scores, query_block, idx_ref.shape[0], **config)


def _top_n_packed_kernel(query_block_ref, first_column_ref, score_ref, *refs, slc_block, widths,
                         **config):
  """`pick_top_n` for packed rows over the narrowest of `widths` (powers of two, the last the
  whole row) that holds the row's candidates, its document's blocks `<= query_block`: a launch
  cannot bucket rows by width as unpacked rows are (a row's candidates follow its document,
  known at run time), so each program picks its width; a row of a short document reads and
  arg-maxes over a few columns, not the row's whole width. Document block `j` is column
  `first + j` of the scores (plus column `first + j + 1` of the tails), read in place."""
  del slc_block  # the query's (document-local) block comes in
  *tails_ref, idx_ref = refs
  query_block, first = query_block_ref[0], first_column_ref[0]

  def pick(width):
    scores = _columns(score_ref, first, width)
    if tails_ref:
      scores += _columns(tails_ref[0], first + 1, width)
    return pick_top_n(scores, query_block, idx_ref.shape[0], **config)

  if len(widths) == 1:  # the whole row (`PACKED_NARROW_WIDTHS` off)
    idx_ref[...] = pick(widths[0])
    return
  num_candidates = jnp.minimum(query_block + 1, config["num_slc"])
  narrower = sum(((num_candidates > w).astype(jnp.int32) for w in widths[:-1]), jnp.int32(0))
  idx_ref[...] = jax.lax.switch(narrower, [functools.partial(pick, w) for w in widths])


def _columns(ref, first, width):
  """`ref[first : first + width]` of a row, 0 past its end (a masked load: no gather)."""
  inside = first + jnp.arange(width) < ref.shape[0]
  return plgpu.load(ref.at[pl.ds(first, width)], mask=inside, other=0.0)


def _top_n_decode_kernel(pos_ref, score_ref, idx_ref, *, slc_block, **config):
  idx_ref[...] = pick_top_n(score_ref[...], pos_ref[0] // slc_block, idx_ref.shape[0], **config)


# Packed rows: each program reads the narrowest of the widths MIN_ROW_WIDTH, 2x, ... that holds
# its candidates (`_top_n_packed_kernel`; False: the whole row). In a 64k row of 8 x 8k documents
# (H100, 2026-12-07) the packed top-n took 0.33 ms with it, as the batched documents' does; the
# GPU tests (`pytest -m gpu tests/test_packing.py`, which set it) passed on an H100 at 3c1342e.
PACKED_NARROW_WIDTHS = True
# Narrowest row a top-n launch reads. Query `t`'s candidates are blocks `<= t // l'`, so rows
# `t < W * l'` need only W columns: launches of widths MIN_ROW_WIDTH, 2x, 4x, ... over ranges of
# rows read (and arg-max over) ~2/3 of the columns one launch over the whole rows would at
# T = 64k, l' = 64 (43 M against 67 M per KV head).
MIN_ROW_WIDTH = 128


def row_buckets(seq_len: int, slc_block: int, row_width: int):
  """`(first row, rows, width)` of each top-n launch: widths doubling from MIN_ROW_WIDTH (at
  most `row_width`), each over the rows whose candidate blocks fit it, the last one to T."""
  buckets, first, width = [], 0, min(MIN_ROW_WIDTH, row_width)
  while first < seq_len:
    end = seq_len if width >= row_width else min(seq_len, width * slc_block)
    buckets.append((first, end - first, width))
    first, width = end, 2 * width
  return buckets


def top_n_blocks(scores, *, seq_len: int, num_selected: int, slc_block: int, num_initial: int,
                 num_local: int, ascending: bool = True, interpret: bool = False,
                 query_blocks=None, first_columns=None, tails=None):
  """Chosen blocks of each query, in ascending order (or, with `ascending=False`, in pick order:
  still distinct, causal and first, which is all the selected-attention kernels need), unused
  places -1.

  Args:
    scores: float32 `[B, H, rows >= T, width]`, non-negative selection scores of query `t` in row
      `t`; `width >= pow2(Ts)`, `Ts = ceil(T / slc_block)`: at most the first `pow2(Ts)` columns
      of a row are read, and only the candidates' (blocks `<= t // slc_block`, `< Ts`) used:
      the others may hold anything, NaN included.
    seq_len: T.
    num_selected, slc_block, num_initial, num_local: the NSA selection config.
    interpret: Pallas interpret mode (CPU).
    query_blocks: int32 `[B, T]` or None (`t // slc_block`): each query's own block, for packed
      rows its document-local one, `(t - s) // slc_block`.
    first_columns: packed rows only, int32 `[B, T]` or None (zeros): row `t`'s document block
      `j` is column `first_columns[t] + j` of `scores` (with `tails`, plus column
      `first_columns[t] + j + 1` of `tails`: the packed score pass's two planes), 0 past the
      last column; read in place, so `scores` may be as wide as the row's aligned blocks.
    tails: None, or float32 shaped as `scores`: unpacked rows' scores are `scores + tails`,
      added as a row is read (the score pass's `TAILS_APART`); packed rows' as above.

  Returns:
    int32 `[B, T, H, num_selected]`.
  """
  b, h, _, width = scores.shape
  if tails is not None and tails.shape != scores.shape:
    raise ValueError(f"tails must be shaped as scores {scores.shape}, got {tails.shape}")
  if first_columns is not None and query_blocks is None:
    raise ValueError("first_columns (packed rows) need query_blocks")
  num_slc = -(-seq_len // slc_block)
  row_width = max(1, 1 << (num_slc - 1).bit_length())
  if width < row_width:
    raise ValueError(f"scores {scores.shape} need >= {row_width} columns for T = {seq_len}")
  slots = max(1, 1 << (num_selected - 1).bit_length())
  config = dict(num_selected=num_selected, slc_block=slc_block, num_slc=num_slc,
                num_initial=num_initial, num_local=num_local)

  def launch(kernel, in_specs, args, num_rows):
    return pl.pallas_call(
        kernel,
        grid=(num_rows, b, h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, None, slots), lambda t, i, j: (i, j, t, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, num_rows, slots), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="nsa_top_n",
    )(*args)

  if query_blocks is None:
    # A launch per range of rows whose candidates fit a narrower row (`row_buckets`).
    planes = [scores] + ([] if tails is None else [tails])
    picks = jnp.concatenate([
        launch(functools.partial(_top_n_kernel, first_row=first, **config),
               [pl.BlockSpec((None, None, None, width),
                             lambda t, i, j, first=first: (i, j, t + first, 0))] * len(planes),
               planes, num_rows)
        for first, num_rows, width in row_buckets(seq_len, slc_block, row_width)], axis=2)
  else:  # packed rows: a query's candidates follow its document, not its position
    widths = ([w for _, _, w in row_buckets(row_width * slc_block, slc_block, row_width)]
              if PACKED_NARROW_WIDTHS else [row_width])
    if first_columns is None:
      first_columns = jnp.zeros_like(query_blocks)
    planes = [scores] + ([] if tails is None else [tails])
    per_row = pl.BlockSpec((None, None, 1), lambda t, i, j: (i, t, 0))
    picks = launch(functools.partial(_top_n_packed_kernel, widths=widths, **config),
                   [per_row] * 2
                   + [pl.BlockSpec((None, None, None, width), lambda t, i, j: (i, j, t, 0))]
                   * len(planes),
                   [query_blocks.astype(jnp.int32)[..., None],
                    first_columns.astype(jnp.int32)[..., None]] + planes, seq_len)
  picks = picks[..., :num_selected]  # distinct, -1 last
  picks = block_maps.ascending(picks) if ascending else picks
  return picks.transpose(0, 2, 1, 3)


def top_n_blocks_decode(scores, position, *, num_selected: int, slc_block: int, num_slc: int,
                        num_initial: int, num_local: int, interpret: bool = False):
  """The chosen blocks of one query per row (decoding), in pick order.

  `lax.top_k` over these few rows costs ~50 us on an H200 (a sort per row); this is one launch.
  The picks are not sorted (the decode kernels take the blocks in any order): forced blocks come
  first, then the rest by falling score.

  Args:
    scores: float32 `[B, H, width]`, non-negative selection scores of the query at `position`;
      `width` a power of two >= `num_slc` (columns past `num_slc` are ignored).
    position: int32 scalar, the query's position.
    num_selected, slc_block, num_initial, num_local: the NSA selection config.
    num_slc: selection blocks that exist (`ceil(cache length / slc_block)`).
    interpret: Pallas interpret mode (CPU).

  Returns:
    int32 `[B, H, pow2(num_selected)]`: distinct blocks, -1 in slots with nothing to pick and in
    the slots past `num_selected`.
  """
  b, h, width = scores.shape
  slots = max(1, 1 << (num_selected - 1).bit_length())
  kernel = functools.partial(_top_n_decode_kernel, num_selected=num_selected,
                             slc_block=slc_block, num_slc=num_slc, num_initial=num_initial,
                             num_local=num_local)
  return pl.pallas_call(
      kernel,
      grid=(b, h),
      in_specs=[pl.BlockSpec((1,), lambda i, j: (0,)),
                pl.BlockSpec((None, None, width), lambda i, j: (i, j, 0))],
      out_specs=pl.BlockSpec((None, None, slots), lambda i, j: (i, j, 0)),
      out_shape=jax.ShapeDtypeStruct((b, h, slots), jnp.int32),
      compiler_params=plgpu.CompilerParams(num_warps=DECODE_NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="nsa_top_n_decode",
  )(jnp.reshape(position, (1,)).astype(jnp.int32), scores)

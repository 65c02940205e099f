"""NSA decode kernels on TPU (Pallas Mosaic): one query token per sequence.

The split (flash-decoding) plan, as in `pallas_kernels/gpu/decode.py`: a grid over (batch, KV
head, split) writes per-split softmax partials, merged in JAX by
`pallas_kernels.decode_partials.merge_partials` (`nsa_jax/split_decode.py` runs the step). The G
query heads of a KV group are the matmul rows (`[Gp, D]`, Gp a multiple of 8 sublanes).
Everything data-dependent reaches the kernels by scalar prefetch, so the index maps choose which
block the pipeline DMAs:

- `compressed_decode`: grid (B, Hkv, Sc / (CMP_SPLIT * BLOCKS_PER_STEP)); prefetched: the
  number of visible compressed blocks. A step takes BLOCKS_PER_STEP splits of CMP_SPLIT keys
  (one BlockSpec each, so the pipeline fetches them all); splits past the visible ones revisit
  the last visible split's block (no new DMA) and are masked. Besides its softmax partial, a
  step sums its probabilities per selection block (two float32-precise MXU matmuls against 0/1
  and tail-weight maps, `_block_sum_maps`), from which XLA forms the SPEC.md Eq. 9 scores once the
  log-sum-exp is known: half the bytes of the raw scores it wrote before, and no `exp2` over
  them in XLA.
- `sparse_decode`: grid (B, Hkv, ceil(n / BLOCKS_PER_STEP) + ceil(window tiles /
  BLOCKS_PER_STEP)); prefetched: the position and the selected blocks. A step of the first part
  takes BLOCKS_PER_STEP selected blocks `idx[i]` (unused slots: block 0, masked), of the second
  as many `l'`-aligned tiles of the window `(t - w, t]` (tiles past the cache: its last block,
  masked); a step never mixes the two branches.

Row statistics are stored lane-replicated (`[Gp, 128]`), the TPU layout for per-row vectors.
Caches are head-major `[B, Hkv, S, D]`; blocks span the full head dim, so any D is legal; `l'` must
be a multiple of 8, S and Sc multiples of `l'` and CMP_SPLIT, `l' / d` a power of two that divides
a step's keys and `l <= l' + d` (`supported` checks).

Cost model (v5e-class: ~0.8 TB/s HBM, ~0.35 us per grid step): at 64k context, B=1, Hkv=4 the
step reads 5.6k tokens x 4 heads x 2 x 256 B = 11.5 MB (~15 us of HBM). With one split or block
a step that was 4 x (33 + 25) = 232 grid steps (~80 us of step overhead if serial on one core);
with BLOCKS_PER_STEP = 4 it is 4 x (9 + 4 + 3) = 64 steps (~22 us), near the HBM time. (The
splits stay 128 keys because the compressed cache is only aligned to 128.)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.decode_partials import merge_partials, merge_selected_and_window
from pallas_kernels.decode_partials import block_sums_apply, tail_weight, window_tiles
from pallas_kernels.tpu.tile_math import dot_by_exact, dot_nn, dot_nt

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES = 128
CMP_SPLIT = 128  # compressed keys per split (the compressed cache is a multiple of it)
BLOCKS_PER_STEP = 4  # compressed splits, selected blocks or window tiles per grid step


def supported(slc_block: int, cache_len: int, cmp_cache_len: int, cmp_block: int,
              cmp_stride: int) -> bool:
  """Whether the kernels take these sizes (else use the XLA decode path). A step's keys must
  cover whole selection blocks, and a compressed block reach at most one selection block back
  (`l <= l' + d`), so that the per-block sums give Eq. 9 (`_block_sum_maps`)."""
  per_cmp, per_slc = cmp_block // cmp_stride, slc_block // cmp_stride
  return (slc_block % 8 == 0 and cache_len % slc_block == 0 and cmp_cache_len > 0
          and cmp_cache_len % CMP_SPLIT == 0 and per_slc & (per_slc - 1) == 0
          and per_slc <= CMP_SPLIT * BLOCKS_PER_STEP
          and block_sums_apply(per_cmp, per_slc))


def group_rows(q_t, num_kv_heads: int):
  """`[B, Hq, D]` -> `[B, Hkv, Gp, D]`, the G heads of a group padded to a multiple of 8 rows."""
  b, hq, d = q_t.shape
  group = hq // num_kv_heads
  rows = -(-group // 8) * 8
  q = q_t.reshape(b, num_kv_heads, group, d)
  return jnp.pad(q, [(0, 0), (0, 0), (0, rows - group), (0, 0)])


def _interpret(interpret):
  return pltpu.InterpretParams(detect_races=True) if interpret else False


def _write_partial(scores, visible, v, acc_ref, m_ref, l_ref):
  """Softmax partial of masked log2-domain `scores [Gp, K]` over `v [K, Dv]`; returns the
  probabilities `[Gp, K]` relative to the row max."""
  row_max = jnp.max(scores, axis=1, keepdims=True)  # [Gp, 1]
  probs = jnp.where(visible, jnp.exp2(scores - row_max), 0.0)
  row_sum = jnp.sum(probs, axis=1, keepdims=True)
  acc_ref[...] = dot_nn(probs.astype(v.dtype), v)
  m_ref[...] = jnp.broadcast_to(jnp.where(row_sum > 0, row_max, -jnp.inf), m_ref.shape)
  l_ref[...] = jnp.broadcast_to(row_sum, l_ref.shape)
  return probs


def _write_empty(acc_ref, m_ref, l_ref):
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
  m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)


def _block_sum_maps(per_cmp: int, per_slc: int):
  """`(sum_map, tail_map)`, float32 `[K, K / m]` for a step's K keys (compressed blocks, `c = l/d`
  and `m = l'/d` sub-blocks per compressed / selection block): `probs @ sum_map` is `V_j`, the
  sum of selection block j's own keys' probabilities, and `probs @ tail_map` is `U_j`, those of
  its last `c - 1` weighted `max(0, r + c - m)` (key r of the block). With `c - 1 <= m`, Eq. 9
  gives block j the score `c V_j - U_j + U_{j-1}` (`pallas_kernels/gpu/decode.py`'s
  `_ScoreMap`)."""
  width = CMP_SPLIT * BLOCKS_PER_STEP
  shape = (width, width // per_slc)
  key = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  offset = key - jax.lax.broadcasted_iota(jnp.int32, shape, 1) * per_slc  # key's place in block
  own = (offset >= 0) & (offset < per_slc)
  return (jnp.where(own, 1.0, 0.0),
          jnp.where(own, tail_weight(offset, per_cmp, per_slc), 0.0))


def _cmp_kernel(count_ref, q_ref, *refs, scale, per_cmp, per_slc):
  k_refs, v_refs = refs[:BLOCKS_PER_STEP], refs[BLOCKS_PER_STEP:2 * BLOCKS_PER_STEP]
  sums_ref, tails_ref, acc_ref, m_ref, l_ref = refs[2 * BLOCKS_PER_STEP:]
  width = BLOCKS_PER_STEP * CMP_SPLIT
  base = pl.program_id(2) * width
  count = count_ref[0]

  @pl.when(base < count)
  def _attend():
    visible = base + jax.lax.broadcasted_iota(jnp.int32, (1, width), 1) < count
    q = q_ref[...]
    scores = jnp.concatenate([dot_nt(q, k_ref[...]) for k_ref in k_refs], axis=1)
    scores = jnp.where(visible, scores * (scale * LOG2E), MASK_VALUE)
    v = jnp.concatenate([v_ref[...] for v_ref in v_refs], axis=0)
    probs = _write_partial(scores, visible, v, acc_ref, m_ref, l_ref)
    # float32 precision in three MXU passes each (the maps are exact small integers).
    sum_map, tail_map = _block_sum_maps(per_cmp, per_slc)
    sums_ref[...] = dot_by_exact(probs, sum_map)
    # With l = d the tail weights are all 0: no matmul for them.
    tails_ref[...] = (dot_by_exact(probs, tail_map) if per_cmp > 1
                      else jnp.zeros(tails_ref.shape, jnp.float32))

  @pl.when(base >= count)
  def _skip():
    sums_ref[...] = jnp.zeros(sums_ref.shape, jnp.float32)
    tails_ref[...] = jnp.zeros(tails_ref.shape, jnp.float32)
    _write_empty(acc_ref, m_ref, l_ref)


def _last_visible_split(count_ref):
  return jnp.maximum(count_ref[0] - 1, 0) // CMP_SPLIT


@functools.partial(jax.jit, static_argnames=("scale", "cmp_block", "cmp_stride", "slc_block",
                                             "num_slc", "interpret"))
def compressed_decode(q_rows, k_cmp, v_cmp, count, *, scale: float, cmp_block: int,
                      cmp_stride: int, slc_block: int, num_slc: int, interpret: bool = False):
  """Compressed-branch attention of one query per sequence, and each head's selection scores.

  Args:
    q_rows: `[B, Hkv, Gp, Dk]` (`group_rows`).
    k_cmp, v_cmp: `[B, Hkv, Sc, Dk]` / `[B, Hkv, Sc, Dv]`, Sc a multiple of CMP_SPLIT.
    count: int32 scalar, compressed blocks the query sees (the first `count`).
    scale: softmax scale.
    cmp_block, cmp_stride, slc_block: l, d, l' (`supported`).
    num_slc: selection blocks of the cache.
    interpret: run under the TPU interpreter (CPU) with race detection.

  Returns:
    `(out [B, Hkv, Gp, Dv], scores [B, Hkv, Gp, num_slc])`, float32: the branch output and, per
    head, SPEC.md Eq. 9 over its compressed-attention probabilities (the group sum of them is
    the selection score).
  """
  b, hkv, rows, dk = q_rows.shape
  num_cmp, dv = k_cmp.shape[2], v_cmp.shape[3]
  width = BLOCKS_PER_STEP * CMP_SPLIT
  steps = -(-num_cmp // width)
  per_cmp, per_slc = cmp_block // cmp_stride, slc_block // cmp_stride
  owned = width // per_slc  # selection blocks a step's keys cover

  def keys(d, j):  # split j of each step, clamped to the last visible split (no new DMA)
    return pl.BlockSpec(
        (None, None, CMP_SPLIT, d),
        lambda i, h, s, count_ref: (
            i, h, jnp.minimum(s * BLOCKS_PER_STEP + j, _last_visible_split(count_ref)), 0))

  part = lambda lanes: pl.BlockSpec((None, None, None, rows, lanes),
                                    lambda i, h, s, count_ref: (i, h, s, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b, hkv, steps),
      in_specs=[pl.BlockSpec((None, None, rows, dk), lambda i, h, s, count_ref: (i, h, 0, 0))]
      + [keys(dk, j) for j in range(BLOCKS_PER_STEP)]
      + [keys(dv, j) for j in range(BLOCKS_PER_STEP)],
      out_specs=[part(owned), part(owned), part(dv), part(LANES), part(LANES)])
  partial_shape = lambda lanes: jax.ShapeDtypeStruct((b, hkv, steps, rows, lanes), jnp.float32)
  sums, tails, acc, row_max, row_sum = pl.pallas_call(
      functools.partial(_cmp_kernel, scale=scale, per_cmp=per_cmp, per_slc=per_slc),
      grid_spec=grid_spec,
      out_shape=[partial_shape(owned), partial_shape(owned), partial_shape(dv),
                 partial_shape(LANES), partial_shape(LANES)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=_interpret(interpret),
      name="nsa_decode_compressed",
  )(jnp.reshape(count, (1,)).astype(jnp.int32), q_rows, *[k_cmp] * BLOCKS_PER_STEP,
    *[v_cmp] * BLOCKS_PER_STEP)
  row_max = row_max[..., 0]  # [B, Hkv, steps, Gp]
  out, lse2 = merge_partials(acc, row_max, row_sum[..., 0], axis=2)
  # Each step's sums are relative to its row max: exp2(max - lse) makes them probabilities
  # (0 for steps that saw nothing, whose sums are zeros).
  factor = jnp.where(row_max > -jnp.inf, jnp.exp2(row_max - lse2[:, :, None]), 0.0)
  by_block = lambda x: (x * factor[..., None]).transpose(0, 1, 3, 2, 4).reshape(
      b, hkv, rows, steps * owned)
  sums, tails = by_block(sums), by_block(tails)
  # Block j: c V_j - U_j + U_{j-1}; one column more for the block after the last step's.
  pad = lambda x, before, after: jnp.pad(x, [(0, 0)] * 3 + [(before, after)])
  scores = pad(per_cmp * sums - tails, 0, 1) + pad(tails, 1, 0)
  columns = scores.shape[-1]
  return out, (scores[..., :num_slc] if columns >= num_slc else pad(scores, 0, num_slc - columns))


def _item_block(item, pos, slot_block, *, block, window, num_selected):
  """The selection block of item `item` (selected slot `item < n`, else window tile
  `item - n`); may be -1 or past the cache: then masked."""
  first_window_block = jnp.maximum(pos - window + 1, 0) // block
  return jnp.where(item < num_selected, slot_block, first_window_block + item - num_selected)


def _step_items(step, num_selected, num_window):
  """`(item, real)` of each of a step's BLOCKS_PER_STEP places: the first
  `ceil(n / BLOCKS_PER_STEP)` steps take selected slots, the others window tiles, so a partial
  (one a step) belongs to one branch. Places past their branch's items are not real."""
  selected_steps = -(-num_selected // BLOCKS_PER_STEP)
  for j in range(BLOCKS_PER_STEP):
    slot = step * BLOCKS_PER_STEP + j
    tile = (step - selected_steps) * BLOCKS_PER_STEP + j
    in_selected = step < selected_steps
    item = jnp.where(in_selected, slot, num_selected + tile)
    real = jnp.where(in_selected, slot < num_selected, tile < num_window)
    yield item, real


def _sparse_kernel(pos_ref, idx_ref, q_ref, *refs, scale, block, window, num_selected,
                   num_window, num_blocks):
  k_refs, v_refs = refs[:BLOCKS_PER_STEP], refs[BLOCKS_PER_STEP:2 * BLOCKS_PER_STEP]
  acc_ref, m_ref, l_ref = refs[2 * BLOCKS_PER_STEP:]
  b, h, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  pos = pos_ref[0]
  q = q_ref[...]
  scores, visible = [], []
  for item, real in _step_items(step, num_selected, num_window):
    slot = jnp.minimum(item, num_selected - 1)
    slot_block = idx_ref[(b * pl.num_programs(1) + h) * num_selected + slot]
    block_id = _item_block(item, pos, slot_block, block=block, window=window,
                           num_selected=num_selected)
    key_pos = block_id * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1)
    visible.append(real & (block_id >= 0) & (block_id < num_blocks) & (key_pos <= pos)
                   & ((item < num_selected) | (key_pos > pos - window)))
  for k_ref in k_refs:
    scores.append(dot_nt(q, k_ref[...]) * (scale * LOG2E))
  visible = jnp.concatenate(visible, axis=1)  # [1, BLOCKS_PER_STEP * l']
  scores = jnp.where(visible, jnp.concatenate(scores, axis=1), MASK_VALUE)
  v = jnp.concatenate([v_ref[...] for v_ref in v_refs], axis=0)
  _write_partial(scores, visible, v, acc_ref, m_ref, l_ref)


@functools.partial(jax.jit, static_argnames=("block", "window", "scale", "interpret"))
def sparse_decode(q_rows, k, v, block_indices, position, *, block: int, window: int,
                  scale: float, interpret: bool = False):
  """Selected-block and sliding-window attention of one query per sequence (TPU).

  Args:
    q_rows: `[B, Hkv, Gp, Dk]`.
    k, v: caches `[B, Hkv, S, Dk]` / `[B, Hkv, S, Dv]`, S a multiple of `block`.
    block_indices: int32 `[B, Hkv, n]`, -1 for unused slots (distinct blocks).
    position: int32 scalar, the query's position (its token is in the cache).
    block: `l'`; window: `w`; scale: softmax scale.
    interpret: run under the TPU interpreter (CPU) with race detection.

  Returns:
    `(o_slc, o_swa)`, each `[B, Hkv, Gp, Dv]` float32.
  """
  b, hkv, rows, dk = q_rows.shape
  num_blocks, dv = k.shape[2] // block, v.shape[3]
  n = block_indices.shape[-1]
  num_window = window_tiles(window, block)
  selected_steps = -(-n // BLOCKS_PER_STEP)
  steps = selected_steps + -(-num_window // BLOCKS_PER_STEP)

  def kv(d, j):  # place j of each step; places that are not real fetch a masked in-bounds block
    def index(i, h, step, pos_ref, idx_ref):
      item, _ = list(_step_items(step, n, num_window))[j]
      slot_block = idx_ref[(i * hkv + h) * n + jnp.minimum(item, n - 1)]
      block_id = _item_block(item, pos_ref[0], slot_block, block=block, window=window,
                             num_selected=n)
      return i, h, jnp.clip(block_id, 0, num_blocks - 1), 0
    return pl.BlockSpec((None, None, block, d), index)

  part = lambda width: pl.BlockSpec((None, None, None, rows, width),
                                    lambda i, h, step, pos_ref, idx_ref: (i, h, step, 0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, hkv, steps),
      in_specs=[pl.BlockSpec((None, None, rows, dk),
                             lambda i, h, step, pos_ref, idx_ref: (i, h, 0, 0))]
      + [kv(dk, j) for j in range(BLOCKS_PER_STEP)] + [kv(dv, j) for j in range(BLOCKS_PER_STEP)],
      out_specs=[part(dv), part(LANES), part(LANES)])
  partial_shape = lambda width: jax.ShapeDtypeStruct((b, hkv, steps, rows, width), jnp.float32)
  acc, row_max, row_sum = pl.pallas_call(
      functools.partial(_sparse_kernel, scale=scale, block=block, window=window,
                        num_selected=n, num_window=num_window, num_blocks=num_blocks),
      grid_spec=grid_spec,
      out_shape=[partial_shape(dv), partial_shape(LANES), partial_shape(LANES)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")),
      interpret=_interpret(interpret),
      name="nsa_decode_sparse",
  )(jnp.reshape(position, (1,)).astype(jnp.int32),
    block_indices.astype(jnp.int32).reshape(-1), q_rows, *[k] * BLOCKS_PER_STEP,
    *[v] * BLOCKS_PER_STEP)
  return merge_selected_and_window(acc, row_max[..., 0], row_sum[..., 0],
                                   selected_steps)  # lanes replicated

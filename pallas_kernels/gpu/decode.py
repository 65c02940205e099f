"""NSA decode kernels on GPU (Pallas, Triton lowering): one query token per sequence.

Decoding reads little (the compressed cache, n selected blocks and the window: 5.6k tokens per
step at 64k instead of 64k), so a step is bound by latency at B=1 and by the compressed cache's
bytes at B=8. Every kernel or XLA op costs a launch (~1 us), so a step (`nsa_jax.pallas_gpu
.decode_step`) is four kernels with nothing between them but free reshapes (per-kernel times:
BENCHMARKS.md).

1. `compressed_partials`: grid (B, Hkv, splits). In a decode step it first appends the token
   (`_append_token`, what `cache_append` does in a launch of its own). Each program scores one
   split of the compressed cache in tiles of CMP_TILE keys and keeps an online softmax
   (flash-decoding partials: unnormalised output, max, sum). Splits are sized to the batch (`cmp_split`): many small ones
   spread B=1 over the SMs, few large ones keep the B=8 partials small. It also sums each tile's
   probabilities per selection block, per query head and relative to the running maximum after
   the tile (two sums a block, from which SPEC.md Eq. 9 follows: `_ScoreMap`), and stores that
   maximum. Only the global log-sum-exp, which needs every split, is left for step 2.
2. `selection_scores`: grid (B, Hkv, tiles of SCORES_TILE selection blocks). Merges the partial
   maxima and sums into each head's log-sum-exp, rescales each tile's block sums by
   `exp2(tile max - lse)`, forms the Eq. 9 scores and sums them over the group.
3. `sparse_partials`: grid (B, Hkv, n + window tiles). Program i < n picks the top n from the
   scores (`top_n.pick_top_n`: each such program repeats the same picks, which costs less than a
   top-n kernel's launch) and attends pick i (cut at the query), the others one `l'`-aligned tile
   of the window `(t - w, t]` (from B * Hkv >= SPARSE_MULTI_MIN_PAIRS, SPARSE_BLOCKS of them a
   program). `select` gives the picks alone (a top-n kernel), for tests and profiles.
4. `combine`: grid (B, Hkv, Dv tiles). Merges the partials of the three branches and
   applies the gates; in a decode step one program also counts the cache's length.

A K/V set per branch (`nsa_jax.decode.nsa_decode_step_separate_kv`) runs the same four: step 1
also writes the token into the selected and window branches' caches (`more_sets`), step 3's
window programs read the window's set (`window_kv`), step 4 counts the three caches' lengths.

Scores and softmax statistics are in the log2 domain (`exp2`). Layout: caches head-major
`[B, Hkv, S, D]`; the G query heads of a KV group are the matmul rows `[B, Hkv, Gp, Dk]` (padded
to Gp = 16 or the next power of two). Partial arrays have a power-of-two partial axis (Triton
loads power-of-two shapes); rows past the grid are never written and are masked when read.
`supported` says which sizes the kernels take; the caller falls back to the XLA decode otherwise.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_partials import block_sums_apply, tail_weight, window_tiles
from pallas_kernels.gpu import cache_append
from pallas_kernels.gpu import top_n as top_n_kernel
from pallas_kernels.gpu.tile_math import LOG2E, MASK_VALUE
from pallas_kernels.gpu.tile_math import dot as _dot
from pallas_kernels.gpu.tile_math import masked_split_loop, online_softmax_init, online_softmax_step
from pallas_kernels.gpu.tile_math import online_softmax_step_with_probs
from pallas_kernels.row_layout import pow2

CMP_TILE = 64  # compressed keys per dot
CMP_ALIGN = 128  # the compressed cache's length is a multiple of this (decode.CACHE_ALIGN)
TARGET_PROGRAMS = 512  # compressed-kernel programs to aim for (swept: 256-1024; 512 best at B=8)
SCORES_TILE = 64  # selection blocks per program of the selection-score kernel
SUMS_SHIFT = 16  # block j's sums are in column j + SUMS_SHIFT, so that j - 1 >= 0 for j = 0
# Partial floats one combine program holds (every partial's rows x a tile of Dv): the widest
# power-of-two Dv tile (>= 8) within it. H200, 64k: B=8 (24 partials) tiles of 32, 3.8 us (16:
# 5.1, 64: 5.0, 128: 57, spilling); B=1 (96 partials) tiles of 8, 5.1 us (16: 5.8, 32: 72).
COMBINE_TILE_FLOATS = 12288
# l' blocks (selected blocks or window tiles) per sparse-kernel program once the grid has at least
# SPARSE_MULTI_MIN_PAIRS (sequence, KV head) pairs: walked with an online softmax, loads pipelined,
# leaving fewer partials to combine. Fewer pairs (B=1) keep one block a program, to spread over
# the SMs. H200, T=64k, GPU us per step with 1 / 4: B=1 24.0 / 25.8, B=8 62.6 / 59.7 (2: 60.6).
SPARSE_BLOCKS = 4
SPARSE_MULTI_MIN_PAIRS = 32
CMP_NUM_WARPS = 4
CMP_STAGES = 2
SCORES_NUM_WARPS = 2  # H200, 64k, B=8: 5.9 us (4 warps: 6.9, 8: 8.9); B=1 3.0 either way
SPARSE_NUM_WARPS = 4
SPARSE_STAGES = 3  # multi-block programs: 2 / 3 / 4 stages 14.1 / 12.6 / 12.8 us (H200, 64k, B=8)
COMBINE_NUM_WARPS = 4


def _is_pow2(x: int) -> bool:
  return pow2(x) == x


def _pow2_floor(x: int) -> int:
  return 1 << max(x, 1).bit_length() - 1


def supported(head_dim: int, head_dim_v: int, slc_block: int, cache_len: int,
              cmp_cache_len: int, cmp_block: int, cmp_stride: int) -> bool:
  """Whether the kernels take these sizes (else use the XLA decode path). A key tile of the
  compressed kernel must own whole selection blocks (`l' / d <= CMP_TILE`, powers of two), and
  a compressed block may reach at most one selection block back (`l <= l' + d`, `_ScoreMap`)."""
  per_cmp, per_slc = cmp_block // cmp_stride, slc_block // cmp_stride
  return (head_dim >= 16 and head_dim_v >= 16 and _is_pow2(head_dim)
          and _is_pow2(head_dim_v) and slc_block >= 16 and _is_pow2(slc_block)
          and cache_len % slc_block == 0 and cmp_cache_len > 0
          and cmp_cache_len % CMP_ALIGN == 0 and _is_pow2(per_slc) and per_slc <= CMP_TILE
          and block_sums_apply(per_cmp, per_slc))


def group_rows(x, num_kv_heads: int):
  """`[B, Hq, ...]` -> `[B, Hkv, Gp, ...]`, the G heads of a group padded with zero rows to Gp."""
  b, hq = x.shape[:2]
  group = hq // num_kv_heads
  x = x.reshape(b, num_kv_heads, group, *x.shape[2:])
  pad = [(0, 0), (0, 0), (0, pow2(group, 16) - group)] + [(0, 0)] * (x.ndim - 3)
  return jnp.pad(x, pad)


def cmp_split(batch: int, num_kv_heads: int, cmp_cache_len: int) -> int:
  """Compressed keys per program: about TARGET_PROGRAMS programs, a multiple of CMP_ALIGN."""
  units = cmp_cache_len // CMP_ALIGN
  per_head = max(1, min(units, TARGET_PROGRAMS // (batch * num_kv_heads)))
  return CMP_ALIGN * -(-units // per_head)


def num_splits(cmp_cache_len: int, split: int) -> int:
  """Programs (partials) per (batch, KV head) of `compressed_partials`."""
  return -(-cmp_cache_len // split)


def compressed_layout(batch: int, num_kv_heads: int, cmp_cache_len: int) -> tuple[int, int]:
  """`(split, partials)` of a decode step's compressed kernel: `cmp_split`, `num_splits`."""
  split = cmp_split(batch, num_kv_heads, cmp_cache_len)
  return split, num_splits(cmp_cache_len, split)


class _ScoreMap(NamedTuple):
  """SPEC.md Eq. 9 (with `l % d == l' % d == 0`) as per-block sums of a key tile.

  Selection block j covers sub-blocks `[j*m, (j+1)*m)` (`m = l'/d`; `c = l/d`), and its score is
  `sum_{r < m, k < c} p[j*m + r - k]`. For `c - 1 <= m` (`l <= l' + d`) that is
  `c * V_j - U_j + U_{j-1}` with `V_j = sum_{r < m} p[j*m + r]` and the tail sum
  `U_j = sum_{r < m} max(0, r + c - m) p[j*m + r]`: a compressed block reaches at most one
  selection block back, and each block's two sums come from its own keys only.
  """

  per_cmp: int  # c = l / d
  per_slc: int  # m = l' / d
  owned: int  # selection blocks a key tile owns: CMP_TILE / m

  def tail_weights(self):
    return tail_weight(jnp.arange(self.per_slc), self.per_cmp, self.per_slc)


def _score_map(cmp_block: int, cmp_stride: int, slc_block: int) -> _ScoreMap:
  per_slc = slc_block // cmp_stride
  return _ScoreMap(cmp_block // cmp_stride, per_slc, CMP_TILE // per_slc)


def _scores_programs(num_slc: int) -> tuple[int, int]:
  """`(selection blocks per program, programs)` of the selection-score kernel (B=1 still spreads
  over the SMs): tiles up to `num_slc`, not its power of two (a cache just past 2^k blocks would
  otherwise launch twice the programs)."""
  tile = min(pow2(num_slc), SCORES_TILE)
  return tile, -(-num_slc // tile)


def _tiles_per_scores_program(tile: int, owned: int) -> int:
  """Key tiles whose blocks one selection-score program reads (a power of two)."""
  return max(1, tile // owned)


def _score_shapes(num_cmp: int, split: int, num_slc: int, smap: _ScoreMap):
  """Columns of the block sums and rows of `tile_max`: wide enough for every key tile's stores
  and every selection-score program's loads (interpret mode clamps out-of-range slices rather
  than masking them)."""
  key_tiles = num_splits(num_cmp, split) * split // CMP_TILE
  tile, programs = _scores_programs(num_slc)
  last_first_tile = (programs - 1) * tile // smap.owned
  columns = SUMS_SHIFT + max(key_tiles * smap.owned, programs * tile)
  rows = max(key_tiles + 1, last_first_tile + pow2(_tiles_per_scores_program(tile, smap.owned)
                                                   + 1))
  return columns, rows


# ---------------------------------------------------------------------------------------------
# 1. Compressed branch: per-split partials and per-tile selection-block sums.


def _visible_cmp_blocks(pos, cmp_block, cmp_stride):
  """Compressed blocks complete at position `pos` (`block_selection.num_cmp_visible`), computed
  in the kernels: an XLA op for it would cost a launch (~1 us) per step."""
  return jnp.maximum((pos + 1 - cmp_block) // cmp_stride + 1, 0)


def _append_token(pos, k_t_ref, v_t_ref, k_ref, v_ref, k_cmp_ref, v_cmp_ref, *, split,
                  cmp_block, cmp_stride, num_cmp, interpret):
  """`cache_append`'s work, done by the compressed kernel (one launch fewer a step): split 0 of
  each (sequence, KV head) writes the token's rows, and the program whose split holds the
  compressed block this token completes makes it, before its own loop reads it."""
  new = {name: token_ref[...].astype(cache_ref.dtype)
         for name, token_ref, cache_ref in (("k", k_t_ref, k_ref), ("v", v_t_ref, v_ref))}

  @pl.when(pl.program_id(2) == 0)
  def _():
    k_ref[pl.ds(pos, 1), :] = new["k"][None, :]
    v_ref[pl.ds(pos, 1), :] = new["v"][None, :]

  completes, first, slot = cache_append.block_to_make(pos, cmp_block=cmp_block,
                                                      cmp_stride=cmp_stride, num_cmp=num_cmp)

  @pl.when(completes & (slot // split == pl.program_id(2)))
  def _():
    for name, cache_ref, cmp_ref in (("k", k_ref, k_cmp_ref), ("v", v_ref, v_cmp_ref)):
      cmp_ref[pl.ds(slot, 1), :] = cache_append.block_mean(
          cache_ref, new[name], first, pos, cmp_block=cmp_block, cmp_stride=cmp_stride)[None, :]
    if not interpret:  # (interpret mode runs the program's stores and loads in order)
      plgpu.debug_barrier()  # the block's row is in global memory before the tiles load it


def _cmp_kernel(*refs, appends, more_sets, num_cmp, interpret, **config):
  """`_cmp_partials`, after `_append_token` with `appends`: the compressed caches are then read
  from the outputs they are updated in (the same buffers on the GPU). `more_sets` more K/V sets
  (a set per branch) get the token's rows too, from split 0."""
  if not appends:
    _cmp_partials(*refs, **config)
    return
  pos_ref, q_ref, k_t_ref, v_t_ref, *refs = refs
  more_tokens, refs = refs[:2 * more_sets], refs[2 * more_sets:]
  refs = refs[4 + 2 * more_sets:]  # the caches' inputs: read through their aliased outputs
  k_ref, v_ref, k_cmp_ref, v_cmp_ref, *refs = refs
  more_caches, outs = refs[:2 * more_sets], refs[2 * more_sets:]
  pos = pos_ref[0]
  _append_token(pos, k_t_ref, v_t_ref, k_ref, v_ref, k_cmp_ref, v_cmp_ref,
                split=config["split"], cmp_block=config["cmp_block"],
                cmp_stride=config["cmp_stride"], num_cmp=num_cmp, interpret=interpret)
  if more_sets:
    @pl.when(pl.program_id(2) == 0)
    def _():
      for token_ref, cache_ref in zip(more_tokens, more_caches):
        cache_ref[pl.ds(pos, 1), :] = token_ref[...].astype(cache_ref.dtype)[None, :]

  _cmp_partials(pos_ref, q_ref, k_cmp_ref, v_cmp_ref, *outs, **config)


def _cmp_partials(pos_ref, q_ref, k_ref, v_ref, sums_ref, tails_ref, tmax_ref, acc_ref, m_ref,
                  l_ref, *, scale, split, cmp_block, cmp_stride, smap):
  count = _visible_cmp_blocks(pos_ref[0], cmp_block, cmp_stride)
  base = pl.program_id(2) * split
  q = q_ref[...]  # [Gp, Dk]
  rows = q.shape[0]
  num_tiles = jnp.clip((count - base + CMP_TILE - 1) // CMP_TILE, 0, split // CMP_TILE)
  num_full = jnp.clip((count - base) // CMP_TILE, 0, split // CMP_TILE)  # no mask needed

  def body(i, carry, masked):
    start = base + i * CMP_TILE
    visible = (start + jnp.arange(CMP_TILE) < count) if masked else None
    scores = _dot(q, k_ref[pl.ds(start, CMP_TILE), :], trans_b=True) * (scale * LOG2E)
    if masked:
      scores = jnp.where(visible[None, :], scores, MASK_VALUE)
    carry, probs = online_softmax_step_with_probs(
        carry, scores, lambda: v_ref[pl.ds(start, CMP_TILE), :], visible)
    # The tile's block sums, relative to the new running max carry[1] (>= every score of the
    # tile, so nothing overflows); key tile u's maximum is row u + 1 of tile_max.
    key_tile = start // CMP_TILE
    columns = pl.ds(SUMS_SHIFT + key_tile * smap.owned, smap.owned)
    by_block = probs.reshape(rows, smap.owned, smap.per_slc)
    sums_ref[:, columns] = jnp.sum(by_block, axis=2)
    if smap.per_cmp > 1:
      tails_ref[:, columns] = jnp.sum(by_block * smap.tail_weights()[None, None, :], axis=2)
    tmax_ref[pl.ds(key_tile + 1, 1), :] = carry[1][None, :]
    return carry

  acc, row_max, row_sum = masked_split_loop(num_full, num_tiles, body,
                                            online_softmax_init(rows, acc_ref.shape[1]))
  acc_ref[...] = acc
  m_ref[...] = row_max
  l_ref[...] = row_sum


@functools.partial(jax.jit, static_argnames=("cmp_block", "cmp_stride", "slc_block", "num_slc",
                                             "scale", "split", "num_cmp", "interpret"))
def compressed_partials(q_rows, k_cmp, v_cmp, position, *, cmp_block: int, cmp_stride: int,
                        slc_block: int, num_slc: int, scale: float, split: int, token=None,
                        more_sets=(), num_cmp: int | None = None, interpret: bool = False):
  """Flash-decoding partials of the compressed branch, and its per-tile selection-block sums.

  With `token = (k, v, k_t, v_t)` it first appends the step's token, as
  `cache_append.append_token` does (the raw caches `[B, Hkv, S, D]`, the token's `[B, Hkv, D]`;
  `num_cmp`: compressed blocks the cache can make), and attends the caches with it.

  Args:
    q_rows: `[B, Hkv, Gp, Dk]` (`group_rows`); padded rows are zeros.
    k_cmp, v_cmp: `[B, Hkv, Sc, Dk]` / `[B, Hkv, Sc, Dv]`, Sc a multiple of CMP_ALIGN.
    position: int32 scalar, the query's position: it sees the first `count` compressed blocks,
      those complete at it (`cmp_block`, `cmp_stride`: l, d).
    slc_block: l'; num_slc: selection blocks in the cache (`S / l'`).
    scale: softmax scale.
    split: compressed keys per program (`cmp_split`).
    token, num_cmp: the token to append first, or None.
    more_sets: with `token`, more `(k, v, k_t, v_t)` (raw caches and the token's rows: a K/V set
      per branch) whose caches get the token too.
    interpret: Pallas interpret mode (CPU).

  Returns:
    `(score_parts, acc [B, Hkv, Pp, Gp, Dv], row_max [B, Hkv, Pp, Gp], row_sum [B, Hkv, Pp,
    Gp])`, all float32, then with `token` the caches `(k, v, k_cmp, v_cmp)` holding it (updated
    in place when donated or loop-carried), then `more_sets`' `(k, v)`, likewise. Partial
    `p < P = ceil(Sc / split)` covers blocks `[p*split, (p+1)*split)` (Pp = pow2(P); rows past
    P are unwritten). `score_parts = (sums [B, Hkv, Gp, *], tails [B, Hkv, Gp, *], tile_max
    [B, Hkv, *, Gp])`: for each key tile `u` (CMP_TILE
    keys) with `u * CMP_TILE < count`, `tile_max[..., u + 1, g]` is row g's running max after
    it, `M`, and columns `SUMS_SHIFT + j` of `sums` / `tails` hold `_ScoreMap`'s `V_j` / `U_j`
    of the selection blocks `j` it owns, over `p = exp2(s - M)` (0 where not visible). Other
    entries are unwritten (`tails` entirely when `l = d`).
  """
  b, hkv, rows, dk = q_rows.shape
  num_cmp, dv = k_cmp.shape[2], v_cmp.shape[3]
  smap = _score_map(cmp_block, cmp_stride, slc_block)
  columns, tile_rows = _score_shapes(num_cmp, split, num_slc, smap)
  splits = num_splits(num_cmp, split)
  padded = pow2(splits)
  whole = lambda d: pl.BlockSpec((None, None, num_cmp, d), lambda i, j, s: (i, j, 0, 0))
  part = lambda *shape: pl.BlockSpec((None, None, None) + shape,
                                     lambda i, j, s: (i, j, s) + (0,) * len(shape))
  per_head = lambda *shape: pl.BlockSpec((None, None) + shape, lambda i, j, s: (i, j, 0, 0))
  f32 = lambda *shape: jax.ShapeDtypeStruct((b, hkv) + shape, jnp.float32)
  caches, cache_specs, token_specs, aliases = [k_cmp, v_cmp], [whole(dk), whole(dv)], [], {}
  tokens = []
  if token is not None:
    k, v, k_t, v_t = token
    size = k.shape[2]
    raw = lambda d: pl.BlockSpec((None, None, size, d), lambda i, j, s: (i, j, 0, 0))
    token_spec = lambda d: pl.BlockSpec((None, None, d), lambda i, j, s: (i, j, 0))
    sets = [(k, v, k_t, v_t), *more_sets]
    tokens = [x for _, _, k_t, v_t in sets for x in (k_t, v_t)]
    token_specs = [token_spec(d) for _ in sets for d in (dk, dv)]
    more_caches = [x for k, v, _, _ in more_sets for x in (k, v)]
    caches = [k, v] + caches + more_caches
    cache_specs = [raw(dk), raw(dv)] + cache_specs + [raw(dk), raw(dv)] * len(more_sets)
    # pos, q and the tokens come first, then the caches
    aliases = {2 + len(tokens) + n: n for n in range(len(caches))}
  scalar = pl.BlockSpec((1,), lambda i, j, s: (0,))
  outs = pl.pallas_call(
      functools.partial(_cmp_kernel, appends=token is not None, more_sets=len(more_sets),
                        num_cmp=num_cmp, interpret=interpret, scale=scale, split=split,
                        cmp_block=cmp_block, cmp_stride=cmp_stride, smap=smap),
      grid=(b, hkv, splits),
      in_specs=[scalar, per_head(rows, dk)] + token_specs + cache_specs,
      out_specs=(cache_specs if token is not None else []) + [
          per_head(rows, columns), per_head(rows, columns), per_head(tile_rows, rows),
          part(rows, dv), part(rows), part(rows)],
      out_shape=([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in caches] if aliases else []) + [
          f32(rows, columns), f32(rows, columns), f32(tile_rows, rows),
          f32(padded, rows, dv), f32(padded, rows), f32(padded, rows)],
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=CMP_NUM_WARPS, num_stages=CMP_STAGES),
      interpret=interpret,
      name="nsa_decode_compressed",
  )(jnp.reshape(position, (1,)).astype(jnp.int32), q_rows, *tokens, *caches)
  updated, (sums, tails, tile_max, *partials) = outs[:len(aliases)], outs[len(aliases):]
  return ((sums, tails, tile_max), *partials, *updated)


# ---------------------------------------------------------------------------------------------
# 2. Selection: log-sum-exp and the rescaled, group-summed block sums per tile of selection
#    blocks (the top n are picked in step 3; `select` runs the top-n kernel instead).


def _merged_statistics(row_max, row_sum, lo, hi):
  """Merges partials `[lo, hi)` of `row_max`, `row_sum` `[Pp, Gp]` (others may be unwritten, even
  NaN): `(used [Pp, Gp], finite total max [Gp], total sum [Gp], weight [Pp, Gp])`, where `weight`
  rescales each used partial to the total max (0 elsewhere) and the sum is 0 if none saw a key."""
  partial = jnp.arange(row_max.shape[0])[:, None]
  used = (partial >= lo) & (partial < hi) & (row_max > -jnp.inf)
  total_max = jnp.max(jnp.where(used, row_max, -jnp.inf), axis=0)
  total_max = jnp.where(total_max > -jnp.inf, total_max, 0.0)
  weight = jnp.where(used, jnp.exp2(row_max - total_max[None, :]), 0.0)
  total = jnp.sum(jnp.where(used, row_sum, 0.0) * weight, axis=0)
  return used, total_max, total, weight


def _load_where(ref, mask, interpret):
  """`ref[...]` where `mask`, else 0. On the GPU the load itself is masked, so that unwritten
  entries (most of them in a cache far from full) are not fetched; interpret mode loads them all
  and `where` makes both the same."""
  value = ref[...] if interpret else plgpu.load(ref, mask=mask, other=0.0)
  return jnp.where(mask, value, 0.0)


def _row(x, r):
  """Row `r` (static) of a small 2D array, as a vector (Triton values have no indexing)."""
  return jnp.sum(jnp.where(jnp.arange(x.shape[0])[:, None] == r, x, 0.0), axis=0)


def _scores_kernel(pos_ref, sums_ref, tails_ref, tmax_ref, m_ref, l_ref, out_ref, *, group,
                   num_partials, cmp_block, cmp_stride, smap, interpret):
  count = _visible_cmp_blocks(pos_ref[0], cmp_block, cmp_stride)
  tile = out_ref.shape[0]
  first_block = pl.program_id(2) * tile
  first_tile = first_block // smap.owned  # the key tile of the first block
  per_program = _tiles_per_scores_program(tile, smap.owned)
  real = jnp.arange(m_ref.shape[1]) < group  # [Gp]
  ran = lambda key_tile: (key_tile >= 0) & (key_tile * CMP_TILE < count)  # tiles with stores
  # Row r of the maxima: key tile first_tile - 1 + r (the previous tile holds U_{j-1} of the
  # first block).
  rows = pow2(per_program + 1)
  row_ok = ran(first_tile - 1 + jnp.arange(rows))[:, None] & real[None, :]
  block = first_block + jnp.arange(tile)
  own_row = block // smap.owned - first_tile + 1
  prev_row = (block - 1) // smap.owned - first_tile + 1  # block -1's "tile" -1 never ran
  own_ok = real[:, None] & ran(block // smap.owned)[None, :]
  prev_ok = real[:, None] & ((block >= 1) & ran((block - 1) // smap.owned))[None, :]
  columns = lambda shift: pl.ds(SUMS_SHIFT + first_block - shift, tile)
  # All loads are issued before any math, to be in flight together.
  tile_max = _load_where(tmax_ref.at[pl.ds(first_tile, rows), :], row_ok, interpret)
  sums = _load_where(sums_ref.at[:, columns(0)], own_ok, interpret)
  if smap.per_cmp > 1:
    tails = _load_where(tails_ref.at[:, columns(0)], own_ok, interpret)
    prev_tails = _load_where(tails_ref.at[:, columns(1)], prev_ok, interpret)
  _, total_max, total, _ = _merged_statistics(m_ref[...], l_ref[...], 0, num_partials)
  lse2 = total_max + jnp.log2(jnp.where(total > 0, total, 1.0))  # [Gp]
  # exp2(M[g, u] - lse[g]) turns tile u's sums into probabilities of the whole softmax.
  factor = jnp.where(row_ok, jnp.exp2(tile_max - lse2[None, :]), 0.0)  # [rows, Gp]
  factors = [_row(factor, r)[:, None] for r in range(per_program + 1)]
  spread = lambda row_of_block: sum(jnp.where((row_of_block == r)[None, :], f, 0.0)
                                    for r, f in enumerate(factors))  # [Gp, tile]
  weighted = sums * smap.per_cmp
  if smap.per_cmp > 1:
    weighted = weighted - tails
  score = jnp.sum(weighted * spread(own_row), axis=0)
  if smap.per_cmp > 1:
    score = score + jnp.sum(prev_tails * spread(prev_row), axis=0)
  out_ref[...] = score


@functools.partial(jax.jit, static_argnames=("group", "num_partials", "cmp_block", "cmp_stride",
                                             "slc_block", "num_slc", "interpret"))
def selection_scores(score_parts, row_max, row_sum, position, *, group: int, num_partials: int,
                     cmp_block: int, cmp_stride: int, slc_block: int, num_slc: int,
                     interpret: bool = False):
  """Selection-block scores (SPEC.md steps 1-3) of the query at `position`, from
  `compressed_partials`' outputs: float32 `[B, Hkv, pow2(num_slc)]`, block `j`'s score summed
  over the G real heads, 0 past the visible compressed blocks; columns from the next multiple of
  SCORES_TILE past `num_slc` are unwritten (the top-n ignores every column past `num_slc`).

  Args:
    score_parts, row_max, row_sum: from `compressed_partials` (P = `num_partials` written
      partials).
    position: int32 scalar, the query's position.
    group: G, the real rows of Gp.
    cmp_block, cmp_stride, slc_block: l, d, l'.
    num_slc: selection blocks in the cache (`S / l'`).
    interpret: Pallas interpret mode (CPU).
  """
  sums, tails, tile_max = score_parts
  b, hkv = sums.shape[:2]
  smap = _score_map(cmp_block, cmp_stride, slc_block)
  tile, programs = _scores_programs(num_slc)
  kernel = functools.partial(_scores_kernel, group=group, num_partials=num_partials,
                             cmp_block=cmp_block, cmp_stride=cmp_stride, smap=smap,
                             interpret=interpret)
  whole = lambda x: pl.BlockSpec((None, None) + x.shape[2:], lambda i, j, t: (i, j, 0, 0))
  return pl.pallas_call(
      kernel,
      grid=(b, hkv, programs),
      in_specs=[pl.BlockSpec((1,), lambda i, j, t: (0,)), whole(sums), whole(tails),
                whole(tile_max), whole(row_max), whole(row_sum)],
      out_specs=pl.BlockSpec((None, None, tile), lambda i, j, t: (i, j, t)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, pow2(num_slc)), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=SCORES_NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="nsa_decode_selection_scores",
  )(jnp.reshape(position, (1,)).astype(jnp.int32), sums, tails, tile_max, row_max, row_sum)


@functools.partial(jax.jit, static_argnames=("group", "num_partials", "cmp_block", "cmp_stride",
                                             "slc_block", "num_selected", "num_slc",
                                             "num_initial", "num_local", "interpret"))
def select(score_parts, row_max, row_sum, position, *, group: int, num_partials: int,
           cmp_block: int, cmp_stride: int, slc_block: int, num_selected: int, num_slc: int,
           num_initial: int, num_local: int, interpret: bool = False):
  """The selected blocks of the query at `position`, from `compressed_partials`' outputs.

  Two kernels: `selection_scores`, grid (B, Hkv, pow2(num_slc) / SCORES_TILE) so that B=1 still
  spreads over the SMs, then `top_n.top_n_blocks_decode`. The decode step does not run this: its
  sparse kernel picks the blocks itself with the same rule; this exposes the picks to tests and
  profiles.

  Args:
    score_parts, row_max, row_sum, position, group, num_partials, cmp_block, cmp_stride,
      slc_block, num_slc, interpret: as `selection_scores`.
    num_selected, num_initial, num_local: the NSA config.

  Returns:
    int32 `[B, Hkv, pow2(n)]`: distinct blocks in pick order (forced first, then by score), -1
    where nothing is left to pick.
  """
  slc_scores = selection_scores(score_parts, row_max, row_sum, position, group=group,
                                num_partials=num_partials, cmp_block=cmp_block,
                                cmp_stride=cmp_stride, slc_block=slc_block, num_slc=num_slc,
                                interpret=interpret)
  return top_n_kernel.top_n_blocks_decode(
      slc_scores, jnp.asarray(position, jnp.int32), num_selected=num_selected,
      slc_block=slc_block, num_slc=num_slc, num_initial=num_initial, num_local=num_local,
      interpret=interpret)


# ---------------------------------------------------------------------------------------------
# 3. Selected blocks and the window: one l' block per program (SPARSE_BLOCKS at larger batch).


def sparse_blocks_per_program(batch: int, num_kv_heads: int) -> int:
  """Selected blocks or window tiles one sparse program walks."""
  return SPARSE_BLOCKS if batch * num_kv_heads >= SPARSE_MULTI_MIN_PAIRS else 1


def sparse_programs(batch: int, num_kv_heads: int, num_selected: int, window: int,
                    block: int) -> tuple[int, int]:
  """`(programs on selected blocks, all programs)` of `sparse_partials` for `batch` sequences of
  `num_kv_heads` heads: its partials, the selected ones first."""
  per_program = sparse_blocks_per_program(batch, num_kv_heads)
  selected = -(-num_selected // per_program)
  return selected, selected + -(-window_tiles(window, block) // per_program)


def _sparse_block(q, k_ref, v_ref, pos, block_id, selected, *, scale, block, window):
  """Block `block_id` of the selected branch (or, not `selected`, a tile of the window) for the
  query at `pos`: `(masked log2-domain scores [Gp, l'], visible [l'], values [l', Dv])`."""
  key_pos = block_id * block + jnp.arange(block)
  visible = (block_id >= 0) & (key_pos <= pos) & (selected | (key_pos > pos - window))
  # Blocks that lie past the cache are wholly after the query (masked): load any in-range one.
  start = jnp.clip(block_id * block, 0, k_ref.shape[0] - block)
  k, v = k_ref[pl.ds(start, block), :], v_ref[pl.ds(start, block), :]  # both loads in flight
  scores = _dot(q, k, trans_b=True) * (scale * LOG2E)
  return jnp.where(visible[None, :], scores, MASK_VALUE), visible, v


def _store_partial(acc_ref, m_ref, l_ref, acc, row_max, row_sum):
  """One flash-decoding partial; a row that saw no key gets max -inf (the merges skip it)."""
  acc_ref[...] = acc
  m_ref[...] = jnp.where(row_sum > 0, row_max, -jnp.inf)
  l_ref[...] = row_sum


class TopN(NamedTuple):
  """The selection config a sparse program picks its blocks with, given selection scores."""

  num_slc: int  # selection blocks in the cache
  num_initial: int
  num_local: int


def _picks(selection_ref, pos, *, block, num_selected, top_n):
  """The query's selected blocks `[slots]` (-1 where nothing was picked): `selection_ref` holds
  them (`top_n` None), or holds the selection scores and they are picked here by the top-n
  kernel's rule (`top_n.pick_top_n`), one launch fewer than a separate top-n kernel."""
  if top_n is None:
    return selection_ref[...]
  return top_n_kernel.pick_top_n(selection_ref[...], pos // block, pow2(num_selected),
                                 num_selected=num_selected, **top_n._asdict())


def _slot_block(picks, slot, num_selected):
  """`picks[slot]` (Triton values have no dynamic indexing), -1 from slot n on."""
  chosen = jnp.sum(jnp.where(jnp.arange(picks.shape[0]) == slot, picks, 0))
  return jnp.where(slot < num_selected, chosen, -1)


def _sparse_refs(refs, window_set):
  """`(k, v, k_window, v_window, acc, m, l)` of a sparse kernel's refs after the query's: the
  window reads the selected blocks' K/V set unless `window_set` (a set per branch)."""
  if window_set:
    return refs
  k_ref, v_ref, *outs = refs
  return (k_ref, v_ref, k_ref, v_ref, *outs)


def _sparse_multi_kernel(pos_ref, selection_ref, q_ref, *refs, scale, block, window,
                         num_selected, top_n, per_program, selected_programs, window_set):
  """`per_program` selected blocks (or window tiles) with an online softmax: one partial."""
  k_ref, v_ref, k_win_ref, v_win_ref, acc_ref, m_ref, l_ref = _sparse_refs(refs, window_set)
  program = pl.program_id(2)
  pos = pos_ref[0]
  selected = program < selected_programs
  base = jnp.where(selected, program, program - selected_programs) * per_program
  first_window_block = jnp.maximum(pos - window + 1, 0) // block
  slots = pow2(num_selected)
  picks = jax.lax.cond(  # the window's programs need no picks
      selected, lambda: _picks(selection_ref, pos, block=block, num_selected=num_selected,
                               top_n=top_n).astype(jnp.int32),
      lambda: jnp.full((slots,), -1, jnp.int32))
  q = q_ref[...]

  def walk(k_ref, v_ref):
    def body(i, carry):
      j = base + i  # slot, or window tile
      window_block = jnp.where(j < window_tiles(window, block), first_window_block + j, -1)
      scores, visible, v = _sparse_block(
          q, k_ref, v_ref, pos, jnp.where(selected, _slot_block(picks, j, num_selected),
                                          window_block), selected,
          scale=scale, block=block, window=window)
      return online_softmax_step(carry, scores, lambda: v, visible)

    return jax.lax.fori_loop(0, per_program, body,
                             online_softmax_init(q.shape[0], acc_ref.shape[1]))

  if window_set:  # a program walks selected blocks or window tiles, never both
    carry = jax.lax.cond(selected, lambda: walk(k_ref, v_ref),
                         lambda: walk(k_win_ref, v_win_ref))
  else:
    carry = walk(k_ref, v_ref)
  _store_partial(acc_ref, m_ref, l_ref, *carry)


def _sparse_kernel(pos_ref, selection_ref, q_ref, *refs, scale, block, window, num_selected,
                   top_n, window_set):
  k_ref, v_ref, k_win_ref, v_win_ref, acc_ref, m_ref, l_ref = _sparse_refs(refs, window_set)
  program = pl.program_id(2)
  pos = pos_ref[0]
  selected = program < num_selected
  first_window_block = jnp.maximum(pos - window + 1, 0) // block
  block_id = jax.lax.cond(
      selected, lambda: _slot_block(_picks(selection_ref, pos, block=block,
                                           num_selected=num_selected, top_n=top_n),
                                    program, num_selected).astype(jnp.int32),
      lambda: (first_window_block + program - num_selected).astype(jnp.int32))
  attend = lambda k_ref, v_ref: _sparse_block(q_ref[...], k_ref, v_ref, pos, block_id, selected,
                                              scale=scale, block=block, window=window)
  if window_set:
    scores, visible, v = jax.lax.cond(selected, lambda: attend(k_ref, v_ref),
                                      lambda: attend(k_win_ref, v_win_ref))
  else:
    scores, visible, v = attend(k_ref, v_ref)
  row_max = jnp.max(scores, axis=1)
  probs = jnp.where(visible[None, :], jnp.exp2(scores - row_max[:, None]), 0.0)
  _store_partial(acc_ref, m_ref, l_ref, _dot(probs.astype(v.dtype), v), row_max,
                 jnp.sum(probs, axis=1))


@functools.partial(jax.jit, static_argnames=("block", "window", "num_selected", "scale", "top_n",
                                             "interpret"))
def sparse_partials(q_rows, k, v, selection, position, *, block: int, window: int,
                    num_selected: int, scale: float, top_n: TopN | None = None,
                    window_kv=None, interpret: bool = False):
  """Partials of selected-block and sliding-window attention of one query per sequence.

  Args:
    q_rows: `[B, Hkv, Gp, Dk]`.
    k, v: caches `[B, Hkv, S, Dk]` / `[B, Hkv, S, Dv]`, S a multiple of `block`.
    selection: without `top_n`, the selected blocks: int32 `[B, Hkv, slots]`, slots a power of
      two >= n; the first n are read, -1 for unused ones (distinct blocks, any order). With
      `top_n`, the selection scores `[B, Hkv, width]` (`selection_scores`), from which each
      program on selected blocks picks them (the rule of `top_n.top_n_blocks_decode`).
    position: int32 scalar, the query's position (its token is in the cache).
    block: `l'`; window: `w`; num_selected: n; scale: softmax scale.
    top_n: the rest of the selection config, when `selection` holds scores.
    window_kv: `(k, v)` caches the window's programs read instead of `k, v` (a K/V set per
      branch), shaped as `k, v`; None: the same.
    interpret: Pallas interpret mode (CPU).

  Returns:
    `(acc [B, Hkv, Pp, Gp, Dv], row_max [B, Hkv, Pp, Gp], row_sum [B, Hkv, Pp, Gp])` float32:
    partials `[0, S)` are the selected blocks', `[S, P)` the window's, `(S, P) =
    sparse_programs(...)` (`(n, n + window tiles)` with one block a program), Pp the next power
    of two (rows past are unwritten).
  """
  b, hkv, rows, dk = q_rows.shape
  size, dv = k.shape[2], v.shape[3]
  width = selection.shape[-1]
  selected_programs, programs = sparse_programs(b, hkv, num_selected, window, block)
  per_program = sparse_blocks_per_program(b, hkv)
  padded = pow2(programs)
  common = dict(scale=scale, block=block, window=window, num_selected=num_selected, top_n=top_n,
                window_set=window_kv is not None)
  if per_program == 1:
    kernel = functools.partial(_sparse_kernel, **common)
  else:
    kernel = functools.partial(_sparse_multi_kernel, **common, per_program=per_program,
                               selected_programs=selected_programs)
  whole = lambda d: pl.BlockSpec((None, None, size, d), lambda i, j, p: (i, j, 0, 0))
  part = lambda *shape: pl.BlockSpec((None, None, None) + shape,
                                     lambda i, j, p: (i, j, p) + (0,) * len(shape))
  return pl.pallas_call(
      kernel,
      grid=(b, hkv, programs),
      in_specs=[pl.BlockSpec((1,), lambda i, j, p: (0,)),
                pl.BlockSpec((None, None, width), lambda i, j, p: (i, j, 0)),
                pl.BlockSpec((None, None, rows, dk), lambda i, j, p: (i, j, 0, 0)),
                whole(dk), whole(dv)] + ([] if window_kv is None else [whole(dk), whole(dv)]),
      out_specs=[part(rows, dv), part(rows), part(rows)],
      out_shape=[jax.ShapeDtypeStruct((b, hkv, padded, rows, dv), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, padded, rows), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, padded, rows), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=SPARSE_NUM_WARPS,
                                           num_stages=1 if per_program == 1 else SPARSE_STAGES),
      interpret=interpret,
      name="nsa_decode_sparse",
  )(jnp.reshape(position, (1,)).astype(jnp.int32), selection, q_rows, k, v,
    *(() if window_kv is None else window_kv))


# ---------------------------------------------------------------------------------------------
# 4. Merge the partials of the three branches and gate them.


def _merge(acc, row_max, row_sum, lo, hi):
  """Normalised output `[Gp, Dv tile]` of partials `[lo, hi)` of `acc [Pp, Gp, Dv tile]`; zeros
  if none saw a key. All partials are reduced at once: a loop over them would be a chain of
  dependent loads, ~0.2 us each."""
  used, _, total, weight = _merged_statistics(row_max, row_sum, lo, hi)
  acc = jnp.where(used[:, :, None], acc * weight[:, :, None], 0.0)
  return jnp.sum(acc, axis=0) / jnp.where(total > 0, total, 1.0)[:, None]


def _combine_kernel(*refs, num_cmp_partials, num_selected, num_sparse, gated, counts):
  # Every input is loaded up front, so that the loads are in flight together.
  cmp = [ref[...] for ref in refs[0:3]]
  sparse = [ref[...] for ref in refs[3:6]]
  gates = refs[6][...] if gated else None  # [Gp, 4], the fourth column padding
  if counts:
    out_ref, *length_refs = refs[-1 - counts:]

    @pl.when((pl.program_id(0) == 0) & (pl.program_id(1) == 0) & (pl.program_id(2) == 0))
    def _():  # one program: no other reads them, and every earlier kernel has read them
      for length_ref in length_refs:
        length_ref[...] = length_ref[...] + 1
  else:
    out_ref = refs[-1]
  branches = (_merge(*cmp, 0, num_cmp_partials),
              _merge(*sparse, 0, num_selected),
              _merge(*sparse, num_selected, num_sparse))
  if gated:
    column = jnp.arange(gates.shape[1])[None, :]
    gate = lambda c: jnp.sum(jnp.where(column == c, gates, 0.0), axis=1)[:, None]
    out = sum(gate(c) * o for c, o in enumerate(branches))
  else:
    out = branches[0] + branches[1] + branches[2]
  out_ref[...] = out.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_cmp_partials", "num_selected", "num_sparse",
                                             "out_dtype", "interpret"))
def combine(cmp_partials, sparse_partials_, gates, *, num_cmp_partials: int, num_selected: int,
            num_sparse: int, out_dtype, length=None, interpret: bool = False):
  """The gated sum of the three branches, `[B, Hkv, Gp, Dv]` in `out_dtype`; with `length` (an
  int32 scalar), `(out, length + 1)`, the add done in place by one program (an XLA add would be
  one more launch a step: the decode step counts its cache's length here); with a tuple of
  lengths (a K/V set per branch, a cache each), `(out, each + 1)`.

  Args:
    cmp_partials: `(acc, row_max, row_sum)` of `compressed_partials`, `num_cmp_partials` written.
    sparse_partials_: those of `sparse_partials`, `num_selected` selected then window partials,
      `num_sparse` written in all.
    gates: float32 `[B, Hkv, Gp, 4]` (cmp, slc, swa, padding) or None (plain sum).
    out_dtype: the output dtype.
    length: int32 scalar to count, or None.
    interpret: Pallas interpret mode (CPU).
  """
  b, hkv, _, rows, dv = cmp_partials[0].shape
  partials = cmp_partials[0].shape[2] + sparse_partials_[0].shape[2]
  dv_tile = min(dv, max(8, _pow2_floor(COMBINE_TILE_FLOATS // (partials * rows))))
  acc_spec = lambda pp: pl.BlockSpec((None, None, pp, rows, dv_tile),
                                     lambda i, j, d: (i, j, 0, 0, d))
  stat_spec = lambda pp: pl.BlockSpec((None, None, pp, rows), lambda i, j, d: (i, j, 0, 0))
  specs = []
  for acc, _, _ in (cmp_partials, sparse_partials_):
    specs += [acc_spec(acc.shape[2]), stat_spec(acc.shape[2]), stat_spec(acc.shape[2])]
  args = list(cmp_partials) + list(sparse_partials_)
  if gates is not None:
    specs.append(pl.BlockSpec((None, None, rows, 4), lambda i, j, d: (i, j, 0, 0)))
    args.append(gates)
  out_specs = [pl.BlockSpec((None, None, rows, dv_tile), lambda i, j, d: (i, j, 0, d))]
  out_shape = [jax.ShapeDtypeStruct((b, hkv, rows, dv), out_dtype)]
  aliases = {}
  several = isinstance(length, (tuple, list))
  lengths = tuple(length) if several else (() if length is None else (length,))
  scalar = pl.BlockSpec((1,), lambda i, j, d: (0,))
  for n, count in enumerate(lengths):
    aliases[len(args)] = 1 + n
    specs, out_specs = specs + [scalar], out_specs + [scalar]
    args.append(jnp.reshape(count, (1,)).astype(jnp.int32))
    out_shape.append(jax.ShapeDtypeStruct((1,), jnp.int32))
  kernel = functools.partial(_combine_kernel, num_cmp_partials=num_cmp_partials,
                             num_selected=num_selected, num_sparse=num_sparse,
                             gated=gates is not None, counts=len(lengths))
  outs = pl.pallas_call(
      kernel,
      grid=(b, hkv, dv // dv_tile),
      in_specs=specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(num_warps=COMBINE_NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="nsa_decode_combine",
  )(*args)
  if length is None:
    return outs[0]
  counted = tuple(x.reshape(()) for x in outs[1:])
  return outs[0], counted if several else counted[0]

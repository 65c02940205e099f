"""Compressed-branch attention on TPU (Pallas Mosaic) and its selection scores.

Compressed attention is dense attention of `T * G` query rows over `Tc` compressed keys with a
staircase mask (query `t` sees block `i` iff `i*d + l - 1 <= t`). A grid step takes `R = ROWS`
rows (`R / Gc` positions x `Gc` heads of one KV group, position-major; more if `Gc > ROWS`) and
one tile of `KEYS` keys (512 x 512 by default, as splash attention's blocks: each grid step
costs ~0.35 us of fixed overhead, so big tiles; lane-dense scores); key tiles past the last one a
row tile can see are skipped (`pl.when`) and their index map repeats the last visible tile, so
the pipeline issues no DMA.

- forward, alone: one online-softmax pass over the key tiles ("arbitrary"): output and lse;
- forward fused with the selection scores (SPEC.md section 2, steps 1-3), for NSA: pass 1 finds
  the log-sum-exp; pass 2 computes, from the same exact probabilities `p = exp(s - lse)`, both the
  output and the scores: group sum (a reshape and VPU adds from 8 heads, else `S @ p` with a 0/1
  row -> position matrix) and overlap map `@ A`, the overlap that spills into the next key tile's
  selection blocks carried in VMEM, one score block per (row tile, key tile) written once; the
  float32 matmuls against the exact 0/1 and count matrices run as three bfloat16 MXU passes
  (`tile_math.dot_by_exact`) instead of `Precision.HIGHEST`'s six;
- backward: dQ over key tiles and dK/dV over row tiles, recomputing `p` from the log-sum-exp.

Every kernel builds the staircase mask only on tiles that some row of the row tile does not see
whole (`_seen_whole`, `_when_active`): with 512 rows of 32 positions against 512 keys of 8192
positions, that is the last key tile of each row tile's walk.

Packed rows (`document_starts=...`): block `i` of the document starting at `s` sits in slot
`s // d + i` (SPEC.md), so row `t` sees slot `c` iff `c >= s // d` and
`c*d + l - 1 + s % d <= t`. Each row's start comes as a row vector (float32, exact below 2^24,
transposed in the kernel like the log-sum-exp) and every tile is masked. The walks skip other
documents' tiles: a row tile starts at the key tile of its first row's document (starts never
decrease along a row), and dK/dV stops at the last row tile whose documents start before the
key tile ends; both bounds come per batch row from SMEM (scalar prefetch, `_walk_tables`), so
the skipped tiles cost neither compute nor DMA. Their selection scores
are on the document's blocks, which start at sub-block `s // d = a m + b` (`m = l' / d`): the
fused pass maps each phase `b`'s rows through maps shifted by `b` (`_document_scores`) into
columns `e = j + a + 1`, so that every key's overlap still only reaches forward.

Layout inside: rows `[B, Hkv, row_tiles, R, Dp]`, keys `[B, Hkv, Tc_pad, Dp]`, row vectors
(lse, delta) `[B, Hkv, row_tiles, 1, R]` (rows on the lanes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import row_layout
from pallas_kernels.block_maps import positions_before_key_tiles
from pallas_kernels.row_layout import pow2 as _pow2
from pallas_kernels.row_layout import round_up as _round_up
from pallas_kernels.tpu.tile_math import dot_by_exact, dot_exact_by, dot_nn, dot_nt, dot_tn
from pallas_kernels.tpu.tile_math import softmax_backward_tile

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES = 128
# Rows (positions x heads) and compressed keys per tile: multiples of 128. 512 x 512 float32
# scores are 1 MiB of VMEM a tile (cost model: pallas_kernels/tpu/README.md; 128 x 128 had 16x
# the grid steps).
ROWS = 512
KEYS = 512
# Packed rows' walk tables (`_walk_tables`) in SMEM (1 MiB up to v6e; a margin for Mosaic's own
# scalars): 4 bytes per row tile and key tile of every row, 64 KiB at B = 8, T = 65536, G = 16.
SMEM_TABLE_BYTES = 512 * 1024


@dataclasses.dataclass(frozen=True)
class _Layout:
  batch: int
  seq_len: int
  num_kv_heads: int
  group: int
  heads: int  # Gc = pow2(G)
  positions: int  # per row tile
  num_cmp: int
  head_dim: int
  head_dim_v: int
  head_dim_pad: int
  head_dim_v_pad: int
  block: int
  stride: int
  documents: bool = False  # packed rows: a row vector of document starts follows the inputs

  @property
  def rows(self) -> int:
    return self.positions * self.heads

  @property
  def row_tiles(self) -> int:
    return -(-self.seq_len // self.positions)

  @property
  def key_tiles(self) -> int:
    return max(1, -(-self.num_cmp // KEYS))


def _layout(q, k_cmp, v_cmp, block, stride, documents=False) -> _Layout:
  b, t, hq, dk = q.shape
  hkv = k_cmp.shape[2]
  heads = _pow2(hq // hkv)
  return _Layout(batch=b, seq_len=t, num_kv_heads=hkv, group=hq // hkv, heads=heads,
                 positions=max(1, ROWS // heads), num_cmp=k_cmp.shape[1], head_dim=dk,
                 head_dim_v=v_cmp.shape[3], head_dim_pad=_round_up(dk, LANES),
                 head_dim_v_pad=_round_up(v_cmp.shape[3], LANES), block=block, stride=stride,
                 documents=documents)


def _to_rows(x, lay: _Layout, dim_pad):
  """`[B, T, Hq, D]` -> `[B, Hkv, row_tiles, R, Dp]`."""
  rows = row_layout.to_rows(x, lay.num_kv_heads, lay.row_tiles * lay.positions, lay.heads,
                           dim_pad)  # [B, Hkv, T_pad, Gc, Dp]
  return rows.reshape(lay.batch, lay.num_kv_heads, lay.row_tiles, lay.rows, dim_pad)


def _from_rows(x, lay: _Layout, dim):
  """`[B, Hkv, row_tiles, R, Dp]` -> `[B, T, Hq, D]`."""
  x = x.reshape(lay.batch, lay.num_kv_heads, lay.row_tiles * lay.positions, lay.heads, -1)
  return row_layout.from_rows(x, lay.seq_len, lay.group, dim)


def _vector_to_rows(x, lay: _Layout):
  """Per-head `[B, T, Hq]` -> `[B, Hkv, row_tiles, 1, R]`."""
  return _to_rows(x[..., None], lay, 1)[..., 0][:, :, :, None, :]


def _vector_from_rows(x, lay: _Layout):
  return _from_rows(x[:, :, :, 0, :, None], lay, 1)[..., 0]


def _to_keys(x, lay: _Layout, dim_pad):
  """`[B, Tc, Hkv, D]` -> `[B, Hkv, Tc_pad, Dp]`."""
  pad = lay.key_tiles * KEYS - x.shape[1]
  return jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, dim_pad - x.shape[3])]).transpose(0, 2, 1, 3)


def _num_visible(pos, lay: _Layout):
  """Compressed blocks visible to position `pos`: `i*d + l - 1 <= pos`, at most Tc."""
  seen = jnp.where(pos >= lay.block - 1, (pos - lay.block + 1) // lay.stride + 1, 0)
  return jnp.minimum(seen, lay.num_cmp)


def _walk_tables(starts, lay: _Layout):
  """Packed rows' walk bounds, int32 tables for scalar prefetch: `first_key_tile [B, row_tiles]`,
  the first key tile a row tile's rows can see (that of its first row's document's first slot
  `s // d`: starts never decrease along a row, and no row sees a slot before its document's),
  and `last_row_tile [B, key_tiles]`, the last row tile with a row whose document's first slot
  is in or before the key tile (later rows see none of its keys)."""
  table_bytes = 4 * lay.batch * (lay.row_tiles + lay.key_tiles)
  if table_bytes > SMEM_TABLE_BYTES:
    raise ValueError(f"packed rows of q [B, T] = [{lay.batch}, {lay.seq_len}] at G = {lay.group}: "
                     f"the compressed kernels' walk tables need {table_bytes} bytes of SMEM, more "
                     f"than {SMEM_TABLE_BYTES}; call them on fewer rows at a time")
  first_key_tile = starts[:, ::lay.positions] // lay.stride // KEYS
  # >= 1 (position 0's document starts at slot 0), so the last row tile is >= 0.
  rows_before = positions_before_key_tiles(starts, lay.stride, KEYS, lay.key_tiles)
  return first_key_tile.astype(jnp.int32), ((rows_before - 1) // lay.positions).astype(jnp.int32)


def _first_key_tile(walk_ref, batch, row_tile):
  """The first key tile `row_tile` walks: 0, or for packed rows `_walk_tables`'s bound."""
  return 0 if walk_ref is None else walk_ref[batch, row_tile]


def _last_key_tile(row_tile, lay: _Layout):
  """The last key tile any row of `row_tile` sees (0 if none; then nothing is computed)."""
  last_pos = jnp.minimum((row_tile + 1) * lay.positions - 1, lay.seq_len - 1)
  seen = _num_visible(last_pos, lay)
  return jnp.maximum(pl.cdiv(seen, KEYS) - 1, 0), seen > 0


def _seen_whole(row_tile, key_tile, lay: _Layout):
  """Whether every row of `row_tile` sees every key of `key_tile`: its first position sees the
  tile's last key (keys seen by a position are seen by all later ones). Never for packed rows
  (a document's rows do not see the slots before its own)."""
  if lay.documents:
    return jnp.bool_(False)
  return (key_tile + 1) * KEYS <= _num_visible(row_tile * lay.positions, lay)


def _when_active(active, whole, body):
  """Runs `body(masked)` on an active tile: `masked=False` where every row sees the tile whole
  (`_seen_whole`), which skips building and applying the staircase mask, ~9 VPU operations a
  score (two iotas, the position and key arithmetic, two compares, an and, two selects) against
  the softmax's ~5; for a 512-row tile only the last key tile of its walk needs it."""
  @pl.when(active & whole)
  def _whole():
    body(False)

  @pl.when(active & jnp.logical_not(whole))
  def _masked():
    body(True)


def _first_row_tile(key_tile, lay: _Layout):
  """The first row tile that sees key tile `key_tile`'s first key."""
  first_pos = key_tile * KEYS * lay.stride + lay.block - 1
  return jnp.minimum(first_pos // lay.positions, lay.row_tiles - 1)


def _last_row_tile(walk_ref, batch, key_tile, lay: _Layout):
  """The last row tile dK/dV walks for `key_tile`: the last one, or for packed rows
  `_walk_tables`'s bound."""
  return lay.row_tiles - 1 if walk_ref is None else walk_ref[batch, key_tile]


def _scores(q, k, row_tile, key_tile, lay: _Layout, scale, masked=True, starts_ref=None):
  """Masked `scale * q . k`, `[R, KEYS]` float32, and the visibility mask (with
  `masked=False`, for tiles every row sees whole, the plain scores and None). `starts_ref`:
  packed rows' `[1, R]` document starts."""
  s = dot_nt(q, k) * scale
  if not masked:
    return s, None
  row = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
  key = key_tile * KEYS + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
  pos = row_tile * lay.positions + row // lay.heads
  if starts_ref is None:
    visible = key * lay.stride + lay.block - 1 <= pos
  else:
    starts = starts_ref[...].T.astype(jnp.int32)  # [R, 1]
    visible = (key >= starts // lay.stride) & (
        key * lay.stride + lay.block - 1 + starts % lay.stride <= pos)
  visible = visible & (key < lay.num_cmp)
  return jnp.where(visible, s, MASK_VALUE), visible


def _online_softmax_step(s, visible, m_scratch, l_scratch):
  """Updates the running max / sum with one tile of scores (`visible` None: all visible);
  returns `(p, alpha)`."""
  m_prev = m_scratch[...]  # [R, 128], lanes replicated
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  p = jnp.exp(s - m_new[:, :1])
  if visible is not None:  # masked entries count 0 even in a row that sees nothing yet
    p = jnp.where(visible, p, 0.0)
  alpha = jnp.exp(m_prev - m_new)
  l_scratch[...] = alpha * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
  m_scratch[...] = m_new
  return p, alpha


def _init_softmax(m_scratch, l_scratch):
  m_scratch[...] = jnp.full(m_scratch.shape, MASK_VALUE, jnp.float32)
  l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)


def _final_lse(m_scratch, l_scratch):
  """`([1, R] lse with +inf for rows that saw nothing, [R, 1] safe row sums)`."""
  l = l_scratch[...][:, :1]
  safe = jnp.where(l > 0, l, 1.0)
  return jnp.where(l > 0, m_scratch[...][:, :1] + jnp.log(safe), jnp.inf).T, safe


def _split_walk(refs, lay: _Layout):
  """`(walk_ref or None, the other refs)`: packed rows' scalar-prefetched walk table (SMEM)
  comes before the inputs."""
  return (refs[0], refs[1:]) if lay.documents else (None, refs)


def _split_starts(refs, lay: _Layout):
  """`(starts_ref or None, the other refs)`: packed rows' document starts come first."""
  return (refs[0], refs[1:]) if lay.documents else (None, refs)


def _forward_kernel(*refs, lay, scale):
  """One pass: online softmax, output and log-sum-exp (no selection scores)."""
  walk_ref, (q_ref, k_ref, v_ref, *refs) = _split_walk(refs, lay)
  starts_ref, (o_ref, lse_ref, m_scratch, l_scratch, acc_scratch) = _split_starts(refs, lay)
  batch, _, row_tile, key_tile = (pl.program_id(i) for i in range(4))
  last_tile, any_visible = _last_key_tile(row_tile, lay)
  first_tile = _first_key_tile(walk_ref, batch, row_tile)

  @pl.when(key_tile == 0)
  def _init():
    _init_softmax(m_scratch, l_scratch)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  def accumulate(masked):
    s, visible = _scores(q_ref[...], k_ref[...], row_tile, key_tile, lay, scale, masked,
                         starts_ref)
    p, alpha = _online_softmax_step(s, visible, m_scratch, l_scratch)
    v = v_ref[...]
    acc_scratch[...] = acc_scratch[...] * alpha[:, :1] + dot_nn(p.astype(v.dtype), v)

  _when_active((first_tile <= key_tile) & (key_tile <= last_tile) & any_visible,
               _seen_whole(row_tile, key_tile, lay), accumulate)

  @pl.when(key_tile == lay.key_tiles - 1)
  def _finish():
    lse, safe = _final_lse(m_scratch, l_scratch)
    o_ref[...] = (acc_scratch[...] / safe).astype(o_ref.dtype)
    lse_ref[...] = lse


def _lse_kernel(*refs, lay, scale):
  """Pass 1 of the fused forward: the log-sum-exp only (no values)."""
  walk_ref, (q_ref, k_ref, *refs) = _split_walk(refs, lay)
  starts_ref, (lse_ref, m_scratch, l_scratch) = _split_starts(refs, lay)
  batch, _, row_tile, key_tile = (pl.program_id(i) for i in range(4))
  last_tile, any_visible = _last_key_tile(row_tile, lay)
  first_tile = _first_key_tile(walk_ref, batch, row_tile)

  @pl.when(key_tile == 0)
  def _init():
    _init_softmax(m_scratch, l_scratch)

  def accumulate(masked):
    s, visible = _scores(q_ref[...], k_ref[...], row_tile, key_tile, lay, scale, masked,
                         starts_ref)
    _online_softmax_step(s, visible, m_scratch, l_scratch)

  _when_active((first_tile <= key_tile) & (key_tile <= last_tile) & any_visible,
               _seen_whole(row_tile, key_tile, lay), accumulate)

  @pl.when(key_tile == lay.key_tiles - 1)
  def _finish():
    lse_ref[...] = _final_lse(m_scratch, l_scratch)[0]


def _overlap(lay: _Layout, slc_block, first_block):
  """`[KEYS, owned]`: overlap / d of tile-local key `i` with tile-local selection block
  `first_block + j` (both counted in stride-`d` sub-blocks)."""
  owned = KEYS * lay.stride // slc_block
  per_cmp, per_slc = lay.block // lay.stride, slc_block // lay.stride
  sub = jax.lax.broadcasted_iota(jnp.int32, (KEYS, owned), 0)
  slc = (first_block + jax.lax.broadcasted_iota(jnp.int32, (KEYS, owned), 1)) * per_slc
  return jnp.maximum(jnp.minimum(sub + per_cmp, slc + per_slc) - jnp.maximum(sub, slc),
                     0).astype(jnp.float32)


def _group_sum(p, lay: _Layout):
  """`p [R, KEYS]` -> `[positions, KEYS]`: each position's probabilities summed over its group's
  heads. Rows of padded heads (G not a power of two) see q = 0, so p > 0 there: not in the sum.
  With 8 or more heads a position's rows are whole sublane tiles, so the sum is a free reshape
  and VPU adds; fewer heads take a 0/1 matmul (three MXU passes, `dot_exact_by`)."""
  row = jax.lax.broadcasted_iota(jnp.int32, (lay.rows, 1), 0)
  if lay.heads >= 8:
    if lay.group != lay.heads:
      p = jnp.where(row % lay.heads < lay.group, p, 0.0)
    return jnp.sum(p.reshape(lay.positions, lay.heads, p.shape[1]), axis=1)
  position = jax.lax.broadcasted_iota(jnp.int32, (lay.positions, lay.rows), 0)
  row = jax.lax.broadcasted_iota(jnp.int32, (lay.positions, lay.rows), 1)
  to_position = (row // lay.heads == position) & (row % lay.heads < lay.group)
  return dot_exact_by(to_position.astype(jnp.float32), p)


def _phase_overlap(lay: _Layout, slc_block, first_block, phase: int):
  """`[KEYS, owned]` for packed rows whose documents start at sub-block `a m + phase` of the
  grid (`m = l' / d`): overlap / d of tile-local key `i` with the span `[(e - 1) m + phase,
  e m + phase)` of column `e = first_block + j`, that is document block `e - 1 - a`."""
  owned = KEYS * lay.stride // slc_block
  per_cmp, per_slc = lay.block // lay.stride, slc_block // lay.stride
  sub = jax.lax.broadcasted_iota(jnp.int32, (KEYS, owned), 0)
  first = (first_block - 1 + jax.lax.broadcasted_iota(jnp.int32, (KEYS, owned), 1)) * per_slc
  first = first + phase
  return jnp.maximum(jnp.minimum(sub + per_cmp, first + per_slc) - jnp.maximum(sub, first),
                     0).astype(jnp.float32)


def _document_scores(p, starts_ref, lay: _Layout, slc_block):
  """Packed rows' scores of one key tile: `(own [positions, owned], spill into the next
  tile's columns)`, column `e` holding document block `e - 1 - a` of a row whose document
  starts at sub-block `a m + b` (`_phase_overlap`). A row's phase `b` is its own, so each of the
  `m` phases takes its rows' probabilities through its own maps: `m` times the unpacked map
  products (the cost model in README.md)."""
  per_slc = slc_block // lay.stride
  owned = KEYS * lay.stride // slc_block
  phase = starts_ref[...].T.astype(jnp.int32) // lay.stride % per_slc  # [R, 1]
  own = spill = jnp.zeros((lay.positions, owned), jnp.float32)
  for b in range(per_slc):
    p_grp = _group_sum(jnp.where(phase == b, p, 0.0), lay)
    own += dot_by_exact(p_grp, _phase_overlap(lay, slc_block, 0, b))
    spill += dot_by_exact(p_grp, _phase_overlap(lay, slc_block, owned, b))
  return own, spill


def _output_and_scores_kernel(*refs, lay, scale, slc_block):
  """Pass 2 of the fused forward: with the exact `p = exp(s - lse)`, the output and the scores
  (packed rows: on document blocks shifted by one column, `_document_scores`).

  The key axis has one step more than there are key tiles: the step after a row tile's last
  visible tile writes the overlap carried out of it (then zeros), and the last step the output.
  Packed rows' tiles before the walk's first write zeros (no row sees them, none spills).
  """
  walk_ref, (q_ref, k_ref, v_ref, lse_ref, *refs) = _split_walk(refs, lay)
  starts_ref, (o_ref, score_ref, acc_scratch, carry_scratch) = _split_starts(refs, lay)
  batch, _, row_tile, key_tile = (pl.program_id(i) for i in range(4))
  last_tile, any_visible = _last_key_tile(row_tile, lay)
  first_tile = _first_key_tile(walk_ref, batch, row_tile)
  active = ((first_tile <= key_tile) & (key_tile <= last_tile) & any_visible
            & (key_tile < lay.key_tiles))

  @pl.when(key_tile == 0)
  def _init():
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)
    carry_scratch[...] = jnp.zeros(carry_scratch.shape, jnp.float32)

  def accumulate(masked):
    s, _ = _scores(q_ref[...], k_ref[...], row_tile, key_tile, lay, scale, masked, starts_ref)
    # [R, KEYS], already normalised; masked scores (MASK_VALUE) and rows that see nothing
    # (lse = +inf) give exp = 0 without a select.
    p = jnp.exp(s - lse_ref[...].T)
    v = v_ref[...]
    acc_scratch[...] += dot_nn(p.astype(v.dtype), v)
    if starts_ref is not None:
      own, spill = _document_scores(p, starts_ref, lay, slc_block)
      score_ref[...] = own + carry_scratch[...]
      carry_scratch[...] = spill
      return
    p_grp = _group_sum(p, lay)  # [positions, KEYS]
    owned = KEYS * lay.stride // slc_block
    score_ref[...] = dot_by_exact(p_grp, _overlap(lay, slc_block, 0)) + carry_scratch[...]
    carry_scratch[...] = dot_by_exact(p_grp, _overlap(lay, slc_block, owned))

  _when_active(active, _seen_whole(row_tile, key_tile, lay), accumulate)

  @pl.when(jnp.logical_not(active))
  def _spill():  # a tile after the last visible one receives the carried overlap, then zeros
    score_ref[...] = carry_scratch[...]
    carry_scratch[...] = jnp.zeros(carry_scratch.shape, jnp.float32)

  @pl.when(key_tile == lay.key_tiles)
  def _finish():
    o_ref[...] = acc_scratch[...].astype(o_ref.dtype)


def _dq_kernel(*refs, lay, scale):
  walk_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs) = _split_walk(refs, lay)
  starts_ref, (dq_ref, dq_scratch) = _split_starts(refs, lay)
  batch, _, row_tile, key_tile = (pl.program_id(i) for i in range(4))
  last_tile, any_visible = _last_key_tile(row_tile, lay)
  first_tile = _first_key_tile(walk_ref, batch, row_tile)

  @pl.when(key_tile == 0)
  def _init():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  def accumulate(masked):
    k = k_ref[...]
    s, visible = _scores(q_ref[...], k, row_tile, key_tile, lay, scale, masked, starts_ref)
    _, ds = softmax_backward_tile(s, visible, lse_ref[...], delta_ref[...], do_ref[...],
                                  v_ref[...])  # [R, KEYS]
    dq_scratch[...] += dot_nn(ds.astype(k.dtype), k)

  _when_active((first_tile <= key_tile) & (key_tile <= last_tile) & any_visible,
               _seen_whole(row_tile, key_tile, lay), accumulate)

  @pl.when(key_tile == lay.key_tiles - 1)
  def _finish():
    dq_ref[...] = (dq_scratch[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, lay, scale):
  walk_ref, (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs) = _split_walk(refs, lay)
  starts_ref, (dk_ref, dv_ref, dk_scratch, dv_scratch) = _split_starts(refs, lay)
  batch, _, key_tile, row_tile = (pl.program_id(i) for i in range(4))

  @pl.when(row_tile == 0)
  def _init():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  def accumulate(masked):
    q, do = q_ref[...], do_ref[...]
    s, visible = _scores(q, k_ref[...], row_tile, key_tile, lay, scale, masked, starts_ref)
    p, ds = softmax_backward_tile(s, visible, lse_ref[...], delta_ref[...], do,
                                  v_ref[...])  # [R, KEYS]
    dv_scratch[...] += dot_tn(p.astype(do.dtype), do)
    dk_scratch[...] += dot_tn(ds.astype(q.dtype), q)

  _when_active((row_tile >= _first_row_tile(key_tile, lay))
               & (row_tile <= _last_row_tile(walk_ref, batch, key_tile, lay)),
               _seen_whole(row_tile, key_tile, lay), accumulate)

  @pl.when(row_tile == lay.row_tiles - 1)
  def _finish():
    dk_ref[...] = (dk_scratch[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _interpret(interpret):
  return pltpu.InterpretParams(detect_races=True) if interpret else False


def _params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


_ROW_MAJOR = ("parallel", "parallel", "parallel", "arbitrary")


def _row_major_specs(lay: _Layout):
  rows = lambda d: pl.BlockSpec((None, None, None, lay.rows, d),
                                lambda b, g, rt, kt, *_: (b, g, rt, 0, 0))
  vector = pl.BlockSpec((None, None, None, 1, lay.rows),
                        lambda b, g, rt, kt, *_: (b, g, rt, 0, 0))

  def key_tile(b, g, rt, kt, *walk):  # tiles off the walk repeat its nearest end: no DMA
    first = _first_key_tile(walk[0] if walk else None, b, rt)
    return b, g, jnp.minimum(jnp.maximum(kt, first), _last_key_tile(rt, lay)[0]), 0
  keys = lambda d: pl.BlockSpec((None, None, KEYS, d), key_tile)
  return rows, vector, keys


def _call(kernel, name, grid, in_specs, out_specs, out_shape, scratch, interpret, walk=None):
  """`pallas_call` over `grid`; packed rows' walk table `walk` is scalar-prefetched into SMEM
  (the kernel's first ref, the index maps' last argument)."""
  prefetch = [] if walk is None else [walk]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch), grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=scratch)
  call = pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, name=name,
                        compiler_params=_params(_ROW_MAJOR), interpret=_interpret(interpret))
  return lambda *args: call(*prefetch, *args)


def _forward(q, k, v, lay: _Layout, scale, slc_block, interpret, starts=None, walk=None):
  """`(out_rows, lse_rows, scores or None)`: one online pass, or, with `slc_block`, the fused two
  passes (log-sum-exp, then output and selection scores from the exact probabilities). Packed
  rows: `starts` (row vector) and `walk` (`first_key_tile` of `_walk_tables`)."""
  rows, vector, keys = _row_major_specs(lay)
  shape = (lay.batch, lay.num_kv_heads, lay.row_tiles)
  # float32 output rows: the backward's delta needs them unrounded (as in the selected kernel).
  out_shape = jax.ShapeDtypeStruct(shape + (lay.rows, lay.head_dim_v_pad), jnp.float32)
  lse_shape = jax.ShapeDtypeStruct(shape + (1, lay.rows), jnp.float32)
  softmax_scratch = [pltpu.VMEM((lay.rows, LANES), jnp.float32),
                     pltpu.VMEM((lay.rows, LANES), jnp.float32)]
  acc_scratch = pltpu.VMEM((lay.rows, lay.head_dim_v_pad), jnp.float32)
  packed = [] if starts is None else [starts]
  if not slc_block:
    out_rows, lse_rows = _call(
        functools.partial(_forward_kernel, lay=lay, scale=scale), "nsa_compressed_fwd_tpu",
        shape + (lay.key_tiles,),
        [rows(lay.head_dim_pad), keys(lay.head_dim_pad), keys(lay.head_dim_v_pad)]
        + [vector] * len(packed),
        [rows(lay.head_dim_v_pad), vector], [out_shape, lse_shape],
        softmax_scratch + [acc_scratch], interpret, walk)(q, k, v, *packed)
    return out_rows, lse_rows, None
  lse_rows = _call(
      functools.partial(_lse_kernel, lay=lay, scale=scale), "nsa_compressed_lse_tpu",
      shape + (lay.key_tiles,), [rows(lay.head_dim_pad), keys(lay.head_dim_pad)]
      + [vector] * len(packed), vector, lse_shape, softmax_scratch, interpret, walk)(q, k, *packed)
  owned = KEYS * lay.stride // slc_block
  score_shape = shape + (lay.key_tiles + 1, lay.positions, owned)
  out_rows, scores = _call(
      functools.partial(_output_and_scores_kernel, lay=lay, scale=scale, slc_block=slc_block),
      "nsa_compressed_output_scores_tpu", shape + (lay.key_tiles + 1,),
      [rows(lay.head_dim_pad), keys(lay.head_dim_pad), keys(lay.head_dim_v_pad), vector]
      + [vector] * len(packed),
      [rows(lay.head_dim_v_pad),
       pl.BlockSpec((None, None, None, None, lay.positions, owned),
                    lambda b, g, rt, kt, *_: (b, g, rt, kt, 0, 0))],
      [out_shape, jax.ShapeDtypeStruct(score_shape, jnp.float32)],
      [acc_scratch, pltpu.VMEM((lay.positions, owned), jnp.float32)], interpret,
      walk)(q, k, v, lse_rows, *packed)
  scores = scores.transpose(0, 1, 2, 4, 3, 5).reshape(
      lay.batch, lay.num_kv_heads, lay.row_tiles * lay.positions, (lay.key_tiles + 1) * owned)
  # [B, Hkv, T, Ts]; packed rows' columns are one further on (document block j + a + 1).
  width = -(-lay.seq_len // slc_block) + bool(packed)
  scores = jnp.pad(scores, [(0, 0)] * 3 + [(0, max(width - scores.shape[-1], 0))])
  return out_rows, lse_rows, scores[:, :, :lay.seq_len, :width]


def _backward(q, k, v, do, lse, delta, lay: _Layout, scale, interpret, starts=None, walks=None):
  """`(dq, dk, dv)` in the kernels' layouts. Packed rows: `starts` (row vector) and `walks`
  (both tables of `_walk_tables`)."""
  rows, vector, keys = _row_major_specs(lay)
  packed = [] if starts is None else [starts]
  first_key_tile, last_row_tile = walks or (None, None)
  dq = _call(
      functools.partial(_dq_kernel, lay=lay, scale=scale), "nsa_compressed_dq_tpu",
      (lay.batch, lay.num_kv_heads, lay.row_tiles, lay.key_tiles),
      [rows(lay.head_dim_pad), keys(lay.head_dim_pad), keys(lay.head_dim_v_pad),
       rows(lay.head_dim_v_pad), vector, vector] + [vector] * len(packed),
      rows(lay.head_dim_pad), jax.ShapeDtypeStruct(q.shape, q.dtype),
      [pltpu.VMEM((lay.rows, lay.head_dim_pad), jnp.float32)], interpret,
      first_key_tile)(q, k, v, do, lse, delta, *packed)
  # dK/dV: key tiles outer, row tiles streamed; rows before a key tile's first viewer (and, for
  # packed rows, after its last) are skipped and their index map repeats the nearest walked one
  # (no DMA).
  def row_tile(b, g, kt, rt, *walk):
    last = _last_row_tile(walk[0] if walk else None, b, kt, lay)
    return b, g, jnp.minimum(jnp.maximum(rt, _first_row_tile(kt, lay)), last), 0, 0
  rows_kv = lambda d: pl.BlockSpec((None, None, None, lay.rows, d), row_tile)
  vector_kv = pl.BlockSpec((None, None, None, 1, lay.rows), row_tile)
  key_tile = lambda d: pl.BlockSpec((None, None, KEYS, d),
                                    lambda b, g, kt, rt, *_: (b, g, kt, 0))
  dk, dv = _call(
      functools.partial(_dkv_kernel, lay=lay, scale=scale), "nsa_compressed_dkv_tpu",
      (lay.batch, lay.num_kv_heads, lay.key_tiles, lay.row_tiles),
      [rows_kv(lay.head_dim_pad), key_tile(lay.head_dim_pad), key_tile(lay.head_dim_v_pad),
       rows_kv(lay.head_dim_v_pad), vector_kv, vector_kv] + [vector_kv] * len(packed),
      [key_tile(lay.head_dim_pad), key_tile(lay.head_dim_v_pad)],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      [pltpu.VMEM((KEYS, lay.head_dim_pad), jnp.float32),
       pltpu.VMEM((KEYS, lay.head_dim_v_pad), jnp.float32)], interpret,
      last_row_tile)(q, k, v, do, lse, delta, *packed)
  return dq, dk, dv


def _starts_rows(starts, lay: _Layout):
  """Packed rows' document starts `[B, T]` -> the float32 row vector `[B, Hkv, row_tiles, 1, R]`
  (None stays None)."""
  if starts is None:
    return None
  per_head = jnp.broadcast_to(starts[:, :, None].astype(jnp.float32),
                              starts.shape + (lay.num_kv_heads * lay.group,))
  return _vector_to_rows(per_head, lay)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _compressed(q, k_cmp, v_cmp, starts, scale, block, stride, slc_block, interpret):
  return _compressed_fwd(q, k_cmp, v_cmp, starts, scale, block, stride, slc_block, interpret)[0]


def _compressed_fwd(q, k_cmp, v_cmp, starts, scale, block, stride, slc_block, interpret):
  lay = _layout(q, k_cmp, v_cmp, block, stride, starts is not None)
  first_key_tile = None if starts is None else _walk_tables(starts, lay)[0]
  out_rows, lse_rows, scores = _forward(
      _to_rows(q, lay, lay.head_dim_pad), _to_keys(k_cmp, lay, lay.head_dim_pad),
      _to_keys(v_cmp, lay, lay.head_dim_v_pad), lay, scale, slc_block, interpret,
      _starts_rows(starts, lay), first_key_tile)
  lse = _vector_from_rows(lse_rows, lay)
  lse = jnp.where(jnp.isinf(lse), -jnp.inf, lse)  # internal +inf (empty rows) -> public -inf
  out = _from_rows(out_rows, lay, lay.head_dim_v).astype(q.dtype)
  return (out, lse, scores), (q, k_cmp, v_cmp, starts, out_rows, lse_rows)


def _compressed_bwd(scale, block, stride, slc_block, interpret, residuals, cotangents):
  del slc_block  # the scores feed the (non-differentiable) selection
  q, k_cmp, v_cmp, starts, out_rows, lse_rows = residuals
  d_out, d_lse, _ = cotangents
  lay = _layout(q, k_cmp, v_cmp, block, stride, starts is not None)
  do_rows = _to_rows(d_out.astype(q.dtype), lay, lay.head_dim_v_pad)
  delta = jnp.sum(out_rows.astype(jnp.float32) * do_rows.astype(jnp.float32), axis=-1)
  # d lse / d s = p, folded into delta: ds = p * (dp - delta + d_lse).
  delta = delta[:, :, :, None, :] - _vector_to_rows(d_lse.astype(jnp.float32), lay)
  dq, dk, dv = _backward(_to_rows(q, lay, lay.head_dim_pad),
                         _to_keys(k_cmp, lay, lay.head_dim_pad),
                         _to_keys(v_cmp, lay, lay.head_dim_v_pad), do_rows, lse_rows, delta, lay,
                         scale, interpret, _starts_rows(starts, lay),
                         None if starts is None else _walk_tables(starts, lay))
  unkeys = lambda x, d: x.transpose(0, 2, 1, 3)[:, :lay.num_cmp, :, :d]
  return (_from_rows(dq, lay, lay.head_dim), unkeys(dk, lay.head_dim),
          unkeys(dv, lay.head_dim_v), None)


_compressed.defvjp(_compressed_fwd, _compressed_bwd)


def compressed_attention(q, k_cmp, v_cmp, *, block: int, stride: int, scale: float,
                         interpret: bool = False, document_starts=None):
  """Attention over the compressed blocks inside each query's prefix (TPU).

  Args:
    q: `[B, T, Hq, Dk]`; k_cmp: `[B, Tc, Hkv, Dk]`; v_cmp: `[B, Tc, Hkv, Dv]`.
    block, stride: `l` and `d`. scale: softmax scale (a Python float).
    interpret: run under the TPU interpreter (CPU) with race detection.
    document_starts: int32 `[B, T]` or None: packed rows (SPEC.md), each position's document
      start; `k_cmp, v_cmp` then hold block `i` of the document starting at `s` in slot
      `s // d + i`.

  Returns:
    `(out [B, T, Hq, Dv] in q.dtype, lse [B, T, Hq] float32)`, `lse = -inf` where nothing is
    visible; differentiable through both.
  """
  out, lse, _ = _compressed(q, k_cmp, v_cmp, document_starts, float(scale), block, stride, 0,
                            interpret)
  return out, lse


def fusable(stride: int, slc_block: int) -> bool:
  """Whether a key tile of `KEYS` compressed blocks owns whole selection blocks."""
  return (KEYS * stride) % slc_block == 0


def compressed_attention_and_scores(q, k_cmp, v_cmp, *, block: int, stride: int, slc_block: int,
                                    scale: float, interpret: bool = False,
                                    document_starts=None):
  """`compressed_attention` fused with the selection scores of SPEC.md section 2, steps 1-3.

  Two passes over the key tiles: the log-sum-exp, then the output and the scores from the same
  exact probabilities. `slc_block` must divide `KEYS * stride` (`fusable`).

  Args:
    document_starts: int32 `[B, T]` or None: packed rows, as in `compressed_attention`.

  Returns:
    `(out, lse, scores)`, `scores [B, Hkv, T, Ts]` float32 (no gradient flows through them);
    packed rows: `[B, Hkv, T, Ts + 1]`, query `t`'s document block `j` in column `j + a + 1`,
    `a = (s // d) // (l' / d)` for its document start `s`.
  """
  if not fusable(stride, slc_block):
    raise ValueError(f"the TPU selection scores need slc_block ({slc_block}) to divide "
                     f"{KEYS} * cmp_stride ({KEYS * stride})")
  out, lse, scores = _compressed(q, k_cmp, v_cmp, document_starts, float(scale), block, stride,
                                 slc_block, interpret)
  return out, lse, jax.lax.stop_gradient(scores)

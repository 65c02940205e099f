"""Packed rows (`segment_ids`, SPEC.md): every position equals the function on its document alone.

Each implementation on packed rows against the oracle (`nsa_jax.reference`) applied per
document, on random inputs whose documents include length-1 documents, documents shorter than a
block and rows that end mid-block.
"""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import reference, xla
from nsa_jax.attention_math import combine_branches
from nsa_jax.config import NSAConfig
from nsa_jax.segments import document_ends, document_starts
from pallas_kernels import packed_rows
from tests.helpers import assert_close, assert_grads_close, fresh_key, random_gates, random_qkv

CONFIG = NSAConfig(cmp_block=4, cmp_stride=2, slc_block=8, num_selected=3, num_initial=1,
                   num_local=1, window=6)
# Row lengths 45 (ends mid-block): length-1 documents, ones shorter than l and l', long ones.
# (One document a row: `test_one_document_per_row_is_the_unpacked_function`.)
DOCUMENTS = ([1, 3, 9, 20, 1, 11], [17, 2, 26])
SCALE = 16 ** -0.5


def _xla_with_chunks(chunk):
  """The XLA path with `chunk`-query chunks, so that documents cross chunk boundaries."""
  with_chunk = lambda fn: functools.partial(fn, query_chunk=chunk)
  return types.SimpleNamespace(
      compress_kv=xla.compress_kv,
      compressed_attention=with_chunk(xla.compressed_attention),
      select_blocks=with_chunk(xla.select_blocks),
      selected_attention=with_chunk(xla.selected_attention),
      sliding_window_attention=with_chunk(xla.sliding_window_attention),
      nsa_attention=with_chunk(xla.nsa_attention))


IMPLEMENTATIONS = {"reference": reference, "xla": _xla_with_chunks(16)}


@pytest.fixture(autouse=True)
def packed_routes(monkeypatch):
  """The kernels' packed routes, pinned on whatever the defaults: whole blocks where documents
  start on block boundaries, else the padded row where its padding fits, else the halves (GPU
  and TPU); the GPU top-n's narrow widths. Which route a row takes follows from its documents
  (DOCUMENTS: halves; ALIGNED_DOCUMENTS: whole blocks; PADDED_DOCUMENTS: the padded row)."""
  from pallas_kernels.gpu import selected_attention as gpu_selected
  from pallas_kernels.gpu import top_n as gpu_top_n
  from pallas_kernels.tpu import selected_attention as tpu_selected
  for module in (gpu_selected, tpu_selected):
    monkeypatch.setattr(module, "WHOLE_BLOCK_DOCUMENTS", True)
    monkeypatch.setattr(module, "PADDED_ROWS", True)
  monkeypatch.setattr(gpu_top_n, "PACKED_NARROW_WIDTHS", True)
  jax.clear_caches()  # jitted entry points read the switches when they trace
  yield
  jax.clear_caches()


def segment_ids_of(rows):
  """`int32 [B, T]` with ids that repeat further on (only changes start a document)."""
  return jnp.asarray([np.repeat(np.arange(len(lengths)) % 2, lengths) for lengths in rows],
                     jnp.int32)


def documents(rows):
  """`(row, start, end)` of every document."""
  for b, lengths in enumerate(rows):
    ends = np.cumsum(lengths)
    for start, end in zip(ends - lengths, ends):
      yield b, int(start), int(end)


def test_document_starts_and_ends():
  segment_ids = jnp.asarray([[7, 7, 3, 3, 3, 7, 5], [1, 1, 1, 1, 1, 1, 1]], jnp.int32)
  np.testing.assert_array_equal(document_starts(segment_ids),
                                [[0, 0, 2, 2, 2, 5, 6], [0] * 7])
  np.testing.assert_array_equal(document_ends(segment_ids), [[2, 2, 5, 5, 5, 6, 7], [7] * 7])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_compressed_blocks_sit_in_their_documents_slots(impl):
  _, k, v = random_qkv(2, 45, 2, 2, 16)
  k_cmp, v_cmp = IMPLEMENTATIONS[impl].compress_kv(k, v, CONFIG.cmp_block, CONFIG.cmp_stride,
                                                   segment_ids_of(DOCUMENTS))
  used = np.zeros(k_cmp.shape[:2], bool)
  for b, start, end in documents(DOCUMENTS):
    alone_k, alone_v = reference.compress_kv(k[b:b + 1, start:end], v[b:b + 1, start:end],
                                             CONFIG.cmp_block, CONFIG.cmp_stride)
    slots = start // CONFIG.cmp_stride + np.arange(alone_k.shape[1])
    assert not used[b, slots].any()  # no two documents share a slot
    used[b, slots] = True
    assert_close(k_cmp[b, slots], alone_k[0])
    assert_close(v_cmp[b, slots], alone_v[0])
  np.testing.assert_array_equal(k_cmp[~used], 0)  # slots without a block are zero


def per_document(fn, arrays, rows=DOCUMENTS):
  """`fn` applied to each document alone, reassembled into packed rows (arrays `[B, T, ...]`).

  Each document runs zero-padded at its end to the rows' length T: every function here is
  causal, so positions past a document's end change nothing before it (with a zero cotangent
  there, not its gradients either), and one shape for all documents compiles `fn`'s programs
  once rather than once a document length."""
  outputs = None
  length = arrays[0].shape[1]
  for b, start, end in documents(rows):
    pad = lambda x: np.pad(x[b:b + 1, start:end], [(0, 0), (0, length - (end - start))]
                           + [(0, 0)] * (x.ndim - 2))
    result = fn(*[pad(x) for x in arrays])
    result = result if isinstance(result, tuple) else (result,)
    if outputs is None:
      outputs = [np.zeros(arrays[0].shape[:2] + r.shape[2:], r.dtype) for r in result]
    for out, r in zip(outputs, result):
      out[b, start:end] = r[0, :end - start]
  return outputs


def compress(k, v, segment_ids=None):
  return reference.compress_kv(k, v, CONFIG.cmp_block, CONFIG.cmp_stride, segment_ids)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_each_branch_and_the_selection_equal_their_documents_alone(impl):
  fns = IMPLEMENTATIONS[impl]
  q, k, v = random_qkv(2, 45, 4, 2, 16)  # groups of 2 query heads share a selection
  segment_ids = segment_ids_of(DOCUMENTS)
  k_cmp, v_cmp = compress(k, v, segment_ids)

  def compressed_alone(q, k, v):
    return reference.compressed_attention(q, *compress(k, v), SCALE, block=CONFIG.cmp_block,
                                          stride=CONFIG.cmp_stride)
  out, lse = fns.compressed_attention(q, k_cmp, v_cmp, SCALE, block=CONFIG.cmp_block,
                                      stride=CONFIG.cmp_stride, segment_ids=segment_ids)
  alone_out, alone_lse = per_document(compressed_alone, (q, k, v))
  assert_close(out, alone_out)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(alone_lse))  # nothing visible: -inf
  assert_close(jnp.where(jnp.isinf(lse), 0, lse), np.where(np.isinf(alone_lse), 0, alone_lse))

  indices = fns.select_blocks(q, k_cmp, SCALE, config=CONFIG, segment_ids=segment_ids)
  alone_indices, = per_document(
      lambda q, k, v: reference.select_blocks(q, compress(k, v)[0], SCALE, config=CONFIG),
      (q, k, v))
  np.testing.assert_array_equal(indices, alone_indices)

  selected = fns.selected_attention(q, k, v, indices, SCALE, block=CONFIG.slc_block,
                                    segment_ids=segment_ids)
  assert_close(selected, per_document(
      lambda q, k, v, idx: reference.selected_attention(q, k, v, idx, SCALE,
                                                        block=CONFIG.slc_block),
      (q, k, v, indices))[0])

  window = fns.sliding_window_attention(q, k, v, SCALE, window=CONFIG.window,
                                        segment_ids=segment_ids)
  assert_close(window, per_document(
      lambda q, k, v: reference.sliding_window_attention(q, k, v, SCALE, window=CONFIG.window),
      (q, k, v))[0])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_nsa_values_and_gradients_equal_their_documents_alone(impl):
  q, k, v = random_qkv(2, 45, 4, 2, 16)

  def packed(q, k, v, gates, segment_ids):
    k_cmp, v_cmp = compress(k, v, segment_ids)
    return IMPLEMENTATIONS[impl].nsa_attention(q, k, v, gates, k_cmp, v_cmp, SCALE,
                                               config=CONFIG, segment_ids=segment_ids)

  _check_against_documents_alone(
      packed,
      lambda q, k, v, gates: reference.nsa_attention(q, k, v, gates, *compress(k, v), SCALE,
                                                     config=CONFIG),
      (q, k, v, random_gates(q)))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_one_document_per_row_is_the_unpacked_function(impl):
  fns = IMPLEMENTATIONS[impl]
  q, k, v = random_qkv(2, 45, 4, 2, 16)
  gates = random_gates(q)
  one_document = jnp.full(q.shape[:2], 3, jnp.int32)
  k_cmp, v_cmp = fns.compress_kv(k, v, CONFIG.cmp_block, CONFIG.cmp_stride)
  assert_close(fns.compress_kv(k, v, CONFIG.cmp_block, CONFIG.cmp_stride, one_document)[0], k_cmp)
  unpacked = fns.nsa_attention(q, k, v, gates, k_cmp, v_cmp, SCALE, config=CONFIG)
  packed = fns.nsa_attention(q, k, v, gates, k_cmp, v_cmp, SCALE, config=CONFIG,
                             segment_ids=one_document)
  assert_close(packed, unpacked)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_public_ops_take_segment_ids_under_jit_and_vmap(impl):
  q, k, v = random_qkv(2, 45, 4, 2, 16)
  gates = random_gates(q)
  segment_ids = segment_ids_of(DOCUMENTS)
  packed = jax.jit(lambda q, k, v, gates, segment_ids: nsa_jax.nsa_attention(
      q, k, v, config=CONFIG, gates=gates, implementation=impl, segment_ids=segment_ids))
  expected, = per_document(
      lambda q, k, v, gates: reference.nsa_attention(q, k, v, gates, *compress(k, v), SCALE,
                                                     config=CONFIG), (q, k, v, gates))
  assert_close(packed(q, k, v, gates, segment_ids), expected)
  # vmap over a leading axis: two packings of the same rows.
  stacked = lambda x: jnp.stack([x, x])
  both = jax.vmap(packed)(*map(stacked, (q, k, v, gates, segment_ids)))
  assert_close(both[1], expected)
  # A K/V set per branch: the same rule.
  keys, values = [k, k[..., ::-1], -k], [v, v[..., ::-1], -v]
  separate = nsa_jax.nsa_attention_separate_kv(q, keys, values, config=CONFIG, gates=gates,
                                               implementation=impl, segment_ids=segment_ids)

  def separate_alone(q, k0, k1, k2, v0, v1, v2, gates):
    return nsa_jax.nsa_attention_separate_kv(q, [k0, k1, k2], [v0, v1, v2], config=CONFIG,
                                             gates=gates, implementation="reference")
  assert_close(separate, per_document(separate_alone, (q, *keys, *values, gates))[0])


def test_bad_segment_ids_are_clear_errors():
  q, k, v = random_qkv(2, 45, 4, 2, 16)
  with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, T\] = \[2, 45\], got "
                                       r"\(2, 44\) \(q \(2, 45, 4, 16\)\)"):
    nsa_jax.nsa_attention(q, k, v, config=CONFIG, segment_ids=jnp.zeros((2, 44), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids must be an integer array"):
    nsa_jax.sliding_window_attention(q, k, v, window=4, segment_ids=jnp.zeros((2, 45)))
  with pytest.raises(ValueError, match=r"segment_ids must have shape .* \(k \(2, 45, 2, 16\)\)"):
    nsa_jax.compress_kv(k, v, block=4, stride=2, segment_ids=jnp.zeros((45,), jnp.int32))


def test_document_block_halves_choose_exactly_the_documents_blocks_tokens():
  """Aligned blocks with LOWER / UPPER codes and offsets r cover the tokens of the chosen
  document-local blocks that are not after the query, nothing else."""
  from pallas_kernels.block_maps import LOWER, UPPER, document_block_halves
  block, lengths = 8, [3, 13, 1, 21, 9]
  segment_ids = segment_ids_of([lengths])
  starts = document_starts(segment_ids)
  t = sum(lengths)
  indices = jax.random.randint(fresh_key(), (1, t, 1, 3), -1, 4)
  aligned, codes, r = map(np.asarray, document_block_halves(indices, starts, block))
  for pos in range(t):
    s = int(starts[0, pos])
    want = {token for j in np.asarray(indices[0, pos, 0]) if j >= 0
            for token in range(s + j * block, s + (j + 1) * block) if token <= pos}
    got = {int(a) * block + o for a, code in zip(aligned[0, pos, 0], codes[0, pos, 0]) if a >= 0
           for o in range(block) if int(a) * block + o <= pos
           and code & (LOWER if o < r[0, pos] else UPPER)}
    assert got == want, pos


def test_span_blocks_cover_exactly_each_span_and_walk_nothing_for_an_empty_one():
  """`span_blocks` (the packed window's early positions): the keys `first .. t` and no others;
  a span starting after its position (`first > t`) has no block at all, so the kernels walk
  none for it."""
  from pallas_kernels.block_maps import LOWER, UPPER, span_blocks
  block, t, width = 8, 45, 4
  positions = np.arange(t)
  first = np.asarray(jax.random.randint(fresh_key(), (1, t), 0, t + 3))
  first = np.where(first > positions, first, np.maximum(first, positions - 2 * block + 1))
  aligned, codes, r = map(np.asarray, span_blocks(jnp.asarray(first, jnp.int32), 1, width, block))
  for pos in range(t):
    want = set(range(first[0, pos], pos + 1))
    got = {int(a) * block + o for a, code in zip(aligned[0, pos, 0], codes[0, pos, 0]) if a >= 0
           for o in range(block) if int(a) * block + o <= pos
           and code & (LOWER if o < r[0, pos] else UPPER)}
    assert got == want, pos
    if first[0, pos] > pos:
      assert np.all(aligned[0, pos] == -1), pos
  assert np.any(first > positions) and np.any(first <= positions)


@functools.partial(jax.jit, static_argnums=0)
def _values_and_grads(packed_fn, arrays, constants, segment_ids, cotangent):
  """`packed_fn`'s output and the gradients in `arrays` of its product with `cotangent`,
  jitted with the segment ids an argument: other rows of the same shapes reuse its programs."""
  def loss(*xs):
    out = packed_fn(*xs, *constants, segment_ids)
    return jnp.sum(out * cotangent), out
  (_, out), grads = jax.value_and_grad(loss, tuple(range(len(arrays))), has_aux=True)(*arrays)
  return out, grads


def _check_against_documents_alone(packed_fn, alone_fn, arrays, constants=(), rows=DOCUMENTS):
  """`packed_fn(*arrays, *constants, segment_ids)` on the packed rows `rows` against `alone_fn`
  on each document alone (all `[B, T, ...]`, sliced per document): values and the gradients in
  `arrays` of a random linear loss."""
  segment_ids = segment_ids_of(rows)
  out_shape = jax.eval_shape(packed_fn, *arrays, *constants, segment_ids).shape
  cotangent = jax.random.normal(fresh_key(), out_shape)
  argnums = tuple(range(len(arrays)))

  def alone(*args):
    xs, rest, cot = args[:len(arrays)], args[len(arrays):-1], args[-1]
    loss = lambda *xs: (jnp.sum(alone_fn(*xs, *rest) * cot), alone_fn(*xs, *rest))
    (_, out), grads = jax.value_and_grad(loss, argnums, has_aux=True)(*xs)
    return (out, *grads)

  out, grads = _values_and_grads(packed_fn, tuple(arrays), tuple(constants), segment_ids,
                                 cotangent)
  expected = per_document(alone, (*arrays, *constants, cotangent), rows)
  assert_close(out, expected[0])
  for grad, want in zip(grads, expected[1:]):
    assert_grads_close(grad, want)


# Documents that all start on a multiple of l' = 8 (the last ones end mid-block): the GPU
# kernels' whole-block route (`packed_rows.document_blocks`).
ALIGNED_DOCUMENTS = ([8, 16, 21], [24, 8, 13])
# Documents off the block boundaries whose padding to them fits the padded row (T' = 64 for
# T = 45, l' = 8; DOCUMENTS' first row needs more: the halves).
PADDED_DOCUMENTS = ([1, 22, 22], [17, 2, 26])


def test_the_padded_row_puts_each_document_on_a_whole_block():
  # DOCUMENTS' first row needs more padding than the padded row holds.
  for rows, fits in ((DOCUMENTS, [False, True]), (PADDED_DOCUMENTS, [True, True]),
                     (ALIGNED_DOCUMENTS, [True, True])):
    starts = document_starts(segment_ids_of(rows))
    padded, inverse = packed_rows.padded_row(starts, 8)
    assert inverse.shape == (2, 64)
    assert np.all(np.diff(padded, axis=1) >= 1)  # one to one, in order
    position = np.arange(45)
    first = starts == position
    assert np.all(np.asarray(padded)[np.asarray(first)] % 8 == 0)
    # Within a document no padding: its positions move together.
    assert np.all(np.diff(padded - position, axis=1)[~np.asarray(first)[:, 1:]] == 0)
    assert np.asarray(padded[:, -1] < 64).tolist() == fits
    for b in range(2):
      kept = np.asarray(padded[b])[np.asarray(padded[b]) < 64]
      np.testing.assert_array_equal(np.asarray(inverse[b])[kept], position[:len(kept)])
      assert np.sum(np.asarray(inverse[b]) >= 0) == len(kept)
  np.testing.assert_array_equal(padded, np.broadcast_to(position, (2, 45)))  # aligned: as is


@pytest.mark.parametrize("impl, pack_rows, row_sets", [
    # Halves (one position a program), whole blocks (the unpacked kernels), the unpacked
    # kernels on the padded row; then halves with 8 positions x 2 heads a program.
    ("pallas_gpu", 0, (DOCUMENTS, ALIGNED_DOCUMENTS, PADDED_DOCUMENTS)),
    ("pallas_gpu", 16, (DOCUMENTS,)),
    ("pallas_tpu", None, (DOCUMENTS, PADDED_DOCUMENTS))])  # halves, the padded row
def test_kernel_selected_attention_values_and_gradients_equal_their_documents_alone(
    monkeypatch, impl, pack_rows, row_sets):
  """The Triton kernels (interpret mode) and the Mosaic TPU kernels (TPU interpreter) on
  document-local selections, on each packed route: forward, dQ and dK/dV. The routes' row sets
  run in one test: the same shapes, so the kernels compile once for all of them."""
  if pack_rows is not None:
    from pallas_kernels.gpu import selected_attention as gpu_selected
    monkeypatch.setattr(gpu_selected, "PACK_ROWS", pack_rows)
  packed = lambda q, k, v, idx, segment_ids: nsa_jax.selected_attention(
      q, k, v, idx, block=CONFIG.slc_block, scale=SCALE, implementation=impl, interpret=True,
      segment_ids=segment_ids)
  alone = lambda q, k, v, idx: reference.selected_attention(q, k, v, idx, SCALE,
                                                            block=CONFIG.slc_block)
  for rows in row_sets:
    q, k, v = random_qkv(2, 45, 4, 2, 16)
    segment_ids = segment_ids_of(rows)
    # The selection of the packed rows, plus random extra picks (repeats, -1, future blocks).
    chosen = reference.select_blocks(q, compress(k, v, segment_ids)[0], SCALE, config=CONFIG,
                                     segment_ids=segment_ids)
    extra = jax.random.randint(fresh_key(), chosen.shape[:3] + (2,), -1, 6)
    indices = jnp.concatenate([chosen, extra], axis=-1)
    _check_against_documents_alone(packed, alone, (q, k, v), (indices,), rows)


@pytest.mark.parametrize("impl, rows", [
    ("pallas_gpu", ([7, 50, 39], [3, 93])),  # phases 0, 3, 0 and 0, 1
    ("pallas_tpu", ([7, 290, 303], [3, 597]))])  # the same phases over 3 key tiles of 128
def test_kernel_selection_and_nsa_equal_their_documents_alone(monkeypatch, fresh_jit_caches, impl,
                                                             rows):
  """The kernels' selection on packed rows: each document's own, exactly, with documents
  starting at every phase of the selection grid (s // d % (l' / d) = 0, 1, 3 here, 2 below;
  3 free picks). GPU: the packed score pass and the top-n kernel (interpret mode); TPU: the
  fused pass's phase-shifted maps (TPU interpreter). Then all of NSA through the kernels
  (values: each kernel's gradients on packed rows are checked on their own)."""
  from pallas_kernels.tpu import compressed_attention as tpu_compressed
  monkeypatch.setattr(tpu_compressed, "ROWS", 128)
  monkeypatch.setattr(tpu_compressed, "KEYS", 128)
  _small_gpu_compressed_tiles(monkeypatch)
  wide = dataclasses.replace(CONFIG, num_selected=5)
  q, k, v = random_qkv(2, sum(rows[0]), 4, 2, 16)
  compress_wide = lambda k, v, *ids: reference.compress_kv(k, v, wide.cmp_block, wide.cmp_stride,
                                                           *ids)
  segment_ids = segment_ids_of(rows)
  indices = nsa_jax.select_blocks(q, compress_wide(k, v, segment_ids)[0], config=wide,
                                  scale=SCALE, implementation=impl, interpret=True,
                                  segment_ids=segment_ids)
  alone_indices, = per_document(
      lambda q, k, v: reference.select_blocks(q, compress_wide(k, v)[0], SCALE, config=wide),
      (q, k, v), rows)
  np.testing.assert_array_equal(indices, alone_indices)

  q, k, v = random_qkv(2, 45, 4, 2, 16)  # phases 0, 0, 2, 2, 0, 1 and 0, 0, 1
  segment_ids = segment_ids_of(DOCUMENTS)
  k_cmp, v_cmp = compress(k, v, segment_ids)
  common = dict(config=CONFIG, scale=SCALE, implementation=impl, interpret=True,
                segment_ids=segment_ids)
  _, indices = nsa_jax.compressed_attention_and_selection(q, k_cmp, v_cmp, **common)
  np.testing.assert_array_equal(indices, per_document(
      lambda q, k, v: reference.select_blocks(q, compress(k, v)[0], SCALE, config=CONFIG),
      (q, k, v))[0])
  gates = random_gates(q)
  assert_close(nsa_jax.nsa_attention(q, k, v, gates=gates, **common), per_document(
      lambda q, k, v, gates: reference.nsa_attention(q, k, v, gates, *compress(k, v), SCALE,
                                                     config=CONFIG), (q, k, v, gates))[0])


def _small_gpu_compressed_tiles(monkeypatch):
  """GPU compressed kernels on 8-key tiles (16 for the log-sum-exp, score and dK/dV ones): the
  rows' 21 slots span several tiles, and the later documents' row tiles start their walks past
  the earlier documents' tiles."""
  from pallas_kernels.gpu import compressed_attention as gpu_compressed
  for name, keys in (("KEYS", 8), ("LSE_KEYS", 16), ("SCORE_KEYS", 16), ("DKV_KEYS", 16)):
    monkeypatch.setattr(gpu_compressed, name, keys)


# Rows of 600 over several TPU tiles of 128 (300 slots: 3 key tiles; 64 positions a row tile):
# later documents start past the first key tile, earlier ones end before the last row tiles.
LONG_ROWS = ([7, 290, 303], [3, 200, 1, 396])


@pytest.mark.parametrize("impl, rows", [("pallas_gpu", DOCUMENTS), ("pallas_tpu", DOCUMENTS),
                                        ("pallas_tpu", LONG_ROWS)])
def test_kernel_compressed_attention_values_lse_and_gradients_equal_their_documents_alone(
    monkeypatch, impl, rows):
  """Output and log-sum-exp (-inf where a document has no complete block yet), and the
  gradients through both, of the kernels on the packed rows' compressed slots. On long rows the
  TPU walks skip other documents' tiles (`_walk_tables`, checked against brute force)."""
  _small_gpu_compressed_tiles(monkeypatch)
  if rows is LONG_ROWS:
    _small_tpu_compressed_tiles(monkeypatch)
    _check_tpu_walk_tables(rows)
  q, k, v = random_qkv(2, sum(rows[0]), 4, 2, 16)
  segment_ids = segment_ids_of(rows)
  k_cmp, v_cmp = compress(k, v, segment_ids)
  lse_weights = jax.random.normal(fresh_key(), q.shape[:3])

  def packed(q, k_cmp, v_cmp):
    return nsa_jax.compressed_attention(q, k_cmp, v_cmp, block=CONFIG.cmp_block,
                                        stride=CONFIG.cmp_stride, scale=SCALE,
                                        implementation=impl, interpret=True,
                                        segment_ids=segment_ids)

  def alone(q, k, v):
    return reference.compressed_attention(q, *compress(k, v), SCALE, block=CONFIG.cmp_block,
                                          stride=CONFIG.cmp_stride)

  out, lse = packed(q, k_cmp, v_cmp)
  want_out, want_lse = per_document(alone, (q, k, v), rows)
  assert_close(out, want_out)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
  assert_close(jnp.where(jnp.isinf(lse), 0, lse), np.where(np.isinf(want_lse), 0, want_lse))

  # Gradients through the output and the finite lse, against the XLA path on the same packed
  # slots (itself checked against documents alone above).
  def loss(fn, q, k_cmp, v_cmp):
    out, lse = fn(q, k_cmp, v_cmp)
    return jnp.sum(out * q) + jnp.sum(jnp.where(jnp.isinf(lse), 0, lse) * lse_weights)
  xla_fn = lambda q, k_cmp, v_cmp: xla.compressed_attention(
      q, k_cmp, v_cmp, SCALE, block=CONFIG.cmp_block, stride=CONFIG.cmp_stride,
      segment_ids=segment_ids)
  grads = jax.grad(functools.partial(loss, packed), (0, 1, 2))(q, k_cmp, v_cmp)
  want = jax.grad(functools.partial(loss, xla_fn), (0, 1, 2))(q, k_cmp, v_cmp)
  for grad, expected in zip(grads, want):
    assert_grads_close(grad, expected)


def _small_tpu_compressed_tiles(monkeypatch):
  """TPU compressed kernels on tiles of 128 rows and 128 keys (the smallest Mosaic takes)."""
  from pallas_kernels.tpu import compressed_attention as tpu_compressed
  monkeypatch.setattr(tpu_compressed, "ROWS", 128)
  monkeypatch.setattr(tpu_compressed, "KEYS", 128)


def _check_tpu_walk_tables(rows):
  """The TPU walk tables (at 128-key tiles) equal their brute-force definitions and skip."""
  from pallas_kernels.tpu import compressed_attention as tpu_compressed
  q, k, _ = random_qkv(2, sum(rows[0]), 4, 2, 16)
  starts = document_starts(segment_ids_of(rows))
  k_cmp = compress(k, k, segment_ids_of(rows))[0]
  lay = tpu_compressed._layout(q, k_cmp, k_cmp, CONFIG.cmp_block, CONFIG.cmp_stride, True)
  first_key_tile, last_row_tile = map(np.asarray, tpu_compressed._walk_tables(starts, lay))
  slot_tile = np.asarray(starts) // CONFIG.cmp_stride // 128  # each row's first visible tile
  row_tile = np.arange(q.shape[1]) // lay.positions
  for b in range(2):
    for rt in range(lay.row_tiles):
      assert first_key_tile[b, rt] == slot_tile[b, row_tile == rt].min()
    for kt in range(lay.key_tiles):
      assert last_row_tile[b, kt] == row_tile[slot_tile[b] <= kt].max()
  assert first_key_tile.max() > 0 and last_row_tile.min() < lay.row_tiles - 1


@pytest.mark.parametrize("impl, window, block, row_sets", [
    ("pallas_tpu", 6, None, (DOCUMENTS,)),  # splash attention, one segment id per document
    # The unpacked window where it lies in the document, else the selected kernels over the
    # span's aligned blocks (up to 4), with halves or (documents on block boundaries) whole
    # (one test: the same shapes, so the kernels compile once for the three row sets).
    ("pallas_gpu", 20, 8, (DOCUMENTS, ALIGNED_DOCUMENTS, PADDED_DOCUMENTS))])
def test_kernel_sliding_window_values_and_gradients_equal_their_documents_alone(
    monkeypatch, impl, window, block, row_sets):
  if block is not None:
    from nsa_jax import pallas_gpu
    monkeypatch.setattr(pallas_gpu, "PACKED_WINDOW_BLOCK", block)
  packed = lambda q, k, v, segment_ids: nsa_jax.sliding_window_attention(
      q, k, v, window=window, scale=SCALE, implementation=impl, interpret=True,
      segment_ids=segment_ids)  # ids repeat: splash must see one id per document
  alone = lambda q, k, v: reference.sliding_window_attention(q, k, v, SCALE, window=window)
  for rows in row_sets:
    _check_against_documents_alone(packed, alone, random_qkv(2, 45, 4, 2, 16), rows=rows)


@pytest.mark.parametrize("attention", ["nsa", "nsa_no_selection", "window", "dense"])
def test_a_decoder_lm_models_each_packed_document_alone(attention):
  """Learned compression, sigmoid gates, RoPE restarting per document: a packed row's logits
  are the logits of its documents run alone."""
  from flax import nnx
  from nsa_jax.transformer import DecoderLM, TransformerConfig
  config = TransformerConfig(vocab_size=32, num_layers=2, num_features=32, num_heads=4,
                             num_kv_heads=2, head_dim=8, mlp_hidden=64, attention=attention,
                             nsa=CONFIG, implementation="xla")
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(fresh_key(), (2, 45), 0, 32)
  packed = model(tokens, segment_ids_of(DOCUMENTS))
  expected, = per_document(lambda tokens: np.asarray(model(tokens)), (np.asarray(tokens),))
  assert_close(packed, expected)


# Device tests: packed rows of documents of 1 to ~1500 tokens at T = 4096.
DEVICE_DOCUMENTS = [[1, 70, 1500, 3, 640, 63, 129, 1690], [4096 - 17, 17]]
# ... and documents that start on multiples of 64 (the kernels' whole-block route: Mosaic GPU's
# selected kernels for half precision on Hopper).
DEVICE_ALIGNED_DOCUMENTS = [[1024, 64, 1536, 1472], [4096 - 960, 960]]
assert all(sum(row) == 4096 for row in DEVICE_DOCUMENTS + DEVICE_ALIGNED_DOCUMENTS)


def _check_gpu_against_xla(op, q, k, v, dtype):
  """`op(q, k, v, implementation)` on the GPU kernels against the XLA path in float32 on the
  same packed rows: values and the gradients of a random linear loss."""
  cotangent = jax.random.normal(fresh_key(), q.shape, jnp.float32)

  def run(implementation, q, k, v):
    def loss(q, k, v):
      out = op(q, k, v, implementation)
      return jnp.sum(out.astype(jnp.float32) * cotangent), out
    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, grads

  out, grads = run("pallas_gpu", q, k, v)
  want, want_grads = run("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
  assert out.dtype == dtype
  assert_close(out, want, dtype)
  assert_grads_close(grads, want_grads, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [DEVICE_DOCUMENTS, DEVICE_ALIGNED_DOCUMENTS])
@pytest.mark.parametrize("group", [1, 4, 16])  # packed positions (G < 16) and one a program
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_selected_attention_on_packed_rows_matches_xla_on_gpu(group, dtype, rows):
  """The real kernels on packed rows (paper blocks, n = 16 document-local picks with repeats and
  -1s), values and gradients, against the XLA path on the same packed rows."""
  segment_ids = segment_ids_of(rows)
  q, k, v = random_qkv(2, 4096, 2 * group, 2, 128, dtype=dtype)
  indices = jax.random.randint(fresh_key(), (2, 4096, 2, 16), -1, 24)
  _check_gpu_against_xla(
      lambda q, k, v, implementation: nsa_jax.selected_attention(
          q, k, v, indices, block=64, implementation=implementation, segment_ids=segment_ids),
      q, k, v, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [DEVICE_DOCUMENTS, DEVICE_ALIGNED_DOCUMENTS])
@pytest.mark.parametrize("group", [1, 16])
def test_gpu_sliding_window_on_packed_rows_matches_xla_on_gpu(group, rows):
  """The paper's w = 512 on packed rows (cuDNN's window where it lies in the document, the
  selected kernels elsewhere; bfloat16), values and gradients, against the XLA path."""
  segment_ids = segment_ids_of(rows)
  q, k, v = random_qkv(2, 4096, 2 * group, 2, 128, dtype=jnp.bfloat16)
  _check_gpu_against_xla(
      lambda q, k, v, implementation: nsa_jax.sliding_window_attention(
          q, k, v, window=512, implementation=implementation, segment_ids=segment_ids),
      q, k, v, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 16])
def test_gpu_compressed_attention_on_packed_rows_matches_xla_on_gpu(group):
  """The Pallas compressed kernels (packed rows never take the folded cuDNN call) in the paper's
  l = 32, d = 16, bfloat16: output, log-sum-exp and gradients against the XLA path."""
  segment_ids = segment_ids_of(DEVICE_DOCUMENTS)
  q, k, v = random_qkv(2, 4096, 2 * group, 2, 128, dtype=jnp.bfloat16)
  k_cmp, v_cmp = xla.compress_kv(k, v, 32, 16, segment_ids)
  weights = jax.random.normal(fresh_key(), q.shape, jnp.float32)

  def run(implementation, q, k_cmp, v_cmp):
    def loss(q, k_cmp, v_cmp):
      out, lse = nsa_jax.compressed_attention(q, k_cmp, v_cmp, block=32, stride=16,
                                              implementation=implementation,
                                              segment_ids=segment_ids)
      finite = jnp.where(jnp.isinf(lse), 0, lse)
      return jnp.sum(out.astype(jnp.float32) * weights) + jnp.sum(finite), (out, lse)
    (_, outs), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k_cmp, v_cmp)
    return outs, grads

  (out, lse), grads = run("pallas_gpu", q, k_cmp, v_cmp)
  (want, want_lse), want_grads = run("xla", *(x.astype(jnp.float32) for x in (q, k_cmp, v_cmp)))
  assert_close(out, want, jnp.bfloat16)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse))
  assert_close(jnp.where(jnp.isinf(lse), 0, lse), jnp.where(jnp.isinf(want_lse), 0, want_lse),
               jnp.bfloat16)
  assert_grads_close(grads, want_grads, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [  # the paper's (l < l'), fla-core's l = d = l' (one phase)
    nsa_jax.NSAConfig(),
    nsa_jax.NSAConfig(cmp_block=64, cmp_stride=64, slc_block=64, num_selected=16, window=64)])
# A document of 12000 tokens (blocks up to 187): its rows' top-n reads 256 columns, the others 128.
@pytest.mark.parametrize("rows", [DEVICE_DOCUMENTS, [[12000, 4384]] * 2])
def test_gpu_selection_on_packed_rows_matches_xla_on_gpu(config, rows):
  segment_ids = segment_ids_of(rows)
  q, k, _ = random_qkv(2, sum(rows[0]), 32, 4, 128)
  k_cmp, _ = xla.compress_kv(k, k, config.cmp_block, config.cmp_stride, segment_ids)
  common = dict(config=config, segment_ids=segment_ids)
  kernels = nsa_jax.select_blocks(q, k_cmp, implementation="pallas_gpu", **common)
  expected = nsa_jax.select_blocks(q, k_cmp, implementation="xla", **common)
  assert np.mean(np.asarray(kernels == expected)) > 0.9999  # float near-ties may flip a slot


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [DEVICE_DOCUMENTS, DEVICE_ALIGNED_DOCUMENTS])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_nsa_on_packed_rows_matches_xla_on_gpu(dtype, rows):
  """All of NSA through the kernels on packed rows (paper config), values and gradients,
  against the XLA branches on the kernels' own selection (near-ties may pick differently)."""
  config = nsa_jax.NSAConfig()
  segment_ids = segment_ids_of(rows)
  q, k, v = random_qkv(2, 4096, 16, 2, 128, dtype=dtype)
  gates = random_gates(q)
  scale = q.shape[-1] ** -0.5
  k_cmp, _ = xla.compress_kv(k, v, config.cmp_block, config.cmp_stride, segment_ids)
  indices = nsa_jax.select_blocks(q, k_cmp, config=config, implementation="pallas_gpu",
                                  segment_ids=segment_ids)

  def xla_with_these_indices(q, k, v, gates):
    k_cmp, v_cmp = xla.compress_kv(k, v, config.cmp_block, config.cmp_stride, segment_ids)
    common = dict(segment_ids=segment_ids)
    o_cmp, _ = xla.compressed_attention(q, k_cmp, v_cmp, scale, block=config.cmp_block,
                                        stride=config.cmp_stride, **common)
    o_slc = xla.selected_attention(q, k, v, indices, scale, block=config.slc_block, **common)
    o_swa = xla.sliding_window_attention(q, k, v, scale, window=config.window, **common)
    return combine_branches(o_cmp, o_slc, o_swa, gates).astype(q.dtype)

  def run(fn, *args):
    cotangent = jax.random.normal(jax.random.key(3), q.shape, jnp.float32)
    loss = lambda *args: (jnp.sum(fn(*args).astype(jnp.float32) * cotangent), fn(*args))
    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(*args)
    return out, grads

  out, grads = run(lambda q, k, v, gates: nsa_jax.nsa_attention(
      q, k, v, config=config, gates=gates, implementation="pallas_gpu", segment_ids=segment_ids),
      q, k, v, gates)
  want, want_grads = run(xla_with_these_indices,
                         *(x.astype(jnp.float32) for x in (q, k, v, gates)))
  assert_close(out, want, dtype)
  assert_grads_close(grads, want_grads, dtype)

"""Pallas TPU kernels under the TPU interpreter (CPU): values and gradients against the oracle.

The interpreter runs with race detection on and raises on out-of-bounds block reads, so these
tests also fail if an index map or a kernel touches memory it should not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import reference
from pallas_kernels.tpu import compressed_attention as tpu_compressed
from pallas_kernels.tpu import selected_attention as tpu_selected
from pallas_kernels.tpu import sliding_window as tpu_window
from tests.helpers import assert_close, assert_grads_close, random_gates, random_qkv

pytestmark = pytest.mark.usefixtures("no_races")  # tests/conftest.py


# (B, T, Hq, Hkv, Dk, Dv, block, n, smem_budget): GQA with Dk != Dv and T not a multiple of the
# block, MHA, MQA with a tiny SMEM budget (several query chunks and work-item chunks); G = 16
# (8 positions a forward / dQ tile, several tiles, unions of several KV_BLOCKS groups) and G = 64
# (2 positions a tile) with small budgets; B = 3 with a budget for 2 sequences' tables (calls of
# 2 and 1 sequences: a single call would raise).
CASES = [
    (1, 37, 4, 2, 16, 24, 8, 3, None),
    (2, 24, 2, 2, 8, 8, 8, 2, None),
    (1, 33, 3, 1, 16, 16, 16, 2, 1024),
    (1, 100, 16, 1, 16, 16, 8, 4, 2048),
    (1, 41, 64, 1, 8, 8, 8, 3, 1024),
    (3, 40, 4, 2, 16, 16, 8, 2, 1100),
]


@pytest.mark.parametrize("case", CASES)
def test_selected_attention_tpu_kernel_matches_reference(case, monkeypatch):
  b, t, hq, hkv, dk, dv, block, n, smem_budget = case
  if smem_budget:
    monkeypatch.setattr(tpu_selected, "SMEM_BUDGET_BYTES", smem_budget)
  q, k, v = random_qkv(b, t, hq, hkv, dk, dv)
  num_blocks = -(-t // block)
  # Any values: -1s, repeats, future and out-of-range blocks included.
  idx = jax.random.randint(jax.random.key(t), (b, t, hkv, n), -1, num_blocks + 2)
  scale = dk ** -0.5
  cotangent = jax.random.normal(jax.random.key(1), (b, t, hq, dv))

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out * cotangent), out

  kernel = lambda q, k, v: tpu_selected.selected_attention(q, k, v, idx, block=block, scale=scale,
                                                           interpret=True)
  expected = lambda q, k, v: reference.selected_attention(q, k, v, idx, scale, block=block)
  # Jitted: the interpreted kernels' programs compile once (eagerly, each op compiles alone).
  (_, out), grads = jax.jit(jax.value_and_grad(lambda *a: loss(kernel, *a), (0, 1, 2),
                                               has_aux=True))(q, k, v)
  (_, ref), ref_grads = jax.value_and_grad(lambda *a: loss(expected, *a), (0, 1, 2),
                                           has_aux=True)(q, k, v)
  assert_close(out, ref)
  assert_grads_close(grads, ref_grads)


def test_tpu_kernel_cuts_a_large_batch_into_calls_whose_tables_fit_smem(monkeypatch):
  monkeypatch.setattr(tpu_selected, "SMEM_BUDGET_BYTES", 1100)
  q, k, v = random_qkv(3, 40, 4, 2, 16)
  lay = tpu_selected._layout(q[:1], v[:1], 2, 8)
  assert tpu_selected._batch_per_call(2, lay.union_len) == 2
  with pytest.raises(ValueError, match="3 sequences x 2 KV heads"):
    tpu_selected._layout(q, v, 2, 8)
  monkeypatch.setattr(tpu_selected, "SMEM_BUDGET_BYTES", 100)  # not even one sequence fits
  with pytest.raises(ValueError, match="exceed SMEM_BUDGET_BYTES = 100"):
    tpu_selected.selected_attention(q, k, v, jnp.zeros((3, 40, 2, 2), jnp.int32), block=8,
                                    scale=0.3, interpret=True)


def test_tpu_kernel_rejects_blocks_off_the_sublane_tiling():
  q, k, v = random_qkv(1, 24, 2, 1, 8)
  with pytest.raises(ValueError, match="multiple of 8, got 12"):
    tpu_selected.selected_attention(q, k, v, jnp.zeros((1, 24, 1, 2), jnp.int32), block=12,
                                    scale=0.3, interpret=True)


# (B, T, Hq, Hkv, Dk, Dv, config): GQA with Dk != Dv and an overlap that spills into the next key
# tile's selection blocks (l = 4d, l' = 4d; with 128-key tiles KEYS * d = 256 owned by 64
# blocks); G = 3 (a padded head row that must not count in the group's scores); T < l; G = 9
# (16 heads a position: the group sum is a reshape, 7 padded heads masked); T = 600 with d = 2,
# where at 128 x 128 later row tiles see the first key tile whole (its unmasked path). Each at
# the default 512 x 512 tiles and, where T > 128, at 128 x 128 (several row and key tiles).
COMPRESSED_CASES = [
    (1, 300, 4, 2, 16, 24, nsa_jax.NSAConfig(8, 2, 8, 3, 1, 1, 20)),
    (1, 600, 4, 2, 16, 16, nsa_jax.NSAConfig(8, 2, 8, 3, 1, 1, 20)),
    (1, 77, 6, 2, 16, 16, nsa_jax.NSAConfig(16, 4, 8, 4, 1, 1, 20)),
    (2, 70, 2, 2, 8, 8, nsa_jax.NSAConfig(8, 4, 16, 3, 1, 1, 20)),
    (1, 7, 2, 1, 16, 16, nsa_jax.NSAConfig(8, 4, 16, 3, 1, 1, 20)),
    (1, 60, 9, 1, 16, 16, nsa_jax.NSAConfig(8, 4, 16, 3, 1, 1, 20)),
]


@pytest.mark.parametrize("case,tiles", [
    pytest.param(case, None, id=f"T{case[1]}-default-tiles") for case in COMPRESSED_CASES] + [
    pytest.param(case, (128, 128), id=f"T{case[1]}-128-tiles") for case in COMPRESSED_CASES
    if case[1] > 128])
def test_compressed_attention_tpu_kernels_match_reference(case, tiles, monkeypatch):
  if tiles:
    monkeypatch.setattr(tpu_compressed, "ROWS", tiles[0])
    monkeypatch.setattr(tpu_compressed, "KEYS", tiles[1])
  b, t, hq, hkv, dk, dv, config = case
  q, k, v = random_qkv(b, t, hq, hkv, dk, dv)
  k_cmp, v_cmp = reference.compress_kv(k, v, config.cmp_block, config.cmp_stride)
  scale = dk ** -0.5
  keys = jax.random.split(jax.random.key(t), 2)
  d_out = jax.random.normal(keys[0], (b, t, hq, dv))
  d_lse = jax.random.normal(keys[1], (b, t, hq))

  def loss(fn, q, k_cmp, v_cmp):
    out, lse = fn(q, k_cmp, v_cmp)
    return jnp.sum(out * d_out) + jnp.sum(jnp.where(jnp.isinf(lse), 0.0, lse) * d_lse), (out, lse)

  kernel = lambda q, k_cmp, v_cmp: tpu_compressed.compressed_attention(
      q, k_cmp, v_cmp, block=config.cmp_block, stride=config.cmp_stride, scale=scale,
      interpret=True)
  expected = lambda q, k_cmp, v_cmp: reference.compressed_attention(
      q, k_cmp, v_cmp, scale, block=config.cmp_block, stride=config.cmp_stride)
  grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), (0, 1, 2),
                                               has_aux=True))(q, k_cmp, v_cmp)
  (_, (out, lse)), grads = grad(kernel)
  (_, (ref, ref_lse)), ref_grads = grad(expected)
  assert_close(out, ref)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
  assert_close(jnp.where(jnp.isinf(lse), 0, lse), jnp.where(jnp.isinf(ref_lse), 0, ref_lse))
  if k_cmp.shape[1]:
    assert_grads_close(grads, ref_grads)
  # The fused forward (lse pass, then output and scores): same values and gradients, and the
  # selection scores of the spec.
  fused = lambda q, k_cmp, v_cmp: tpu_compressed.compressed_attention_and_scores(
      q, k_cmp, v_cmp, block=config.cmp_block, stride=config.cmp_stride,
      slc_block=config.slc_block, scale=scale, interpret=True)[:2]
  (_, (fused_out, fused_lse)), fused_grads = grad(fused)
  assert_close(fused_out, ref)
  np.testing.assert_array_equal(np.isinf(fused_lse), np.isinf(ref_lse))
  if k_cmp.shape[1]:
    assert_grads_close(fused_grads, ref_grads)
  _, _, scores = tpu_compressed.compressed_attention_and_scores(
      q, k_cmp, v_cmp, block=config.cmp_block, stride=config.cmp_stride,
      slc_block=config.slc_block, scale=scale, interpret=True)
  assert_close(scores.transpose(0, 2, 1, 3), reference.selection_scores(q, k_cmp, scale, config))


@pytest.mark.parametrize("with_gates", [False, True])
def test_public_api_pallas_tpu_under_the_interpreter(with_gates):
  config = nsa_jax.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3,
                             num_initial=1, num_local=1, window=12)
  q, k, v = random_qkv(1, 45, 4, 2, 16)
  gates = random_gates(q) if with_gates else None

  def loss(impl, q, k, v):
    out = nsa_jax.nsa_attention(q, k, v, config=config, gates=gates, implementation=impl,
                                interpret=impl == "pallas_tpu")
    return jnp.sum(out ** 2), out

  values_and_grads = jax.jit(jax.value_and_grad(loss, (1, 2, 3), has_aux=True), static_argnums=0)
  (_, out), grads = values_and_grads("pallas_tpu", q, k, v)
  (_, ref), ref_grads = values_and_grads("reference", q, k, v)
  assert_close(out, ref)
  assert_grads_close(grads, ref_grads)
  k_cmp, _ = nsa_jax.compress_kv(k, v, block=8, stride=4)
  np.testing.assert_array_equal(
      nsa_jax.select_blocks(q, k_cmp, config=config, implementation="pallas_tpu", interpret=True),
      nsa_jax.select_blocks(q, k_cmp, config=config, implementation="reference"))
  assert_close(nsa_jax.sliding_window_attention(q, k, v, window=12, implementation="pallas_tpu",
                                                interpret=True),
               nsa_jax.sliding_window_attention(q, k, v, window=12, implementation="reference"))


@pytest.mark.parametrize("packed", [False, True])
def test_dense_causal_attention_on_a_tpu_is_splash_values_and_gradients(monkeypatch, packed):
  """`nsa_jax.dense_causal_attention` (the dense layers' attention) on a TPU runs splash
  attention (here its interpreter): causal GQA, packed rows each document alone; the values and
  gradients of the masked reference math. T = 300 pads to 384 (128-token tiles)."""
  from nsa_jax import pallas_tpu
  calls = []
  splash_dense = pallas_tpu.dense_causal_attention

  def on_interpreter(*args, **kwargs):
    calls.append(kwargs.get("segment_ids") is not None)
    return splash_dense(*args, **kwargs, interpret=True)
  monkeypatch.setattr(pallas_tpu.jax, "default_backend", lambda: "tpu")
  monkeypatch.setattr(pallas_tpu, "dense_causal_attention", on_interpreter)
  q, k, v = random_qkv(2, 300, 4, 2, 16)
  lengths = ([1, 140, 17, 142], [300])
  segment_ids = (jnp.asarray([np.repeat(np.arange(len(row)), row) for row in lengths])
                 if packed else None)
  same_document = (True if segment_ids is None
                   else segment_ids[:, :, None] == segment_ids[:, None, :])  # [B, T, T]
  causal = jnp.tril(jnp.ones((300, 300), bool)) & same_document

  def expected(q, k, v):  # masked softmax over [B, Hq, T, T]
    kk, vv = (jnp.repeat(x, 2, axis=2) for x in (k, v))
    s = jnp.einsum("bthd,bshd->bhts", q, kk) * 16 ** -0.5
    s = jnp.where(jnp.broadcast_to(causal[:, None] if packed else causal, s.shape), s, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), vv)

  got = lambda q, k, v: nsa_jax.dense_causal_attention(q, k, v, segment_ids=segment_ids)
  assert_close(got(q, k, v), expected(q, k, v))
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * q)
  for grad, want in zip(jax.grad(loss(got), (0, 1, 2))(q, k, v),
                        jax.grad(loss(expected), (0, 1, 2))(q, k, v)):
    assert_grads_close(grad, want)
  assert calls and all(call == packed for call in calls)


def test_splash_causal_baseline_matches_dense_causal_attention():
  # The TPU benchmark's dense baseline: a window as long as the sequence is causal attention.
  # T = 200 pads to two 128-token blocks.
  q, k, v = random_qkv(1, 200, 4, 2, 16)
  scale = 16 ** -0.5
  got = tpu_window.causal_attention(q, k, v, scale=scale, block=128, interpret=True)
  expected = reference.sliding_window_attention(q, k, v, scale, window=200)
  assert_close(got, expected)

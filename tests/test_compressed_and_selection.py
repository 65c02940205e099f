"""`compressed_attention_and_selection`: the compressed branch's output and the selected blocks
from one pass, equal to `compressed_attention` and `select_blocks` apart, on the reference, XLA
and Pallas GPU (interpreted) implementations; and the NNX layer with separate K/V sets makes that
one pass instead of two."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nsa_jax
from nsa_jax import NSAConfig, ops
from nsa_jax.nn import NativeSparseAttention
from tests.helpers import assert_close, assert_grads_close, random_qkv

CONFIG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3, num_initial=1,
                   num_local=1, window=20)
# pallas_tpu's path (its fused kernels) is nsa_attention's, tested under the TPU interpreter in
# test_pallas_tpu.py (~13 s a case here).
CASES = [("reference", False), ("xla", False), ("pallas_gpu", True)]


@pytest.mark.parametrize("impl,interpret", CASES)
@pytest.mark.parametrize("seq_len", [45, 6])  # T = 6 < l: no compressed block is visible
def test_equals_compressed_attention_and_select_blocks(impl, interpret, seq_len):
  q, k, v = random_qkv(2, seq_len, 4, 2, 16)
  k_cmp, v_cmp = nsa_jax.compress_kv(k, v, block=CONFIG.cmp_block, stride=CONFIG.cmp_stride)
  kwargs = dict(implementation=impl, interpret=interpret)
  cotangent = jax.random.normal(jax.random.key(seq_len), q.shape)

  def fused(q, k_cmp, v_cmp):
    out, idx = nsa_jax.compressed_attention_and_selection(q, k_cmp, v_cmp, config=CONFIG,
                                                          **kwargs)
    return jnp.sum(out * cotangent), (out, idx)

  def apart(q, k_cmp, v_cmp):
    out, _ = nsa_jax.compressed_attention(q, k_cmp, v_cmp, block=CONFIG.cmp_block,
                                          stride=CONFIG.cmp_stride, **kwargs)
    return jnp.sum(out * cotangent), out

  grads, (out, idx) = jax.grad(fused, (0, 1, 2), has_aux=True)(q, k_cmp, v_cmp)
  expected_grads, expected = jax.grad(apart, (0, 1, 2), has_aux=True)(q, k_cmp, v_cmp)
  assert out.dtype == q.dtype and out.shape == q.shape
  assert_close(out, expected)
  assert_grads_close(grads, expected_grads)
  assert idx.dtype == jnp.int32 and idx.shape == (2, seq_len, 2, CONFIG.num_selected)
  np.testing.assert_array_equal(idx, nsa_jax.select_blocks(q, k_cmp, config=CONFIG, **kwargs))


def test_rejects_bad_input():
  q, k, v = random_qkv(2, 45, 4, 2, 16)
  k_cmp, v_cmp = nsa_jax.compress_kv(k, v, block=8, stride=4)
  with pytest.raises(ValueError, match=r"config must be an NSAConfig, got dict"):
    nsa_jax.compressed_attention_and_selection(q, k_cmp, v_cmp, config={})
  with pytest.raises(ValueError, match=r"Tc = 10 compressed blocks.*k_cmp \(2, 8, 2, 16\)"):
    nsa_jax.compressed_attention_and_selection(q, k_cmp[:, :8], v_cmp[:, :8], config=CONFIG)
  with pytest.raises(ValueError, match=r"q and k_cmp must have the same head dimension"):
    nsa_jax.compressed_attention_and_selection(q[..., :8], k_cmp, v_cmp, config=CONFIG)


def test_layer_with_separate_kv_passes_over_the_compressed_keys_once(monkeypatch):
  # `compressed_attention` and `select_blocks` called apart would each make the pass (on a GPU:
  # two cuDNN forwards over the compressed keys).
  called = []
  original = ops._call

  def recording(implementation, interpret, fn_name, *args, **kwargs):
    called.append(fn_name)
    return original(implementation, interpret, fn_name, *args, **kwargs)

  monkeypatch.setattr(ops, "_call", recording)
  layer = NativeSparseAttention(num_features=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                config=CONFIG, separate_kv=True, rngs=nnx.Rngs(0))
  layer(jax.random.normal(jax.random.key(0), (1, 40, 32)))
  assert sorted(called) == ["compressed_attention_and_selection", "selected_attention",
                            "sliding_window_attention"]

"""The Flax NNX layers: shapes, wiring against the functional ops, causality, gradients, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nsa_jax
from nsa_jax import NSAConfig
from nsa_jax.nn import DenseAttention, NativeSparseAttention, apply_rope, make_attention
from tests.helpers import assert_close, fresh_key

CONFIG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3, num_initial=1,
                   num_local=1, window=20)
VARIANTS = [
    dict(),  # the paper: learned compression, sigmoid gates, shared K/V
    dict(compression="mean", gating="sum"),  # the tutorial
    dict(separate_kv=True),
    dict(head_dim_v=12),
]
DIMS = dict(num_features=32, num_heads=4, num_kv_heads=2, head_dim=8)


def nsa_layer(**kwargs):
  return NativeSparseAttention(**DIMS, config=CONFIG, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_nsa_layer_maps_features_to_features(kwargs):
  x = jax.random.normal(fresh_key(), (2, 45, 32))
  y = nnx.jit(lambda m, x: m(x))(nsa_layer(**kwargs), x)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert np.all(np.isfinite(np.asarray(y)))


def test_bfloat16_computation():
  layer = nsa_layer(dtype=jnp.bfloat16)
  y = layer(jax.random.normal(fresh_key(), (1, 40, 32)).astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y, np.float32)))


@pytest.mark.parametrize("separate_kv", [False, True])
def test_nsa_layer_is_the_functional_op_on_its_projections(separate_kv):
  layer = nsa_layer(separate_kv=separate_kv)
  x = jax.random.normal(fresh_key(), (2, 45, 32))
  b, t, sets = 2, 45, 3 if separate_kv else 1
  pos = jnp.arange(t)
  q = apply_rope((x @ layer.q_proj.kernel[...]).reshape(b, t, 4, 8), pos)
  k = (x @ layer.k_proj.kernel[...]).reshape(b, t, sets, 2, 8)
  v = (x @ layer.v_proj.kernel[...]).reshape(b, t, sets, 2, 8)
  keys = [apply_rope(k[:, :, i], pos) for i in range(sets)]
  k_cmp, v_cmp = layer.k_compress(keys[0]), layer.v_compress(v[:, :, 0])
  gates = jax.nn.sigmoid(layer.gate_proj(x).reshape(b, t, 4, 3))
  kwargs = dict(implementation="reference")
  if separate_kv:  # the three branches on K/V sets 0, 1, 2
    o_cmp, _ = nsa_jax.compressed_attention(q, k_cmp, v_cmp, block=8, stride=4, **kwargs)
    idx = nsa_jax.select_blocks(q, k_cmp, config=CONFIG, **kwargs)
    o_slc = nsa_jax.selected_attention(q, keys[1], v[:, :, 1], idx, block=16, **kwargs)
    o_swa = nsa_jax.sliding_window_attention(q, keys[2], v[:, :, 2], window=20, **kwargs)
    out = sum(gates[..., i, None] * o for i, o in enumerate((o_cmp, o_slc, o_swa)))
  else:
    out = nsa_jax.nsa_attention(q, keys[0], v[:, :, 0], config=CONFIG, gates=gates, k_cmp=k_cmp,
                                v_cmp=v_cmp, **kwargs)
  expected = out.reshape(b, t, 32) @ layer.o_proj.kernel[...]
  assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)  # two extra float32 matmuls


def test_learned_compression_uses_block_and_position():
  comp = nsa_layer().k_compress
  x = jax.random.normal(fresh_key(), (1, 20, 2, 8))
  out = comp(x)  # Tc = (20 - 8) // 4 + 1 = 4
  assert out.shape == (1, 4, 2, 8)
  # Block 1 covers tokens 4..11: changing token 12 leaves blocks 0, 1 alone and changes block 2.
  changed = comp(x.at[:, 12].add(1.0))
  np.testing.assert_array_equal(out[:, :2], changed[:, :2])
  assert not np.allclose(out[:, 2], changed[:, 2])
  assert comp(x[:, :7]).shape == (1, 0, 2, 8)


@pytest.mark.parametrize("kind,kwargs", [("dense", {}), ("nsa_no_selection", {}), ("window", {})]
                         + [("nsa", kw) for kw in VARIANTS])
def test_layers_are_causal(kind, kwargs):
  layer = make_attention(kind, **DIMS, config=CONFIG, rngs=nnx.Rngs(0), **kwargs)
  x = jax.random.normal(fresh_key(), (1, 60, 32))
  t0 = 37
  y = layer(x)
  y_changed = layer(x.at[:, t0:].set(jax.random.normal(fresh_key(), (1, 60 - t0, 32))))
  np.testing.assert_allclose(y[:, :t0], y_changed[:, :t0], atol=1e-6)
  assert not np.allclose(y[:, t0:], y_changed[:, t0:])


@pytest.mark.parametrize("kind,kwargs", [("dense", {})] + [("nsa", kw) for kw in VARIANTS])
def test_gradients_reach_every_parameter(kind, kwargs):
  layer = make_attention(kind, **DIMS, config=CONFIG, rngs=nnx.Rngs(0), **kwargs)
  x = jax.random.normal(fresh_key(), (2, 45, 32))
  grads = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))(layer, x)
  for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)


def test_a_few_optimizer_steps_reduce_the_loss():
  layer = nsa_layer()
  optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
  x = jax.random.normal(fresh_key(), (2, 40, 32))
  target = jax.random.normal(fresh_key(), (2, 40, 32))
  loss_fn = lambda m: jnp.mean((m(x) - target) ** 2)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(layer, optimizer)) for _ in range(15)]
  assert losses[-1] < 0.9 * losses[0], losses


def test_make_attention_switches_kind_and_rejects_bad_arguments():
  assert isinstance(make_attention("dense", **DIMS, config=CONFIG, rngs=nnx.Rngs(0)),
                    DenseAttention)
  assert isinstance(make_attention("nsa", **DIMS, config=CONFIG, rngs=nnx.Rngs(0)),
                    NativeSparseAttention)
  with pytest.raises(ValueError, match="kind must be one of"):
    make_attention("linear", **DIMS, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="compression must be one of"):
    nsa_layer(compression="max")
  with pytest.raises(ValueError, match="gating must be one of"):
    nsa_layer(gating="softmax")
  with pytest.raises(ValueError, match=r"num_heads \(5\) must be a multiple"):
    NativeSparseAttention(32, 5, 2, 8, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind,branches", [("nsa_no_selection", ("cmp", "swa")),
                                           ("window", ("swa",))])
def test_ablations_are_the_full_layer_without_their_branches(kind, branches):
  """An ablation equals the full layer's function on its parameters with the other branches'
  gates at 0."""
  layer = make_attention(kind, **DIMS, config=CONFIG, rngs=nnx.Rngs(0))
  x = jax.random.normal(fresh_key(), (2, 45, 32))
  b, t = 2, 45
  pos = jnp.arange(t)
  q = apply_rope((x @ layer.q_proj.kernel[...]).reshape(b, t, 4, 8), pos)
  k = apply_rope((x @ layer.k_proj.kernel[...]).reshape(b, t, 2, 8), pos)
  v = (x @ layer.v_proj.kernel[...]).reshape(b, t, 2, 8)
  keep = jnp.array([branch in branches for branch in ("cmp", "slc", "swa")], jnp.float32)
  gates = jax.nn.sigmoid(layer.gate_proj(x).reshape(b, t, 4, 3)) * keep
  # The window alone has no compression: any blocks do, their gates being 0.
  k_cmp, v_cmp = ((layer.k_compress(k), layer.v_compress(v)) if "cmp" in branches else
                  nsa_jax.compress_kv(k, v, block=8, stride=4))
  out = nsa_jax.nsa_attention(q, k, v, config=CONFIG, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp,
                              implementation="reference")
  expected = out.reshape(b, t, 32) @ layer.o_proj.kernel[...]
  assert layer.branches == branches
  assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)  # two extra float32 matmuls
  if kind == "window":  # nothing to compress: no compression parameters
    assert not hasattr(layer, "k_compress")


def test_ablations_reject_decoding_separate_kv_and_bad_branches():
  window = make_attention("window", **DIMS, config=CONFIG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="decoding needs all branches"):
    window.init_cache(1, 64)
  with pytest.raises(ValueError, match="separate_kv=True needs all branches"):
    nsa_layer(branches=("cmp", "swa"), separate_kv=True)
  with pytest.raises(ValueError, match="non-empty subset"):
    nsa_layer(branches=("swa", "cmp"))

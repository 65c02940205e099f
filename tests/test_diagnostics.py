"""experiments.diagnostics: the selection, gates and token-level attention of a model at the
positions that retrieve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nsa_jax
from experiments import diagnostics
from experiments import train
from tests.test_train import small_config


def test_selection_hits_and_gates_at_answers():
  config = small_config(seq_len=256)  # 8 selection blocks of 32, n = 4: the selection chooses
  model = train.build_model(config, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 256), 0, train.vocab_size(config))
  queries = np.array([40, 130, 255])
  own_position = np.broadcast_to(queries, (2, 3))
  found = diagnostics.at_answers(model, tokens, queries, own_position)
  # A query's own block is always selected (a forced local block), a future one never.
  assert found["selection_hits"] == [1.0] * config.model.num_layers
  future = diagnostics.at_answers(model, tokens, queries, own_position + 32)["selection_hits"]
  assert future == [0.0] * config.model.num_layers
  indices, gates = diagnostics.layer_internals(model, tokens)
  assert indices.shape == (config.model.num_layers, 2, 256, config.model.num_kv_heads, 4)
  # The first layer's gates are the sigmoid of its gate projection of the normed embeddings.
  block = model.blocks[0]
  logits = block.attention.gate_proj(block.attention_norm(model.embed(tokens)))
  np.testing.assert_allclose(gates[0], jax.nn.sigmoid(logits.reshape(gates.shape[1:])),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(found["gates_at_answers"], gates[:, :, queries].mean((1, 2, 3)),
                             rtol=1e-6)


def _model(attention, **model):
  config = small_config(seq_len=96, attention=attention)
  config.nsa.window = 24
  config.model.update(dict(num_heads=4, num_kv_heads=2, **model))  # G = 2
  return config, train.build_model(config, nnx.Rngs(1))


@pytest.mark.parametrize("attention, separate_kv, branch", [
    ("dense", False, "swa"), ("window", False, "swa"), ("nsa", True, "swa"),
    ("nsa", True, "slc"), ("nsa", False, "slc")])
def test_attention_rows_are_the_weights_of_the_layers_token_attention(attention, separate_kv,
                                                                      branch):
  """Weighting the values by `attention_rows` gives the layer's window / selected (dense:
  causal) attention output at those rows, so the weights have the layer's scale, mask, chosen
  blocks, RoPE and GQA heads."""
  config, model = _model(attention, **({"separate_kv": True} if separate_kv else {}))
  layer = model.blocks[0].attention
  x = jax.random.normal(jax.random.key(2), (2, 96, config.model.num_features))
  rows = jnp.array([[0, 5, 23, 24, 95], [1, 30, 47, 60, 90]])
  probs = diagnostics.attention_rows(layer, x, rows, branch=branch)
  q, keys, values = layer._project(x)  # pylint: disable=protected-access
  kv_set = {"swa": -1, "slc": 1 if separate_kv else 0}[branch]
  k, v = keys[kv_set], values[kv_set]
  if attention == "dense":
    out = nsa_jax.dense_causal_attention(q, k, v)
  elif branch == "swa":
    out = nsa_jax.sliding_window_attention(q, k, v, window=24, implementation="xla")
  else:
    k_cmp, _ = layer._compress(keys[0], values[0])  # pylint: disable=protected-access
    chosen = nsa_jax.select_blocks(q, k_cmp, config=layer.config, implementation="xla")
    out = nsa_jax.selected_attention(q, k, v, chosen, block=layer.config.slc_block,
                                     implementation="xla")
  group = q.shape[2] // k.shape[2]
  mixed = jnp.einsum("bhrs,bshd->brhd", probs, jnp.repeat(v, group, axis=2))
  expected = jnp.take_along_axis(out, rows[:, :, None, None], axis=1)
  np.testing.assert_allclose(mixed, expected, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def test_token_attention_at_answers():
  config, model = _model("window")
  tokens = jax.random.randint(jax.random.key(3), (2, 96), 0, train.vocab_size(config))
  queries = np.array([80, 90])
  # Targets beyond the window (24 tokens) get no attention from the queries: induction 0.
  far = diagnostics.token_attention(model, tokens, queries, np.array([[40, 50], [10, 60]]))
  assert far["induction_attention"] == [0.0] * config.model.num_layers
  # Targets at the queries themselves: the largest over heads of the mean weight.
  near = diagnostics.token_attention(model, tokens, queries, np.broadcast_to(queries, (2, 2)))
  x = model.blocks[0].attention_norm(model.embed(tokens))
  rows = jnp.asarray(np.broadcast_to(queries, (2, 2)))
  probs = diagnostics.attention_rows(model.blocks[0].attention, x, rows)  # [B, H, 2, T]
  on_self = probs[:, :, [0, 1], [80, 90]]
  on_before = probs[:, :, [0, 1], [79, 89]]
  np.testing.assert_allclose(near["induction_attention"][0], on_self.mean((0, 2)).max(),
                             rtol=1e-5)
  np.testing.assert_allclose(near["previous_token_attention"][0],
                             on_before.mean((0, 2)).max(), rtol=1e-5)
  assert "selected_induction_attention" not in near  # the window ablation has no selection


def test_selected_induction_attention_is_zero_where_the_selection_misses_the_target():
  config, model = _model("nsa")  # T = 96: 3 selection blocks of 32, n = 4 chooses all of them
  config.nsa.num_selected = 2  # 1 initial + 1 local: a middle block is never chosen
  model = train.build_model(config, nnx.Rngs(1))
  tokens = jax.random.randint(jax.random.key(4), (2, 96), 0, train.vocab_size(config))
  queries = np.array([70, 90])
  middle = diagnostics.token_attention(model, tokens, queries, np.full((2, 2), 40))
  assert middle["selected_induction_attention"] == [0.0] * config.model.num_layers
  local = diagnostics.token_attention(model, tokens, queries, np.full((2, 2), 66))
  assert all(0 < a < 1 for a in local["selected_induction_attention"])


def test_compressed_rows_are_the_weights_of_the_compressed_branch():
  config, model = _model("nsa_no_selection")
  layer = model.blocks[0].attention
  l, d = layer.config.cmp_block, layer.config.cmp_stride
  x = jax.random.normal(jax.random.key(5), (2, 96, config.model.num_features))
  rows = jnp.array([[3, 31, 40, 95], [15, 16, 63, 80]])
  targets = jnp.array([[0, 16, 33, 90], [0, 8, 32, 79]])  # 16, 32: on block edges
  probs, holds = diagnostics.compressed_rows(layer, x, rows, targets)
  q, keys, values = layer._project(x)  # pylint: disable=protected-access
  k_cmp, v_cmp = layer._compress(keys[0], values[0])  # pylint: disable=protected-access
  out, _ = nsa_jax.compressed_attention(q, k_cmp, v_cmp, block=l, stride=d,
                                        implementation="xla")
  group = q.shape[2] // k_cmp.shape[2]
  mixed = jnp.einsum("bhrc,bchd->brhd", probs, jnp.repeat(v_cmp, group, axis=2))
  np.testing.assert_allclose(mixed, jnp.take_along_axis(out, rows[:, :, None, None], axis=1),
                             rtol=2e-5, atol=2e-6)
  expected = [[[c * d <= int(t) < c * d + l for c in range(k_cmp.shape[1])] for t in row]
              for row in targets]
  np.testing.assert_array_equal(holds, expected)
  assert float(jnp.abs(probs[0, :, 0]).max()) == 0.0  # row 3 sees no whole block yet
  found = diagnostics.token_attention(model, jnp.zeros((2, 96), jnp.int32), np.array([70, 90]),
                                      np.array([[60, 80], [10, 85]]))
  assert len(found["compressed_target_attention"]) == config.model.num_layers

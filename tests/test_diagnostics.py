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


@pytest.mark.parametrize("attention, separate_kv", [("dense", False), ("window", False),
                                                     ("nsa", True)])
def test_attention_rows_are_the_weights_of_the_layers_token_attention(attention, separate_kv):
  """Weighting the values by `attention_rows` gives the layer's window (dense: causal) attention
  output at those rows, so the weights have the layer's scale, mask, RoPE and GQA heads."""
  config, model = _model(attention, **({"separate_kv": True} if separate_kv else {}))
  layer = model.blocks[0].attention
  x = jax.random.normal(jax.random.key(2), (2, 96, config.model.num_features))
  rows = jnp.array([[0, 5, 23, 24, 95], [1, 30, 47, 60, 90]])
  probs = diagnostics.attention_rows(layer, x, rows)
  q, keys, values = layer._project(x)  # pylint: disable=protected-access
  if attention == "dense":
    out = nsa_jax.dense_causal_attention(q, keys[0], values[0])
  else:
    out = nsa_jax.sliding_window_attention(q, keys[-1], values[-1], window=24,
                                           implementation="xla")
  group = q.shape[2] // keys[0].shape[2]
  mixed = jnp.einsum("bhrs,bshd->brhd", probs, jnp.repeat(values[-1], group, axis=2))
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

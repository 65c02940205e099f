"""experiments.diagnostics: the selection and gates of a model at the positions that retrieve."""

import jax
import numpy as np
from flax import nnx

from experiments import diagnostics
from experiments import train
from tests.test_train import small_config


def test_selection_hits_and_gates_at_answers():
  config = small_config(seq_len=256)  # 8 selection blocks of 32, n = 4: the selection chooses
  model = train.build_model(config, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (2, 256), 0, train.vocab_size(config))
  queries = np.array([40, 130, 255])
  own_block = np.broadcast_to(queries // 32, (2, 3))
  found = diagnostics.at_answers(model, tokens, queries, own_block)
  # A query's own block is always selected (a forced local block), a future one never.
  assert found["selection_hits"] == [1.0] * config.model.num_layers
  future = diagnostics.at_answers(model, tokens, queries, own_block + 1)["selection_hits"]
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

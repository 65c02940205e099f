"""The decoder LM: shapes, causality, both attention kinds, and that it learns."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nsa_jax import NSAConfig
from nsa_jax.transformer import DecoderLM, TransformerConfig
from tests.helpers import fresh_key

CONFIG = TransformerConfig(num_layers=2, num_features=64, num_heads=4, num_kv_heads=2,
                           head_dim=16, mlp_hidden=128,
                           nsa=NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3,
                                         num_initial=1, num_local=1, window=16))


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_logits_shape_and_causality(attention):
  model = DecoderLM(dataclasses.replace(CONFIG, attention=attention), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(fresh_key(), (2, 60), 0, 256)
  logits = model(tokens)
  assert logits.shape == (2, 60, 256) and logits.dtype == jnp.float32
  changed = model(tokens.at[:, 41:].set((tokens[:, 41:] + 1) % 256))
  np.testing.assert_allclose(logits[:, :41], changed[:, :41], atol=1e-5)
  assert not np.allclose(logits[:, 41:], changed[:, 41:])


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_learns_to_copy_a_repeated_sequence(attention):
  """A random 24-token pattern repeated: the second copy is predictable from the first, which
  needs attention 24 tokens back (beyond NSA's 16-token window: compressed or selected blocks)."""
  model = DecoderLM(dataclasses.replace(CONFIG, attention=attention), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  pattern = jax.random.randint(fresh_key(), (8, 24), 0, 256)
  tokens = jnp.concatenate([pattern, pattern, pattern], axis=1)  # [8, 72]

  def loss_fn(model):
    logits = model(tokens[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return losses[:, 24:].mean()  # the predictable part

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(60)]
  assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_bad_config_and_tokens_are_rejected():
  with pytest.raises(ValueError, match="attention must be one of"):
    TransformerConfig(attention="linear")
  with pytest.raises(ValueError, match="num_layers must be a positive int"):
    TransformerConfig(num_layers=0)
  model = DecoderLM(CONFIG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"tokens must be an integer array \[B, T\]"):
    model(jnp.zeros((2, 8)))

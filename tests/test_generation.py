"""Generation with the KV cache: cached logits equal the full forward's, sampling is consistent."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax import NSAConfig
from nsa_jax.transformer import DecoderLM, TransformerConfig, generate
from tests.helpers import assert_close, fresh_key

CONFIG = TransformerConfig(num_layers=2, num_features=64, num_heads=4, num_kv_heads=2,
                           head_dim=16, mlp_hidden=128,
                           nsa=NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3,
                                         num_initial=1, num_local=1, window=16))
VARIANTS = {
    "nsa (learned phi, sigmoid gates)": dict(attention="nsa"),
    "nsa (mean, sum)": dict(attention="nsa", compression="mean", gating="sum"),
    "nsa (a K/V set per branch)": dict(attention="nsa", separate_kv=True),
    "dense": dict(attention="dense"),
}


def cached_logits(model, tokens, prompt_len):
  """Prefill `prompt_len` tokens, then feed the rest one step at a time: `[B, T, V]`."""
  caches = model.init_cache(tokens.shape[0], tokens.shape[1])
  logits, caches = model.prefill(tokens[:, :prompt_len], caches)
  step = nnx.jit(lambda model, token, caches: model.decode_step(token, caches))
  rows = [logits]
  for t in range(prompt_len, tokens.shape[1]):
    logits_t, caches = step(model, tokens[:, t], caches)
    rows.append(logits_t[:, None])
  return jnp.concatenate(rows, axis=1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prompt_len", [1, 21])
def test_cached_decoding_gives_the_full_forward_logits(variant, prompt_len):
  model = DecoderLM(dataclasses.replace(CONFIG, **VARIANTS[variant]), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(fresh_key(), (2, 50), 0, 256)
  assert_close(cached_logits(model, tokens, prompt_len), model(tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["nsa (learned phi, sigmoid gates)",
                                     "nsa (a K/V set per branch)", "dense"])
def test_greedy_generation_follows_the_argmax_of_the_full_forward(variant):
  model = DecoderLM(dataclasses.replace(CONFIG, **VARIANTS[variant]), rngs=nnx.Rngs(1))
  prompt = jax.random.randint(fresh_key(), (3, 7), 0, 256)
  tokens = generate(model, prompt, 30)
  assert tokens.shape == (3, 37) and tokens.dtype == jnp.int32
  np.testing.assert_array_equal(tokens[:, :7], prompt)
  # Every new token is the argmax of the full forward's logits on the sequence before it.
  np.testing.assert_array_equal(tokens[:, 7:], jnp.argmax(model(tokens)[:, 6:-1], axis=-1))


@pytest.mark.parametrize("variant", ["nsa (learned phi, sigmoid gates)",
                                     "nsa (a K/V set per branch)", "dense"])
def test_prompts_of_different_lengths_each_continue_their_own_prompt(variant):
  """`generate(lengths=...)`: right-padded prompts of 3, 21 and 9 tokens (padding of random
  tokens, which must not leak); each row's new tokens are the argmax of the full forward on its
  own sequence."""
  model = DecoderLM(dataclasses.replace(CONFIG, **VARIANTS[variant]), rngs=nnx.Rngs(1))
  lengths, new = [3, 21, 9], 12
  prompt = jax.random.randint(fresh_key(), (3, 21), 0, 256)
  tokens = generate(model, prompt, new, lengths=jnp.asarray(lengths))
  assert tokens.shape == (3, 21 + new)
  for b, n in enumerate(lengths):
    row = tokens[b:b + 1, :n + new]
    np.testing.assert_array_equal(row[0, :n], prompt[b, :n])
    np.testing.assert_array_equal(tokens[b, n + new:], 0)
    np.testing.assert_array_equal(row[0, n:], jnp.argmax(model(row)[0, n - 1:-1], axis=-1))
  with pytest.raises(ValueError, match=r"lengths must lie in \[1, P = 21\]"):
    generate(model, prompt, new, lengths=jnp.asarray([0, 3, 3]))


def test_temperature_sampling_is_reproducible_and_follows_the_key():
  model = DecoderLM(CONFIG, rngs=nnx.Rngs(2))
  prompt = jax.random.randint(fresh_key(), (2, 5), 0, 256)
  a = generate(model, prompt, 20, temperature=1.0, rng=jax.random.key(7))
  b = generate(model, prompt, 20, temperature=1.0, rng=jax.random.key(7))
  c = generate(model, prompt, 20, temperature=1.0, rng=jax.random.key(8))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert int(a.min()) >= 0 and int(a.max()) < 256


def test_bad_generation_arguments_raise_value_errors():
  model = DecoderLM(CONFIG, rngs=nnx.Rngs(0))
  prompt = jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(ValueError, match="prompt must be an integer array"):
    generate(model, prompt.astype(jnp.float32), 3)
  with pytest.raises(ValueError, match="at least one token"):
    generate(model, prompt[:, :0], 3)
  with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
    generate(model, prompt, 0)
  with pytest.raises(ValueError, match="rng"):
    generate(model, prompt, 3, temperature=0.5)

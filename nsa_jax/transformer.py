"""A decoder-only language model whose attention is NSA or dense, chosen by one config field.

Pre-norm blocks (RMSNorm), GQA attention with RoPE (`nsa_jax.nn`), SwiGLU MLPs, tied input and
output embeddings. Built for the experiments (NSA vs dense on the same data) and for decoding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax.config import NSAConfig
from nsa_jax.nn import ATTENTION_KINDS, make_attention
from nsa_jax.validation import check_positive


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Model shape. `attention` ("nsa", "dense", or the NSA ablations "nsa_no_selection" and
  "window", `nsa_jax.nn.make_attention`) is the only field that switches the layer kind; the
  NSA-only fields are ignored by dense attention."""

  vocab_size: int = 256  # bytes
  num_layers: int = 4
  num_features: int = 256
  num_heads: int = 8
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_hidden: int = 768
  attention: str = "nsa"
  nsa: NSAConfig = NSAConfig()
  compression: str = "mlp"
  gating: str = "sigmoid"
  separate_kv: bool = False
  implementation: str | None = None
  rope_theta: float = 10000.0

  def __post_init__(self):
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(f"TransformerConfig.attention must be one of {ATTENTION_KINDS}, "
                       f"got {self.attention!r}")
    for name in ("vocab_size", "num_layers", "num_features", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_hidden"):
      check_positive(f"TransformerConfig.{name}", getattr(self, name))


class SwiGLU(nnx.Module):
  """`x -> W_out (silu(W_gate x) * W_up x)`."""

  def __init__(self, num_features: int, hidden: int, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs)
    self.gate, self.up, self.out = (linear(num_features, hidden), linear(num_features, hidden),
                                    linear(hidden, num_features))

  def __call__(self, x):
    return self.out(nnx.silu(self.gate(x)) * self.up(x))


class DecoderBlock(nnx.Module):
  """Pre-norm residual block: attention, then SwiGLU."""

  def __init__(self, config: TransformerConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    f = config.num_features
    self.attention_norm = nnx.RMSNorm(f, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention = make_attention(
        config.attention, num_features=f, num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, config=config.nsa,
        compression=config.compression, gating=config.gating, separate_kv=config.separate_kv,
        implementation=config.implementation, rope_theta=config.rope_theta, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(f, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = SwiGLU(f, config.mlp_hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, segment_ids=None):
    x = x + self.attention(self.attention_norm(x), segment_ids)
    return x + self.mlp(self.mlp_norm(x))

  def prefill(self, x, cache, lengths=None):
    y, cache = self.attention.prefill(self.attention_norm(x), cache, lengths)
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), cache

  def decode_step(self, x_t, cache):
    y, cache = self.attention.decode_step(self.attention_norm(x_t), cache)
    x_t = x_t + y
    return x_t + self.mlp(self.mlp_norm(x_t)), cache


class DecoderLM(nnx.Module):
  """`tokens int [B, T] -> logits float32 [B, T, vocab_size]`, causal; with `segment_ids int
  [B, T]` a packed row's documents are modelled each alone (positions restart at each)."""

  def __init__(self, config: TransformerConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.cache_dtype = dtype or param_dtype  # the dtype of the keys and values it computes
    self.embed = nnx.Embed(config.vocab_size, config.num_features, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([DecoderBlock(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.final_norm = nnx.RMSNorm(config.num_features, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)

  def __call__(self, tokens, segment_ids=None):
    _check_tokens("tokens", tokens, 2, "[B, T]")
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, segment_ids)
    return self._logits(x)

  def _logits(self, x):
    return self.embed.attend(self.final_norm(x)).astype(jnp.float32)  # tied output embedding

  # Decoding: `prefill` then `decode_step`, with one cache per layer (`DecodeCache` for NSA,
  # `DenseCache` for dense); the logits equal `__call__`'s at every position.

  def init_cache(self, batch: int, max_len: int) -> list:
    """Empty per-layer caches for up to `max_len` tokens."""
    return [block.attention.init_cache(batch, max_len, self.cache_dtype)
            for block in self.blocks]

  def prefill(self, tokens, caches, lengths=None):
    """`tokens int [B, T]` -> `(logits float32 [B, T, vocab_size], caches)`; `lengths int [B]`:
    prompts of different lengths, right-padded; each row then decodes from its own length
    (`decode.nsa_prefill`), and its logits past it are those of padding."""
    _check_tokens("tokens", tokens, 2, "[B, T]")
    return self._through_blocks(
        tokens, caches, lambda block: functools.partial(block.prefill, lengths=lengths))

  def decode_step(self, token, caches):
    """`token int [B]` at position `caches[0].length` (per row after a prefill with `lengths`)
    -> `(logits float32 [B, vocab], caches)`."""
    _check_tokens("token", token, 1, "[B]")
    return self._through_blocks(token, caches, lambda block: block.decode_step)

  def _through_blocks(self, tokens, caches, method):
    """Embeds `tokens`, runs `method(block)(x, cache)` layer by layer: `(logits, caches)`."""
    x = self.embed(tokens)
    new_caches = []
    for block, cache in zip(self.blocks, caches):
      x, cache = method(block)(x, cache)
      new_caches.append(cache)
    return self._logits(x), new_caches


def _check_tokens(name, tokens, rank, layout):
  if tokens.ndim != rank or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array {layout}, got {tokens.dtype} "
                     f"{tuple(tokens.shape)}")


def generate(model: DecoderLM, prompt, max_new_tokens: int, *, temperature: float = 0.0,
             rng=None, lengths=None):
  """Batched sampling with the KV cache: greedy when `temperature == 0`, else softmax sampling.

  One jitted program: prefill of the prompt, then a `lax.scan` of decode steps.

  Args:
    model: a `DecoderLM`.
    prompt: int `[B, P]`, `P >= 1`.
    max_new_tokens: tokens to add (>= 1).
    temperature: 0 for greedy decoding, > 0 to sample from `softmax(logits / temperature)`.
    rng: a `jax.random` key, needed when `temperature > 0`.
    lengths: int `[B]` or None: prompts of different lengths (`1 <= lengths[b] <= P`), each
      row's first `lengths[b]` tokens, right-padded; each row continues its own prompt.

  Returns:
    int32 `[B, P + max_new_tokens]`: the prompt followed by the new tokens; with `lengths`, row
    `b` is its `lengths[b]` prompt tokens, its new tokens, then zeros.

  Raises:
    ValueError: a bad prompt, `max_new_tokens`, `temperature`, `lengths`, or a missing `rng`.
  """
  _check_tokens("prompt", prompt, 2, "[B, P]")
  if prompt.shape[1] == 0:
    raise ValueError(f"prompt must hold at least one token, got shape {tuple(prompt.shape)}")
  if lengths is not None:
    _check_tokens("lengths", lengths, 1, "[B]")
    if lengths.shape[0] != prompt.shape[0]:
      raise ValueError(f"lengths must have shape [B] = [{prompt.shape[0]}], got "
                       f"{tuple(lengths.shape)}")
    if not isinstance(lengths, jax.core.Tracer) and not (
        1 <= int(jnp.min(lengths)) and int(jnp.max(lengths)) <= prompt.shape[1]):
      raise ValueError(f"lengths must lie in [1, P = {prompt.shape[1]}], got {lengths}")
  check_positive("max_new_tokens", max_new_tokens)
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("rng (a jax.random key) is needed when temperature > 0")
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  prompt = prompt.astype(jnp.int32)
  new_tokens = _generate(graphdef, state, prompt, rng,
                         None if lengths is None else lengths.astype(jnp.int32),
                         max_new_tokens=max_new_tokens, temperature=float(temperature))
  if lengths is None:
    return jnp.concatenate([prompt, new_tokens], axis=1)
  # Row b: its prompt, then its new tokens from position lengths[b], then zeros.
  out = jnp.pad(jnp.where(jnp.arange(prompt.shape[1]) < lengths[:, None], prompt, 0),
                [(0, 0), (0, max_new_tokens)])
  at = lengths[:, None] + jnp.arange(max_new_tokens)
  return out.at[jnp.arange(prompt.shape[0])[:, None], at].set(new_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature"))
def _generate(graphdef, state, prompt, rng, lengths, *, max_new_tokens, temperature):
  model = nnx.merge(graphdef, state)
  b, p = prompt.shape

  def sample(logits, key):  # [B, V] -> int32 [B]
    if temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

  keys = jax.random.split(rng, max_new_tokens)
  logits, caches = model.prefill(prompt, model.init_cache(b, p + max_new_tokens), lengths)
  last = logits[:, -1] if lengths is None else logits[jnp.arange(b), lengths - 1]
  first = sample(last, keys[0])

  def step(carry, key):
    caches, token = carry
    logits, caches = model.decode_step(token, caches)
    token_next = sample(logits, key)
    return (caches, token_next), token_next

  _, rest = jax.lax.scan(step, (caches, first), keys[1:])  # [N - 1, B]
  return jnp.concatenate([first[:, None], rest.T], axis=1)

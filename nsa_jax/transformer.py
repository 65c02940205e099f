"""A decoder-only language model whose attention is NSA or dense, chosen by one config field.

Pre-norm blocks (RMSNorm), GQA attention with RoPE (`nsa_jax.nn`), SwiGLU MLPs, tied input and
output embeddings. Built for the experiments (NSA vs dense on the same data) and for decoding.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from nsa_jax.config import NSAConfig
from nsa_jax.nn import ATTENTION_KINDS, make_attention
from nsa_jax.validation import check_positive


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Model shape. `attention` ("nsa" or "dense") is the only field that switches the layer kind;
  the NSA-only fields are ignored by dense attention."""

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

  def __call__(self, x):
    x = x + self.attention(self.attention_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nnx.Module):
  """`tokens int [B, T] -> logits float32 [B, T, vocab_size]`, causal."""

  def __init__(self, config: TransformerConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.num_features, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([DecoderBlock(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.final_norm = nnx.RMSNorm(config.num_features, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)

  def __call__(self, tokens):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer array [B, T], got {tokens.dtype} "
                       f"{tuple(tokens.shape)}")
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.final_norm(x)).astype(jnp.float32)  # tied output embedding

"""NSA decoding: a KV cache with incremental compression, prefill, and one-token steps.

Prefill followed by decode steps gives, at every position, what `nsa_attention` gives on the whole
sequence (SPEC.md): the cache holds the raw keys/values (the selection and window branches read
them) and the compressed blocks made so far. A compressed block is made, and never changed again,
when its last token arrives, so the compressed cache is exactly what `compress_kv` (or the
caller's `compress_fn`) makes of the prefix.

Everything is a pure function of a `DecodeCache` pytree and jit-able; `max_len` is static.

    cache = init_decode_cache(B, max_len, Hkv, Dk, config=cfg, dtype=jnp.bfloat16)
    out, cache = nsa_prefill(q, k, v, cache, config=cfg)              # the prompt, T tokens
    out_t, cache = nsa_decode_step(q_t, k_t, v_t, cache, config=cfg)  # one token per call

`compress_fn(k, v) -> (k_cmp, v_cmp)` replaces mean pooling (e.g. the NNX layer's learned `phi`):
it must map `[B, T, Hkv, D]` to the `(T - l) // d + 1` compressed blocks, block `i` a function of
tokens `[i*d, i*d + l)` only; the step calls it on the last `l` tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from nsa_jax import ops
from nsa_jax import validation as check
from nsa_jax.attention_math import combine_branches, masked_attention
from nsa_jax.attention_math import attention_scores, masked_softmax
from nsa_jax.block_selection import decode_selection, num_cmp_visible
from nsa_jax.config import NSAConfig

# The cache's token axis is padded to a multiple of this (and of `slc_block`), so that whole
# selection blocks and aligned kernel tiles never read past the arrays.
CACHE_ALIGN = 128

CompressFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["k", "v", "k_cmp", "v_cmp", "length"], meta_fields=["max_len"])
@dataclasses.dataclass(frozen=True)
class DecodeCache:
  """The decoding state of one NSA layer (a pytree; `max_len` is static).

  Attributes:
    k: `[B, S, Hkv, Dk]` keys of positions `[0, length)`, `S >= max_len` (padded, see
      `CACHE_ALIGN`); the rest is zeros.
    v: `[B, S, Hkv, Dv]` values, likewise.
    k_cmp: `[B, Sc, Hkv, Dk]` compressed keys, `Sc = num_cmp_blocks(max_len)`; the first
      `num_cmp_blocks(length)` are made.
    v_cmp: `[B, Sc, Hkv, Dv]` compressed values.
    length: int32 scalar, tokens seen so far (all sequences of the batch move together).
    max_len: the most tokens the cache holds.
  """

  k: jax.Array
  v: jax.Array
  k_cmp: jax.Array
  v_cmp: jax.Array
  length: jax.Array
  max_len: int


def _padded_len(max_len: int, config: NSAConfig) -> int:
  align = CACHE_ALIGN * config.slc_block // _gcd(CACHE_ALIGN, config.slc_block)
  return -(-max_len // align) * align


def _gcd(a: int, b: int) -> int:
  while b:
    a, b = b, a % b
  return a


def init_decode_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                      head_dim_v: int | None = None, *, config: NSAConfig,
                      dtype=jnp.float32) -> DecodeCache:
  """An empty cache for up to `max_len` tokens of `batch` sequences.

  Raises:
    ValueError: a non-positive size or an invalid config.
  """
  config = check.check_config(config)
  for name, value in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads),
                      ("head_dim", head_dim)):
    check.check_positive(name, value)
  head_dim_v = head_dim if head_dim_v is None else check.check_positive("head_dim_v", head_dim_v)
  size = _padded_len(max_len, config)
  num_cmp = config.num_cmp_blocks(max_len)
  zeros = lambda s, d: jnp.zeros((batch, s, num_kv_heads, d), dtype)
  return DecodeCache(k=zeros(size, head_dim), v=zeros(size, head_dim_v),
                     k_cmp=zeros(num_cmp, head_dim), v_cmp=zeros(num_cmp, head_dim_v),
                     length=jnp.zeros((), jnp.int32), max_len=max_len)


def _check_cache(cache, k, v, tokens: int):
  if not isinstance(cache, DecodeCache):
    raise ValueError(f"cache must be a DecodeCache (from init_decode_cache), got "
                     f"{type(cache).__name__}")
  b, _, hkv, dk = cache.k.shape
  expected = f"[B, ., Hkv, Dk] = [{b}, ., {hkv}, {dk}] and Dv = {cache.v.shape[-1]}"
  if (k.shape[0], k.shape[2], k.shape[3]) != (b, hkv, dk) or v.shape[-1] != cache.v.shape[-1]:
    raise ValueError(f"k and v must match the cache's {expected}, got k {tuple(k.shape)}, "
                     f"v {tuple(v.shape)}")
  if tokens > cache.max_len:
    raise ValueError(f"{tokens} tokens do not fit a cache of max_len {cache.max_len}")


def _default_compress(config: NSAConfig) -> CompressFn:
  return functools.partial(ops.compress_kv, block=config.cmp_block, stride=config.cmp_stride)


def nsa_prefill(q, k, v, cache: DecodeCache, *, config: NSAConfig, gates=None, scale=None,
                compress_fn: CompressFn | None = None, implementation=None,
                interpret: bool = False):
  """Attends a prompt and starts the cache with it.

  The cache is reset to the prompt (whatever it held before), so prefill is the first call on a
  cache; decode steps follow.

  Args:
    q: `[B, T, Hq, Dk]`, `0 <= T <= cache.max_len`.
    k: `[B, T, Hkv, Dk]`.
    v: `[B, T, Hkv, Dv]`.
    cache: a `DecodeCache` of matching B, Hkv, Dk, Dv.
    config, gates, scale, implementation, interpret: as in `nsa_attention`.
    compress_fn: `(k, v) -> (k_cmp, v_cmp)`, default mean pooling (module docstring).

  Returns:
    `(out [B, T, Hq, Dv] in q.dtype, cache)`: `out` is `nsa_attention(q, k, v, ...)`.

  Raises:
    ValueError: bad shapes (as `nsa_attention`), or a prompt that does not fit the cache.
  """
  config = check.check_config(config)
  _check_cache(cache, k, v, q.shape[1])
  compress_fn = compress_fn or _default_compress(config)
  t = q.shape[1]
  if t == 0:
    out = jnp.zeros(q.shape[:3] + (v.shape[-1],), q.dtype)
    return out, dataclasses.replace(cache, length=jnp.zeros((), jnp.int32))
  k_cmp, v_cmp = compress_fn(k, v)
  out = ops.nsa_attention(q, k, v, config=config, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp,
                          scale=scale, implementation=implementation, interpret=interpret)
  write = lambda buf, x: jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), (0, 0, 0, 0))
  cache = DecodeCache(k=write(cache.k, k), v=write(cache.v, v), k_cmp=write(cache.k_cmp, k_cmp),
                      v_cmp=write(cache.v_cmp, v_cmp), length=jnp.asarray(t, jnp.int32),
                      max_len=cache.max_len)
  return out, cache


def nsa_decode_step(q_t, k_t, v_t, cache: DecodeCache, *, config: NSAConfig, gates=None,
                    scale=None, compress_fn: CompressFn | None = None, implementation=None,
                    interpret: bool = False):
  """Appends one token to the cache and attends it: position `t = cache.length`.

  Args:
    q_t: `[B, Hq, Dk]`.
    k_t: `[B, Hkv, Dk]`.
    v_t: `[B, Hkv, Dv]`.
    cache: a `DecodeCache` holding positions `[0, t)`; `t < max_len` is the caller's to keep
      (a step on a full cache is not detected under jit and overwrites the last position).
    config: the `NSAConfig`.
    gates: `[B, Hq, 3]` branch weights (cmp, slc, swa) or None (plain sum).
    scale: softmax scale, default `Dk ** -0.5`.
    compress_fn: as in `nsa_prefill`.
    implementation: "xla" (also what "reference" runs), "pallas_gpu", "pallas_tpu", or None (the
      best for the backend).
    interpret: run the Pallas kernels in interpret mode (CPU).

  Returns:
    `(out_t [B, Hq, Dv] in q_t.dtype, cache)`: `out_t` is row `t` of `nsa_attention` on the
    sequence so far.

  Raises:
    ValueError: bad ranks, dtypes or shapes.
  """
  config = check.check_config(config)
  check.check_rank("q_t", q_t, 3, "[B, Hq, Dk]")
  check.check_rank("k_t", k_t, 3, "[B, Hkv, Dk]")
  check.check_rank("v_t", v_t, 3, "[B, Hkv, Dv]")
  check.check_qkv(q_t[:, None], k_t[:, None], v_t[:, None])
  _check_cache(cache, k_t[:, None], v_t[:, None], 1)
  if gates is not None:
    expected = tuple(q_t.shape[:2]) + (3,)
    if tuple(gates.shape) != expected:
      raise ValueError(f"gates must have shape [B, Hq, 3] = {list(expected)}, "
                       f"got {tuple(gates.shape)}")
    check.check_float("gates", gates)
  scale = q_t.shape[-1] ** -0.5 if scale is None else scale
  cache = _append(cache, k_t, v_t, config, compress_fn or _default_compress(config))
  backend = _decode_backend(implementation, interpret)
  out = backend(q_t, cache, cache.length - 1, gates, scale, config=config, interpret=interpret)
  return out, cache


def _append(cache: DecodeCache, k_t, v_t, config: NSAConfig, compress_fn) -> DecodeCache:
  """Writes token `t = cache.length` and, when it completes a compressed block, that block."""
  t = cache.length
  write_token = lambda buf, x: jax.lax.dynamic_update_slice(
      buf, x[:, None].astype(buf.dtype), (0, t, 0, 0))
  k, v = write_token(cache.k, k_t), write_token(cache.v, v_t)
  k_cmp, v_cmp = cache.k_cmp, cache.v_cmp
  block, stride = config.cmp_block, config.cmp_stride
  if k_cmp.shape[1]:  # else max_len < l: no block is ever made
    first = t + 1 - block  # first token of the block that ends at t
    completes = (first >= 0) & (first % stride == 0)
    first = jnp.maximum(first, 0)
    tokens = lambda buf: jax.lax.dynamic_slice_in_dim(buf, first, block, axis=1)
    new_k, new_v = compress_fn(tokens(k), tokens(v))  # [B, 1, Hkv, D]
    slot = jnp.minimum(first // stride, k_cmp.shape[1] - 1)

    def write_block(buf, new):
      old = jax.lax.dynamic_slice_in_dim(buf, slot, 1, axis=1)
      return jax.lax.dynamic_update_slice_in_dim(
          buf, jnp.where(completes, new.astype(buf.dtype), old), slot, axis=1)

    k_cmp, v_cmp = write_block(k_cmp, new_k), write_block(v_cmp, new_v)
  return DecodeCache(k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, length=t + 1, max_len=cache.max_len)


def _decode_backend(implementation, interpret):
  """The decode attention of `implementation` (the XLA one until the decode kernels land)."""
  ops.resolve_implementation(implementation, interpret)  # validates the choice
  return decode_attention


# ---------------------------------------------------------------------------------------------
# The XLA decode attention: one query per sequence, the G heads of a KV group together.


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def decode_attention(q_t, cache: DecodeCache, position, gates, scale, *, config: NSAConfig,
                     interpret: bool = False):
  """Row `position` of NSA over the cache (which already holds that token): `[B, Hq, Dv]`."""
  del interpret  # the XLA path has no interpret mode
  b, hq, dk = q_t.shape
  size, hkv = cache.k.shape[1], cache.k.shape[2]
  q = q_t.reshape(b, hkv, hq // hkv, dk)  # [B, Hkv, G, Dk]
  heads_first = lambda x: x.transpose(0, 2, 1, 3)  # [B, S, Hkv, D] -> [B, Hkv, S, D]

  # Compressed branch, and its probabilities for the selection.
  num_cmp = cache.k_cmp.shape[1]
  visible = (jnp.arange(num_cmp) < num_cmp_visible(position, config))[None, None, None, :]
  probs, _ = masked_softmax(attention_scores(q, heads_first(cache.k_cmp), scale), visible)
  o_cmp = jnp.einsum("bhgi,bhid->bhgd", probs, heads_first(cache.v_cmp).astype(probs.dtype),
                     precision=jax.lax.Precision.HIGHEST)
  num_slc = size // config.slc_block
  block_indices = decode_selection(jax.lax.stop_gradient(probs.sum(2)), position, config,
                                   num_slc)  # [B, Hkv, n]

  # Selected blocks: gather their tokens; the query's own block is cut at the query.
  tokens = block_indices[..., None] * config.slc_block + jnp.arange(config.slc_block)
  keep = (block_indices[..., None] >= 0) & (tokens <= position)  # [B, Hkv, n, l']
  tokens = jnp.where(keep, tokens, 0).reshape(b, hkv, -1)  # [B, Hkv, n*l']
  gather = lambda x: jnp.take_along_axis(heads_first(x), tokens[..., None], axis=2)
  o_slc, _ = masked_attention(q, gather(cache.k), gather(cache.v),
                              keep.reshape(b, hkv, 1, -1), scale)

  # Sliding window: the last `w` tokens, read as one span that stays inside the cache.
  span = min(config.window, size)
  start = jnp.clip(position + 1 - span, 0, size - span)
  window_slice = lambda x: heads_first(jax.lax.dynamic_slice_in_dim(x, start, span, axis=1))
  key_pos = start + jnp.arange(span)
  in_window = (key_pos <= position) & (key_pos > position - config.window)
  o_swa, _ = masked_attention(q, window_slice(cache.k), window_slice(cache.v),
                              in_window[None, None, None, :], scale)

  ungroup = lambda o: o.reshape(b, hq, -1)
  gates = None if gates is None else gates[:, None]  # combine_branches wants [B, T, Hq, 3]
  out = combine_branches(ungroup(o_cmp)[:, None], ungroup(o_slc)[:, None],
                         ungroup(o_swa)[:, None], gates)
  return out[:, 0].astype(q_t.dtype)

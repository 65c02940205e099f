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
import math
from typing import Callable

import jax
import jax.numpy as jnp

from nsa_jax import ops, pallas_gpu, pallas_tpu, xla
from nsa_jax import validation as check
from nsa_jax.attention_math import masked_attention
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

  Head-major, so that one KV head's tokens are contiguous for the decode kernels.

  Attributes:
    k: `[B, Hkv, S, Dk]` keys of positions `[0, length)`, `S >= max_len` (padded, see
      `CACHE_ALIGN`); the rest is zeros.
    v: `[B, Hkv, S, Dv]` values, likewise.
    k_cmp: `[B, Hkv, Sc, Dk]` compressed keys, `Sc >= num_cmp_blocks(max_len)` (padded likewise);
      the first `num_cmp_blocks(length)` are made.
    v_cmp: `[B, Hkv, Sc, Dv]` compressed values.
    length: int32, tokens seen so far: a scalar (all sequences of the batch move together) or,
      after a prefill of prompts of different lengths, `[B]` (each sequence its own).
    max_len: the most tokens the cache holds.
  """

  k: jax.Array
  v: jax.Array
  k_cmp: jax.Array
  v_cmp: jax.Array
  length: jax.Array
  max_len: int


def _padded_len(max_len: int, config: NSAConfig) -> int:
  align = math.lcm(CACHE_ALIGN, config.slc_block)
  return -(-max_len // align) * align


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
  num_cmp = -(-num_cmp // CACHE_ALIGN) * CACHE_ALIGN
  zeros = lambda s, d: jnp.zeros((batch, num_kv_heads, s, d), dtype)
  return DecodeCache(k=zeros(size, head_dim), v=zeros(size, head_dim_v),
                     k_cmp=zeros(num_cmp, head_dim), v_cmp=zeros(num_cmp, head_dim_v),
                     length=jnp.zeros((), jnp.int32), max_len=max_len)


def _check_cache(cache, k, v, tokens: int):
  if not isinstance(cache, DecodeCache):
    raise ValueError(f"cache must be a DecodeCache (from init_decode_cache), got "
                     f"{type(cache).__name__}")
  b, hkv, _, dk = cache.k.shape
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
                interpret: bool = False, lengths=None):
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
    lengths: int `[B]` or None: prompts of different lengths, each row's first `lengths[b]`
      tokens (`0 <= lengths[b] <= T`), padded at the end to `T`. Row `b` then continues at
      position `lengths[b]` (the cache's `length` is `[B]`) and equals the same calls on its own
      prompt at every position; the padding is never attended. None: every row is `T` long.

  Returns:
    `(out [B, T, Hq, Dv] in q.dtype, cache)`: `out` is `nsa_attention(q, k, v, ...)` (with
    `lengths`: zero at each row's padding).

  Raises:
    ValueError: bad shapes (as `nsa_attention`), `lengths` not `[B]` integers, or a prompt that
      does not fit the cache.
  """
  config = check.check_config(config)
  _check_cache(cache, k, v, q.shape[1])
  compress_fn = compress_fn or _default_compress(config)
  t = q.shape[1]
  if lengths is not None:
    _check_lengths(lengths, q)
  if t == 0:
    out = jnp.zeros(q.shape[:3] + (v.shape[-1],), q.dtype)
    length = jnp.zeros((), jnp.int32) if lengths is None else jnp.zeros((q.shape[0],), jnp.int32)
    return out, dataclasses.replace(cache, length=length)
  k_cmp, v_cmp = compress_fn(k, v)
  # Causal: a row's first `lengths[b]` outputs never see its padding.
  out = ops.nsa_attention(q, k, v, config=config, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp,
                          scale=scale, implementation=implementation, interpret=interpret)
  cache = _write_prompt(cache, k, v, k_cmp, v_cmp)
  if lengths is None:
    return out, cache
  # The padding's tokens and the compressed blocks reaching into it stay in the cache unseen: a
  # step at `t` reads positions `<= t` (all written by then) and blocks complete at `t`, each
  # remade by the step its last token arrives in.
  return padding_zeroed(out, lengths), dataclasses.replace(cache, length=lengths.astype(jnp.int32))


def padding_zeroed(out, lengths):
  """`out [B, T, ...]` with each row's positions `>= lengths[b]` zero (None: unchanged)."""
  if lengths is None:
    return out
  keep = jnp.arange(out.shape[1]) < lengths[:, None]
  return jnp.where(keep.reshape(keep.shape + (1,) * (out.ndim - 2)), out, 0)


def _check_lengths(lengths, q):
  if (not hasattr(lengths, "shape") or tuple(lengths.shape) != (q.shape[0],)
      or not jnp.issubdtype(lengths.dtype, jnp.integer)):
    raise ValueError(f"lengths must be integers of shape [B] = [{q.shape[0]}], got "
                     f"{getattr(lengths, 'dtype', type(lengths).__name__)} "
                     f"{tuple(getattr(lengths, 'shape', ()))} (q {tuple(q.shape)})")


def _write_prompt(cache: DecodeCache, k, v, k_cmp, v_cmp) -> DecodeCache:
  """The cache reset to a prompt's tokens `[B, T, Hkv, D]` and its compressed blocks."""
  write = lambda buf, x: jax.lax.dynamic_update_slice(
      buf, x.transpose(0, 2, 1, 3).astype(buf.dtype), (0, 0, 0, 0))
  return DecodeCache(k=write(cache.k, k), v=write(cache.v, v), k_cmp=write(cache.k_cmp, k_cmp),
                     v_cmp=write(cache.v_cmp, v_cmp), length=jnp.asarray(k.shape[1], jnp.int32),
                     max_len=cache.max_len)


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
  _check_step(q_t, k_t, v_t, gates)
  _check_cache(cache, k_t[:, None], v_t[:, None], 1)
  scale = q_t.shape[-1] ** -0.5 if scale is None else scale
  implementation = ops.resolve_implementation(implementation, interpret)
  if _ragged(cache):  # rows at their own positions: each row alone, batched
    step = functools.partial(nsa_decode_step, config=config, scale=scale,
                             compress_fn=compress_fn, implementation=implementation,
                             interpret=interpret)
    return _per_row(step, q_t, k_t, v_t, cache, gates)
  if (implementation == "pallas_gpu" and compress_fn is None
      and pallas_gpu.step_supported(q_t, cache, config)):  # append and attention in 4 kernels
    return pallas_gpu.decode_step(q_t, k_t, v_t, cache, gates, scale, config=config,
                                  interpret=interpret)
  position = cache.length  # the new token's
  if (implementation == "pallas_gpu" and compress_fn is None
      and pallas_gpu.append_supported(cache, config)):
    cache = pallas_gpu.decode_append(cache, k_t, v_t, config=config, interpret=interpret)
  else:
    cache = _append(cache, k_t, v_t, config, compress_fn or _default_compress(config))
  backend = _decode_backend(implementation)
  out = backend(q_t, cache, position, gates, scale, config=config, interpret=interpret)
  return out, cache


def _per_row(step, q_t, k_t, v_t, cache, gates):
  """`step(q_t, k_t, v_t, cache, gates=...)` on each row of caches whose rows sit at their own
  positions (`length [B]`; `cache` one cache or a tuple), as a batch of one with a scalar
  length, vmapped over the rows (the kernels batch under vmap)."""
  def one_row(q, k, v, row, g):
    out, row = step(q[None], _map_tokens(lambda x: x[None], k), _map_tokens(lambda x: x[None], v),
                    _map_caches(lambda x: x[None], row), gates=None if g is None else g[None])
    return out[0], _map_caches(lambda x: x[0], row)
  return jax.vmap(one_row)(q_t, k_t, v_t, cache, gates)


def _map_tokens(fn, x):
  """`fn` on a token array or on each of a list of them (a K/V set per branch)."""
  return [fn(t) for t in x] if isinstance(x, (list, tuple)) else fn(x)


def _map_caches(fn, cache):
  """`fn` on the token arrays of a cache (or of each of a tuple of caches), `length` kept."""
  if isinstance(cache, tuple):
    return tuple(_map_caches(fn, c) for c in cache)
  arrays = [f.name for f in dataclasses.fields(cache) if f.name not in ("length", "max_len")]
  return dataclasses.replace(cache, **{name: fn(getattr(cache, name)) for name in arrays})


def _ragged(cache) -> bool:
  """Whether the rows of `cache` (one cache, or the first of a tuple) sit at their own
  positions (`nsa_prefill(lengths=...)`)."""
  return jnp.ndim((cache[0] if isinstance(cache, tuple) else cache).length) == 1


def _check_step(q_t, k_t, v_t, gates):
  """A step's token `q_t [B, Hq, Dk]`, `k_t [B, Hkv, Dk]`, `v_t [B, Hkv, Dv]` and gates."""
  check.check_rank("q_t", q_t, 3, "[B, Hq, Dk]")
  check.check_rank("k_t", k_t, 3, "[B, Hkv, Dk]")
  check.check_rank("v_t", v_t, 3, "[B, Hkv, Dv]")
  check.check_qkv(q_t[:, None], k_t[:, None], v_t[:, None])
  if gates is not None:
    expected = tuple(q_t.shape[:2]) + (3,)
    if tuple(gates.shape) != expected:
      raise ValueError(f"gates must have shape [B, Hq, 3] = {list(expected)}, "
                       f"got {tuple(gates.shape)}")
    check.check_float("gates", gates)


def _append(cache: DecodeCache, k_t, v_t, config: NSAConfig, compress_fn) -> DecodeCache:
  """Writes token `t = cache.length` and, when it completes a compressed block, that block."""
  t = cache.length
  write_token = lambda buf, x: jax.lax.dynamic_update_slice(
      buf, x[:, :, None].astype(buf.dtype), (0, 0, t, 0))
  k, v = write_token(cache.k, k_t), write_token(cache.v, v_t)
  k_cmp, v_cmp = cache.k_cmp, cache.v_cmp
  block, stride = config.cmp_block, config.cmp_stride
  num_cmp = config.num_cmp_blocks(cache.max_len)
  if num_cmp:  # else max_len < l: no block is ever made
    first = t + 1 - block  # first token of the block that ends at t
    completes = (first >= 0) & (first % stride == 0)
    first = jnp.maximum(first, 0)
    # compress_fn takes the token-major layout [B, l, Hkv, D] and gives [B, 1, Hkv, D].
    tokens = lambda buf: jax.lax.dynamic_slice_in_dim(buf, first, block, axis=2).transpose(
        0, 2, 1, 3)
    new_k, new_v = compress_fn(tokens(k), tokens(v))
    slot = jnp.minimum(first // stride, num_cmp - 1)

    def write_block(buf, new):
      old = jax.lax.dynamic_slice_in_dim(buf, slot, 1, axis=2)
      new = new.transpose(0, 2, 1, 3).astype(buf.dtype)  # [B, Hkv, 1, D]
      return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(completes, new, old), slot,
                                                 axis=2)

    k_cmp, v_cmp = write_block(k_cmp, new_k), write_block(v_cmp, new_v)
  return DecodeCache(k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, length=t + 1, max_len=cache.max_len)


def _decode_backend(implementation: str):
  """The decode attention of a resolved `implementation`; "reference" uses the XLA one (it is as
  plain)."""
  return {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}.get(implementation,
                                                                   xla).decode_attention


# ---------------------------------------------------------------------------------------------
# Dense decoding (the baseline `nsa_jax.nn.DenseAttention` generates with).


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "length"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class DenseCache:
  """Plain KV cache: `k [B, Hkv, S, Dk]`, `v [B, Hkv, S, Dv]` (positions `[0, length)` filled),
  `length` an int32 scalar."""

  k: jax.Array
  v: jax.Array
  length: jax.Array


def init_dense_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                     head_dim_v: int | None = None, *, dtype=jnp.float32) -> DenseCache:
  """An empty dense cache for up to `max_len` tokens."""
  for name, value in (("batch", batch), ("max_len", max_len), ("num_kv_heads", num_kv_heads),
                      ("head_dim", head_dim)):
    check.check_positive(name, value)
  head_dim_v = head_dim if head_dim_v is None else head_dim_v
  zeros = lambda d: jnp.zeros((batch, num_kv_heads, max_len, d), dtype)
  return DenseCache(k=zeros(head_dim), v=zeros(head_dim_v), length=jnp.zeros((), jnp.int32))


def dense_cache_write(cache: DenseCache, k, v, lengths=None) -> DenseCache:
  """Resets the cache to the prompt `k [B, T, Hkv, Dk]`, `v [B, T, Hkv, Dv]`; with `lengths
  int [B]` (right-padded prompts, as `nsa_prefill`'s) each row holds its first `lengths[b]`
  tokens and continues from there."""
  if k.shape[1] > cache.k.shape[2]:
    raise ValueError(f"{k.shape[1]} tokens do not fit a cache of max_len {cache.k.shape[2]}")
  if lengths is not None:
    _check_lengths(lengths, k)
  write = lambda buf, x: jax.lax.dynamic_update_slice(
      buf, x.transpose(0, 2, 1, 3).astype(buf.dtype), (0, 0, 0, 0))
  length = (jnp.asarray(k.shape[1], jnp.int32) if lengths is None
            else lengths.astype(jnp.int32))
  return DenseCache(k=write(cache.k, k), v=write(cache.v, v), length=length)


def dense_decode_step(q_t, k_t, v_t, cache: DenseCache, scale=None):
  """Appends one token and attends everything so far: `(out_t [B, Hq, Dv], cache)`; rows at
  their own positions (`length [B]`, `dense_cache_write(lengths=...)`) each alone."""
  if _ragged(cache):
    step = lambda q, k, v, row, gates: dense_decode_step(q, k, v, row, scale)
    return _per_row(step, q_t, k_t, v_t, cache, None)
  t = cache.length
  cache = _dense_append(cache, k_t, v_t)
  b, hq, dk = q_t.shape
  hkv = cache.k.shape[1]
  scale = dk ** -0.5 if scale is None else scale
  visible = (jnp.arange(cache.k.shape[2]) <= t)[None, None, None, :]
  out, _ = masked_attention(q_t.reshape(b, hkv, hq // hkv, dk), cache.k, cache.v, visible, scale)
  return out.reshape(b, hq, -1).astype(q_t.dtype), cache


def _dense_append(cache: DenseCache, k_t, v_t) -> DenseCache:
  """Writes token `t = cache.length` (`k_t [B, Hkv, Dk]`, `v_t [B, Hkv, Dv]`)."""
  write = lambda buf, x: jax.lax.dynamic_update_slice(
      buf, x[:, :, None].astype(buf.dtype), (0, 0, cache.length, 0))
  return DenseCache(k=write(cache.k, k_t), v=write(cache.v, v_t), length=cache.length + 1)


# ---------------------------------------------------------------------------------------------
# A K/V set per branch (`nsa_jax.nsa_attention_separate_kv`; the NNX layer's `separate_kv=True`):
# set 0 is compressed (its blocks feed the compressed branch and rank the selection), set 1 gives
# the selected blocks' tokens, set 2 the window's. On GPU the decode kernels take the three sets
# (the sparse kernel's window programs read set 2); elsewhere the steps run the XLA decode.


def init_separate_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                           head_dim_v: int | None = None, *, config: NSAConfig,
                           dtype=jnp.float32) -> tuple[DecodeCache, DenseCache, DenseCache]:
  """Empty caches for up to `max_len` tokens of a layer with a K/V set per branch.

  Returns `(cmp, slc, swa)`: a `DecodeCache` of set 0 (its raw tokens make the compressed
  blocks) and `DenseCache`s of sets 1 and 2, as long as the `DecodeCache`'s padded token axis.
  Sets 0 and 2 are kept whole although only their last `l` / `w` tokens are read again.

  Raises:
    ValueError: a non-positive size or an invalid config.
  """
  cmp = init_decode_cache(batch, max_len, num_kv_heads, head_dim, head_dim_v, config=config,
                          dtype=dtype)
  dense = lambda: init_dense_cache(batch, cmp.k.shape[2], num_kv_heads, head_dim, head_dim_v,
                                   dtype=dtype)
  return cmp, dense(), dense()


def _check_separate_caches(caches, keys, values, tokens: int):
  """`caches` from `init_separate_kv_cache`, three sets `[B, ., Hkv, D]` that match them."""
  kinds = (DecodeCache, DenseCache, DenseCache)
  if (not isinstance(caches, (tuple, list)) or len(caches) != 3
      or not all(isinstance(c, kind) for c, kind in zip(caches, kinds))):
    raise ValueError(f"caches must be (DecodeCache, DenseCache, DenseCache) from "
                     f"init_separate_kv_cache, got {type(caches).__name__}")
  if len(keys) != 3 or len(values) != 3:
    raise ValueError(f"keys and values must be three sets each (compressed, selected, window "
                     f"branch), got {len(keys)} and {len(values)}")
  _check_cache(caches[0], keys[0], values[0], tokens)
  for name, cache, k, v in zip(("selected", "window"), caches[1:], keys[1:], values[1:]):
    b, hkv, _, dk = cache.k.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, hkv, dk) or v.shape[-1] != cache.v.shape[-1]:
      raise ValueError(f"the {name} branch's k and v must match its cache's [B, ., Hkv, Dk] = "
                       f"[{b}, ., {hkv}, {dk}] and Dv = {cache.v.shape[-1]}, got "
                       f"k {tuple(k.shape)}, v {tuple(v.shape)}")


def nsa_prefill_separate_kv(q, keys, values, caches, *, config: NSAConfig, gates=None,
                            scale=None, compress_fn: CompressFn | None = None,
                            implementation=None, interpret: bool = False, lengths=None):
  """`nsa_prefill` with a K/V set per branch.

  Args:
    q: `[B, T, Hq, Dk]`, `0 <= T <= max_len`.
    keys: three `[B, T, Hkv, Dk]` (compressed, selected, window branch).
    values: three `[B, T, Hkv, Dv]`.
    caches: from `init_separate_kv_cache`, reset to the prompt.
    config, gates, scale, compress_fn, implementation, interpret, lengths: as in
      `nsa_prefill` (`compress_fn` compresses set 0).

  Returns:
    `(out [B, T, Hq, Dv] in q.dtype, caches)`: `out` is `nsa_attention_separate_kv(q, keys,
    values, ...)`.

  Raises:
    ValueError: bad shapes (as `nsa_attention_separate_kv`), caches that do not match, or a
      prompt that does not fit them.
  """
  config = check.check_config(config)
  _check_separate_caches(caches, keys, values, q.shape[1])
  if lengths is not None:
    _check_lengths(lengths, q)
  cmp, slc, swa = caches
  if q.shape[1] == 0:
    out = jnp.zeros(q.shape[:3] + (values[0].shape[-1],), q.dtype)
    # A length each: one array in three caches could not be donated to a jitted step.
    length = lambda: (jnp.zeros((), jnp.int32) if lengths is None
                      else jnp.zeros((q.shape[0],), jnp.int32))
    return out, tuple(dataclasses.replace(c, length=length()) for c in caches)
  k_cmp, v_cmp = (compress_fn or _default_compress(config))(keys[0], values[0])
  out = ops.nsa_attention_separate_kv(q, keys, values, config=config, gates=gates, k_cmp=k_cmp,
                                      v_cmp=v_cmp, scale=scale, implementation=implementation,
                                      interpret=interpret)
  cmp = _write_prompt(cmp, keys[0], values[0], k_cmp, v_cmp)
  if lengths is not None:  # as in `nsa_prefill`: the padding stays in the caches unseen
    cmp = dataclasses.replace(cmp, length=lengths.astype(jnp.int32))
  return padding_zeroed(out, lengths), (
      cmp, dense_cache_write(slc, keys[1], values[1], lengths),
      dense_cache_write(swa, keys[2], values[2], lengths))


def nsa_decode_step_separate_kv(q_t, k_ts, v_ts, caches, *, config: NSAConfig, gates=None,
                                scale=None, compress_fn: CompressFn | None = None,
                                implementation=None, interpret: bool = False):
  """`nsa_decode_step` with a K/V set per branch.

  On GPU the decode kernels (`pallas_gpu.decode_step_separate_kv`: the sparse kernel's window
  programs read set 2; with a `compress_fn` the tokens are appended in XLA first); elsewhere the
  XLA decode (also on TPU).

  Args:
    q_t: `[B, Hq, Dk]`.
    k_ts: three `[B, Hkv, Dk]`, the token's keys of sets 0, 1, 2.
    v_ts: three `[B, Hkv, Dv]`.
    caches: from `nsa_prefill_separate_kv` (or the last step), holding positions `[0, t)`.
    config, gates, scale, compress_fn, implementation, interpret: as in `nsa_decode_step`.

  Returns:
    `(out_t [B, Hq, Dv] in q_t.dtype, caches)`: row `t` of `nsa_attention_separate_kv` on the
    sequence so far.

  Raises:
    ValueError: bad ranks, dtypes or shapes.
  """
  config = check.check_config(config)
  if len(k_ts) != 3 or len(v_ts) != 3:
    raise ValueError(f"k_ts and v_ts must be three tokens each (compressed, selected, window "
                     f"branch), got {len(k_ts)} and {len(v_ts)}")
  for k_t, v_t in zip(k_ts, v_ts):
    _check_step(q_t, k_t, v_t, gates)
  _check_separate_caches(caches, [k[:, None] for k in k_ts], [v[:, None] for v in v_ts], 1)
  scale = q_t.shape[-1] ** -0.5 if scale is None else scale
  implementation = ops.resolve_implementation(implementation, interpret)
  if _ragged(caches):  # rows at their own positions: each row alone, batched
    step = functools.partial(nsa_decode_step_separate_kv, config=config, scale=scale,
                             compress_fn=compress_fn, implementation=implementation,
                             interpret=interpret)
    return _per_row(step, q_t, list(k_ts), list(v_ts), tuple(caches), gates)
  if (implementation == "pallas_gpu" and compress_fn is None
      and pallas_gpu.step_separate_kv_supported(q_t, caches, config)):
    return pallas_gpu.decode_step_separate_kv(q_t, k_ts, v_ts, caches, gates, scale,
                                              config=config, interpret=interpret)
  cmp, slc, swa = caches
  position = cmp.length  # the new token's
  cmp = _append(cmp, k_ts[0], v_ts[0], config, compress_fn or _default_compress(config))
  caches = (cmp, _dense_append(slc, k_ts[1], v_ts[1]), _dense_append(swa, k_ts[2], v_ts[2]))
  if (implementation == "pallas_gpu"  # a learned compression: appended above, then the kernels
      and pallas_gpu.kernels_take_separate_kv(q_t, caches, config)):
    out = pallas_gpu.decode_attention_separate_kv(q_t, caches, position, gates, scale,
                                                  config=config, interpret=interpret)
  else:
    out = xla.decode_attention_separate_kv(q_t, cmp, (caches[1].k, caches[1].v),
                                           (caches[2].k, caches[2].v), position, gates, scale,
                                           config=config)
  return out, caches

"""Flax NNX layers: `NativeSparseAttention` and a `DenseAttention` with the same interface.

Both map `x [B, T, features] -> [B, T, features]` with causal GQA attention and RoPE, so a model
switches between them with one config field (`make_attention(kind, ...)`). The NSA layer adds the
paper's learned compression `phi`, sigmoid branch gates and optional per-branch K/V projections;
it can also run a subset of its branches (the ablations `make_attention("nsa_no_selection")`:
compressed + window, and `make_attention("window")`: the sliding window alone).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax import decode, ops, segments, sharding
from nsa_jax.config import NSAConfig

COMPRESSIONS = ("mlp", "mean")
GATINGS = ("sigmoid", "sum")
BRANCHES = ("cmp", "slc", "swa")  # the order of the gates


def apply_rope(x, positions, theta: float = 10000.0):
  """Rotary position embedding (half-split layout) of `x [B, T, H, D]` at `positions [T]` (or
  `[B, T]`: packed rows, positions restarting per document).

  Computed in float32, returned in x.dtype. D must be even.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [D/2]
  angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [(B,) T, D/2]
  cos, sin = jnp.cos(angle)[..., None, :], jnp.sin(angle)[..., None, :]  # [(B,) T, 1, D/2]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def step_positions(length):
  """A decode step's RoPE positions: `[1]` for a scalar cache length, `[B, 1]` for rows at their
  own positions (`length [B]`)."""
  return length[None] if jnp.ndim(length) == 0 else length[:, None]


class LearnedCompression(nnx.Module):
  """The paper's `phi`: an MLP over each flattened `l x D` block plus an intra-block position embedding.

  Maps `x [B, T, H, D]` to `[B, Tc, H, D]` with compressed block `i` made of tokens
  `[i*stride, i*stride + block)`; the weights are shared by all heads. Packed rows
  (`segment_ids [B, T]`): each document's blocks in its slots, the others zero (SPEC.md).
  """

  def __init__(self, block: int, stride: int, head_dim: int, *, hidden: int | None = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.block, self.stride = block, stride
    hidden = hidden or head_dim
    self.position = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (block, head_dim), param_dtype))
    self.hidden = nnx.Linear(block * head_dim, hidden, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)
    self.out = nnx.Linear(hidden, head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, segment_ids=None):
    b, t, h, d = x.shape
    num_blocks = (t - self.block) // self.stride + 1 if t >= self.block else 0
    if num_blocks == 0:
      return jnp.zeros((b, 0, h, d), x.dtype)
    if segment_ids is None:
      tokens = jnp.arange(num_blocks)[:, None] * self.stride + jnp.arange(self.block)  # [Tc, l]
      blocks = x[:, tokens]  # [B, Tc, l, H, D]
    else:
      tokens, exists = segments.document_blocks(segment_ids, self.block, self.stride)
      blocks = segments.gather_blocks(x, tokens)
    blocks = jnp.moveaxis(blocks, 3, 2) + self.position[...].astype(x.dtype)  # [B, Tc, H, l, D]
    flat = blocks.reshape(b, num_blocks, h, self.block * d)
    out = self.out(nnx.gelu(self.hidden(flat))).astype(x.dtype)
    return out if segment_ids is None else jnp.where(exists[..., None, None], out, 0)


class _CausalAttentionBase(nnx.Module):
  """Query projection, RoPE and output projection shared by the two layers."""

  def __init__(self, num_features, num_heads, num_kv_heads, head_dim, head_dim_v, rope_theta,
               num_kv_sets, dtype, param_dtype, rngs):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                       f"({num_kv_heads})")
    if head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
    self.head_dim, self.head_dim_v = head_dim, head_dim_v or head_dim
    self.rope_theta, self.num_kv_sets = rope_theta, num_kv_sets
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs)
    self.q_proj = linear(num_features, num_heads * head_dim)
    self.k_proj = linear(num_features, num_kv_sets * num_kv_heads * head_dim)
    self.v_proj = linear(num_features, num_kv_sets * num_kv_heads * self.head_dim_v)
    self.o_proj = linear(num_heads * self.head_dim_v, num_features)

  def _project(self, x, positions=None):
    """`x [B, T, F]` at `positions [T]` or `[B, T]` (default `0..T-1`) -> `q [B, T, Hq, Dk]` and
    lists of `num_kv_sets` keys / values, RoPE applied."""
    b, t, _ = x.shape
    positions = jnp.arange(t) if positions is None else positions
    q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), positions,
                   self.rope_theta)
    k = self.k_proj(x).reshape(b, t, self.num_kv_sets, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_sets, self.num_kv_heads, self.head_dim_v)
    keys = [apply_rope(k[:, :, i], positions, self.rope_theta) for i in range(self.num_kv_sets)]
    values = [v[:, :, i] for i in range(self.num_kv_sets)]
    return q, keys, values

  def _output(self, out):
    b, t = out.shape[:2]
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim_v))


class NativeSparseAttention(_CausalAttentionBase):
  """NSA self-attention layer (Yuan et al., 2025): `x [B, T, num_features] -> [B, T, num_features]`.

  Args:
    num_features: model width F.
    num_heads: query heads Hq.
    num_kv_heads: key/value heads Hkv (GQA group `Hq // Hkv`, which shares selected blocks).
    head_dim: Dk (even, for RoPE).
    head_dim_v: Dv, default Dk.
    config: the `NSAConfig`.
    compression: "mlp" (the paper's learned `phi`) or "mean" (mean pooling, the tutorial's).
    gating: "sigmoid" (per-head gates from a linear map of x, the paper's) or "sum" (tutorial).
    separate_kv: independent K/V projections per branch (paper section 3.3.3) instead of one.
    branches: the branches computed (a subset of `BRANCHES`, in that order); the others
      contribute nothing (ablations: `("cmp", "swa")`, `("swa",)`). Only all three decode or
      take `separate_kv`.
    rope_theta: RoPE base.
    implementation: passed to the functional ops (None picks the best for the backend).
    dtype, param_dtype: computation and parameter dtypes.
    rngs: `nnx.Rngs` (keyword-only).
  """

  def __init__(self, num_features: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               head_dim_v: int | None = None, config: NSAConfig = NSAConfig(),
               compression: str = "mlp", gating: str = "sigmoid", separate_kv: bool = False,
               branches: tuple[str, ...] = BRANCHES, rope_theta: float = 10000.0,
               implementation: str | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if compression not in COMPRESSIONS:
      raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if gating not in GATINGS:
      raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
    branches = tuple(branches)
    if not branches or branches != tuple(b for b in BRANCHES if b in branches):
      raise ValueError(f"branches must be a non-empty subset of {BRANCHES} in that order, got "
                       f"{branches!r}")
    if separate_kv and branches != BRANCHES:
      raise ValueError(f"separate_kv=True needs all branches {BRANCHES}, got {branches!r}")
    super().__init__(num_features, num_heads, num_kv_heads, head_dim, head_dim_v, rope_theta,
                     3 if separate_kv else 1, dtype, param_dtype, rngs)
    self.config, self.compression, self.gating = config, compression, gating
    self.branches, self.implementation = branches, implementation
    if compression == "mlp" and branches != ("swa",):  # the window alone compresses nothing
      make = lambda d: LearnedCompression(config.cmp_block, config.cmp_stride, d, dtype=dtype,
                                          param_dtype=param_dtype, rngs=rngs)
      self.k_compress, self.v_compress = make(head_dim), make(self.head_dim_v)
    if gating == "sigmoid":
      self.gate_proj = nnx.Linear(num_features, num_heads * 3, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)

  def _compress(self, k, v, segment_ids=None):
    """`phi` of the compression branch: `(k [B, T, Hkv, Dk], v) -> (k_cmp, v_cmp)` (None, None
    for the window alone)."""
    if self.branches == ("swa",):
      return None, None
    if self.compression == "mlp":
      return self.k_compress(k, segment_ids), self.v_compress(v, segment_ids)
    return ops.compress_kv(k, v, block=self.config.cmp_block, stride=self.config.cmp_stride,
                           segment_ids=segment_ids)

  def _gates(self, x, dtype):
    """`[B, T, Hq, 3]` sigmoid gates of `x [B, T, F]`, or None for the plain sum."""
    if self.gating != "sigmoid":
      return None
    b, t, _ = x.shape
    logits = self.gate_proj(x).reshape(b, t, self.num_heads, 3).astype(jnp.float32)
    return jax.nn.sigmoid(logits).astype(dtype)

  def __call__(self, x, segment_ids=None):
    """`x [B, T, F]` -> `[B, T, F]`; `segment_ids int [B, T]`: packed rows, each document
    attended alone with positions from its start (SPEC.md)."""
    positions = None if segment_ids is None else segments.document_positions(segment_ids)
    q, keys, values = self._project(x, positions)
    # The compression branch's K/V (set 0).
    k_cmp, v_cmp = self._compress(keys[0], values[0], segment_ids)
    gates = self._gates(x, q.dtype)
    # Under a device mesh the ops run per shard (batch over data/fsdp, heads over tensor).
    out = sharding.per_shard(self._attend, q, gates, k_cmp, v_cmp, segment_ids, *keys, *values)
    return self._output(out)

  def _attend(self, q, gates, k_cmp, v_cmp, segment_ids, *keys_and_values):
    """The three branches, on one K/V set or on their own (sets 0: cmp, 1: slc, 2: swa)."""
    keys, values = keys_and_values[:self.num_kv_sets], keys_and_values[self.num_kv_sets:]
    if self.branches != BRANCHES:
      return self._attend_branches(q, gates, k_cmp, v_cmp, keys[0], values[0], segment_ids)
    common = dict(config=self.config, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp,
                  implementation=self.implementation, segment_ids=segment_ids)
    if self.num_kv_sets == 1:
      return ops.nsa_attention(q, keys[0], values[0], **common)
    return ops.nsa_attention_separate_kv(q, keys, values, **common)

  def _attend_branches(self, q, gates, k_cmp, v_cmp, k, v, segment_ids=None):
    """`self.branches` only, each through its own op, mixed as `nsa_attention` mixes all three
    (gates of the others unused): `[B, T, Hq, Dv]` in q.dtype."""
    cfg = self.config
    common = dict(implementation=self.implementation, segment_ids=segment_ids)
    outputs = []
    if "cmp" in self.branches and "slc" in self.branches:
      o_cmp, block_indices = ops.compressed_attention_and_selection(
          q, k_cmp, v_cmp, config=cfg, **common)
      outputs += [o_cmp, ops.selected_attention(q, k, v, block_indices, block=cfg.slc_block,
                                                **common)]
    elif "cmp" in self.branches:
      outputs.append(ops.compressed_attention(q, k_cmp, v_cmp, block=cfg.cmp_block,
                                              stride=cfg.cmp_stride, **common)[0])
    elif "slc" in self.branches:
      block_indices = ops.select_blocks(q, k_cmp, config=cfg, **common)
      outputs.append(ops.selected_attention(q, k, v, block_indices, block=cfg.slc_block,
                                            **common))
    if "swa" in self.branches:
      outputs.append(ops.sliding_window_attention(q, k, v, window=cfg.window, **common))
    out = jnp.zeros(outputs[0].shape, jnp.float32)
    for branch, o in zip(self.branches, outputs):
      weight = 1.0 if gates is None else gates[..., BRANCHES.index(branch), None]
      out = out + weight * o.astype(jnp.float32)
    return out.astype(q.dtype)

  # Decoding (`nsa_jax.decode`): prefill a prompt, then one token per step; the outputs equal
  # `__call__` on the whole sequence at every position.

  def _check_decodes(self):
    if self.branches != BRANCHES:
      raise ValueError(f"decoding needs all branches {BRANCHES}; this layer computes "
                       f"{self.branches}")

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
    """An empty cache for this layer: a `DecodeCache`, or with `separate_kv=True` the three
    caches of `decode.init_separate_kv_cache`."""
    self._check_decodes()
    init = (decode.init_decode_cache if self.num_kv_sets == 1
            else decode.init_separate_kv_cache)
    return init(batch, max_len, self.num_kv_heads, self.head_dim, self.head_dim_v,
                config=self.config, dtype=dtype)

  def prefill(self, x, cache, lengths=None):
    """`x [B, T, F]` (positions 0..T-1) -> `(y [B, T, F], cache)`; `lengths int [B]`: prompts of
    different lengths, right-padded (`decode.nsa_prefill`)."""
    q, keys, values = self._project(x)
    common = dict(config=self.config, gates=self._gates(x, q.dtype), compress_fn=self._compress,
                  implementation=self.implementation, lengths=lengths)
    if self.num_kv_sets == 1:
      out, cache = decode.nsa_prefill(q, keys[0], values[0], cache, **common)
    else:
      out, cache = decode.nsa_prefill_separate_kv(q, keys, values, cache, **common)
    return self._output(out), cache

  def decode_step(self, x_t, cache):
    """`x_t [B, F]` at position `cache.length` (per row where it is `[B]`) ->
    `(y_t [B, F], cache)`."""
    length = cache.length if self.num_kv_sets == 1 else cache[0].length
    q, keys, values = self._project(x_t[:, None], step_positions(length))
    gates = self._gates(x_t[:, None], q.dtype)
    common = dict(config=self.config, gates=None if gates is None else gates[:, 0],
                  compress_fn=self._compress)
    if self.num_kv_sets == 1:
      out, cache = decode.nsa_decode_step(q[:, 0], keys[0][:, 0], values[0][:, 0], cache,
                                          implementation=self.implementation, **common)
    else:
      out, cache = decode.nsa_decode_step_separate_kv(
          q[:, 0], [k[:, 0] for k in keys], [v[:, 0] for v in values], cache,
          implementation=self.implementation, **common)
    return self._output(out[:, None])[:, 0], cache


class DenseAttention(_CausalAttentionBase):
  """Full causal GQA attention with RoPE, with `NativeSparseAttention`'s interface.

  Args: as `NativeSparseAttention`'s `num_features`, `num_heads`, `num_kv_heads`, `head_dim`,
  `head_dim_v`, `rope_theta`, `dtype`, `param_dtype`, `rngs`.
  """

  def __init__(self, num_features: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               head_dim_v: int | None = None, rope_theta: float = 10000.0, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(num_features, num_heads, num_kv_heads, head_dim, head_dim_v, rope_theta, 1,
                     dtype, param_dtype, rngs)

  def __call__(self, x, segment_ids=None):
    """`x [B, T, F]` -> `[B, T, F]`; `segment_ids int [B, T]`: packed rows, each document
    attended alone with positions from its start."""
    positions = None if segment_ids is None else segments.document_positions(segment_ids)
    q, keys, values = self._project(x, positions)
    attend = lambda q, k, v, segment_ids: ops.dense_causal_attention(q, k, v,
                                                                    segment_ids=segment_ids)
    return self._output(sharding.per_shard(attend, q, keys[0], values[0], segment_ids))

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> decode.DenseCache:
    """An empty `DenseCache` for this layer."""
    return decode.init_dense_cache(batch, max_len, self.num_kv_heads, self.head_dim,
                                   self.head_dim_v, dtype=dtype)

  def prefill(self, x, cache, lengths=None):
    """`x [B, T, F]` (positions 0..T-1) -> `(y [B, T, F], cache)`; `lengths int [B]`: prompts of
    different lengths, right-padded (as `decode.nsa_prefill`'s)."""
    q, keys, values = self._project(x)
    out = ops.dense_causal_attention(q, keys[0], values[0]) if x.shape[1] else (
        jnp.zeros(q.shape[:3] + (self.head_dim_v,), q.dtype))
    return (self._output(decode.padding_zeroed(out, lengths)),
            decode.dense_cache_write(cache, keys[0], values[0], lengths))

  def decode_step(self, x_t, cache):
    """`x_t [B, F]` at position `cache.length` (per row where it is `[B]`) ->
    `(y_t [B, F], cache)`."""
    q, keys, values = self._project(x_t[:, None], step_positions(cache.length))
    out, cache = decode.dense_decode_step(q[:, 0], keys[0][:, 0], values[0][:, 0], cache)
    return self._output(out[:, None])[:, 0], cache


_NSA_ONLY = ("config", "compression", "gating", "separate_kv", "implementation")
# NSA kinds and the branches they compute: the full layer and the ablations.
NSA_KINDS = {"nsa": BRANCHES, "nsa_no_selection": ("cmp", "swa"), "window": ("swa",)}
ATTENTION_KINDS = (*NSA_KINDS, "dense")


def make_attention(kind: str, **kwargs):
  """An attention layer of `kind` from one set of kwargs: `NativeSparseAttention` ("nsa"), its
  ablations "nsa_no_selection" (compressed + window branches) and "window" (the sliding window
  alone), or `DenseAttention` ("dense").

  The NSA-only arguments (`config`, `compression`, `gating`, `separate_kv`, `implementation`) are
  dropped for "dense", so a model config switches attention with one field.
  """
  if kind in NSA_KINDS:
    return NativeSparseAttention(branches=NSA_KINDS[kind], **kwargs)
  if kind == "dense":
    return DenseAttention(**{k: v for k, v in kwargs.items() if k not in _NSA_ONLY})
  raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {kind!r}")

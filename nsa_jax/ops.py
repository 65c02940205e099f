"""The public functional API (SPEC.md, "Public functional API"): validation, then dispatch.

Each function checks its inputs (raising `ValueError` that names the argument and the shapes seen),
resolves `scale` and `implementation`, and calls the chosen backend:

- `"reference"`: `nsa_jax.reference`, dense masks, O(T^2): the oracle.
- `"xla"`: `nsa_jax.xla`, pure JAX chunked over queries; any backend, the default on CPU.
- `"pallas_gpu"`: `nsa_jax.pallas_gpu`, Pallas (Triton) kernels plus cuDNN; the default on GPU.
- `"pallas_tpu"`: `nsa_jax.pallas_tpu`, Pallas Mosaic kernels plus splash attention; the default
  on TPU.
"""

from __future__ import annotations

import jax

from nsa_jax import pallas_gpu, pallas_tpu, reference, xla
from nsa_jax import validation as check
from nsa_jax.attention_math import combine_branches
from nsa_jax.config import NSAConfig, num_cmp_blocks

_BACKENDS = {"reference": reference, "xla": xla, "pallas_gpu": pallas_gpu,
             "pallas_tpu": pallas_tpu}
_DEFAULT_FOR_PLATFORM = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}
IMPLEMENTATIONS = tuple(_BACKENDS)


def default_implementation() -> str:
  """The implementation `implementation=None` resolves to on `jax.default_backend()`."""
  return _DEFAULT_FOR_PLATFORM.get(jax.default_backend(), "xla")


def _call(implementation, interpret, fn_name, *args, segment_ids=None, **kwargs):
  """Calls `fn_name` of the chosen backend, passing `interpret` to the Pallas ones and
  `segment_ids` when given."""
  backend = _backend(implementation, interpret)
  if backend in (pallas_gpu, pallas_tpu):
    kwargs["interpret"] = interpret
  if segment_ids is not None:
    kwargs["segment_ids"] = segment_ids
  return getattr(backend, fn_name)(*args, **kwargs)


def resolve_implementation(implementation, interpret) -> str:
  """The implementation's name, None resolved for `jax.default_backend()`; ValueError if unknown
  or if `interpret=True` goes with a non-Pallas implementation."""
  if implementation is None:
    implementation = default_implementation()
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, "
                     f"got {implementation!r}")
  if interpret and not implementation.startswith("pallas"):
    raise ValueError(f"interpret=True applies to the Pallas implementations only, "
                     f"got implementation={implementation!r}")
  return implementation


def _backend(implementation, interpret):
  """The module implementing `implementation`; None picks the best for `jax.default_backend()`."""
  return _BACKENDS[resolve_implementation(implementation, interpret)]


def _scale(scale, head_dim):
  return head_dim ** -0.5 if scale is None else scale


def compress_kv(k, v, *, block: int, stride: int, implementation=None, segment_ids=None):
  """Mean-pools overlapping blocks: compressed block `i` covers tokens `[i*stride, i*stride + block)`.

  Args:
    k: `[B, T, Hkv, Dk]`.
    v: `[B, T, Hkv, Dv]`.
    block: `l`, tokens per compressed block.
    stride: `d`, a divisor of `block`.
    implementation: as in `nsa_attention` (the Pallas ones use the XLA pooling).
    segment_ids: int `[B, T]` or None: packed rows (SPEC.md), each document pooled alone.

  Returns:
    `(k_cmp [B, Tc, Hkv, Dk], v_cmp [B, Tc, Hkv, Dv])` in the input dtypes, with
    `Tc = (T - block) // stride + 1` (0 when `T < block`). Packed: block `i` of the document
    starting at `s` in slot `s // stride + i`, slots without a block zero.

  Raises:
    ValueError: bad ranks, dtypes or shapes, or invalid `block` / `stride`.
  """
  check.check_rank("k", k, 4, "[B, T, Hkv, Dk]")
  check.check_rank("v", v, 4, "[B, T, Hkv, Dv]")
  check.check_float("k", k)
  check.check_float("v", v)
  if tuple(k.shape[:3]) != tuple(v.shape[:3]):
    raise ValueError(f"k and v must agree on [B, T, Hkv], got k {tuple(k.shape)}, "
                     f"v {tuple(v.shape)}")
  check.check_block_stride(block, stride)
  check.check_segment_ids(k, segment_ids, "k")
  backend = _backend(implementation, interpret=False)
  if segment_ids is not None:  # every implementation pools packed rows (the XLA pooling)
    return backend.compress_kv(k, v, block, stride, segment_ids)
  return backend.compress_kv(k, v, block, stride)


def compressed_attention(q, k_cmp, v_cmp, *, block: int, stride: int, scale=None,
                         implementation=None, interpret: bool = False, segment_ids=None):
  """Attention of every query over the compressed blocks that lie inside its prefix.

  Query `t` sees block `i` iff `i*stride + block - 1 <= t`; a query that sees none gets zeros.

  Args:
    q: `[B, T, Hq, Dk]`.
    k_cmp: `[B, Tc, Hkv, Dk]` with `Tc = (T - block) // stride + 1` (0 when `T < block`).
    v_cmp: `[B, Tc, Hkv, Dv]`.
    block, stride: `l` and `d` of the compression.
    scale: softmax scale, default `Dk ** -0.5`.
    implementation, interpret: as in `nsa_attention`.
    segment_ids: int `[B, T]` or None: packed rows, each document attended alone (SPEC.md);
      `k_cmp, v_cmp` then in `compress_kv`'s packed slots.

  Returns:
    `(out [B, T, Hq, Dv] in q.dtype, lse [B, T, Hq] float32)`; `lse = -inf` where nothing is visible.

  Raises:
    ValueError: bad ranks, dtypes, head counts, `Tc`, or `block` / `stride`.
  """
  check.check_rank("q", q, 4, "[B, T, Hq, Dk]")
  check.check_float("q", q)
  check.check_block_stride(block, stride)
  check.check_compressed(q, k_cmp, v_cmp, num_cmp_blocks(q.shape[1], block, stride))
  check.check_segment_ids(q, segment_ids)
  return _call(implementation, interpret, "compressed_attention", q, k_cmp, v_cmp,
               _scale(scale, q.shape[-1]), block=block, stride=stride, segment_ids=segment_ids)


def select_blocks(q, k_cmp, *, config: NSAConfig, scale=None, implementation=None,
                  interpret: bool = False, segment_ids=None):
  """The top-n selection blocks of every query, shared by the query heads of a KV group.

  Scores are the group-summed compressed-attention probabilities mapped onto selection blocks by
  overlap; the first `num_initial` and the `num_local` most recent blocks are always chosen
  (SPEC.md, section 2). Not differentiable (the indices are integers).

  Args:
    q: `[B, T, Hq, Dk]`.
    k_cmp: `[B, Tc, Hkv, Dk]`, compressed keys (e.g. from `compress_kv`).
    config: an `NSAConfig`.
    scale: softmax scale, default `Dk ** -0.5`.
    implementation, interpret: as in `nsa_attention`.
    segment_ids: int `[B, T]` or None: packed rows, each document attended alone (SPEC.md).

  Returns:
    `int32 [B, T, Hkv, num_selected]`: ascending block numbers, unused places -1 at the end;
    packed, numbers of blocks counted from the query's document start.

  Raises:
    ValueError: bad ranks, dtypes, head counts, `Tc`, or an invalid config.
  """
  config = _check_selection(q, k_cmp, k_cmp, config)
  check.check_segment_ids(q, segment_ids)
  return _call(implementation, interpret, "select_blocks", q, k_cmp, _scale(scale, q.shape[-1]),
               config=config, segment_ids=segment_ids)


def _check_selection(q, k_cmp, v_cmp, config) -> NSAConfig:
  """Checks the inputs of the ops that select blocks; returns the config."""
  config = check.check_config(config)
  check.check_rank("q", q, 4, "[B, T, Hq, Dk]")
  check.check_float("q", q)
  check.check_compressed(q, k_cmp, v_cmp, config.num_cmp_blocks(q.shape[1]))
  return config


def compressed_attention_and_selection(q, k_cmp, v_cmp, *, config: NSAConfig, scale=None,
                                       implementation=None, interpret: bool = False,
                                       segment_ids=None):
  """`compressed_attention`'s output and `select_blocks`' blocks, from one pass over `k_cmp`.

  Both come from the same softmax of `q` over the compressed keys, which the fused paths compute
  once (on GPU: cuDNN's compressed forward, or the fused Pallas kernels; on TPU the fused Pallas
  kernels), where calling the two ops computes it twice. For layers that run the selected and
  window branches on K/V sets of their own (`nsa_jax.nn`'s `separate_kv=True`); `nsa_attention`
  already shares the pass.

  Args:
    q: `[B, T, Hq, Dk]`.
    k_cmp: `[B, Tc, Hkv, Dk]`, `Tc = config.num_cmp_blocks(T)`.
    v_cmp: `[B, Tc, Hkv, Dv]`.
    config: an `NSAConfig` (its `cmp_block` / `cmp_stride` are the compression's `l` / `d`).
    scale: softmax scale, default `Dk ** -0.5`.
    implementation, interpret: as in `nsa_attention`.
    segment_ids: int `[B, T]` or None: packed rows, each document attended alone (SPEC.md).

  Returns:
    `(out [B, T, Hq, Dv] in q.dtype, block_indices int32 [B, T, Hkv, num_selected])`: what
    `compressed_attention(...)[0]` and `select_blocks(...)` return. `out` is differentiable; the
    indices are not.

  Raises:
    ValueError: bad ranks, dtypes, head counts, `Tc`, or an invalid config.
  """
  config = _check_selection(q, k_cmp, v_cmp, config)
  check.check_segment_ids(q, segment_ids)
  out, block_indices = _call(implementation, interpret, "compressed_attention_and_selection", q,
                             k_cmp, v_cmp, _scale(scale, q.shape[-1]), config=config,
                             segment_ids=segment_ids)
  return out.astype(q.dtype), block_indices


def selected_attention(q, k, v, block_indices, *, block: int, scale=None, implementation=None,
                       interpret: bool = False, segment_ids=None):
  """Attention of every query over the tokens `s <= t` of its KV group's selected blocks.

  Args:
    q: `[B, T, Hq, Dk]`.
    k: `[B, T, Hkv, Dk]`.
    v: `[B, T, Hkv, Dv]`.
    block_indices: int `[B, T, Hkv, n]`; block `j` covers tokens `[j*block, (j+1)*block)`. `-1`,
      indices past the sequence and repeats of an earlier slot select nothing.
    block: `l'`, tokens per selection block.
    scale: softmax scale, default `Dk ** -0.5`.
    implementation, interpret: as in `nsa_attention`.
    segment_ids: int `[B, T]` or None: packed rows, each document attended alone (SPEC.md);
      block `j` then covers `[s + j*block, s + (j+1)*block)` of the document starting at `s`.

  Returns:
    `[B, T, Hq, Dv]` in q.dtype; a query with no selected token gets zeros.

  Raises:
    ValueError: bad ranks, dtypes or shapes, or a non-positive `block`.
  """
  check.check_qkv(q, k, v)
  check.check_positive("block", block)
  check.check_block_indices(q, k, block_indices)
  check.check_segment_ids(q, segment_ids)
  return _call(implementation, interpret, "selected_attention", q, k, v, block_indices,
               _scale(scale, q.shape[-1]), block=block, segment_ids=segment_ids)


def sliding_window_attention(q, k, v, *, window: int, scale=None, implementation=None,
                             interpret: bool = False, segment_ids=None):
  """Causal attention over the last `window` tokens: query `t` sees `t - window < s <= t`.

  Args:
    q: `[B, T, Hq, Dk]`.
    k: `[B, T, Hkv, Dk]`.
    v: `[B, T, Hkv, Dv]`.
    window: `w`, the query itself included.
    scale: softmax scale, default `Dk ** -0.5`.
    implementation, interpret: as in `nsa_attention`.
    segment_ids: int `[B, T]` or None: packed rows, each document attended alone (SPEC.md).

  Returns:
    `[B, T, Hq, Dv]` in q.dtype.

  Raises:
    ValueError: bad ranks, dtypes or shapes, or a non-positive `window`.
  """
  check.check_qkv(q, k, v)
  check.check_positive("window", window)
  check.check_segment_ids(q, segment_ids)
  return _call(implementation, interpret, "sliding_window_attention", q, k, v,
               _scale(scale, q.shape[-1]), window=window, segment_ids=segment_ids)


def nsa_attention(q, k, v, *, config: NSAConfig, gates=None, k_cmp=None, v_cmp=None, scale=None,
                  implementation=None, interpret: bool = False, segment_ids=None):
  """Native Sparse Attention: compressed, selected and sliding-window attention mixed per head.

  `out[t] = g_cmp * Attn(q_t, K_cmp, V_cmp) + g_slc * Attn(q_t, K_slc, V_slc)
  + g_swa * Attn(q_t, K_win, V_win)`, causal, with the selected blocks shared by the query heads
  of each KV group (SPEC.md).

  Args:
    q: `[B, T, Hq, Dk]`, float32 / bfloat16 / float16 (accumulation is float32).
    k: `[B, T, Hkv, Dk]`, `Hq % Hkv == 0`.
    v: `[B, T, Hkv, Dv]`.
    config: an `NSAConfig`.
    gates: `[B, T, Hq, 3]` per-head branch weights (order cmp, slc, swa), e.g. sigmoid outputs;
      None sums the three branches.
    k_cmp, v_cmp: `[B, Tc, Hkv, Dk]` / `[B, Tc, Hkv, Dv]` precomputed compressed keys/values (e.g. a
      learned compression); both None mean-pools `k` and `v` with `compress_kv`.
    scale: softmax scale of all three branches and of the selection, default `Dk ** -0.5`.
    implementation: None (the fastest available for the backend), "reference", "xla",
      "pallas_gpu" or "pallas_tpu".
    interpret: run the Pallas kernels in interpret mode (CPU testing).
    segment_ids: int `[B, T]` or None: packed rows, each document attended alone (SPEC.md:
      positions, blocks and the window restart at each document; given `k_cmp, v_cmp` are in
      `compress_kv`'s packed slots). Implemented by "reference" and "xla" so far.

  Returns:
    `[B, T, Hq, Dv]` in q.dtype. Differentiable in q, k, v, gates, k_cmp and v_cmp.

  Raises:
    ValueError: bad ranks, dtypes, head counts, Dk mismatch, gates, compressed or segment_ids
      shapes, an invalid config, or an unknown implementation.
  """
  config = check.check_config(config)
  check.check_qkv(q, k, v)
  if gates is not None:
    check.check_gates(q, gates)
  _check_both_or_neither(k_cmp, v_cmp)
  check.check_segment_ids(q, segment_ids)
  backend = _backend(implementation, interpret)
  if k_cmp is None and segment_ids is not None:
    k_cmp, v_cmp = backend.compress_kv(k, v, config.cmp_block, config.cmp_stride, segment_ids)
  elif k_cmp is None:
    k_cmp, v_cmp = backend.compress_kv(k, v, config.cmp_block, config.cmp_stride)
  check.check_compressed(q, k_cmp, v_cmp, config.num_cmp_blocks(q.shape[1]))
  if k_cmp.shape[2] != k.shape[2] or v_cmp.shape[3] != v.shape[3]:
    raise ValueError(f"k_cmp / v_cmp must have the heads and head dims of k / v, got "
                     f"k {tuple(k.shape)}, v {tuple(v.shape)}, k_cmp {tuple(k_cmp.shape)}, "
                     f"v_cmp {tuple(v_cmp.shape)}")
  return _call(implementation, interpret, "nsa_attention", q, k, v, gates, k_cmp, v_cmp,
               _scale(scale, q.shape[-1]), config=config, segment_ids=segment_ids)


def nsa_attention_separate_kv(q, keys, values, *, config: NSAConfig, gates=None, k_cmp=None,
                              v_cmp=None, scale=None, implementation=None,
                              interpret: bool = False, segment_ids=None):
  """`nsa_attention` with a K/V set per branch (the paper's section 3.3.3, against shortcuts
  between the branches): set 0 is compressed (and so ranks the selection), set 1 gives the
  selected blocks' tokens, set 2 the window's.

  Args:
    q: `[B, T, Hq, Dk]`.
    keys: three `[B, T, Hkv, Dk]` (compressed, selected, window branch).
    values: three `[B, T, Hkv, Dv]`, likewise.
    config, gates, scale, implementation, interpret, segment_ids: as in `nsa_attention`.
    k_cmp, v_cmp: compressed blocks of `keys[0]` / `values[0]` (e.g. a learned compression); both
      None mean-pools them.

  Returns:
    `[B, T, Hq, Dv]` in q.dtype, differentiable in every input but the config.

  Raises:
    ValueError: not three keys / values, or any input `nsa_attention` would refuse.
  """
  config = check.check_config(config)
  if len(keys) != 3 or len(values) != 3:
    raise ValueError(f"keys and values must be three arrays each (compressed, selected, window "
                     f"branch), got {len(keys)} keys and {len(values)} values")
  for k, v in zip(keys, values):
    check.check_qkv(q, k, v)
  if gates is not None:
    check.check_gates(q, gates)
  _check_both_or_neither(k_cmp, v_cmp)
  if k_cmp is None:
    k_cmp, v_cmp = compress_kv(keys[0], values[0], block=config.cmp_block,
                               stride=config.cmp_stride, implementation=implementation,
                               segment_ids=segment_ids)
  common = dict(scale=scale, implementation=implementation, interpret=interpret,
                segment_ids=segment_ids)
  o_cmp, block_indices = compressed_attention_and_selection(q, k_cmp, v_cmp, config=config,
                                                            **common)
  o_slc = selected_attention(q, keys[1], values[1], block_indices, block=config.slc_block,
                             **common)
  o_swa = sliding_window_attention(q, keys[2], values[2], window=config.window, **common)
  return combine_branches(o_cmp, o_slc, o_swa, gates).astype(q.dtype)


def _check_both_or_neither(k_cmp, v_cmp) -> None:
  if (k_cmp is None) != (v_cmp is None):
    raise ValueError("k_cmp and v_cmp must be given together or both be None, got "
                     f"k_cmp {None if k_cmp is None else tuple(k_cmp.shape)}, "
                     f"v_cmp {None if v_cmp is None else tuple(v_cmp.shape)}")


def dense_causal_attention(q, k, v, *, scale=None, segment_ids=None):
  """Plain causal GQA attention, `[B, T, Hq, Dv]` in q.dtype: the baseline NSA is compared with.

  cuDNN flash attention on GPU where it applies (half precision, Dk == Dv); splash attention on
  TPU (Dk == Dv); elsewhere `jax.nn.dot_product_attention`'s XLA path (O(T^2) memory), or the
  masked reference math when Dk != Dv. Packed rows (`segment_ids int [B, T]`): each document
  attended alone, on TPU by splash's segment ids, elsewhere through the XLA window path with the
  window the whole row (O(T) memory per query chunk; cuDNN's public call has no segment mask).
  """
  check.check_qkv(q, k, v)
  check.check_segment_ids(q, segment_ids)
  scale = _scale(scale, q.shape[-1])
  if pallas_tpu.use_splash(q, v, scale):
    return pallas_tpu.dense_causal_attention(q, k, v, scale, segment_ids=segment_ids)
  if segment_ids is not None:
    return xla.sliding_window_attention(q, k, v, scale, window=q.shape[1],
                                        segment_ids=segment_ids)
  if pallas_gpu.use_cudnn(q, v):
    return pallas_gpu.cudnn_causal_attention(q, k, v, scale)
  if q.shape[-1] == v.shape[-1]:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True)
  # jax.nn.dot_product_attention needs Dk == Dv: fall back to the masked reference math.
  return reference.sliding_window_attention(q, k, v, scale, window=q.shape[1])

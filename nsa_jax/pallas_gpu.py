"""`implementation="pallas_gpu"`: NSA on NVIDIA GPUs.

- selected attention: the Pallas kernels of `pallas_kernels.gpu.selected_attention` (Mosaic
  GPU on Hopper, Triton elsewhere), forward and backward, packed rows included (document-local
  blocks as halves of aligned ones on Triton; where documents start on block boundaries, the
  unpacked kernels on whole blocks, `WHOLE_BLOCK_DOCUMENTS`; elsewhere on a row padded so that
  they do, `PADDED_ROWS`, where the padding fits);
- sliding window: cuDNN through `jax.nn.dot_product_attention(local_window_size=(w - 1, 0))`
  (3.2 ms forward, 14.5 ms forward+backward at T=64k on an H200: 346 / 265 TF/s, above every
  Pallas kernel here; no banded Pallas kernel was written to compete), falling back to the XLA
  path where cuDNN does not apply (float32, Dk != Dv, head sizes it does not take, interpret
  mode); packed rows, which cuDNN's public entry point cannot mask per document: that call for
  the positions whose window lies in their document, the selected-attention kernels over the
  first `w - 1` positions of each document (`_packed_window`);
- compressed attention where cuDNN takes the inputs and `d <= CUDNN_COMPRESSED_MAX_STRIDE`
  (`cudnn_compressed_applies`): cuDNN over folded queries (`nsa_jax.cudnn_compressed`: one
  causal attention of chunk queries with `d * G` heads a KV group), forward and backward; in
  `nsa_attention`, `select_blocks` and `compressed_attention_and_selection` its log-sum-exp
  feeds a Pallas pass for the selection scores
  (`compressed_attention.selection_from_lse`) and the top-n kernel of `pallas_kernels.gpu.top_n`.
  H200, T=64k: output 9.0 ms forward and 32.7 ms forward+backward against 16.8 / 51.2 for the
  Pallas kernels;
- compressed attention elsewhere (float32, Dk != Dv, larger strides, interpret mode, packed
  rows, which the folded cuDNN call cannot mask per document): the Pallas kernels of
  `pallas_kernels.gpu.compressed_attention`, forward and backward, with the selection scores
  fused into the forward; for packed rows a score pass of its own from the log-sum-exp
  (`packed_selection_from_lse`: each row's document blocks are the aligned ones shifted by its
  start) and the top-n kernel on document-local blocks;
- mean-pooling compression: the XLA path (one fused elementwise pass);
- decoding: four kernels a step (`decode_step`: the cache append with mean pooling + compressed
  partials, selection scores, top-n + selected + window partials, combine;
  `pallas_kernels.gpu.decode`); with a learned compression the step appends in XLA and attends
  with the same kernels (`decode_attention`); where the attention kernels do not take the sizes,
  the append alone is one kernel (`decode_append`, `pallas_kernels.gpu.cache_append`).

Same signatures as `nsa_jax.xla` plus `interpret`; arguments are validated by `nsa_jax.ops`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from nsa_jax import cudnn_compressed
from nsa_jax import segments
from nsa_jax import xla
from nsa_jax.attention_math import combine_branches
from nsa_jax.config import NSAConfig
from nsa_jax.validation import static_scale
from pallas_kernels.gpu import cache_append
from pallas_kernels.gpu import compressed_attention as compressed_kernel
from pallas_kernels.gpu import decode as decode_kernel
from pallas_kernels.gpu import selected_attention as selected_kernel

# Queries per XLA chunk on the GPU: memory is plentiful and each sequential chunk costs a launch.
GPU_QUERY_CHUNK = 2048
# Largest compression stride d for which the compressed branch goes through cuDNN over
# folded queries (d * G heads a KV group over Tc chunks). H200, NSA ms fwd / fwd+bwd, fused Pallas
# -> cuDNN: d = 16 (paper config) 64k 39.97 / 112.98 -> 37.99 / 101.09; d = 64 (fla-core's
# l = d = l' = 64: 1024 heads a group over T / 64 chunks, cuDNN's backward sums dK / dV over
# them) 64k 24.39 / 64.19 -> 24.37 / 64.52, 8k 2.35 / 6.41 -> 2.42 / 7.31.
CUDNN_COMPRESSED_MAX_STRIDE = 16

compress_kv = xla.compress_kv


def _static_scale(scale):
  return static_scale(scale, "pallas_gpu")


def cudnn_takes_head_dim(head_dim: int, compute_capability: str) -> bool:
  """cuDNN's flash attention's head sizes: multiples of 8 up to 128, or 256 from Hopper (9.0)
  on (what `jax.nn.dot_product_attention` checks; it raises for the rest)."""
  major = int(compute_capability.split(".")[0])
  return head_dim % 8 == 0 and head_dim <= (256 if major >= 9 else 128)


def _cuda_compute_capability():
  """`"major.minor"` of the first GPU, None where it is not a CUDA device (e.g. ROCm)."""
  capability = str(getattr(jax.devices()[0], "compute_capability", ""))
  return capability if capability.replace(".", "").isdigit() else None


def use_cudnn(q, v, interpret=False):
  """Whether cuDNN's flash attention takes these inputs (an NVIDIA GPU, half precision,
  Dk == Dv, a head size it supports on this GPU)."""
  if interpret or jax.default_backend() != "gpu" or q.shape[-1] != v.shape[-1]:
    return False
  capability = _cuda_compute_capability()
  return (q.dtype in (jnp.bfloat16, jnp.float16) and capability is not None
          and cudnn_takes_head_dim(q.shape[-1], capability))


def cudnn_causal_attention(q, k, v, scale, window=None):
  """Causal (optionally banded: the last `window` tokens) GQA attention through cuDNN.

  cuDNN's masked training kernels need an even length: a token appended at the end is after
  every real query (causal), so it changes nothing but its own row, which is cut off.
  """
  t = q.shape[1]
  pad = [(0, 0), (0, t % 2), (0, 0), (0, 0)]
  local = None if window is None else (window - 1, 0)
  out = jax.nn.dot_product_attention(jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad),
                                     scale=scale, is_causal=True, local_window_size=local,
                                     implementation="cudnn")
  return out[:, :t]


def cudnn_compressed_applies(q, v_cmp, stride, interpret=False) -> bool:
  """Whether the compressed branch goes through cuDNN over folded queries (`cudnn_compressed`):
  cuDNN takes the inputs and `d <= CUDNN_COMPRESSED_MAX_STRIDE`."""
  return (use_cudnn(q, v_cmp, interpret) and cudnn_compressed.available()
          and stride <= CUDNN_COMPRESSED_MAX_STRIDE)


def compressed_attention(q, k_cmp, v_cmp, scale, *, block, stride, interpret=False,
                         segment_ids=None):
  scale = _static_scale(scale)
  if segment_ids is not None:  # the folded cuDNN call has no per-document mask: the Pallas one
    return compressed_kernel.compressed_attention(
        q, k_cmp, v_cmp, block=block, stride=stride, scale=scale, interpret=interpret,
        document_starts=segments.document_starts(segment_ids))
  if cudnn_compressed_applies(q, v_cmp, stride, interpret):
    return cudnn_compressed.compressed_attention(q, k_cmp, v_cmp, scale, block=block,
                                                 stride=stride)
  return compressed_kernel.compressed_attention(q, k_cmp, v_cmp, block=block, stride=stride,
                                                scale=scale, interpret=interpret)


def compressed_attention_and_selection(q, k_cmp, v_cmp, scale, config, interpret=False,
                                       ascending=True, segment_ids=None):
  """`(o_cmp, block_indices [B, T, Hkv, n])`: cuDNN's output and log-sum-exp, then the score
  and top-n kernels, where cuDNN takes the inputs; else the fused Pallas kernels; the XLA
  selection where the config does not tile (`slc_block` must divide
  `compressed_kernel.KEYS * cmp_stride`). `ascending=False`: the indices in pick order
  (distinct, causal, -1 last), all the selected-attention kernels need. Packed rows:
  `_packed_compressed_and_selection`."""
  scale = _static_scale(scale)
  if segment_ids is not None:
    return _packed_compressed_and_selection(q, k_cmp, v_cmp, scale, config, interpret,
                                            ascending, segment_ids)
  if (cudnn_compressed_applies(q, v_cmp, config.cmp_stride, interpret)
      and compressed_kernel.fusable(config.cmp_stride, config.slc_block)):
    if (q.shape[1] >= config.cmp_block
        and compressed_kernel.folded_selection_applies(q, k_cmp.shape[2], config.cmp_stride)):
      return _folded_compressed_and_selection(q, k_cmp, v_cmp, scale, config, interpret,
                                              ascending)
    o_cmp, lse = cudnn_compressed.compressed_attention(q, k_cmp, v_cmp, scale,
                                                       block=config.cmp_block,
                                                       stride=config.cmp_stride)
    return o_cmp, compressed_kernel.selection_from_lse(
        q, k_cmp, lse, block=config.cmp_block, stride=config.cmp_stride,
        slc_block=config.slc_block, num_selected=config.num_selected,
        num_initial=config.num_initial, num_local=config.num_local, scale=scale,
        ascending=ascending, interpret=interpret)
  if not compressed_kernel.fusable(config.cmp_stride, config.slc_block):
    o_cmp, _ = compressed_attention(q, k_cmp, v_cmp, scale, block=config.cmp_block,
                                    stride=config.cmp_stride, interpret=interpret)
    return o_cmp, xla.select_blocks(q, k_cmp, scale, config=config, query_chunk=GPU_QUERY_CHUNK)
  o_cmp, _, block_indices = compressed_kernel.compressed_attention_and_selection(
      q, k_cmp, v_cmp, block=config.cmp_block, stride=config.cmp_stride,
      slc_block=config.slc_block, num_selected=config.num_selected,
      num_initial=config.num_initial, num_local=config.num_local, scale=scale,
      ascending=ascending, interpret=interpret)
  return o_cmp, block_indices


def _folded_compressed_and_selection(q, k_cmp, v_cmp, scale, config, interpret, ascending,
                                     use_cudnn=True):
  """cuDNN's folded compressed branch, then the score pass over its folded queries and
  log-sum-exp as they are (`compressed_kernel.selection_from_folded`) and the top-n kernel.
  (`use_cudnn=False`: the folded attention in XLA, for tests on CPU.)"""
  o_cmp, qf, lse = cudnn_compressed.compressed_attention_folded(
      q, k_cmp, v_cmp, scale, block=config.cmp_block, stride=config.cmp_stride,
      use_cudnn=use_cudnn)
  return o_cmp, compressed_kernel.selection_from_folded(
      qf, k_cmp, lse, seq_len=q.shape[1], block=config.cmp_block, stride=config.cmp_stride,
      slc_block=config.slc_block, num_selected=config.num_selected,
      num_initial=config.num_initial, num_local=config.num_local, scale=scale,
      ascending=ascending, interpret=interpret)


def _packed_compressed_and_selection(q, k_cmp, v_cmp, scale, config, interpret, ascending,
                                     segment_ids):
  """Packed rows: the Pallas compressed kernels (output and log-sum-exp per document), then the
  packed score pass and the top-n kernel on document-local blocks
  (`compressed_kernel.packed_selection_from_lse`); the XLA selection where that does not take
  the config (`packed_selection_applies`: also `l <= l' + d`)."""
  starts = segments.document_starts(segment_ids)
  o_cmp, lse = compressed_kernel.compressed_attention(
      q, k_cmp, v_cmp, block=config.cmp_block, stride=config.cmp_stride, scale=scale,
      interpret=interpret, document_starts=starts)
  if not compressed_kernel.packed_selection_applies(config.cmp_block, config.cmp_stride,
                                                    config.slc_block):
    return o_cmp, xla.select_blocks(q, k_cmp, scale, config=config,
                                    query_chunk=GPU_QUERY_CHUNK, segment_ids=segment_ids)
  return o_cmp, compressed_kernel.packed_selection_from_lse(
      q, k_cmp, lse, starts, block=config.cmp_block, stride=config.cmp_stride,
      slc_block=config.slc_block, num_selected=config.num_selected,
      num_initial=config.num_initial, num_local=config.num_local, scale=scale,
      ascending=ascending, interpret=interpret)


def select_blocks(q, k_cmp, scale, *, config: NSAConfig, interpret=False, segment_ids=None):
  scale = _static_scale(scale)
  return compressed_attention_and_selection(q, k_cmp, k_cmp, scale, config, interpret,
                                            segment_ids=segment_ids)[1]


def selected_attention(q, k, v, block_indices, scale, *, block, interpret=False,
                       segment_ids=None):
  starts = segments.document_starts_or_none(segment_ids)
  return selected_kernel.selected_attention(q, k, v, block_indices, block=block,
                                            scale=_static_scale(scale), interpret=interpret,
                                            document_starts=starts)


# Packed rows' window through the selected-attention kernels: blocks of this many tokens.
PACKED_WINDOW_BLOCK = 64


def sliding_window_attention(q, k, v, scale, *, window, interpret=False, segment_ids=None):
  if segment_ids is not None:
    return _packed_window(q, k, v, scale, window, segment_ids, interpret)
  if use_cudnn(q, v, interpret):
    return cudnn_causal_attention(q, k, v, scale, window)
  return xla.sliding_window_attention(q, k, v, scale, window=window, query_chunk=GPU_QUERY_CHUNK)


def _packed_window(q, k, v, scale, window, segment_ids, interpret):
  """The window of packed rows: keys `max(s, t - w + 1) .. t` (s: t's document start).

  A position at least `w - 1` into its document sees the unpacked window (its keys `t - w + 1 ..
  t` all lie in the document): those take the unpacked route's output (cuDNN's sliding window
  over the whole row, which `jax.nn.dot_product_attention` cannot mask per document). The first
  `w - 1` positions of each document see `s .. t`: the selected-attention kernels over that
  span's aligned blocks of 64 tokens (`span_attention`, the first block masked below `s`), every
  other position given an empty span, so no block is walked for it."""
  block = PACKED_WINDOW_BLOCK
  positions = jnp.arange(q.shape[1], dtype=jnp.int32)
  starts = segments.document_starts(segment_ids)
  early = positions - starts < window - 1
  o_early = selected_kernel.span_attention(q, k, v, jnp.where(early, starts, positions + 1),
                                           width=-(-window // block) + 1, block=block,
                                           scale=_static_scale(scale), interpret=interpret)
  o_late = sliding_window_attention(q, k, v, scale, window=window, interpret=interpret)
  return jnp.where(early[:, :, None, None], o_early, o_late)


def nsa_attention(q, k, v, gates, k_cmp, v_cmp, scale, *, config: NSAConfig, interpret=False,
                  segment_ids=None):
  scale = _static_scale(scale)
  return _nsa_jit(q, k, v, gates, k_cmp, v_cmp, segment_ids, config=config, interpret=interpret,
                  scale=scale)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "scale"))
def _nsa_jit(q, k, v, gates, k_cmp, v_cmp, segment_ids, *, config, interpret, scale):
  # The selected kernels need the indices distinct, causal and -1 last, not ascending: the top-n
  # kernel's pick order is kept (no sort), and the selected kernels skip their clean-up.
  o_cmp, block_indices = compressed_attention_and_selection(
      q, k_cmp, v_cmp, scale, config, interpret, ascending=False, segment_ids=segment_ids)
  o_slc = selected_kernel.selected_attention(
      q, k, v, block_indices, block=config.slc_block, scale=scale, interpret=interpret,
      indices_sorted=True, document_starts=segments.document_starts_or_none(segment_ids))
  o_swa = sliding_window_attention(q, k, v, scale, window=config.window, interpret=interpret,
                                   segment_ids=segment_ids)
  return combine_branches(o_cmp, o_slc, o_swa, gates).astype(q.dtype)


def _kernels_take(q_t, cache, config: NSAConfig) -> bool:
  return decode_kernel.supported(q_t.shape[-1], cache.v.shape[-1], config.slc_block,
                                 cache.k.shape[2], cache.k_cmp.shape[2], config.cmp_block,
                                 config.cmp_stride)


def decode_attention(q_t, cache, position, gates, scale, *, config: NSAConfig, interpret=False):
  """Row `position` of NSA over a `DecodeCache` holding that token: `[B, Hq, Dv]` in q_t.dtype.

  The XLA decode path where the kernels do not take the sizes (`decode_kernel.supported`)."""
  if not _kernels_take(q_t, cache, config):
    return xla.decode_attention(q_t, cache, position, gates, scale, config=config)
  return _decode_jit(q_t, cache, position, gates, None, config=config,
                     scale=_static_scale(scale), interpret=interpret)


def step_supported(q_t, cache, config: NSAConfig) -> bool:
  """Whether `decode_step` takes this query, cache and config (with mean pooling)."""
  return append_supported(cache, config) and _kernels_take(q_t, cache, config)


def decode_step(q_t, k_t, v_t, cache, gates, scale, *, config: NSAConfig, interpret=False):
  """`nsa_jax.decode.nsa_decode_step` with mean pooling, in the decode kernels: the compressed
  kernel appends the token (what `decode_append` does in a launch of its own), then attends.
  Returns `(out [B, Hq, Dv] in q_t.dtype, cache)`; sizes as `step_supported` takes."""
  return _decode_jit(q_t, cache, cache.length, gates, (k_t, v_t), config=config,
                     scale=_static_scale(scale), interpret=interpret)


def kernels_take_separate_kv(q_t, caches, config: NSAConfig) -> bool:
  """Whether `decode_attention_separate_kv` takes these caches (`init_separate_kv_cache`'s)."""
  cmp, *dense = caches
  return _kernels_take(q_t, cmp, config) and all(
      c.k.shape == cmp.k.shape and c.v.shape == cmp.v.shape for c in dense)


def step_separate_kv_supported(q_t, caches, config: NSAConfig) -> bool:
  """Whether `decode_step_separate_kv` takes these caches (with mean pooling)."""
  return append_supported(caches[0], config) and kernels_take_separate_kv(q_t, caches, config)


def decode_attention_separate_kv(q_t, caches, position, gates, scale, *, config: NSAConfig,
                                 interpret=False):
  """`decode_attention` with a K/V set per branch, the caches holding the token already (a
  learned compression appends in XLA first): `[B, Hq, Dv]`; sizes as
  `kernels_take_separate_kv` takes."""
  cmp, slc, swa = caches
  return _decode_jit(q_t, cmp, position, gates, None, more=((slc, None, None), (swa, None, None)),
                     config=config, scale=_static_scale(scale), interpret=interpret)


def decode_step_separate_kv(q_t, k_ts, v_ts, caches, gates, scale, *, config: NSAConfig,
                            interpret=False):
  """`decode_step` with a K/V set per branch (`nsa_jax.decode.nsa_decode_step_separate_kv`):
  the compressed kernel appends the token to the three sets (and makes set 0's compressed
  blocks), the sparse kernel's selected programs read set 1 and its window programs set 2, the
  combine counts the three caches' lengths. Returns `(out, caches)`."""
  cmp, slc, swa = caches
  out, cmp, more = _decode_jit(q_t, cmp, cmp.length, gates, (k_ts[0], v_ts[0]),
                               more=((slc, k_ts[1], v_ts[1]), (swa, k_ts[2], v_ts[2])),
                               config=config, scale=_static_scale(scale), interpret=interpret)
  return out, (cmp, *more)


@functools.partial(jax.jit, static_argnames=("config", "scale", "interpret"))
def _decode_jit(q_t, cache, position, gates, token, more=None, *, config, scale, interpret):
  """The four decode kernels (`pallas_kernels.gpu.decode`), with only reshapes between them
  (and, with gates, the padding of the gates to `[B, Hkv, Gp, 4]`). With `token = (k_t, v_t)`
  the compressed kernel appends it first, and the updated cache is returned with the output.
  `more = ((slc cache, k_t, v_t), (swa cache, k_t, v_t))`: a K/V set per branch, dense caches
  that get the token too (with `token`; else they hold it already), the sparse kernel reading
  the selected blocks from the first and the window from the second; with `token` returned
  updated after the cache."""
  b, hq, _ = q_t.shape
  hkv, size = cache.k.shape[1], cache.k.shape[2]
  group = hq // hkv
  num_cmp_cache = cache.k_cmp.shape[2]
  num_slc = size // config.slc_block
  split, num_cmp_partials = decode_kernel.compressed_layout(b, hkv, num_cmp_cache)
  q_rows = decode_kernel.group_rows(q_t, hkv)  # [B, Hkv, Gp, Dk]
  append = {} if token is None else dict(token=(cache.k, cache.v) + tuple(token),
                                         num_cmp=config.num_cmp_blocks(cache.max_len))
  if more is not None and token is not None:
    append["more_sets"] = tuple((c.k, c.v, k_t, v_t) for c, k_t, v_t in more)
  score_parts, *cmp_partials = decode_kernel.compressed_partials(
      q_rows, cache.k_cmp, cache.v_cmp, position, cmp_block=config.cmp_block,
      cmp_stride=config.cmp_stride, slc_block=config.slc_block, num_slc=num_slc, scale=scale,
      split=split, interpret=interpret, **append)
  if token is not None:
    cmp_partials, (k, v, k_cmp, v_cmp, *more_kv) = cmp_partials[:3], cmp_partials[3:]
    cache = dataclasses.replace(cache, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp)
  if more is not None:  # the dense caches (with the token: their lengths counted below)
    more = [c if token is None else dataclasses.replace(c, k=more_kv[2 * n], v=more_kv[2 * n + 1])
            for n, (c, _, _) in enumerate(more)]
  slc_scores = decode_kernel.selection_scores(
      score_parts, cmp_partials[1], cmp_partials[2], position, group=group,
      num_partials=num_cmp_partials, cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
      slc_block=config.slc_block, num_slc=num_slc, interpret=interpret)
  # The sparse kernel's programs on selected blocks pick them from the scores themselves.
  selected_kv, window_kv = (((cache.k, cache.v), None) if more is None else
                            ((more[0].k, more[0].v), (more[1].k, more[1].v)))
  sparse = decode_kernel.sparse_partials(
      q_rows, *selected_kv, slc_scores, position, block=config.slc_block,
      window=config.window, num_selected=config.num_selected, scale=scale,
      top_n=decode_kernel.TopN(num_slc, config.num_initial, config.num_local),
      window_kv=window_kv, interpret=interpret)
  if gates is not None:  # [B, Hq, 3] -> [B, Hkv, Gp, 4]: group rows, a power-of-two last axis
    gates = jnp.pad(decode_kernel.group_rows(gates.astype(jnp.float32), hkv),
                    [(0, 0)] * 3 + [(0, 1)])
  num_selected_partials, num_sparse_partials = decode_kernel.sparse_programs(
      b, hkv, config.num_selected, config.window, config.slc_block)
  # With the token, the combine also counts it (cache.length is the position: the kernels before
  # have read it).
  lengths = None if token is None else (
      cache.length if more is None else (cache.length,) + tuple(c.length for c in more))
  out = decode_kernel.combine(
      cmp_partials, sparse, gates, num_cmp_partials=num_cmp_partials,
      num_selected=num_selected_partials, num_sparse=num_sparse_partials, out_dtype=q_t.dtype,
      length=lengths, interpret=interpret)
  if token is None:
    return out[:, :, :group].reshape(b, hq, -1)
  out, counted = out
  out = out[:, :, :group].reshape(b, hq, -1)
  if more is None:
    return out, dataclasses.replace(cache, length=counted)
  more = tuple(dataclasses.replace(c, length=n) for c, n in zip(more, counted[1:]))
  return out, dataclasses.replace(cache, length=counted[0]), more


def append_supported(cache, config: NSAConfig) -> bool:
  """Whether `decode_append` takes this cache and config (else the XLA append)."""
  return cache_append.supported(cache.k.shape[3], cache.v.shape[3], config.cmp_stride,
                                cache.k_cmp.shape[2])


def decode_append(cache, k_t, v_t, *, config: NSAConfig, interpret=False):
  """`nsa_jax.decode._append` with mean pooling, in one kernel: the cache holding token
  `cache.length` (`k_t [B, Hkv, Dk]`, `v_t [B, Hkv, Dv]`)."""
  k, v, k_cmp, v_cmp = cache_append.append_token(
      cache.k, cache.v, cache.k_cmp, cache.v_cmp, k_t, v_t, cache.length,
      cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
      num_cmp=config.num_cmp_blocks(cache.max_len), interpret=interpret)
  return dataclasses.replace(cache, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, length=cache.length + 1)

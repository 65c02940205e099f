"""`implementation="pallas_tpu"`: NSA on TPUs (Mosaic), the default on a TPU backend.

- selected attention: `pallas_kernels.tpu.selected_attention` (block indices by scalar prefetch;
  packed rows on whole blocks where documents start on them, else on a row padded so that they
  do, else as halves of aligned blocks: `pallas_kernels.packed_rows`);
- compressed attention: `pallas_kernels.tpu.compressed_attention`, fused with the selection
  scores (pass 1: log-sum-exp; pass 2: output and scores from the same probabilities); the top-n
  of the scores is `lax.top_k` in XLA; packed rows too (scores on document blocks);
- sliding window: splash attention's `LocalMask` (`pallas_kernels.tpu.sliding_window`), packed
  rows through splash's segment ids (one per document);
- mean-pooling compression: the XLA path;
- dense causal attention (`ops.dense_causal_attention`, the dense layers): splash attention's
  `CausalMask`, packed rows through its segment ids;
- decoding (`decode_attention`): the split decode kernels of `pallas_kernels.tpu.decode`, with the
  top-n in XLA between them.
Configs the kernels cannot tile (`slc_block % 8 != 0`, `slc_block` not dividing
`128 * cmp_stride`, or `Dk != Dv` for splash) fall back to the XLA path for that branch.

Same signatures as `nsa_jax.xla` plus `interpret` (the TPU interpreter on CPU, races detected);
arguments are validated by `nsa_jax.ops`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax import segments
from nsa_jax import xla
from nsa_jax.attention_math import combine_branches
from nsa_jax.block_selection import top_n_blocks
from nsa_jax.config import NSAConfig
from nsa_jax.split_decode import split_decode_attention
from nsa_jax.validation import static_scale
from pallas_kernels.block_maps import document_block_columns
from pallas_kernels.tpu import compressed_attention as compressed_kernel
from pallas_kernels.tpu import decode as decode_kernel
from pallas_kernels.tpu import selected_attention as selected_kernel
from pallas_kernels.tpu import sliding_window as window_kernel

compress_kv = xla.compress_kv


def _static_scale(scale):
  return static_scale(scale, "pallas_tpu")


def compressed_attention(q, k_cmp, v_cmp, scale, *, block, stride, interpret=False,
                         segment_ids=None):
  return compressed_kernel.compressed_attention(
      q, k_cmp, v_cmp, block=block, stride=stride, scale=_static_scale(scale),
      interpret=interpret, document_starts=segments.document_starts_or_none(segment_ids))


def compressed_attention_and_selection(q, k_cmp, v_cmp, scale, config, interpret=False,
                                       segment_ids=None):
  """`(o_cmp, block_indices [B, T, Hkv, n])`: the fused compressed kernels and an XLA top-n (the
  XLA selection where the config does not tile). Packed rows: the fused pass scores document
  blocks (query `t`'s block `j` in column `j + s // l' + 1` for its document start `s`),
  gathered into document-local rows before the top-n (`block_maps.document_block_columns`)."""
  scale = _static_scale(scale)
  starts = segments.document_starts_or_none(segment_ids)
  if not compressed_kernel.fusable(config.cmp_stride, config.slc_block):
    o_cmp, _ = compressed_attention(q, k_cmp, v_cmp, scale, block=config.cmp_block,
                                    stride=config.cmp_stride, interpret=interpret,
                                    segment_ids=segment_ids)
    return o_cmp, xla.select_blocks(q, k_cmp, scale, config=config, segment_ids=segment_ids)
  o_cmp, _, scores = compressed_kernel.compressed_attention_and_scores(
      q, k_cmp, v_cmp, block=config.cmp_block, stride=config.cmp_stride,
      slc_block=config.slc_block, scale=scale, interpret=interpret,
      document_starts=starts)  # scores [B, Hkv, T, Ts (+ 1 packed)]
  query_pos = jnp.arange(q.shape[1])
  if starts is not None:
    scores = document_block_columns(scores, starts, config.slc_block, shift=1,
                                    width=config.num_slc_blocks(q.shape[1]))
    query_pos = query_pos - starts[:, None, :]  # [B, 1, T], document-local
  block_indices = top_n_blocks(scores, query_pos, config)
  return o_cmp, block_indices.transpose(0, 2, 1, 3)


def select_blocks(q, k_cmp, scale, *, config: NSAConfig, interpret=False, segment_ids=None):
  scale = _static_scale(scale)
  return compressed_attention_and_selection(q, k_cmp, k_cmp, scale, config, interpret,
                                            segment_ids)[1]


def selected_attention(q, k, v, block_indices, scale, *, block, interpret=False,
                       indices_sorted=False, segment_ids=None):
  if block % 8:
    return xla.selected_attention(q, k, v, block_indices, scale, block=block,
                                  segment_ids=segment_ids)
  return selected_kernel.selected_attention(q, k, v, block_indices, block=block,
                                            scale=_static_scale(scale), interpret=interpret,
                                            indices_sorted=indices_sorted,
                                            document_starts=segments.document_starts_or_none(
                                                segment_ids))


def use_splash(q, v, scale) -> bool:
  """Whether dense causal attention runs on splash attention: a TPU backend, Dk == Dv and a
  Python-number scale (splash kernels are built per scale)."""
  return (jax.default_backend() == "tpu" and q.shape[-1] == v.shape[-1]
          and isinstance(scale, (int, float)))


def dense_causal_attention(q, k, v, scale, *, interpret=False, segment_ids=None):
  """Causal GQA attention through splash attention's `CausalMask` (O(T) memory, all-masked
  tiles skipped), in tiles of up to 512 tokens; packed rows through splash's segment ids (one
  per document): `ops.dense_causal_attention` on a TPU, the dense layers' attention."""
  document_ids = None if segment_ids is None else segments.document_index(segment_ids)
  block = min(512, -(-q.shape[1] // 128) * 128)
  return window_kernel.causal_attention(q, k, v, scale=_static_scale(scale), block=block,
                                        interpret=interpret, document_ids=document_ids)


def sliding_window_attention(q, k, v, scale, *, window, interpret=False, segment_ids=None):
  if q.shape[-1] != v.shape[-1]:
    return xla.sliding_window_attention(q, k, v, scale, window=window, segment_ids=segment_ids)
  document_ids = None if segment_ids is None else segments.document_index(segment_ids)
  return window_kernel.sliding_window_attention(q, k, v, window=window,
                                                scale=_static_scale(scale), interpret=interpret,
                                                document_ids=document_ids)


def nsa_attention(q, k, v, gates, k_cmp, v_cmp, scale, *, config: NSAConfig, interpret=False,
                  segment_ids=None):
  return _nsa(q, k, v, gates, k_cmp, v_cmp, segment_ids, config=config, interpret=interpret,
              scale=_static_scale(scale))


@functools.partial(jax.jit, static_argnames=("config", "interpret", "scale"))
def _nsa(q, k, v, gates, k_cmp, v_cmp, segment_ids, *, config, interpret, scale):
  o_cmp, block_indices = compressed_attention_and_selection(q, k_cmp, v_cmp, scale, config,
                                                            interpret, segment_ids)
  # The selection's indices are already distinct, ascending and causal: no second sort.
  common = dict(interpret=interpret, segment_ids=segment_ids)
  o_slc = selected_attention(q, k, v, block_indices, scale, block=config.slc_block,
                             indices_sorted=True, **common)
  o_swa = sliding_window_attention(q, k, v, scale, window=config.window, **common)
  return combine_branches(o_cmp, o_slc, o_swa, gates).astype(q.dtype)


def decode_attention(q_t, cache, position, gates, scale, *, config: NSAConfig, interpret=False):
  """Row `position` of NSA over a `DecodeCache` holding that token: `[B, Hq, Dv]` in q_t.dtype.

  The XLA decode path where the kernels do not take the sizes (`decode_kernel.supported`)."""
  if not decode_kernel.supported(config.slc_block, cache.k.shape[2], cache.k_cmp.shape[2],
                                 config.cmp_block, config.cmp_stride):
    return xla.decode_attention(q_t, cache, position, gates, scale, config=config)
  return _decode(q_t, cache, position, gates, config=config, scale=_static_scale(scale),
                 interpret=interpret)


@functools.partial(jax.jit, static_argnames=("config", "scale", "interpret"))
def _decode(q_t, cache, position, gates, *, config, scale, interpret):
  return split_decode_attention(q_t, cache, position, gates, config=config, scale=scale,
                                kernels=decode_kernel, top_n=top_n_blocks, interpret=interpret)

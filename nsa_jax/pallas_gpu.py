"""`implementation="pallas_gpu"`: NSA on NVIDIA GPUs.

- selected attention: the Pallas (Triton) kernels of `pallas_kernels.gpu.selected_attention`,
  forward and backward;
- sliding window: cuDNN through `jax.nn.dot_product_attention(local_window_size=(w - 1, 0))`
  (3.2 ms forward, 14.5 ms forward+backward at T=64k on an H200: 346 / 265 TF/s, above every
  Pallas kernel here; no banded Pallas kernel was written to compete), falling back to the XLA
  path where cuDNN does not apply (float32, Dk != Dv, interpret mode);
- compressed attention: the Pallas kernels of `pallas_kernels.gpu.compressed_attention`, forward
  and backward, with the selection scores fused into the forward, and their top-n in the Pallas
  kernel of `pallas_kernels.gpu.top_n`;
- mean-pooling compression: the XLA path (one fused elementwise pass).

Same signatures as `nsa_jax.xla` plus `interpret`; arguments are validated by `nsa_jax.ops`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax import xla
from nsa_jax.attention_math import combine_branches
from nsa_jax.config import NSAConfig
from nsa_jax.validation import static_scale
from pallas_kernels.gpu import compressed_attention as compressed_kernel
from pallas_kernels.gpu import selected_attention as selected_kernel

# Queries per XLA chunk on the GPU: memory is plentiful and each sequential chunk costs a launch.
GPU_QUERY_CHUNK = 2048

compress_kv = xla.compress_kv


def _static_scale(scale):
  return static_scale(scale, "pallas_gpu")


def _use_cudnn(q, v, interpret):
  return (not interpret and jax.default_backend() == "gpu" and q.shape[-1] == v.shape[-1]
          and q.dtype in (jnp.bfloat16, jnp.float16))


def compressed_attention(q, k_cmp, v_cmp, scale, *, block, stride, interpret=False):
  out, lse = compressed_kernel.compressed_attention(q, k_cmp, v_cmp, block=block, stride=stride,
                                                    scale=_static_scale(scale),
                                                    interpret=interpret)
  return out, lse


def compressed_attention_and_selection(q, k_cmp, v_cmp, scale, config, interpret):
  """`(o_cmp, block_indices [B, T, Hkv, n])` from the fused kernels; the XLA selection where the
  config does not tile (`slc_block` must divide `compressed_kernel.KEYS * cmp_stride`)."""
  if not compressed_kernel.fusable(config.cmp_stride, config.slc_block):
    o_cmp, _ = compressed_attention(q, k_cmp, v_cmp, scale, block=config.cmp_block,
                                    stride=config.cmp_stride, interpret=interpret)
    return o_cmp, xla.select_blocks(q, k_cmp, scale, config=config, query_chunk=GPU_QUERY_CHUNK)
  o_cmp, _, block_indices = compressed_kernel.compressed_attention_and_selection(
      q, k_cmp, v_cmp, block=config.cmp_block, stride=config.cmp_stride,
      slc_block=config.slc_block, num_selected=config.num_selected,
      num_initial=config.num_initial, num_local=config.num_local, scale=scale,
      interpret=interpret)
  return o_cmp, block_indices


def select_blocks(q, k_cmp, scale, *, config: NSAConfig, interpret=False):
  scale = _static_scale(scale)
  return compressed_attention_and_selection(q, k_cmp, k_cmp, scale, config, interpret)[1]


def selected_attention(q, k, v, block_indices, scale, *, block, interpret=False):
  return selected_kernel.selected_attention(q, k, v, block_indices, block=block,
                                            scale=_static_scale(scale), interpret=interpret)


def sliding_window_attention(q, k, v, scale, *, window, interpret=False):
  if _use_cudnn(q, v, interpret):
    # cuDNN's masked training kernels need an even length: a token appended at the end is after
    # every real query (causal), so it changes nothing but its own row, which is cut off.
    t = q.shape[1]
    pad = [(0, 0), (0, t % 2), (0, 0), (0, 0)]
    out = jax.nn.dot_product_attention(jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad),
                                       scale=scale, is_causal=True,
                                       local_window_size=(window - 1, 0), implementation="cudnn")
    return out[:, :t]
  return xla.sliding_window_attention(q, k, v, scale, window=window, query_chunk=GPU_QUERY_CHUNK)


def nsa_attention(q, k, v, gates, k_cmp, v_cmp, scale, *, config: NSAConfig, interpret=False):
  scale = _static_scale(scale)
  return _nsa_jit(q, k, v, gates, k_cmp, v_cmp, config=config, interpret=interpret, scale=scale)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "scale"))
def _nsa_jit(q, k, v, gates, k_cmp, v_cmp, *, config, interpret, scale):
  o_cmp, block_indices = compressed_attention_and_selection(q, k_cmp, v_cmp, scale, config,
                                                            interpret)
  # The selection's indices are already distinct, ascending and causal: no second sort.
  o_slc = selected_kernel.selected_attention(q, k, v, block_indices, block=config.slc_block,
                                             scale=scale, interpret=interpret, indices_sorted=True)
  o_swa = sliding_window_attention(q, k, v, scale, window=config.window, interpret=interpret)
  return combine_branches(o_cmp, o_slc, o_swa, gates).astype(q.dtype)

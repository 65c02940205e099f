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
- mean-pooling compression: the XLA path (one fused elementwise pass);
- decoding (`decode_attention`): the split decode kernels of `pallas_kernels.gpu.decode` and the
  decode top-n kernel of `pallas_kernels.gpu.top_n` between them.

Same signatures as `nsa_jax.xla` plus `interpret`; arguments are validated by `nsa_jax.ops`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax import xla
from nsa_jax.attention_math import combine_branches
from nsa_jax.config import NSAConfig
from nsa_jax.split_decode import split_decode_attention
from nsa_jax.validation import static_scale
from pallas_kernels.gpu import compressed_attention as compressed_kernel
from pallas_kernels.gpu import decode as decode_kernel
from pallas_kernels.gpu import selected_attention as selected_kernel
from pallas_kernels.gpu import top_n as top_n_kernel

# Queries per XLA chunk on the GPU: memory is plentiful and each sequential chunk costs a launch.
GPU_QUERY_CHUNK = 2048

compress_kv = xla.compress_kv


def _static_scale(scale):
  return static_scale(scale, "pallas_gpu")


def use_cudnn(q, v, interpret=False):
  """Whether cuDNN's flash attention takes these inputs (GPU, half precision, Dk == Dv)."""
  return (not interpret and jax.default_backend() == "gpu" and q.shape[-1] == v.shape[-1]
          and q.dtype in (jnp.bfloat16, jnp.float16))


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
  if use_cudnn(q, v, interpret):
    return cudnn_causal_attention(q, k, v, scale, window)
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


def decode_attention(q_t, cache, position, gates, scale, *, config: NSAConfig, interpret=False):
  """Row `position` of NSA over a `DecodeCache` holding that token: `[B, Hq, Dv]` in q_t.dtype.

  The XLA decode path where the kernels do not take the sizes (`decode_kernel.supported`)."""
  dk, dv = q_t.shape[-1], cache.v.shape[-1]
  if not decode_kernel.supported(dk, dv, config.slc_block, cache.k.shape[2],
                                 cache.k_cmp.shape[2]):
    return xla.decode_attention(q_t, cache, position, gates, scale, config=config)
  return _decode_jit(q_t, cache, position, gates, config=config, scale=_static_scale(scale),
                     interpret=interpret)


def _top_n_kernel(scores, position, config: NSAConfig, interpret: bool):
  """The decode top-n kernel on `scores [B, Hkv, num_slc]` padded to a power-of-two width."""
  num_slc = scores.shape[-1]
  width = 1 << (num_slc - 1).bit_length()
  return top_n_kernel.top_n_blocks_decode(
      jnp.pad(scores, [(0, 0), (0, 0), (0, width - num_slc)]), position,
      num_selected=config.num_selected, slc_block=config.slc_block, num_slc=num_slc,
      num_initial=config.num_initial, num_local=config.num_local, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("config", "scale", "interpret"))
def _decode_jit(q_t, cache, position, gates, *, config, scale, interpret):
  top_n = functools.partial(_top_n_kernel, interpret=interpret)
  return split_decode_attention(q_t, cache, position, gates, config=config, scale=scale,
                                kernels=decode_kernel, top_n=top_n, interpret=interpret)

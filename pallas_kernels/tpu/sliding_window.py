"""Sliding-window attention on TPU through splash attention's `LocalMask` (jax-ml/jax), and
dense causal attention through its `CausalMask` (the baseline NSA is timed against on TPU).

Why splash and not a kernel of our own: the window branch is a banded causal attention, exactly
what splash attention's block-sparse mask machinery does (it skips every all-masked block, keeps
partial blocks masked, and ships tuned forward and dQ/dKV kernels). GQA groups run as splash's
multi-query attention (one K/V head shared by the group's G query heads), vmapped over batch and
KV heads.

Splash needs the sequence to be a multiple of its 128-token blocks and head dims of 128 lanes:
tokens appended at the end are after every real query (causal), so padding changes nothing and
is cut off; `q` is pre-scaled because splash applies no softmax scale.

Packed rows: splash's segment ids (a token attends only tokens of its own id, and-ed with the
band inside the kernels, forward and backward), given one id per document, so the window of a
token starts at its document's first token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

BLOCK = 128


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _kernel(mask, group: int, block: int, interpret: bool):
  # Built per trace, not cached: the kernel holds its mask metadata as arrays of the trace.
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mqa_single_device(
      mask_lib.MultiHeadMask([mask] * group), block_sizes=sizes, interpret=interpret)


def sliding_window_attention(q, k, v, *, window: int, scale: float, interpret: bool = False,
                             document_ids=None):
  """Query `t` attends `t - window < s <= t` (and, in packed rows, only its own document).

  Args:
    q: `[B, T, Hq, Dk]`; k: `[B, T, Hkv, Dk]`; v: `[B, T, Hkv, Dv]` with `Dv == Dk`.
    window: `w`, the query itself included.
    scale: softmax scale.
    interpret: run under the TPU interpreter (CPU).
    document_ids: int32 `[B, T]` or None: packed rows, one id per document, different for any
      two documents of a row (`nsa_jax.segments.document_index`): a token attends only tokens
      of its own id.

  Returns:
    `[B, T, Hq, Dv]` in q.dtype; differentiable (splash's own backward kernels).
  """
  seq_pad = _round_up(q.shape[1], BLOCK)
  local = mask_lib.LocalMask((seq_pad, seq_pad), window_size=(min(window, seq_pad) - 1, 0),
                             offset=0)
  return _splash_gqa(q, k, v, local, BLOCK, scale, interpret, document_ids)


def causal_attention(q, k, v, *, scale: float, block: int = 512, interpret: bool = False,
                     document_ids=None):
  """Dense causal attention through splash attention (`block`-token tiles): the TPU baseline of
  `experiments/bench_kernels.py`. Shapes and `document_ids` as `sliding_window_attention`."""
  seq_pad = _round_up(q.shape[1], block)
  return _splash_gqa(q, k, v, mask_lib.CausalMask((seq_pad, seq_pad)), block, scale, interpret,
                     document_ids)


def _splash_gqa(q, k, v, mask, block, scale, interpret, document_ids=None):
  """Splash MQA per KV group over `mask` (`[T_pad, T_pad]`, T_pad a multiple of `block`),
  vmapped over batch and KV heads; pads T and the head dim, cuts them off again."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  if v.shape[3] != d:
    raise ValueError(f"splash attention needs Dv == Dk, got q {q.shape}, v {v.shape}")
  seq_pad, dim_pad = mask.shape[0], _round_up(d, 128)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, seq_pad - t), (0, 0), (0, dim_pad - d)])
  group = hq // hkv
  kernel = _kernel(mask, group, block, interpret)
  q_groups = (pad(q) * scale).astype(q.dtype).reshape(b, seq_pad, hkv, group, dim_pad)
  q_groups = q_groups.transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
  heads_first = lambda x: pad(x).transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
  if document_ids is None:
    out = jax.vmap(jax.vmap(kernel))(q_groups, heads_first(k), heads_first(v))
  else:
    # Padded tokens come after every real query (causal): any id will do.
    ids = jnp.pad(document_ids.astype(jnp.int32), [(0, 0), (0, seq_pad - t)], constant_values=-1)
    per_head = lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids))
    out = jax.vmap(jax.vmap(per_head, (0, 0, 0, None)))(q_groups, heads_first(k), heads_first(v),
                                                         ids)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, seq_pad, hq, dim_pad)
  return out[:, :t, :, :d]

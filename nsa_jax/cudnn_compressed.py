"""The compressed branch as one causal attention over folded queries, which cuDNN runs on GPU.

Query `t` sees compressed block `i` iff `i*d + l - 1 <= t` (SPEC.md), so the `d` positions
`t = l - 1 + c*d + j` (`j < d`) all see exactly blocks `0..c`. Folding those `d` positions into
the heads makes the branch an ordinary causal attention of `Tc` chunk queries over the `Tc`
compressed keys, with `d * G` query heads per KV head (GQA): cuDNN's flash attention runs it at
dense attention's rate, forward and backward, and gives each row's log-sum-exp, from which
`pallas_kernels.gpu.compressed_attention.selection_from_lse` scores the selection blocks.
Positions before `l - 1` see nothing: output 0, lse -inf.

The log-sum-exp comes from `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`
(`return_residual=True`), the function behind `jax.nn.dot_product_attention(...,
implementation="cudnn")`; `available()` is False where that import fails, and the callers then
use the Pallas kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

try:
  from jax._src.cudnn import fused_attention_stablehlo as _cudnn
except ImportError:  # a JAX without it: the Pallas kernels take the branch
  _cudnn = None


def available() -> bool:
  return _cudnn is not None


def num_chunks(seq_len: int, block: int, stride: int) -> int:
  """Chunks of `d` positions from position `l - 1` on: as many as compressed blocks, Tc."""
  return max(0, -(-(seq_len - block + 1) // stride))


def fold_queries(q, num_kv_heads: int, block: int, stride: int):
  """`[B, T, Hq, D]` -> `[B, C, Hkv * d * G, D]`, `C` = chunks rounded up to even (cuDNN's
  masked kernels want an even length; the extra chunk of zeros is cut off after). Head
  `(g, j, h)` of chunk `c` is head `h` of KV group `g` at position `l - 1 + c*d + j`."""
  b, t, hq, d = q.shape
  chunks = num_chunks(t, block, stride)
  padded = chunks + chunks % 2
  x = jnp.pad(q[:, block - 1:], [(0, 0), (0, padded * stride - (t - block + 1)), (0, 0), (0, 0)])
  x = x.reshape(b, padded, stride, num_kv_heads, hq // num_kv_heads, d)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, padded, stride * hq, d)


def unfold(x, seq_len: int, num_kv_heads: int, block: int, stride: int, fill):
  """`fold_queries`' inverse for per-row results `[B, C, Hkv * d * G, ...]` -> `[B, T, Hq, ...]`,
  `fill` at the positions before `l - 1`."""
  b, padded, heads = x.shape[:3]
  rest = x.shape[3:]
  group = heads // (num_kv_heads * stride)
  x = x.reshape(b, padded, num_kv_heads, stride, group, *rest)
  x = jnp.moveaxis(x, 3, 2).reshape(b, padded * stride, num_kv_heads * group, *rest)
  x = x[:, :seq_len - block + 1]
  return jnp.pad(x, [(0, 0), (block - 1, 0)] + [(0, 0)] * (1 + len(rest)), constant_values=fill)


def _xla_attention(qf, kf, vf, scale):
  """The folded causal attention and its natural log-sum-exp `[B, N, C]` in XLA (tests on CPU)."""
  b, c, n, d = qf.shape
  hkv = kf.shape[2]
  qg = qf.reshape(b, c, hkv, n // hkv, d).astype(jnp.float32)
  s = jnp.einsum("bchrd,bkhd->bhrck", qg, kf.astype(jnp.float32)) * scale
  s = jnp.where(jnp.arange(c)[:, None] >= jnp.arange(c)[None, :], s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)  # [B, Hkv, r, C]
  out = jnp.einsum("bhrck,bkhd->bchrd", jnp.exp(s - lse[..., None]), vf.astype(jnp.float32))
  return out.reshape(b, c, n, -1).astype(qf.dtype), lse.reshape(b, n, c)


def _attention(qf, kf, vf, scale, use_cudnn):
  """`(out [B, C, N, Dv], lse [B, N, C])` of the causal attention over folded queries."""
  if use_cudnn:
    return _cudnn.dot_product_attention(qf, kf, vf, scale=scale,
                                        mask_type=_cudnn.MaskType.CAUSAL, qkv_layout="BTNH",
                                        return_residual=True)
  return _xla_attention(qf, kf, vf, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention_and_lse(qf, kf, vf, scale, use_cudnn):
  """`_attention`, differentiable through the log-sum-exp too: cuDNN's backward takes no lse
  cotangent, so one costs two more cuDNN calls here (none when only `out` is differentiated)."""
  return _attention(qf, kf, vf, scale, use_cudnn)


def _attention_and_lse_fwd(qf, kf, vf, scale, use_cudnn):
  qf, kf, vf = (x.value for x in (qf, kf, vf))  # symbolic_zeros: CustomVJPPrimal records
  out, out_vjp, lse = jax.vjp(lambda *a: _attention(*a, scale, use_cudnn), qf, kf, vf,
                              has_aux=True)
  return (out, lse), (out_vjp, qf, kf)


def _attention_and_lse_bwd(scale, use_cudnn, residuals, cotangents):
  out_vjp, qf, kf = residuals
  d_out, d_lse = cotangents
  if isinstance(d_out, SymbolicZero):
    d_out = jnp.zeros(d_out.shape, d_out.dtype)
  dq, dk, dv = out_vjp(d_out)
  if not isinstance(d_lse, SymbolicZero):
    # d lse_r / d s_ri = p_ri, s = scale * q . k: dq_r += scale * d_lse_r * (P K)_r and
    # dk_i += (P^T (scale * d_lse * Q))_i, the same attention with the keys as values, its
    # output and its values' gradient.
    weight = scale * d_lse.transpose(0, 2, 1)[..., None]  # [B, C, N, 1]
    pk, pk_vjp = jax.vjp(lambda v: _attention(qf, kf, v, scale, use_cudnn)[0], kf)
    dq = (dq.astype(jnp.float32) + weight * pk.astype(jnp.float32)).astype(qf.dtype)
    dk_lse, = pk_vjp((weight * qf.astype(jnp.float32)).astype(qf.dtype))
    dk = (dk.astype(jnp.float32) + dk_lse.astype(jnp.float32)).astype(kf.dtype)
  return dq, dk, dv


_attention_and_lse.defvjp(_attention_and_lse_fwd, _attention_and_lse_bwd, symbolic_zeros=True)


def compressed_attention(q, k_cmp, v_cmp, scale: float, *, block: int, stride: int,
                         use_cudnn: bool = True):
  """Attention over the compressed blocks inside each query's prefix, as one folded causal
  attention (cuDNN; `use_cudnn=False`: the same in XLA, for tests).

  Args:
    q: `[B, T, Hq, Dk]`; k_cmp: `[B, Tc, Hkv, Dk]`; v_cmp: `[B, Tc, Hkv, Dv]`
      (cuDNN: half precision, Dk == Dv).
    scale: softmax scale (a Python float). block, stride: `l` and `d`.

  Returns:
    `(out [B, T, Hq, Dv] in q.dtype, lse [B, T, Hq] float32)`, natural log, -inf where nothing
    is visible; differentiable in q, k_cmp, v_cmp through both (cuDNN's backward for out; a
    gradient through lse costs two more cuDNN calls).
  """
  b, t, hq, _ = q.shape
  hkv = k_cmp.shape[2]
  if num_chunks(t, block, stride) == 0:  # T < l: no position sees a block
    return (jnp.zeros((b, t, hq, v_cmp.shape[-1]), q.dtype),
            jnp.full((b, t, hq), -jnp.inf, jnp.float32))
  out, _, lse = compressed_attention_folded(q, k_cmp, v_cmp, scale, block=block, stride=stride,
                                            use_cudnn=use_cudnn)
  return out, unfold(lse.transpose(0, 2, 1), t, hkv, block, stride, -jnp.inf)


def compressed_attention_folded(q, k_cmp, v_cmp, scale: float, *, block: int, stride: int,
                                use_cudnn: bool = True):
  """`compressed_attention` with the log-sum-exp left folded, and the folded queries: for a
  score pass that reads them as they are
  (`pallas_kernels.gpu.compressed_attention.selection_from_folded`). Needs `T >= l`.

  Returns:
    `(out [B, T, Hq, Dv] in q.dtype, qf [B, C, Hkv * d * G, Dk] (fold_queries), lse float32
    [B, Hkv * d * G, C])`: the row of head `(g, j, h)` of chunk `c`, natural log (chunk `c`
    sees blocks `0..c`, so every row sees one); differentiable in q, k_cmp, v_cmp through out
    and lse.
  """
  t, hkv = q.shape[1], k_cmp.shape[2]
  if num_chunks(t, block, stride) == 0:
    raise ValueError(f"the folded compressed branch needs T >= l = {block}, got q {q.shape}")
  qf = fold_queries(q, hkv, block, stride)
  pad = [(0, 0), (0, qf.shape[1] - k_cmp.shape[1]), (0, 0), (0, 0)]
  out, lse = _attention_and_lse(qf, jnp.pad(k_cmp, pad), jnp.pad(v_cmp, pad), scale, use_cudnn)
  return (unfold(out, t, hkv, block, stride, 0).astype(q.dtype), qf,
          lse.astype(jnp.float32))

"""Masked softmax attention with float32 accumulation: the numerically safe core of every NSA path.

Rows whose mask is all false get probabilities 0, output 0 and `lse = -inf`, with finite gradients
(never NaN): this is how SPEC.md's "fully masked rows contribute nothing" is met everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# float32 dots are exact on CPU but default to TF32 on GPU; the XLA path and the oracle want float32.
PRECISION = jax.lax.Precision.HIGHEST


def accum_dtype(*arrays):
  """float32 for 16- and 32-bit inputs, float64 when an input is float64 (gradient checks)."""
  return jnp.result_type(jnp.float32, *(x.dtype for x in arrays))


def attention_scores(q, k, scale):
  """`scale * q . k` in `accum_dtype`: `q [..., M, Dk]`, `k [..., S, Dk]` -> `[..., M, S]`."""
  dtype = accum_dtype(q, k)
  return jnp.einsum("...md,...sd->...ms", q.astype(dtype), k.astype(dtype),
                    precision=PRECISION) * scale


def masked_softmax(scores, mask):
  """Softmax over the last axis restricted to `mask`.

  Args:
    scores: `[..., M, S]`, float32 (or float64).
    mask: bool, broadcastable to `scores`.

  Returns:
    `(probs [..., M, S], lse [..., M])` in the dtype of `scores`; masked entries and empty rows have probability 0,
    empty rows have `lse = -inf`.
  """
  masked = jnp.where(mask, scores, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True, initial=-jnp.inf))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # empty rows: any finite shift works
  unnormalized = jnp.exp(masked - row_max)  # exp(-inf) = 0 on masked entries
  row_sum = jnp.sum(unnormalized, axis=-1, keepdims=True)
  nonempty = row_sum > 0
  safe_sum = jnp.where(nonempty, row_sum, 1.0)  # keeps log and division finite in both directions
  probs = unnormalized / safe_sum
  lse = jnp.where(nonempty, row_max + jnp.log(safe_sum), -jnp.inf)[..., 0]
  return probs, lse


def masked_attention(q, k, v, mask, scale):
  """Softmax attention of `q [..., M, Dk]` over `k [..., S, Dk]`, `v [..., S, Dv]` where `mask`.

  Returns `(out [..., M, Dv], lse [..., M])` in `accum_dtype`; empty rows give zeros and `-inf`.
  """
  probs, lse = masked_softmax(attention_scores(q, k, scale), mask)
  out = jnp.einsum("...ms,...sd->...md", probs, v.astype(probs.dtype), precision=PRECISION)
  return out, lse


def combine_branches(o_cmp, o_slc, o_swa, gates):
  """`g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa` in `accum_dtype` (plain sum if `gates` is None).

  `o_* [B, T, Hq, Dv]`, `gates [B, T, Hq, 3]` (order cmp, slc, swa) or None.
  """
  dtype = accum_dtype(o_cmp, o_slc, o_swa)
  branches = [o.astype(dtype) for o in (o_cmp, o_slc, o_swa)]
  if gates is None:
    return branches[0] + branches[1] + branches[2]
  gates = gates.astype(dtype)[..., None]  # [B, T, Hq, 3, 1]
  return sum(gates[..., i, :] * branches[i] for i in range(3))

"""Masked softmax attention in float32: the numerically safe core every NSA path shares.

Rows whose mask is all false get probabilities 0, output 0 and `lse = -inf`, with finite gradients
(never NaN): this is how SPEC.md's "fully masked rows contribute nothing" is met everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# float32 dots are exact on CPU but default to TF32 on GPU; the XLA path and the oracle want float32.
PRECISION = jax.lax.Precision.HIGHEST


def attention_scores(q, k, scale):
  """`scale * q . k` in float32: `q [..., M, Dk]`, `k [..., S, Dk]` -> `[..., M, S]`."""
  return jnp.einsum("...md,...sd->...ms", q.astype(jnp.float32), k.astype(jnp.float32),
                    precision=PRECISION) * scale


def masked_softmax(scores, mask):
  """Softmax over the last axis restricted to `mask`.

  Args:
    scores: float32 `[..., M, S]`.
    mask: bool, broadcastable to `scores`.

  Returns:
    `(probs [..., M, S], lse [..., M])`, float32; masked entries and empty rows have probability 0,
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

  Returns `(out [..., M, Dv], lse [..., M])` in float32; empty rows give zeros and `-inf`.
  """
  probs, lse = masked_softmax(attention_scores(q, k, scale), mask)
  out = jnp.einsum("...ms,...sd->...md", probs, v.astype(jnp.float32), precision=PRECISION)
  return out, lse


def combine_branches(o_cmp, o_slc, o_swa, gates):
  """`g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa` in float32 (a plain sum when `gates` is None).

  `o_* [B, T, Hq, Dv]`, `gates [B, T, Hq, 3]` (order cmp, slc, swa) or None.
  """
  branches = [o.astype(jnp.float32) for o in (o_cmp, o_slc, o_swa)]
  if gates is None:
    return branches[0] + branches[1] + branches[2]
  gates = gates.astype(jnp.float32)[..., None]  # [B, T, Hq, 3, 1]
  return sum(gates[..., i, :] * branches[i] for i in range(3))

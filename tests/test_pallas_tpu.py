"""Pallas TPU kernels under the TPU interpreter (CPU): values and gradients against the oracle.

The interpreter runs with race detection on and raises on out-of-bounds block reads, so these
tests also fail if an index map or a kernel touches memory it should not.
"""

import jax
import jax.numpy as jnp
import pytest

from nsa_jax import reference
from pallas_kernels.tpu import selected_attention as tpu_selected
from tests.helpers import assert_close, assert_grads_close, random_qkv

# (B, T, Hq, Hkv, Dk, Dv, block, n, smem_budget): GQA with Dk != Dv and T not a multiple of the
# block, MHA, MQA with a tiny SMEM budget (several query chunks and work-item chunks).
CASES = [
    (1, 37, 4, 2, 16, 24, 8, 3, None),
    (2, 24, 2, 2, 8, 8, 8, 2, None),
    (1, 33, 3, 1, 16, 16, 16, 2, 1024),
]


@pytest.mark.parametrize("case", CASES)
def test_selected_attention_tpu_kernel_matches_reference(case, monkeypatch):
  b, t, hq, hkv, dk, dv, block, n, smem_budget = case
  if smem_budget:
    monkeypatch.setattr(tpu_selected, "SMEM_BUDGET_BYTES", smem_budget)
  q, k, v = random_qkv(b, t, hq, hkv, dk, dv)
  num_blocks = -(-t // block)
  # Any values: -1s, repeats, future and out-of-range blocks included.
  idx = jax.random.randint(jax.random.key(t), (b, t, hkv, n), -1, num_blocks + 2)
  scale = dk ** -0.5
  cotangent = jax.random.normal(jax.random.key(1), (b, t, hq, dv))

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out * cotangent), out

  kernel = lambda q, k, v: tpu_selected.selected_attention(q, k, v, idx, block=block, scale=scale,
                                                           interpret=True)
  expected = lambda q, k, v: reference.selected_attention(q, k, v, idx, scale, block=block)
  (_, out), grads = jax.value_and_grad(lambda *a: loss(kernel, *a), (0, 1, 2), has_aux=True)(q, k, v)
  (_, ref), ref_grads = jax.value_and_grad(lambda *a: loss(expected, *a), (0, 1, 2),
                                           has_aux=True)(q, k, v)
  assert_close(out, ref)
  assert_grads_close(grads, ref_grads)


def test_tpu_kernel_rejects_blocks_off_the_sublane_tiling():
  q, k, v = random_qkv(1, 24, 2, 1, 8)
  with pytest.raises(ValueError, match="multiple of 8, got 12"):
    tpu_selected.selected_attention(q, k, v, jnp.zeros((1, 24, 1, 2), jnp.int32), block=12,
                                    scale=0.3, interpret=True)

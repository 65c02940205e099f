"""Bad input raises ValueError naming the argument and the shapes seen; NSAConfig validates."""

import dataclasses

import jax.numpy as jnp
import pytest

import nsa_jax
from nsa_jax import NSAConfig

CONFIG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3, num_initial=1,
                   num_local=1, window=20)
Q = jnp.zeros((2, 40, 4, 8))
K = jnp.zeros((2, 40, 2, 8))
V = jnp.zeros((2, 40, 2, 6))


def test_config_defaults_are_the_papers():
  assert dataclasses.astuple(NSAConfig()) == (32, 16, 64, 16, 1, 2, 512)
  assert hash(NSAConfig()) == hash(NSAConfig())
  with pytest.raises(dataclasses.FrozenInstanceError):
    NSAConfig().window = 3
  assert NSAConfig().num_cmp_blocks(100) == 5 and NSAConfig().num_cmp_blocks(31) == 0
  assert NSAConfig().num_slc_blocks(129) == 3


@pytest.mark.parametrize("fields,field_named", [
    (dict(cmp_block=24, cmp_stride=16), "cmp_block"),
    (dict(slc_block=40), "slc_block"),
    (dict(num_selected=2, num_initial=1, num_local=2), "num_initial"),
    (dict(window=0), "window"),
    (dict(cmp_stride=-16), "cmp_stride"),
    (dict(num_selected=0), "num_selected"),
    (dict(num_local=-1), "num_local"),
    (dict(slc_block=64.0), "slc_block"),
    (dict(window=True), "window"),
])
def test_invalid_config_names_the_field(fields, field_named):
  with pytest.raises(ValueError, match=field_named):
    NSAConfig(**fields)


def nsa(**overrides):
  args = dict(q=Q, k=K, v=V, config=CONFIG)
  args.update(overrides)
  return nsa_jax.nsa_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("overrides,pattern", [
    (dict(q=jnp.zeros((40, 4, 8))), r"q must have rank 4 .*\(40, 4, 8\)"),
    (dict(k=jnp.zeros((2, 40, 8))), r"k must have rank 4"),
    (dict(v=jnp.zeros((2, 40, 2, 6, 1))), r"v must have rank 4"),
    (dict(k=jnp.zeros((2, 40, 3, 8)), v=jnp.zeros((2, 40, 3, 6))), r"Hq must be .*multiple"),
    (dict(k=jnp.zeros((2, 40, 2, 16))), r"head dimension Dk.*\(2, 40, 4, 8\).*\(2, 40, 2, 16\)"),
    (dict(v=jnp.zeros((2, 40, 1, 6))), r"k and v must have the same number of heads"),
    (dict(k=jnp.zeros((2, 41, 2, 8))), r"sequence length T"),
    (dict(v=jnp.zeros((3, 40, 2, 6))), r"batch size B"),
    (dict(q=jnp.zeros((2, 40, 4, 8), jnp.int32)), r"q must be a floating-point array.*int32"),
    (dict(k=jnp.zeros((2, 40, 2, 8), bool)), r"k must be a floating-point"),
    (dict(q=jnp.zeros((2, 0, 4, 8)), k=jnp.zeros((2, 0, 2, 8)), v=jnp.zeros((2, 0, 2, 6))),
     r"sequence length T must be positive"),
    (dict(gates=jnp.zeros((2, 40, 4))), r"gates must have shape \[B, T, Hq, 3\].*\(2, 40, 4\)"),
    (dict(gates=jnp.zeros((2, 40, 2, 3))), r"gates must have shape"),
    (dict(gates=jnp.zeros((2, 40, 4, 3), jnp.int32)), r"gates must be a floating-point"),
    (dict(k_cmp=jnp.zeros((2, 9, 2, 8))), r"k_cmp and v_cmp must be given together"),
    (dict(k_cmp=jnp.zeros((2, 5, 2, 8)), v_cmp=jnp.zeros((2, 5, 2, 6))),
     r"Tc = 9 compressed blocks.*\(2, 5, 2, 8\)"),
    (dict(k_cmp=jnp.zeros((2, 9, 2, 8)), v_cmp=jnp.zeros((2, 9, 2, 4))), r"head dims"),
    (dict(config=dict(window=3)), r"config must be an NSAConfig"),
    (dict(implementation="cuda"), r"implementation must be one of"),
    (dict(implementation="xla", interpret=True), r"interpret=True applies to the Pallas"),
])
def test_nsa_attention_rejects_bad_input(overrides, pattern):
  with pytest.raises(ValueError, match=pattern):
    nsa(**overrides)


def test_branch_ops_reject_bad_input():
  k_cmp, v_cmp = nsa_jax.compress_kv(K, V, block=8, stride=4)
  with pytest.raises(ValueError, match=r"block \(8\) must be a multiple of stride \(3\)"):
    nsa_jax.compress_kv(K, V, block=8, stride=3)
  with pytest.raises(ValueError, match=r"k and v must agree on \[B, T, Hkv\]"):
    nsa_jax.compress_kv(K, V[:, :20], block=8, stride=4)
  with pytest.raises(ValueError, match=r"Tc = 5 compressed blocks.*k_cmp \(2, 9, 2, 8\)"):
    nsa_jax.compressed_attention(Q, k_cmp, v_cmp, block=8, stride=8)
  with pytest.raises(ValueError, match=r"k_cmp must have rank 4"):
    nsa_jax.compressed_attention(Q, k_cmp[0], v_cmp, block=8, stride=4)
  with pytest.raises(ValueError, match=r"q and k_cmp must have the same head dimension"):
    nsa_jax.select_blocks(Q[..., :4], k_cmp, config=CONFIG)
  with pytest.raises(ValueError, match=r"block_indices must be an integer array.*float32"):
    nsa_jax.selected_attention(Q, K, V, jnp.zeros((2, 40, 2, 3)), block=16)
  with pytest.raises(ValueError, match=r"block_indices must have shape \[B, T, Hkv, n\]"):
    nsa_jax.selected_attention(Q, K, V, jnp.zeros((2, 40, 4, 3), jnp.int32), block=16)
  with pytest.raises(ValueError, match=r"block must be a positive int"):
    nsa_jax.selected_attention(Q, K, V, jnp.zeros((2, 40, 2, 3), jnp.int32), block=0)
  with pytest.raises(ValueError, match=r"window must be a positive int"):
    nsa_jax.sliding_window_attention(Q, K, V, window=-1)
  with pytest.raises(ValueError, match=r"Hq must be a positive multiple"):
    nsa_jax.sliding_window_attention(Q[:, :, :3], K, V, window=4)

"""Shared test helpers: fresh random inputs and per-dtype tolerances."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

# Tolerances of an implementation against the float32 oracle on the same (rounded) inputs. Paths
# that accumulate in float32 differ from the oracle by summation order (float32) plus the final
# rounding to the input dtype (half types).
TOLERANCES = {
    jnp.float32: dict(atol=2e-5, rtol=2e-5),
    jnp.bfloat16: dict(atol=2e-2, rtol=2e-2),
    jnp.float16: dict(atol=3e-3, rtol=3e-3),
}
# Gradients: relative L2 error of the whole gradient tensor.
GRAD_RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 3e-3}
# float32 gradients that sum over ~10^5 terms (the GPU tests: dK_cmp at T=4k with G=64) carry the
# expected sqrt(N) * eps = 3e-5 rounding of two different summation orders.
GRAD_RTOL_LONG_FLOAT32 = 5e-5

_seed = itertools.count(1234)


def reset_keys(seed: int) -> None:
  """Restarts the key sequence: `tests/conftest.py` seeds it from each test's id, so a test's
  inputs do not depend on which tests ran before it in the same worker."""
  global _seed
  _seed = itertools.count(seed)


def fresh_key():
  """A new PRNG key per call: every check draws its own inputs (reproducible run to run)."""
  return jax.random.key(next(_seed))


def random_qkv(batch, seq_len, num_heads, num_kv_heads, head_dim, head_dim_v=None,
               dtype=jnp.float32, key=None):
  """Normal `q [B, T, Hq, Dk]`, `k [B, T, Hkv, Dk]`, `v [B, T, Hkv, Dv]`."""
  key = fresh_key() if key is None else key
  kq, kk, kv = jax.random.split(key, 3)
  head_dim_v = head_dim if head_dim_v is None else head_dim_v
  q = jax.random.normal(kq, (batch, seq_len, num_heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (batch, seq_len, num_kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (batch, seq_len, num_kv_heads, head_dim_v), jnp.float32).astype(dtype)
  return q, k, v


def random_gates(q):
  """Sigmoid gates `[B, T, Hq, 3]` in q.dtype."""
  shape = q.shape[:3] + (3,)
  return jax.nn.sigmoid(jax.random.normal(fresh_key(), shape)).astype(q.dtype)


def assert_close(actual, expected, dtype=jnp.float32, **override):
  tol = dict(TOLERANCES[jnp.dtype(dtype).type], **override)
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert np.all(np.isfinite(actual)), "non-finite values"
  np.testing.assert_allclose(actual, expected, **tol)


def assert_grads_close(actual, expected, dtype=jnp.float32, long_reduction=False):
  """Relative L2 error of each gradient below `GRAD_RTOL[dtype]`.

  A gradient that is exactly zero (dq and dk at T = 1, where every softmax row has one key) has
  no relative error: it is measured against the largest expected gradient of the set instead.
  There a flash-attention backward (dS = P * (dP - rowsum(dO * O))) returns the rounding of the
  cancelled terms, which scales with them, not with the zero (2026-12-04, H200, float32, G = 16,
  T = 1: |dq| = 1.4e-6 for |dv| = 33, the same absolute error as at T = 2).

  `long_reduction`: the float32 gradients sum over ~10^5 terms (`GRAD_RTOL_LONG_FLOAT32`).
  """
  rtol = GRAD_RTOL[jnp.dtype(dtype).type]
  if long_reduction and jnp.dtype(dtype) == jnp.float32:
    rtol = GRAD_RTOL_LONG_FLOAT32
  actual = [np.asarray(jnp.asarray(a, jnp.float32)) for a in actual]
  expected = [np.asarray(jnp.asarray(e, jnp.float32)) for e in expected]
  largest = max(np.linalg.norm(e) for e in expected)
  for i, (a, e) in enumerate(zip(actual, expected)):
    assert np.all(np.isfinite(a)), f"gradient {i}: non-finite values"
    norm = np.linalg.norm(e)
    err = np.linalg.norm(a - e) / max(norm if norm > 0 else largest, 1e-30)
    assert err < rtol, f"gradient {i}: relative error {err:.2e} (|expected| {norm:.2e})"


def assert_valid_selection(block_indices, score, config, atol):
  """`block_indices` is a correct top-n of `score` up to near-ties (SPEC.md selection steps 4-5).

  Implementations compute the scores with different summation orders, so where two candidates'
  scores are within rounding of each other either may be chosen. This checks the format (ascending,
  distinct, -1 last), that every forced block is chosen, that `min(n, candidates)` blocks are, and
  that no unchosen candidate beats a chosen non-forced one by more than `atol`.

  Args:
    block_indices: int `[B, T, Hkv, n]`.
    score: float `[B, T, Hkv, Ts]`, e.g. `reference.selection_scores`.
    config: the `NSAConfig`.
    atol: the largest score difference treated as a tie.
  """
  idx = np.asarray(block_indices)
  score = np.asarray(jnp.asarray(score, jnp.float32))
  seq_len, num_slc, n = idx.shape[1], score.shape[-1], idx.shape[-1]
  valid = idx >= 0
  assert np.all(valid[..., 1:] <= valid[..., :-1]), "-1 slots must come last"
  assert np.all((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]), "indices must ascend"
  block = np.arange(num_slc)
  chosen = np.any(idx[..., :, None] == block, axis=-2)  # [B, T, Hkv, Ts]
  query_block = (np.arange(seq_len) // config.slc_block)[:, None]
  candidate = (block <= query_block)[None, :, None, :]  # [1, T, 1, Ts]
  forced = candidate & ((block < config.num_initial)
                        | (block > query_block - config.num_local))[None, :, None, :]
  assert not np.any(chosen & ~candidate), "a chosen block is not a candidate"
  assert np.all(chosen | ~forced), "a forced block is missing"
  expected_count = np.minimum(n, candidate.sum(-1))
  np.testing.assert_array_equal(chosen.sum(-1), np.broadcast_to(expected_count, chosen.shape[:-1]))
  worst_chosen = np.where(chosen & ~forced, score, np.inf).min(-1)
  best_left = np.where(candidate & ~chosen, score, -np.inf).max(-1)
  margin = best_left - worst_chosen
  assert np.all(margin <= atol), f"an unchosen block outscores a chosen one by {margin.max():.3g}"


def tensorboard_scalars(logdir, tag):
  """`[(step, value)]` of scalar `tag` in the TensorBoard event files under `logdir`."""
  import pathlib
  import struct

  from tensorboardX.proto import event_pb2

  values = []
  for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):  # TFRecord: length, its crc, the record, its crc
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      values += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
  return values


def has_gpu():
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def uneven_pooling(config, head_dim):
  """A learned-compression stand-in `(k, v) -> (k_cmp, v_cmp)` for `config`'s blocks: weights a
  block's tokens unevenly and mixes features, so a block made from the wrong tokens, or twice,
  gives other values than mean pooling would hide."""
  weights = jax.random.normal(jax.random.key(3), (config.cmp_block,))
  mix = jax.random.normal(jax.random.key(4), (head_dim, head_dim)) / 4

  def compress_fn(k, v):
    num = config.num_cmp_blocks(k.shape[1])
    tokens = jnp.arange(num)[:, None] * config.cmp_stride + jnp.arange(config.cmp_block)
    pool = lambda x: jnp.tanh(jnp.einsum("bilhd,l,de->bihe", x[:, tokens], weights, mix))
    return pool(k), pool(v)

  return compress_fn

"""The oracle itself: SPEC.md rules checked against independent numpy loops and dense attention.

Parametrized over both pure-JAX implementations, so each SPEC.md rule is pinned for both.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import NSAConfig
from nsa_jax import reference
from tests.helpers import assert_close, assert_valid_selection, random_qkv

IMPLS = ["reference", "xla"]
SMALL = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3, num_initial=1,
                  num_local=1, window=20)


def dense_causal(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def np_softmax_attend(q_rows, keys, values, scale):
  """q_rows [M, D], keys [S, D], values [S, Dv] -> [M, Dv] (zeros if S == 0), float64."""
  if len(keys) == 0:
    return np.zeros((len(q_rows), values.shape[-1]))
  s = scale * q_rows @ keys.T
  p = np.exp(s - s.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ values


def np_loop_attention(q, k, v, keys_of_query):
  """For every (b, t, h): softmax attention over the key positions `keys_of_query(b, t, g)`."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t_, hq, d = q.shape
  group = hq // k.shape[2]
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  for b in range(b_):
    for t in range(t_):
      for h in range(hq):
        keys = np.asarray(sorted(keys_of_query(b, t, h // group)), int)
        out[b, t, h] = np_softmax_attend(q[b, t, h][None], k[b, keys, h // group],
                                         v[b, keys, h // group], d ** -0.5)[0]
  return out


@pytest.mark.parametrize("impl", IMPLS)
def test_compress_kv_is_the_mean_of_each_overlapping_block(impl):
  _, k, v = random_qkv(2, 45, 2, 2, 8, head_dim_v=6)
  k_cmp, v_cmp = nsa_jax.compress_kv(k, v, block=8, stride=4, implementation=impl)
  num_blocks = (45 - 8) // 4 + 1
  assert k_cmp.shape == (2, num_blocks, 2, 8) and v_cmp.shape == (2, num_blocks, 2, 6)
  expected_k = np.stack([np.asarray(k)[:, i * 4:i * 4 + 8].mean(1) for i in range(num_blocks)], 1)
  expected_v = np.stack([np.asarray(v)[:, i * 4:i * 4 + 8].mean(1) for i in range(num_blocks)], 1)
  assert_close(k_cmp, expected_k)
  assert_close(v_cmp, expected_v)


@pytest.mark.parametrize("impl", IMPLS)
def test_compressed_attention_sees_only_blocks_inside_the_prefix(impl):
  q, k, v = random_qkv(1, 37, 4, 2, 8)
  k_cmp, v_cmp = nsa_jax.compress_kv(k, v, block=8, stride=4)
  out, lse = nsa_jax.compressed_attention(q, k_cmp, v_cmp, block=8, stride=4, implementation=impl)
  # Treat compressed block i as a "token": query t sees it iff i*4 + 8 - 1 <= t.
  visible = lambda b, t, g: [i for i in range(k_cmp.shape[1]) if i * 4 + 7 <= t]
  assert_close(out, np_loop_attention(q, k_cmp, v_cmp, visible))
  assert np.all(np.asarray(out[:, :7]) == 0.0), "queries before the first full block get exact 0"
  assert np.all(np.isneginf(np.asarray(lse[:, :7])))
  assert np.all(np.isfinite(np.asarray(lse[:, 7:])))


def np_selection(q, k_cmp, config):
  """SPEC.md section 2 steps 1-5, as loops over queries and blocks."""
  q, k_cmp = np.asarray(q, np.float64), np.asarray(k_cmp, np.float64)
  b_, t_, hq, d = q.shape
  hkv, num_cmp = k_cmp.shape[2], k_cmp.shape[1]
  group, num_slc = hq // hkv, -(-t_ // config.slc_block)
  l, st, ls = config.cmp_block, config.cmp_stride, config.slc_block
  out = np.full((b_, t_, hkv, config.num_selected), -1)
  for b in range(b_):
    for t in range(t_):
      visible = [i for i in range(num_cmp) if i * st + l - 1 <= t]
      for g in range(hkv):
        p_grp = np.zeros(num_cmp)
        for h in range(g * group, (g + 1) * group):
          if visible:
            s = d ** -0.5 * k_cmp[b, visible, g] @ q[b, t, h]
            p_grp[visible] += np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        score = [sum(p_grp[i] * max(0, min(i * st + l, (j + 1) * ls) - max(i * st, j * ls)) / st
                     for i in range(num_cmp)) for j in range(num_slc)]
        last = t // ls
        forced = {j for j in range(last + 1)
                  if j < config.num_initial or j > last - config.num_local}
        rest = sorted((j for j in range(last + 1) if j not in forced), key=lambda j: (-score[j], j))
        chosen = sorted(forced | set(rest[:config.num_selected - len(forced)]))
        out[b, t, g, :len(chosen)] = chosen
  return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", [
    SMALL,
    NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=4, num_initial=0, num_local=0,
              window=8),
    NSAConfig(cmp_block=16, cmp_stride=4, slc_block=8, num_selected=5, num_initial=2, num_local=2,
              window=8),
])
def test_select_blocks_follows_the_rule_of_the_spec(impl, config):
  q, k, _ = random_qkv(2, 75, 4, 2, 8)
  k_cmp, _ = nsa_jax.compress_kv(k, k, block=config.cmp_block, stride=config.cmp_stride)
  idx = nsa_jax.select_blocks(q, k_cmp, config=config, implementation=impl)
  assert idx.dtype == jnp.int32 and idx.shape == (2, 75, 2, config.num_selected)
  np.testing.assert_array_equal(np.asarray(idx), np_selection(q, k_cmp, config))


def test_tie_tolerant_selection_check_accepts_the_oracle_and_rejects_worse_choices():
  # The GPU tests judge kernel selections with `assert_valid_selection`: it must fail on a wrong one.
  config = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=4, num_initial=1,
                     num_local=1, window=8)
  q, k, _ = random_qkv(1, 64, 2, 1, 8)
  k_cmp, _ = nsa_jax.compress_kv(k, k, block=8, stride=4)
  score = reference.selection_scores(q, k_cmp, 8 ** -0.5, config)  # [1, 64, 1, 8]
  idx = np.asarray(nsa_jax.select_blocks(q, k_cmp, config=config, implementation="reference"))
  assert_valid_selection(idx, score, config, atol=0.0)
  t = 63  # blocks 0 (initial) and 7 (local) are forced, two of 1..6 are chosen by score
  row = list(idx[0, t, 0])
  unchosen = [j for j in range(1, 7) if j not in row]
  lowest = min(unchosen, key=lambda j: score[0, t, 0, j])
  swap = lambda old, new: np.sort([new if j == old else j for j in row])
  worse, no_forced, too_few = idx.copy(), idx.copy(), idx.copy()
  worse[0, t, 0] = swap(row[1], lowest)  # a chosen block traded for a lower-scoring one
  no_forced[0, t, 0] = swap(7, lowest)
  too_few[0, t, 0] = row[:-1] + [-1]
  for bad in (worse, no_forced, too_few):
    with pytest.raises(AssertionError):
      assert_valid_selection(bad, score, config, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_select_blocks_prefers_lower_index_on_ties(impl):
  # Constant keys make every visible compressed block equally likely: the scores of full selection
  # blocks tie, and the lower-numbered blocks must win.
  config = NSAConfig(cmp_block=4, cmp_stride=4, slc_block=4, num_selected=3, num_initial=0,
                     num_local=1, window=4)
  q, _, _ = random_qkv(1, 40, 2, 1, 8)
  k_cmp = jnp.ones((1, 10, 1, 8))
  idx = nsa_jax.select_blocks(q, k_cmp, config=config, implementation=impl)
  np.testing.assert_array_equal(np.asarray(idx[0, 39, 0]), [0, 1, 9])
  np.testing.assert_array_equal(np.asarray(idx[0, 5, 0]), [0, 1, -1])


@pytest.mark.parametrize("impl", IMPLS)
def test_selected_attention_treats_indices_as_a_set_of_blocks(impl):
  q, k, v = random_qkv(1, 40, 4, 2, 8, head_dim_v=5)
  block = 8  # Ts = 5
  idx = jax.random.randint(jax.random.key(7), (1, 40, 2, 4), -2, 8)  # -1s, out of range, repeats
  out = nsa_jax.selected_attention(q, k, v, idx, block=block, implementation=impl)
  idx_np = np.asarray(idx)

  def keys(b, t, g):
    blocks = {j for j in idx_np[b, t, g] if 0 <= j < 5}
    return [s for s in range(t + 1) if s // block in blocks]

  assert_close(out, np_loop_attention(q, k, v, keys))


@pytest.mark.parametrize("impl", IMPLS)
def test_sliding_window_attends_the_last_w_tokens(impl):
  q, k, v = random_qkv(2, 50, 6, 3, 8, head_dim_v=12)
  out = nsa_jax.sliding_window_attention(q, k, v, window=7, implementation=impl)
  keys = lambda b, t, g: range(max(0, t - 6), t + 1)
  assert_close(out, np_loop_attention(q, k, v, keys))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq_len,window", [(33, 33), (33, 512), (1, 1)])
def test_window_covering_the_sequence_is_dense_causal_attention(impl, seq_len, window):
  q, k, v = random_qkv(2, seq_len, 8, 2, 16)
  out = nsa_jax.sliding_window_attention(q, k, v, window=window, implementation=impl)
  assert_close(out, dense_causal(q, k, v))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq_len", [48, 61, 5])
def test_selecting_every_block_is_dense_causal_attention(impl, seq_len):
  config = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, num_initial=1,
                     num_local=1, window=8)  # n = 4 >= ceil(61 / 16)
  q, k, v = random_qkv(2, seq_len, 8, 2, 16)
  k_cmp, _ = nsa_jax.compress_kv(k, v, block=8, stride=4)
  idx = nsa_jax.select_blocks(q, k_cmp, config=config, implementation=impl)
  out = nsa_jax.selected_attention(q, k, v, idx, block=16, implementation=impl)
  assert_close(out, dense_causal(q, k, v))


@pytest.mark.parametrize("impl", IMPLS)
def test_nsa_with_every_block_and_full_window_is_cmp_plus_twice_dense(impl):
  config = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, num_initial=1,
                     num_local=1, window=64)
  q, k, v = random_qkv(1, 60, 4, 1, 16)
  out = nsa_jax.nsa_attention(q, k, v, config=config, implementation=impl)
  k_cmp, v_cmp = nsa_jax.compress_kv(k, v, block=8, stride=4)
  o_cmp, _ = nsa_jax.compressed_attention(q, k_cmp, v_cmp, block=8, stride=4,
                                          implementation=impl)
  assert_close(out, o_cmp + 2 * dense_causal(q, k, v))


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_shorter_than_a_compressed_block_has_zero_compressed_branch(impl):
  q, k, v = random_qkv(2, 7, 4, 2, 8)
  k_cmp, v_cmp = nsa_jax.compress_kv(k, v, block=8, stride=4)
  assert k_cmp.shape[1] == 0
  o_cmp, lse = nsa_jax.compressed_attention(q, k_cmp, v_cmp, block=8, stride=4,
                                            implementation=impl)
  assert np.all(np.asarray(o_cmp) == 0.0) and np.all(np.isneginf(np.asarray(lse)))
  out = nsa_jax.nsa_attention(q, k, v, config=SMALL, implementation=impl)
  # T = 7 < l' and w: the selected and window branches both attend the whole causal prefix.
  assert_close(out, 2 * dense_causal(q, k, v))


@pytest.mark.parametrize("impl", IMPLS)
def test_single_token_sequence(impl):
  q, k, v = random_qkv(3, 1, 4, 2, 8)
  out = nsa_jax.nsa_attention(q, k, v, config=NSAConfig(), implementation=impl)
  # One visible token: selected and window branches return v, the compressed branch 0.
  assert_close(out, 2 * jnp.repeat(v, 2, axis=2))


@pytest.mark.parametrize("impl", IMPLS)
def test_gates_weight_the_three_branches(impl):
  q, k, v = random_qkv(1, 40, 4, 2, 8)
  gates = jax.random.uniform(jax.random.key(3), (1, 40, 4, 3))
  out = nsa_jax.nsa_attention(q, k, v, config=SMALL, gates=gates, implementation=impl)
  k_cmp, v_cmp = nsa_jax.compress_kv(k, v, block=8, stride=4)
  o_cmp, _ = nsa_jax.compressed_attention(q, k_cmp, v_cmp, block=8, stride=4)
  idx = nsa_jax.select_blocks(q, k_cmp, config=SMALL)
  o_slc = nsa_jax.selected_attention(q, k, v, idx, block=16)
  o_swa = nsa_jax.sliding_window_attention(q, k, v, window=20)
  g = gates[..., None]
  assert_close(out, g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_swa)

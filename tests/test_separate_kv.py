"""A K/V set per branch (the paper's section 3.3.3): `nsa_attention_separate_kv` is the three
branch ops on their own sets, and prefill + one-token steps reproduce it at every position."""

import functools

import jax
import jax.numpy as jnp
import pytest

import nsa_jax
from nsa_jax import NSAConfig, pallas_gpu
from nsa_jax.attention_math import combine_branches
from pallas_kernels.gpu import decode as gpu_decode
from tests.helpers import assert_close, assert_grads_close, random_gates, random_qkv
from tests.helpers import uneven_pooling

# l=8, d=4, l'=16, n=3, w=20: every branch is exercised within ~80 tokens.
SMALL = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3, num_initial=1,
                  num_local=1, window=20)


def three_sets(b, t, hq, hkv, dk, dv=None, dtype=jnp.float32):
  """`q` and three independent K/V sets."""
  q, k0, v0 = random_qkv(b, t, hq, hkv, dk, dv, dtype=dtype)
  sets = [(k0, v0)] + [random_qkv(b, t, hq, hkv, dk, dv, dtype=dtype)[1:] for _ in range(2)]
  return q, [k for k, _ in sets], [v for _, v in sets]


def branches_apart(q, keys, values, gates, config):
  """The oracle's three branches, each on its set, the selection ranked by set 0."""
  kw = dict(implementation="reference")
  k_cmp, v_cmp = nsa_jax.compress_kv(keys[0], values[0], block=config.cmp_block,
                                     stride=config.cmp_stride)
  o_cmp, _ = nsa_jax.compressed_attention(q, k_cmp, v_cmp, block=config.cmp_block,
                                          stride=config.cmp_stride, **kw)
  idx = nsa_jax.select_blocks(q, k_cmp, config=config, **kw)
  o_slc = nsa_jax.selected_attention(q, keys[1], values[1], idx, block=config.slc_block, **kw)
  o_swa = nsa_jax.sliding_window_attention(q, keys[2], values[2], window=config.window, **kw)
  return combine_branches(o_cmp, o_slc, o_swa, gates).astype(q.dtype)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_is_the_three_branches_on_their_own_sets(impl):
  q, keys, values = three_sets(2, 45, 4, 2, 8)
  gates = random_gates(q)
  fn = lambda q, keys, values: nsa_jax.nsa_attention_separate_kv(
      q, keys, values, config=SMALL, gates=gates, implementation=impl)
  expected_fn = lambda q, keys, values: branches_apart(q, keys, values, gates, SMALL)
  assert_close(fn(q, keys, values), expected_fn(q, keys, values))
  # Gradients reach every set (the loss weights rows unevenly, so no gradient is trivially 0).
  weight = jax.random.normal(jax.random.key(1), q.shape)
  loss = lambda f: lambda *args: jnp.sum(f(*args) * weight)
  grads = jax.grad(loss(fn), (0, 1, 2))(q, keys, values)
  expected = jax.grad(loss(expected_fn), (0, 1, 2))(q, keys, values)
  assert_grads_close(jax.tree.leaves(grads), jax.tree.leaves(expected))


def decode_all(q, keys, values, gates, prompt_len, config, max_len, implementation="xla",
               interpret=False, compress_fn=None):
  """Prefill `prompt_len` tokens, then one step per token: the outputs `[B, T, Hq, Dv]`."""
  b, t, _, dk = q.shape
  caches = nsa_jax.init_separate_kv_cache(b, max_len, keys[0].shape[2], dk, values[0].shape[-1],
                                          config=config)
  p = prompt_len
  gates_at = lambda s: None if gates is None else gates[:, s]
  kwargs = dict(config=config, implementation=implementation, interpret=interpret,
                compress_fn=compress_fn)
  out, caches = nsa_jax.nsa_prefill_separate_kv(
      q[:, :p], [k[:, :p] for k in keys], [v[:, :p] for v in values], caches,
      gates=gates_at(slice(0, p)), **kwargs)
  # The caches donated, as a generation loop does (each leaf its own buffer).
  step = jax.jit(functools.partial(nsa_jax.nsa_decode_step_separate_kv, **kwargs),
                 donate_argnums=3)
  outs = [out]
  for s in range(p, t):
    out_t, caches = step(q[:, s], [k[:, s] for k in keys], [v[:, s] for v in values], caches,
                         gates=gates_at(s))
    outs.append(out_t[:, None])
  assert [int(c.length) for c in caches] == [t] * 3
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("prompt_len,with_gates", [(0, False), (1, True), (13, False),
                                                   (40, True)])
def test_prefill_then_steps_equal_the_full_forward(prompt_len, with_gates):
  q, keys, values = three_sets(2, 77, 4, 2, 16)
  gates = random_gates(q) if with_gates else None
  expected = nsa_jax.nsa_attention_separate_kv(q, keys, values, config=SMALL, gates=gates,
                                               implementation="reference")
  assert_close(decode_all(q, keys, values, gates, prompt_len, SMALL, max_len=83), expected)


@pytest.mark.parametrize("with_gates,batch,prompt_len,multi_block",
                         [(True, 2, 60, False), (False, 1, 0, False), (False, 1, 60, True)])
@pytest.mark.usefixtures("fresh_jit_caches")  # the jitted kernels read constants when traced
def test_gpu_decode_kernels_in_interpret_mode_equal_the_full_forward(monkeypatch, with_gates,
                                                                     batch, prompt_len,
                                                                     multi_block):
  # The four decode kernels, the sparse kernel's window programs reading set 2 (one block a
  # program, or walks of 2: selected programs of slots 0-1 / 2, window programs of tiles).
  if multi_block:
    monkeypatch.setattr(gpu_decode, "SPARSE_BLOCKS", 2)
    monkeypatch.setattr(gpu_decode, "SPARSE_MULTI_MIN_PAIRS", 1)
  q, keys, values = three_sets(batch, 70, 4, 2, 16)
  caches = nsa_jax.init_separate_kv_cache(batch, 70, 2, 16, config=SMALL)
  assert pallas_gpu.step_separate_kv_supported(q[:, 0], caches, SMALL)
  gates = random_gates(q) if with_gates else None
  expected = nsa_jax.nsa_attention_separate_kv(q, keys, values, config=SMALL, gates=gates,
                                               implementation="reference")
  out = decode_all(q, keys, values, gates, prompt_len, SMALL, max_len=70,
                   implementation="pallas_gpu", interpret=True)
  assert_close(out, expected)


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu"])
def test_a_learned_compress_fn_compresses_set_0(implementation):
  # A pooling that weights the block's tokens unevenly and mixes features (the NNX layer's
  # learned phi in spirit). pallas_gpu: the step appends in XLA, then attends with the decode
  # kernels (interpret mode).
  compress_fn = uneven_pooling(SMALL, 16)
  q, keys, values = three_sets(1, 60, 4, 2, 16)
  caches = nsa_jax.init_separate_kv_cache(1, 60, 2, 16, config=SMALL)
  assert pallas_gpu.kernels_take_separate_kv(q[:, 0], caches, SMALL)
  k_cmp, v_cmp = compress_fn(keys[0], values[0])
  expected = nsa_jax.nsa_attention_separate_kv(q, keys, values, config=SMALL, k_cmp=k_cmp,
                                               v_cmp=v_cmp, implementation="reference")
  assert_close(decode_all(q, keys, values, None, 9, SMALL, max_len=60,
                          implementation=implementation, interpret=implementation == "pallas_gpu",
                          compress_fn=compress_fn), expected)


def test_steps_with_dk_not_dv_and_mqa():
  config = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, num_selected=4, num_initial=2,
                     num_local=2, window=9)
  q, keys, values = three_sets(1, 70, 4, 1, 16, 8)
  expected = nsa_jax.nsa_attention_separate_kv(q, keys, values, config=config,
                                               implementation="reference")
  assert_close(decode_all(q, keys, values, None, 5, config, max_len=70), expected)


def test_bad_inputs_raise_value_errors():
  q, keys, values = three_sets(2, 20, 4, 2, 8)
  with pytest.raises(ValueError, match="keys and values must be three arrays each"):
    nsa_jax.nsa_attention_separate_kv(q, keys[:2], values, config=SMALL)
  with pytest.raises(ValueError, match="q, k and v must have the same sequence length"):
    nsa_jax.nsa_attention_separate_kv(q, [keys[0], keys[1][:, :5], keys[2]], values,
                                      config=SMALL)
  caches = nsa_jax.init_separate_kv_cache(2, 16, 2, 8, config=SMALL)
  with pytest.raises(ValueError, match="do not fit a cache of max_len 16"):
    nsa_jax.nsa_prefill_separate_kv(q, keys, values, caches, config=SMALL)
  with pytest.raises(ValueError, match="caches must be \\(DecodeCache, DenseCache, DenseCache\\)"):
    nsa_jax.nsa_prefill_separate_kv(q, keys, values, caches[:2], config=SMALL)
  step = lambda k_ts, v_ts: nsa_jax.nsa_decode_step_separate_kv(q[:, 0], k_ts, v_ts, caches,
                                                                config=SMALL)
  with pytest.raises(ValueError, match="k_ts and v_ts must be three tokens each"):
    step([k[:, 0] for k in keys[:2]], [v[:, 0] for v in values])
  with pytest.raises(ValueError, match="the window branch's k and v must match its cache"):
    step([k[:, 0] for k in keys[:2]] + [keys[2][:, 0, :1]],
         [v[:, 0] for v in values[:2]] + [values[2][:, 0, :1]])


@pytest.mark.gpu
@pytest.mark.parametrize("multi_block,given_compress_fn", [(False, False), (True, False),
                                                           (False, True)])
@pytest.mark.usefixtures("fresh_jit_caches")  # the jitted kernels read constants when traced
def test_gpu_decode_kernels_match_the_xla_decode_on_gpu(monkeypatch, multi_block,
                                                        given_compress_fn):
  # The paper's config at an 8k context, G = 16, bf16; multi_block: the sparse programs walk
  # SPARSE_BLOCKS blocks each (by default only from B * Hkv = 32; here 4); given_compress_fn:
  # mean pooling passed as a `compress_fn`, so the step appends in XLA and the kernels attend.
  if multi_block:
    monkeypatch.setattr(gpu_decode, "SPARSE_MULTI_MIN_PAIRS", 1)
  config = NSAConfig()
  b, hkv, prompt, steps = 2, 2, 8192 + 5, 40
  q, keys, values = three_sets(b, prompt + steps, 16 * hkv, hkv, 128, dtype=jnp.bfloat16)
  gates = random_gates(q)
  caches = nsa_jax.init_separate_kv_cache(b, prompt + steps, hkv, 128, config=config,
                                          dtype=jnp.bfloat16)
  _, caches = nsa_jax.nsa_prefill_separate_kv(q[:, :prompt], [k[:, :prompt] for k in keys],
                                              [v[:, :prompt] for v in values], caches,
                                              config=config, gates=gates[:, :prompt])
  assert pallas_gpu.step_separate_kv_supported(q[:, 0], caches, config)
  compress_fn = (functools.partial(nsa_jax.compress_kv, block=config.cmp_block,
                                   stride=config.cmp_stride) if given_compress_fn else None)
  steps_of = {impl: jax.jit(functools.partial(nsa_jax.nsa_decode_step_separate_kv,
                                              config=config, implementation=impl,
                                              compress_fn=compress_fn))
              for impl in ("pallas_gpu", "xla")}
  for t in range(prompt, prompt + steps):
    args = (q[:, t], [k[:, t] for k in keys], [v[:, t] for v in values], caches)
    out, next_caches = steps_of["pallas_gpu"](*args, gates=gates[:, t])
    expected, expected_caches = steps_of["xla"](*args, gates=gates[:, t])
    assert_close(out, expected, jnp.bfloat16)
    for got, want in zip(jax.tree.leaves(next_caches), jax.tree.leaves(expected_caches)):
      assert_close(got, want, jnp.bfloat16)  # every cache write, lengths included
    caches = next_caches

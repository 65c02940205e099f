"""Decoding: prefill + one-token steps reproduce `nsa_attention` on the whole sequence."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import NSAConfig
from nsa_jax import pallas_gpu
from nsa_jax.attention_math import masked_softmax
from nsa_jax.block_selection import decode_selection, num_cmp_visible
from nsa_jax.block_selection import slc_scores_from_cmp_probs
from nsa_jax.decode import _append, init_decode_cache, nsa_decode_step, nsa_prefill
from pallas_kernels.gpu import decode as gpu_decode
from pallas_kernels.tpu import decode as tpu_decode
from tests.helpers import assert_close, random_gates, random_qkv, uneven_pooling

# l=8, d=4, l'=16, n=3, w=20: every branch is exercised within ~80 tokens.
SMALL = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3, num_initial=1,
                  num_local=1, window=20)


def decode_all(q, k, v, gates, prompt_len, config, implementation="xla", interpret=False,
               max_len=None, compress_fn=None):
  """Prefill `prompt_len` tokens, then one step per token: the outputs `[B, T, Hq, Dv]`."""
  b, t, _, dk = q.shape
  cache = init_decode_cache(b, max_len or t, k.shape[2], dk, v.shape[-1], config=config,
                            dtype=k.dtype)
  kwargs = dict(config=config, compress_fn=compress_fn, implementation=implementation,
                interpret=interpret)
  p = prompt_len
  out, cache = nsa_prefill(q[:, :p], k[:, :p], v[:, :p], cache,
                           gates=None if gates is None else gates[:, :p], **kwargs)
  step = jax.jit(functools.partial(nsa_decode_step, **kwargs))
  outs = [out]
  for t_ in range(p, t):
    out_t, cache = step(q[:, t_], k[:, t_], v[:, t_], cache,
                        gates=None if gates is None else gates[:, t_])
    outs.append(out_t[:, None])
  assert int(cache.length) == t
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("prompt_len", [0, 1, 13, 40, 77])
@pytest.mark.parametrize("with_gates", [False, True])
def test_prefill_then_steps_equal_the_full_forward(prompt_len, with_gates):
  q, k, v = random_qkv(2, 77, 4, 2, 16)
  gates = random_gates(q) if with_gates else None
  expected = nsa_jax.nsa_attention(q, k, v, config=SMALL, gates=gates, implementation="reference")
  assert_close(decode_all(q, k, v, gates, prompt_len, SMALL, max_len=83), expected)


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu", "pallas_tpu"])
def test_prompts_of_different_lengths_each_decode_as_alone(implementation):
  """`nsa_prefill(lengths=...)`: right-padded prompts of 5, 33, 0 and 17 tokens, then steps;
  each row equals `nsa_attention` on its own sequence at every position, its padding (noise)
  never attended. The kernels run per row under vmap (interpret mode)."""
  _check_ragged_prompts([5, 33, 0, 17], 12, 4, 2, 16, SMALL, jnp.float32, implementation,
                        interpret=implementation != "xla", reference="reference")
  q, k, v = random_qkv(4, 33, 4, 2, 16)
  cache = init_decode_cache(4, 45, 2, 16, config=SMALL)
  with pytest.raises(ValueError, match=r"lengths must be integers of shape \[B\] = \[4\]"):
    nsa_prefill(q, k, v, cache, config=SMALL, lengths=jnp.asarray([1.0, 2.0, 3.0, 4.0]))


@pytest.mark.gpu
def test_gpu_prompts_of_different_lengths_each_decode_as_alone_on_gpu():
  # The real kernels, vmapped per row, at the paper config: prompts across block boundaries.
  _check_ragged_prompts([1000, 4100, 0, 2049], 8, 32, 2, 128, NSAConfig(), jnp.bfloat16,
                        "pallas_gpu", interpret=False, reference="xla")


def _check_ragged_prompts(lengths, steps, hq, hkv, dim, config, dtype, implementation, interpret,
                          reference):
  b, prompt_len = len(lengths), max(lengths)
  q, k, v = random_qkv(b, prompt_len + steps, hq, hkv, dim, dtype=dtype)
  gates = random_gates(q)
  noise = random_qkv(b, prompt_len, hq, hkv, dim, dtype=dtype)
  # Row b's sequence is its first lengths[b] + steps tokens: the prompt, then the steps' tokens.
  padded = [jnp.stack([jnp.concatenate([x[i, :n], pad[i, n:]]) for i, n in enumerate(lengths)])
            for x, pad in zip((q, k, v), noise)]
  padded_gates = jnp.stack([jnp.concatenate([gates[i, :n], gates[i, n:prompt_len] * 0 + 0.5])
                            for i, n in enumerate(lengths)])
  kwargs = dict(config=config, implementation=implementation, interpret=interpret)
  cache = init_decode_cache(b, prompt_len + steps, hkv, dim, config=config, dtype=dtype)
  out, cache = nsa_prefill(*padded, cache, gates=padded_gates, lengths=jnp.asarray(lengths),
                           **kwargs)
  np.testing.assert_array_equal(cache.length, lengths)
  step = jax.jit(functools.partial(nsa_decode_step, **kwargs))
  rows = jnp.arange(b)
  step_outs = []
  for i in range(steps):
    at = jnp.asarray(lengths) + i  # each row's own next token
    out_t, cache = step(q[rows, at], k[rows, at], v[rows, at], cache, gates=gates[rows, at])
    step_outs.append(out_t)
  for i, n in enumerate(lengths):
    alone = nsa_jax.nsa_attention(q[i:i + 1, :n + steps], k[i:i + 1, :n + steps],
                                  v[i:i + 1, :n + steps], config=config,
                                  gates=gates[i:i + 1, :n + steps], implementation=reference)
    assert_close(out[i, :n], alone[0, :n], dtype)
    np.testing.assert_array_equal(out[i, n:], 0)
    assert_close(jnp.stack([o[i] for o in step_outs]), alone[0, n:], dtype)


def test_steps_with_dk_not_dv_and_mqa_and_paper_like_forcing():
  config = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, num_selected=4, num_initial=2,
                     num_local=2, window=9)
  q, k, v = random_qkv(1, 70, 4, 1, 16, 8)
  expected = nsa_jax.nsa_attention(q, k, v, config=config, implementation="reference")
  assert_close(decode_all(q, k, v, None, 5, config), expected)


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu"])
def test_a_learned_compress_fn_is_applied_to_each_new_block(implementation):
  # A pooling that weights the block's tokens unevenly and mixes features: block i must be made
  # from exactly tokens [i*d, i*d + l), once, when its last token arrives. pallas_gpu: the step
  # appends in XLA, then attends with the decode kernels (interpret mode).
  compress_fn = uneven_pooling(SMALL, 16)
  q, k, v = random_qkv(1, 60, 4, 2, 16)
  k_cmp, v_cmp = compress_fn(k, v)
  expected = nsa_jax.nsa_attention(q, k, v, config=SMALL, k_cmp=k_cmp, v_cmp=v_cmp,
                                   implementation="reference")
  assert_close(decode_all(q, k, v, None, 9, SMALL, compress_fn=compress_fn,
                          implementation=implementation,
                          interpret=implementation == "pallas_gpu"), expected)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_decode_matches_the_forward_on_the_same_inputs(dtype):
  q, k, v = random_qkv(2, 50, 4, 2, 16, dtype=dtype)
  expected = nsa_jax.nsa_attention(q, k, v, config=SMALL, implementation="reference")
  out = decode_all(q, k, v, None, 10, SMALL)
  assert out.dtype == dtype
  assert_close(out, expected, dtype)


def test_cache_shorter_than_a_compressed_block():
  q, k, v = random_qkv(1, 6, 2, 1, 8)
  expected = nsa_jax.nsa_attention(q, k, v, config=SMALL, implementation="reference")
  assert_close(decode_all(q, k, v, None, 2, SMALL), expected)


def test_decode_step_is_one_jitted_program_over_a_scan():
  q, k, v = random_qkv(1, 40, 4, 2, 16)
  cache = init_decode_cache(1, 40, 2, 16, config=SMALL)
  _, cache = nsa_prefill(q[:, :8], k[:, :8], v[:, :8], cache, config=SMALL)

  @jax.jit
  def run(cache, xs):
    def body(cache, x):
      out, cache = nsa_decode_step(*x, cache, config=SMALL, implementation="xla")
      return cache, out
    return jax.lax.scan(body, cache, xs)

  xs = tuple(jnp.moveaxis(x[:, 8:], 1, 0) for x in (q, k, v))
  cache, outs = run(cache, xs)
  expected = nsa_jax.nsa_attention(q, k, v, config=SMALL, implementation="reference")
  assert_close(jnp.moveaxis(outs, 0, 1), expected[:, 8:])
  assert int(cache.length) == 40


def test_bad_decode_inputs_raise_value_errors():
  cache = init_decode_cache(2, 16, 2, 8, config=SMALL)
  q, k, v = random_qkv(2, 20, 4, 2, 8)
  with pytest.raises(ValueError, match="do not fit a cache of max_len 16"):
    nsa_prefill(q, k, v, cache, config=SMALL)
  with pytest.raises(ValueError, match="must match the cache"):
    nsa_decode_step(q[:, 0], k[:, 0, :1], v[:, 0, :1], cache, config=SMALL)
  with pytest.raises(ValueError, match="q_t must have rank 3"):
    nsa_decode_step(q[:, :1], k[:, 0], v[:, 0], cache, config=SMALL)
  with pytest.raises(ValueError, match=r"gates must have shape \[B, Hq, 3\]"):
    nsa_decode_step(q[:, 0], k[:, 0], v[:, 0], cache, config=SMALL, gates=jnp.ones((2, 4, 2)))
  with pytest.raises(ValueError, match="cache must be a DecodeCache"):
    nsa_decode_step(q[:, 0], k[:, 0], v[:, 0], {"k": k}, config=SMALL)
  with pytest.raises(ValueError, match="max_len must be a positive int"):
    init_decode_cache(2, 0, 2, 8, config=SMALL)


@pytest.mark.parametrize("with_gates,batch,prompt_len", [(False, 1, 60), (True, 2, 60),
                                                          (False, 1, 0)])
def test_gpu_decode_kernels_in_interpret_mode_equal_the_full_forward(with_gates, batch,
                                                                     prompt_len):
  # G = 2 (padded to 16 rows), several compressed splits' worth of masking, window tiles that
  # straddle the selection blocks, the last steps past the first 128-block boundary of k_cmp;
  # from an empty cache, the first steps see no compressed block at all.
  q, k, v = random_qkv(batch, 70, 4, 2, 16)
  gates = random_gates(q) if with_gates else None
  expected = nsa_jax.nsa_attention(q, k, v, config=SMALL, gates=gates, implementation="reference")
  out = decode_all(q, k, v, gates, prompt_len, SMALL, implementation="pallas_gpu",
                   interpret=True)
  assert_close(out, expected)


def test_decode_kernels_decline_compressed_blocks_reaching_two_selection_blocks_back():
  # The selection scores are formed from per-block sums of each block's own keys, which holds
  # while a compressed block reaches at most one selection block back (l <= l' + d); a key tile
  # (CMP_TILE keys) must also own whole selection blocks. Other configs take the XLA decode.
  tile = gpu_decode.CMP_TILE
  assert gpu_decode.supported(128, 128, 64, 1024, 128, 32, 16)
  assert gpu_decode.supported(128, 128, 64, 1024, 128, 64 + 16, 16)
  assert not gpu_decode.supported(128, 128, 64, 1024, 128, 64 + 32, 16)
  assert gpu_decode.supported(128, 128, tile * 2, 4096, 128, 4, 2)
  assert not gpu_decode.supported(128, 128, tile * 4, 4096, 128, 4, 2)
  # The TPU kernels form the scores the same way, over steps of 512 keys.
  assert tpu_decode.supported(64, 1024, 128, 64 + 16, 16)
  assert not tpu_decode.supported(64, 1024, 128, 64 + 32, 16)
  assert not tpu_decode.supported(48, 1536, 128, 32, 16)  # l' / d = 3: not a power of two


@pytest.mark.parametrize("sparse_blocks", [1, 3])
@pytest.mark.usefixtures("fresh_jit_caches")  # the jitted kernels read constants when traced
def test_gpu_decode_kernels_with_one_sub_block_per_selection_block_and_dk_not_dv(
    monkeypatch, sparse_blocks):
  # l' = d (each selection block scores one sub-block), l = 2d (two compressed blocks overlap
  # each sub-block), G = 3, Dk = 32, Dv = 16: the other corner of the score map and the combine.
  # SPARSE_BLOCKS = 3: the sparse programs walk 3 blocks (n = 4 selected: 3 + 1; 3 window tiles),
  # here at B * Hkv = 4 pairs (by default only from 32).
  monkeypatch.setattr(gpu_decode, "SPARSE_BLOCKS", sparse_blocks)
  monkeypatch.setattr(gpu_decode, "SPARSE_MULTI_MIN_PAIRS", 1)
  config = NSAConfig(cmp_block=32, cmp_stride=16, slc_block=16, num_selected=4, num_initial=1,
                     num_local=1, window=32)
  assert gpu_decode.sparse_programs(2, 2, 4, 32, 16) == {1: (4, 7), 3: (2, 3)}[sparse_blocks]
  q, k, v = random_qkv(2, 120, 6, 2, 32, 16)
  gates = random_gates(q)
  expected = nsa_jax.nsa_attention(q, k, v, config=config, gates=gates,
                                   implementation="reference")
  out = decode_all(q, k, v, gates, 50, config, implementation="pallas_gpu", interpret=True)
  assert_close(out, expected)


@pytest.mark.parametrize("with_gates,batch", [(False, 1), (True, 2)])
def test_tpu_decode_kernels_under_the_interpreter_equal_the_full_forward(with_gates, batch,
                                                                         no_races):
  q, k, v = random_qkv(batch, 70, 4, 2, 16)  # B = 2: the prefetched block table is per (b, h)
  gates = random_gates(q) if with_gates else None
  expected = nsa_jax.nsa_attention(q, k, v, config=SMALL, gates=gates, implementation="reference")
  out = decode_all(q, k, v, gates, 60, SMALL, implementation="pallas_tpu", interpret=True)
  assert_close(out, expected)


# Sc = 256: two 128-key splits, one grid step (its other splits clamped and masked); Sc = 1280:
# ten splits over three steps, the last one part past the cache. (l, d, l') as in the GPU kernel
# test below: the paper's shape, l = d, and l = l' + d (tail weights 1..4).
@pytest.mark.parametrize("blocks", [(8, 4, 16), (4, 4, 16), (20, 4, 16)])
@pytest.mark.parametrize("num_cmp,count", [(256, 0), (256, 1), (256, 77), (256, 200),
                                           (1280, 600), (1280, 1280)])
def test_tpu_compressed_decode_kernel_gives_the_branch_output_and_selection_scores(
    num_cmp, count, blocks, no_races):
  cmp_block, cmp_stride, slc_block = blocks
  config = dataclasses.replace(SMALL, cmp_block=cmp_block, cmp_stride=cmp_stride,
                               slc_block=slc_block)
  per_cmp, per_slc = cmp_block // cmp_stride, slc_block // cmp_stride
  num_slc = -(-(num_cmp + per_cmp - 1) // per_slc)  # every block a compressed block reaches
  q_t, k_cmp, v_cmp = random_qkv(2, num_cmp, 3, 1, 16)  # G = 3 -> 8 rows
  q_t = q_t[:, 0]  # [B, Hq, Dk]
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  out, head_scores = tpu_decode.compressed_decode(
      tpu_decode.group_rows(q_t, 1), heads_first(k_cmp), heads_first(v_cmp),
      jnp.int32(count), scale=0.25, cmp_block=cmp_block, cmp_stride=cmp_stride,
      slc_block=slc_block, num_slc=num_slc, interpret=True)
  scores = jnp.einsum("bhd,bsd->bhs", q_t, k_cmp[:, :, 0]) * 0.25
  visible = jnp.arange(num_cmp) < count
  expected_probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
  expected_probs = jnp.where(visible, expected_probs, 0.0)  # NaN-free if count=0
  assert head_scores.shape == (2, 1, tpu_decode.group_rows(q_t, 1).shape[2], num_slc)
  assert_close(head_scores[:, 0, :3], slc_scores_from_cmp_probs(expected_probs, config, num_slc))
  assert_close(out[:, 0, :3], expected_probs @ v_cmp[:, :, 0])


# (l, d, l'): l/d = 2 compressed blocks per sub-block, 4 sub-blocks per selection block (the
# paper's shape: a block's last key also scores the next block); l = d (each compressed block
# scores one selection block); l = l' + d, the most the kernels take (tail weights 1..4); l' = d
# (64 selection blocks a key tile: one key tile per selection-score program).
@pytest.mark.parametrize("blocks", [(8, 4, 16), (4, 4, 16), (20, 4, 16), (8, 4, 4)])
@pytest.mark.parametrize("split", [128, 256])
@pytest.mark.parametrize("position", [6, 40, 517, 1023])
def test_gpu_compressed_partials_and_select_kernels_pick_the_xla_decode_blocks(position, split,
                                                                             blocks):
  # S = 1024 tokens, Sc = 256 compressed slots; G = 3 heads padded to 16 rows; one or two
  # splits. Position 6 sees no compressed block (only the forced blocks are picked).
  cmp_block, cmp_stride, slc_block = blocks
  config = dataclasses.replace(SMALL, cmp_block=cmp_block, cmp_stride=cmp_stride,
                               slc_block=slc_block)
  hkv, group = 2, 3
  q_t, k_cmp, v_cmp = random_qkv(2, 256, hkv * group, hkv, 16)
  q_t, k_cmp, v_cmp = q_t[:, 0], k_cmp.transpose(0, 2, 1, 3), v_cmp.transpose(0, 2, 1, 3)
  num_slc, scale = 1024 // config.slc_block, 0.25
  count = num_cmp_visible(jnp.int32(position), config)
  kwargs = dict(cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
                slc_block=config.slc_block, num_slc=num_slc, interpret=True)
  score_parts, acc, row_max, row_sum = gpu_decode.compressed_partials(
      gpu_decode.group_rows(q_t, hkv), k_cmp, v_cmp, jnp.int32(position), scale=scale,
      split=split, **kwargs)
  stats = (score_parts, row_max, row_sum, jnp.int32(position))
  scores = gpu_decode.selection_scores(*stats, group=group, num_partials=256 // split, **kwargs)
  picks = gpu_decode.select(*stats, group=group, num_partials=256 // split,
                            num_selected=config.num_selected, num_initial=config.num_initial,
                            num_local=config.num_local, **kwargs)

  q = q_t.reshape(2, hkv, group, 16)
  visible = jnp.arange(256) < count
  logits = jnp.einsum("bhgd,bhsd->bhgs", q, k_cmp) * scale
  probs, _ = masked_softmax(logits, visible)
  expected_scores = slc_scores_from_cmp_probs(probs.sum(2), config, num_slc)
  assert_close(scores[..., :num_slc], expected_scores)
  expected = decode_selection(probs.sum(2), jnp.int32(position), config, num_slc)
  got = jnp.sort(jnp.where(picks[..., :config.num_selected] >= 0,
                           picks[..., :config.num_selected], 10**6), axis=-1)
  np.testing.assert_array_equal(got, jnp.where(expected >= 0, expected, 10**6))
  # The branch output of the merged partials.
  merged = (acc * jnp.exp2(row_max - row_max.max(2, keepdims=True))[..., None]).sum(2)
  total = (row_sum * jnp.exp2(row_max - row_max.max(2, keepdims=True))).sum(2)
  if position >= config.cmp_block - 1:
    assert_close((merged / total[..., None])[:, :, :group],
                 jnp.einsum("bhgs,bhsd->bhgd", probs, v_cmp))


@pytest.mark.parametrize("sparse_blocks", [1, 3])
@pytest.mark.parametrize("position", [20, 47, 300])
@pytest.mark.usefixtures("fresh_jit_caches")  # the jitted kernels read constants when traced
def test_gpu_sparse_kernel_picking_from_scores_equals_it_given_the_top_n_kernels_picks(
    monkeypatch, position, sparse_blocks):
  # The decode step hands the sparse kernel the selection scores and its programs pick the blocks
  # (top_n.pick_top_n); the top-n kernel, tested against the selection rule with ties, picks from
  # the same scores. Scores with ties (multiples of 1/4); n = 5 of 1 initial + 2 local forced
  # blocks; position 20 has fewer candidates than n (the last picks are -1), 300 a window of 3
  # tiles apart from most picks. One block a program, or 3 (picks 0-2 and 3-4 in two programs).
  monkeypatch.setattr(gpu_decode, "SPARSE_BLOCKS", sparse_blocks)
  monkeypatch.setattr(gpu_decode, "SPARSE_MULTI_MIN_PAIRS", 1)
  block, window, num_selected, num_slc = 16, 40, 5, 32
  top_n = gpu_decode.TopN(num_slc=num_slc, num_initial=1, num_local=2)
  b, hkv = 2, 2
  q_t, k, v = random_qkv(b, num_slc * block, hkv * 3, hkv, 16)
  q_rows = gpu_decode.group_rows(q_t[:, 0], hkv)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  scores = jnp.floor(jax.random.uniform(jax.random.key(position), (b, hkv, num_slc)) * 8) / 4
  picks = gpu_decode.top_n_kernel.top_n_blocks_decode(
      scores, jnp.int32(position), num_selected=num_selected, slc_block=block, num_slc=num_slc,
      num_initial=1, num_local=2, interpret=True)
  kwargs = dict(block=block, window=window, num_selected=num_selected, scale=0.25,
                interpret=True)
  expected = gpu_decode.sparse_partials(q_rows, k, v, picks, jnp.int32(position), **kwargs)
  got = gpu_decode.sparse_partials(q_rows, k, v, scores, jnp.int32(position), top_n=top_n,
                                   **kwargs)
  written = gpu_decode.sparse_programs(b, hkv, num_selected, window, block)[1]
  for got_part, expected_part in zip(got, expected):
    np.testing.assert_array_equal(got_part[:, :, :written], expected_part[:, :, :written])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("in_step", [False, True])
def test_gpu_append_kernels_equal_the_xla_append(dtype, in_step):
  # Steps across several compressed-block boundaries (l = 8, d = 4) from an empty cache: the
  # append kernel alone; or the decode step's compressed kernel appending (its split 0 writes the
  # token, the split holding the new block makes it: 4 splits of 128 slots at max_len 2000),
  # after a prefill of 500 tokens, so that the blocks go to slots 124-132 of splits 0 and 1.
  config, steps, start = SMALL, 37, 500 if in_step else 0
  q, k, v = random_qkv(2, start + steps, 2, 2, 16, 32, dtype=dtype)
  expected = init_decode_cache(2, 2000 if in_step else 40, 2, 16, 32, config=config,
                               dtype=dtype)
  if in_step:
    assert pallas_gpu.step_supported(q[:, 0], expected, config)
    assert gpu_decode.compressed_layout(2, 2, expected.k_cmp.shape[2]) == (128, 4)
    _, expected = nsa_prefill(q[:, :start], k[:, :start], v[:, :start], expected, config=config)
  got = expected
  compress = functools.partial(nsa_jax.compress_kv, block=config.cmp_block,
                               stride=config.cmp_stride)
  for t in range(start, start + steps):
    if in_step:  # and the step's output, which attends the block it made
      expected_out, expected = nsa_decode_step(q[:, t], k[:, t], v[:, t], expected,
                                               config=config, implementation="xla")
      out, got = pallas_gpu.decode_step(q[:, t], k[:, t], v[:, t], got, None, 16 ** -0.5,
                                        config=config, interpret=True)
      assert_close(out, expected_out, dtype)
    else:
      expected = _append(expected, k[:, t], v[:, t], config, compress)
      got = pallas_gpu.decode_append(got, k[:, t], v[:, t], config=config, interpret=True)
  assert int(got.length) == start + steps
  for name in ("k", "v", "k_cmp", "v_cmp"):
    assert_close(getattr(got, name), getattr(expected, name), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("group,prompt,multi_block", [
    (1, 8192 + 5, False), (16, 8192 + 5, False), (64, 8192 + 5, False), (16, 8192 + 5, True),
    (16, 65536 + 5, False)])
@pytest.mark.usefixtures("fresh_jit_caches")  # the jitted kernels read constants when traced
def test_gpu_decode_kernels_match_the_xla_decode_on_gpu(monkeypatch, group, prompt, multi_block):
  # 8k: every group size; 64k: the benchmark's context (2048-wide selection rows, 33 compressed
  # splits at B=2). Each step's cache writes are compared too. multi_block: the sparse programs
  # walk SPARSE_BLOCKS blocks each (by default only from B * Hkv = 32; here 4).
  if multi_block:
    monkeypatch.setattr(gpu_decode, "SPARSE_MULTI_MIN_PAIRS", 1)
  _check_gpu_decode_against_xla(group, prompt)


def _check_gpu_decode_against_xla(group, prompt):
  config = NSAConfig()
  b, hkv, steps = 2, 2, 40
  q, k, v = random_qkv(b, prompt + steps, hkv * group, hkv, 128, dtype=jnp.bfloat16)
  gates = random_gates(q)
  cache = init_decode_cache(b, prompt + steps, hkv, 128, config=config, dtype=jnp.bfloat16)
  _, cache = nsa_prefill(q[:, :prompt], k[:, :prompt], v[:, :prompt], cache, config=config,
                         gates=gates[:, :prompt])
  steps_of = {impl: jax.jit(functools.partial(nsa_decode_step, config=config, implementation=impl))
              for impl in ("pallas_gpu", "xla")}
  for t in range(prompt, prompt + steps):
    args = (q[:, t], k[:, t], v[:, t], cache)
    out, next_cache = steps_of["pallas_gpu"](*args, gates=gates[:, t])
    expected, expected_cache = steps_of["xla"](*args, gates=gates[:, t])
    assert_close(out, expected, jnp.bfloat16)
    for name in ("k", "v", "k_cmp", "v_cmp"):  # the append kernel's writes
      assert_close(getattr(next_cache, name), getattr(expected_cache, name), jnp.bfloat16)
    cache = next_cache

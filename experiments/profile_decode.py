"""Where a GPU decode step's time goes: each part timed alone in a jitted loop at one context.

    python -m experiments.profile_decode [--context 65536] [--batches 1,8]

Parts: the full `nsa_decode_step` (pallas_gpu), the attention alone, the cache append with
incremental compression alone, the compressed split kernel with its merge, the XLA `lax.top_k`
selection (for comparison with the top-n kernel the step uses), and the selected + window split
kernel. Prints microseconds per step and how many kernel-launching ops (fusions, custom calls,
in-place updates, copies) the compiled loop holds.
"""

from __future__ import annotations

import argparse
import functools
import re

import jax
import jax.numpy as jnp

import nsa_jax
from experiments.bench_decode import CONFIG, D, HKV, HQ, filled_nsa_cache, random_inputs
from experiments.bench_decode import time_steps
from nsa_jax import pallas_gpu
from nsa_jax.block_selection import decode_selection, num_cmp_visible
from nsa_jax.decode import _append, nsa_decode_step
from pallas_kernels.gpu import decode as decode_kernel


def launches(step, state, inputs):
  loop = jax.jit(lambda s: jax.lax.fori_loop(0, 2, lambda _, x: step(x, *inputs), s))
  text = loop.lower(state).compile().as_text()
  pattern = r"= .*(fusion|custom-call|dynamic-update-slice|copy)\("
  return sum(1 for line in text.splitlines() if re.search(pattern, line))


def parts(batch):
  """name -> `step(state, q, k, v)` with `state = (cache, total)`."""
  scale = D ** -0.5
  compress = functools.partial(nsa_jax.compress_kv, block=CONFIG.cmp_block,
                               stride=CONFIG.cmp_stride)
  fixed_blocks = jnp.tile(jnp.arange(16, dtype=jnp.int32) * 60, (batch, HKV, 1))

  def full(state, q, k, v):
    cache, total = state
    out, cache = nsa_decode_step(q, k, v, cache, config=CONFIG, implementation="pallas_gpu")
    return cache, total + out.astype(jnp.float32)

  def attention(state, q, k, v):
    cache, total = state
    out = pallas_gpu.decode_attention(q, cache, cache.length, None, scale, config=CONFIG)
    return cache, total + out.astype(jnp.float32)

  def append(state, q, k, v):
    cache, total = state
    return _append(cache, k, v, CONFIG, compress), total

  def compressed(state, q, k, v):
    cache, total = state
    out, probs = decode_kernel.compressed_decode(
        decode_kernel.group_rows(q, HKV), cache.k_cmp, cache.v_cmp,
        num_cmp_visible(cache.length, CONFIG), scale=scale)
    total = total + out[:, :, 0, :].sum() + probs[:, :, :, 0].sum()
    return cache, total

  def xla_top_k(state, q, k, v):
    cache, total = state
    p_grp = cache.k_cmp[:, :, :CONFIG.num_cmp_blocks(cache.max_len), 0].astype(jnp.float32)
    idx = decode_selection(p_grp + total[0, 0, 0], cache.length, CONFIG,
                           cache.k.shape[2] // CONFIG.slc_block)
    return cache, total + idx.sum()

  def sparse(state, q, k, v):
    cache, total = state
    o_slc, o_swa = decode_kernel.sparse_decode(
        decode_kernel.group_rows(q, HKV), cache.k, cache.v, fixed_blocks, cache.length,
        block=CONFIG.slc_block, window=CONFIG.window, scale=scale)
    return cache, total + o_slc[:, :, 0].sum() + o_swa[:, :, 0].sum()

  return {"full step": full, "attention only": attention, "append only": append,
          "compressed kernel": compressed, "selection (XLA top_k)": xla_top_k,
          "selected+window kernel": sparse}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--context", type=int, default=65536)
  parser.add_argument("--batches", default="1,8")
  args = parser.parse_args()
  rows = []
  key = jax.random.key(0)
  for batch in map(int, args.batches.split(",")):
    inputs = random_inputs(batch, key)
    for name, step in parts(batch).items():
      state = lambda: (filled_nsa_cache(batch, args.context, key),
                       jnp.zeros((batch, HQ, D), jnp.float32))
      count = launches(step, state(), inputs)
      us = 1e6 * time_steps(step, state(), inputs, steps=64, repeats=5)
      rows.append((batch, name, us, count))
      print(f"B={batch} {name}: {us:.1f} us, {count} ops", flush=True)
  print(f"\n{jax.devices()[0].device_kind}, context {args.context}")
  print(f"{'B':>2} {'part':>24} {'us/step':>8} {'ops':>4}")
  for batch, name, us, count in rows:
    print(f"{batch:>2} {name:>24} {us:>8.1f} {count:>4}")


if __name__ == "__main__":
  main()

"""Where a GPU decode step's time goes, at one context.

    python -m experiments.probes.profile_decode [--context 65536] [--batches 1,8]
    python -m experiments.probes.profile_decode --trace [--variants SETTINGS ...]
    python -m experiments.probes.profile_decode --variants TARGET_PROGRAMS=256 TARGET_PROGRAMS=512

Default: each part timed alone in a jitted loop: a loop floor (a step with no attention), the
full `nsa_decode_step` (pallas_gpu), the attention alone, the cache append (the kernel, and the
XLA append it replaces), then the attention's kernels cumulatively: the compressed partials,
+ the selection, the sparse partials alone, and all of them + the combine (with fixed selected
blocks). Prints microseconds per step and how many kernel-launching ops (fusions, custom calls,
in-place updates, copies) the compiled loop holds. Parts can overlap on the GPU, so they do not
add up.

`--trace`: each GPU kernel's time per full step, from a `jax.profiler` trace (the direct view;
BENCHMARKS.md's table). `--variants`: the same (with `--trace`) or the full step and compressed
kernel timings, once per setting of `pallas_kernels.gpu.decode`'s constants (`NAME=VALUE,...`;
`top_n.NAME` for the top-n module's).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp

import nsa_jax
from experiments.bench_decode import CONFIG, D, HKV, HQ, filled_nsa_cache, random_inputs
from experiments.bench_decode import time_steps
from experiments.probes import gpu_trace
from nsa_jax import pallas_gpu
from nsa_jax.decode import _append, nsa_decode_step
from pallas_kernels.gpu import decode as decode_kernel
from pallas_kernels.gpu import top_n as top_n_kernel


def launches(step, state, inputs):
  loop = jax.jit(lambda s: jax.lax.fori_loop(0, 2, lambda _, x: step(x, *inputs), s))
  text = loop.lower(state).compile().as_text()
  pattern = r"= .*(fusion|custom-call|dynamic-update-slice|copy)\("
  ops = [line for line in text.splitlines() if re.search(pattern, line)]
  copies = sum(1 for line in ops if re.search(r"= .*copy\(", line))
  return len(ops), copies


def parts(batch):
  """name -> `step(state, q, k, v)` with `state = (cache, total)`; each kernel alone on the
  cache's current position (`total` keeps outputs live)."""
  scale = D ** -0.5
  compress = functools.partial(nsa_jax.compress_kv, block=CONFIG.cmp_block,
                               stride=CONFIG.cmp_stride)
  fixed_blocks = jnp.tile(jnp.arange(16, dtype=jnp.int32) * 60, (batch, HKV, 1))

  def sizes(cache):
    """`(num_slc, split, partials)` as the decode step has them."""
    num_slc = cache.k.shape[2] // CONFIG.slc_block
    return (num_slc,) + decode_kernel.compressed_layout(batch, HKV, cache.k_cmp.shape[2])

  def cmp_partials(cache, q):
    num_slc, split, _ = sizes(cache)
    return decode_kernel.compressed_partials(
        decode_kernel.group_rows(q, HKV), cache.k_cmp, cache.v_cmp, cache.length,
        cmp_block=CONFIG.cmp_block, cmp_stride=CONFIG.cmp_stride, slc_block=CONFIG.slc_block,
        num_slc=num_slc, scale=scale, split=split)

  def sparse_partials(cache, q):
    return decode_kernel.sparse_partials(
        decode_kernel.group_rows(q, HKV), cache.k, cache.v, fixed_blocks, cache.length,
        block=CONFIG.slc_block, window=CONFIG.window, num_selected=CONFIG.num_selected,
        scale=scale)

  def full(state, q, k, v):
    cache, total = state
    out, cache = nsa_decode_step(q, k, v, cache, config=CONFIG, implementation="pallas_gpu")
    return cache, total + out.astype(jnp.float32)

  def attention(state, q, k, v):
    cache, total = state
    out = pallas_gpu.decode_attention(q, cache, cache.length, None, scale, config=CONFIG)
    return cache, total + out.astype(jnp.float32)

  def append_kernel(state, q, k, v):
    cache, total = state
    cache = pallas_gpu.decode_append(cache, k, v, config=CONFIG)
    return dataclasses.replace(cache, length=cache.length - 1), total  # stay at one position

  def append_xla(state, q, k, v):
    cache, total = state
    cache = _append(cache, k, v, CONFIG, compress)
    return dataclasses.replace(cache, length=cache.length - 1), total

  def compressed(state, q, k, v):
    cache, total = state
    score_parts, acc, _, _ = cmp_partials(cache, q)
    return cache, total + acc[:, :, 0, :16].sum() + score_parts[0][:, :, :, 0].sum()

  def select(state, q, k, v):
    cache, total = state
    num_slc, _, num_partials = sizes(cache)
    score_parts, _, row_max, row_sum = cmp_partials(cache, q)
    picks = decode_kernel.select(
        score_parts, row_max, row_sum, cache.length, group=HQ // HKV,
        num_partials=num_partials, cmp_block=CONFIG.cmp_block,
        cmp_stride=CONFIG.cmp_stride, slc_block=CONFIG.slc_block,
        num_selected=CONFIG.num_selected, num_slc=num_slc, num_initial=CONFIG.num_initial,
        num_local=CONFIG.num_local)
    return cache, total + picks.sum()

  def sparse(state, q, k, v):
    cache, total = state
    acc, _, _ = sparse_partials(cache, q)
    return cache, total + acc[:, :, 0, :16].sum()

  def sparse_and_combine(state, q, k, v):
    cache, total = state
    _, _, num_partials = sizes(cache)
    selected_partials, all_partials = decode_kernel.sparse_programs(
        q.shape[0], HKV, CONFIG.num_selected, CONFIG.window, CONFIG.slc_block)
    out = decode_kernel.combine(
        cmp_partials(cache, q)[1:], sparse_partials(cache, q), None,
        num_cmp_partials=num_partials, num_selected=selected_partials, num_sparse=all_partials,
        out_dtype=q.dtype)
    return cache, total + out[:, :, :1].astype(jnp.float32).sum()

  def loop_floor(state, q, k, v):  # what the timing loop costs with no attention in it
    cache, total = state
    return cache, total + q.astype(jnp.float32)

  return {"loop floor": loop_floor, "full step": full, "attention only": attention,
          "append kernel": append_kernel, "append (XLA)": append_xla,
          "compressed kernel": compressed, "compressed + select": select,
          "sparse kernel": sparse, "cmp + sparse + combine": sparse_and_combine}


def apply_variant(variant):
  """Sets `NAME=VALUE,...` constants of `pallas_kernels.gpu.decode` (`top_n.NAME` for the top-n
  module); returns a function restoring the previous values."""
  modules = {"decode": decode_kernel, "top_n": top_n_kernel}
  previous = []
  for item in filter(None, variant.split(",")):
    name, value = item.split("=")
    module_name, _, attr = name.rpartition(".")
    module = modules[module_name or "decode"]
    old = getattr(module, attr)
    previous.append((module, attr, old))
    setattr(module, attr, type(old)(value))
  jax.clear_caches()  # the jitted decode was traced with the old values

  def restore():
    for module, attr, old in previous:
      setattr(module, attr, old)
    jax.clear_caches()
  return restore


def sweep(args):
  """Full step and compressed kernel per variant of the decode kernels' module constants."""
  key = jax.random.key(0)
  for variant in args.variants:
    restore = apply_variant(variant)
    for batch in map(int, args.batches.split(",")):
      inputs = random_inputs(batch, key)
      for name in ("full step", "compressed kernel"):
        state = (filled_nsa_cache(batch, args.context, key),
                 jnp.zeros((batch, HQ, D), jnp.float32))
        us = 1e6 * time_steps(parts(batch)[name], state, inputs, steps=48, repeats=5)
        print(f"{variant} B={batch} {name}: {us:.1f} us", flush=True)
    restore()


def trace_kernels(args, steps=64):
  """Device time per GPU kernel of the full step, from a `jax.profiler` trace of `steps` steps.

  The part timings above include the timing loop's own floor and overlap; the trace gives each
  kernel's duration on the GPU (summed over the trace, divided by `steps`)."""
  key = jax.random.key(0)
  for batch in map(int, args.batches.split(",")):
    inputs = random_inputs(batch, key)
    step = parts(batch)["full step"]
    run = jax.jit(lambda s: jax.lax.fori_loop(0, steps, lambda _, x: step(x, *inputs), s),
                  donate_argnums=0)
    state = [(filled_nsa_cache(batch, args.context, key),
              jnp.zeros((batch, HQ, D), jnp.float32))]

    def run_once():  # carries the donated cache, so it updates in place as in decoding
      state[0] = jax.block_until_ready(run(state[0]))

    totals = gpu_trace.kernel_times(run_once)
    kernels = {name: total for name, total in totals.items() if name.startswith("nsa_")}
    kernels["other (XLA fusions, copies)"] = sum(totals.values()) - sum(kernels.values())
    kernels["sum"] = sum(totals.values())
    print(f"B={batch}, us per step: " + ", ".join(
        f"{name.removeprefix('nsa_')} {total / steps:.2f}" for name, total in kernels.items()))
    others = sorted(((total, name) for name, total in totals.items()
                     if not name.startswith("nsa_")), reverse=True)
    print("  largest others: " + ", ".join(f"{name} {total / steps:.2f}"
                                           for total, name in others[:6]))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--context", type=int, default=65536)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--trace", action="store_true",
                      help="instead: per-kernel GPU time of the full step from a profiler trace")
  parser.add_argument("--variants", nargs="*", default=[],
                      help="kernel settings to compare, each 'NAME=VALUE,...' of "
                           "pallas_kernels.gpu.decode constants (top_n.NAME: the top-n "
                           "module's), e.g. TARGET_PROGRAMS=512 top_n.DECODE_NUM_WARPS=1")
  args = parser.parse_args()
  if args.trace:
    for variant in args.variants or [""]:
      print(f"\n== variant: {variant or 'defaults'}")
      restore = apply_variant(variant)
      trace_kernels(args)
      restore()
    return
  if args.variants:
    sweep(args)
    return
  rows = []
  key = jax.random.key(0)
  for batch in map(int, args.batches.split(",")):
    inputs = random_inputs(batch, key)
    for name, step in parts(batch).items():
      state = lambda: (filled_nsa_cache(batch, args.context, key),
                       jnp.zeros((batch, HQ, D), jnp.float32))
      count, copies = launches(step, state(), inputs)
      us = 1e6 * time_steps(step, state(), inputs, steps=48, repeats=5)
      rows.append((batch, name, us, count, copies))
      print(f"B={batch} {name}: {us:.1f} us, {count} ops ({copies} copies)", flush=True)
  print(f"\n{jax.devices()[0].device_kind}, context {args.context}")
  print(f"{'B':>2} {'part':>24} {'us/step':>8} {'ops':>4} {'copies':>6}")
  for batch, name, us, count, copies in rows:
    print(f"{batch:>2} {name:>24} {us:>8.1f} {count:>4} {copies:>6}")


if __name__ == "__main__":
  main()

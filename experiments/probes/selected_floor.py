"""What bounds the GPU selected-attention forward kernel: the same launch with parts taken out.

    python -m experiments.probes.selected_floor [--seq_len 65536] [--out out/selected_floor.json]

B=1, Hq=64, Hkv=4 (G = 16, one query position a program), D=128, bf16, paper config, on the
real NSA selection of random inputs (as `bench_kernels`' `selected` row). Each row swaps the
forward kernel body of `pallas_kernels.gpu.selected_attention` and times the same `pallas_call`
(grid, block specs, launch settings):

- `kernel`: the shipped kernel;
- `loads`: the same block loads (K and V of every selected block), summed, no math: the floor
  of the kernel's memory traffic as Triton issues it;
- `loads_k`: only the K blocks (half the bytes): time proportional to bytes means bandwidth,
  about the same time means latency;
- `loads_hot`: `loads` with every slot on block 0 (the same bytes, all cache hits);
- `math`: the kernel's math (dots, online softmax) on one block loaded before the loop: its
  compute floor;
- `kernel_pairs`: two blocks a loop step (two independent loads in flight), same output;
- `kernel_preloaded`: the block list read as a vector before the loop, same output.

Prints a table (ms, TB/s of K/V blocks moved, TF/s of useful FLOPs), writes JSON.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

import nsa_jax
from experiments.bench_kernels import D, HKV, HQ, median_ms, random_qkv
from experiments.probes import floor_cli
from pallas_kernels.gpu import selected_attention as selected_kernel
from pallas_kernels.gpu.tile_math import online_softmax_init, online_softmax_step


def _store_sum(o_ref, lse_ref, tile):
  """Keeps the loads live: the column sums of `tile` in every output row."""
  o_ref[...] = jnp.broadcast_to(jnp.sum(tile, axis=0)[None, :], o_ref.shape).astype(o_ref.dtype)
  lse_ref[...] = jnp.zeros(lse_ref.shape, jnp.float32)


def loads_kernel(idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block, loaded, with_v,
                 **unused):
  del q_ref, unused

  def body(slot, acc):
    start = idx_ref[slot] * block
    acc = acc + k_ref[pl.ds(start, loaded), :].astype(jnp.float32)
    if with_v:
      acc = acc + v_ref[pl.ds(start, loaded), :].astype(jnp.float32)
    return acc

  acc = jnp.zeros((loaded, k_ref.shape[1]), jnp.float32)
  _store_sum(o_ref, lse_ref, jax.lax.fori_loop(0, selected_kernel._num_valid(idx_ref), body, acc))


def math_kernel(idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block, loaded, **unused):
  del unused
  q = q_ref[...]
  start = idx_ref[0] * block
  k, v = k_ref[pl.ds(start, loaded), :], v_ref[pl.ds(start, loaded), :]
  position = pl.program_id(0)

  def body(slot, carry):
    visible = selected_kernel._visible(start + slot, position, loaded, block)[None, :]
    scores = selected_kernel._log2_scores(q, k, visible, scale)
    return online_softmax_step(carry, scores, lambda: v)

  init = online_softmax_init(q.shape[0], o_ref.shape[1])
  carry = jax.lax.fori_loop(0, selected_kernel._num_valid(idx_ref), body, init)
  selected_kernel._store_output(o_ref, lse_ref, *carry)


def preloaded_kernel(idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block, loaded,
                     **unused):
  del unused
  q = q_ref[...]
  idx = idx_ref[...]
  slots = jnp.arange(idx.shape[0])
  position = pl.program_id(0)

  def body(slot, carry):
    start = jnp.sum(jnp.where(slots == slot, idx, 0)) * block
    k = k_ref[pl.ds(start, loaded), :]
    visible = selected_kernel._visible(start, position, loaded, block)[None, :]
    scores = selected_kernel._log2_scores(q, k, visible, scale)
    return online_softmax_step(carry, scores, lambda: v_ref[pl.ds(start, loaded), :])

  init = online_softmax_init(q.shape[0], o_ref.shape[1])
  num_valid = jnp.sum((idx >= 0).astype(jnp.int32))
  selected_kernel._store_output(o_ref, lse_ref, *jax.lax.fori_loop(0, num_valid, body, init))


def pairs_kernel(idx_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block, loaded,
                 **unused):
  del unused
  q = q_ref[...]
  position = pl.program_id(0)
  num_valid = selected_kernel._num_valid(idx_ref)

  def body(pair, carry):
    acc, row_max, row_sum = carry
    scores, starts = [], []
    for i in range(2):
      slot = 2 * pair + i
      start = jnp.maximum(idx_ref[slot], 0) * block  # an odd count's last slot holds -1
      k = k_ref[pl.ds(start, loaded), :]
      visible = (selected_kernel._visible(start, position, loaded, block)
                 & (slot < num_valid))[None, :]
      scores.append((selected_kernel._log2_scores(q, k, visible, scale), visible))
      starts.append(start)
    new_max = jnp.maximum(row_max, jnp.maximum(jnp.max(scores[0][0], axis=1),
                                               jnp.max(scores[1][0], axis=1)))
    correction = jnp.exp2(row_max - new_max)
    acc = acc * correction[:, None]
    row_sum = row_sum * correction
    for (s, visible), start in zip(scores, starts):
      probs = jnp.where(visible, jnp.exp2(s - new_max[:, None]), 0.0)
      v = v_ref[pl.ds(start, loaded), :]
      acc = acc + selected_kernel._dot(probs.astype(v.dtype), v)
      row_sum = row_sum + jnp.sum(probs, axis=1)
    return acc, new_max, row_sum

  init = online_softmax_init(q.shape[0], o_ref.shape[1])
  carry = jax.lax.fori_loop(0, (num_valid + 1) // 2, body, init)
  selected_kernel._store_output(o_ref, lse_ref, *carry)


def _with_v(with_v):
  return lambda *refs, **kw: loads_kernel(*refs, with_v=with_v, **kw)


VARIANTS = {  # name -> (forward kernel body, every slot on block 0)
    "kernel": (None, False),
    "loads": (_with_v(True), False),
    "loads_k": (_with_v(False), False),
    "loads_hot": (_with_v(True), True),
    "math": (math_kernel, False),
    "kernel_pairs": (pairs_kernel, False),
    "kernel_preloaded": (preloaded_kernel, False),
}
SAME_OUTPUT = ("kernel_pairs", "kernel_preloaded")


def run_variant(name, q, k, v, block_indices, repeats, interpret=False):
  """`(ms, output)` of the selected forward with the variant's kernel body."""
  body, hot = VARIANTS[name]
  shipped = selected_kernel._forward_kernel
  if hot:
    block_indices = jnp.where(block_indices >= 0, 0, -1)
  fn = jax.jit(lambda q, k, v, idx: selected_kernel.selected_attention(
      q, k, v, idx, block=64, scale=D ** -0.5, indices_sorted=True, interpret=interpret))
  jax.clear_caches()
  try:
    if body is not None:
      selected_kernel._forward_kernel = body
    out = fn(q, k, v, block_indices)
    ms = median_ms(fn, (q, k, v, block_indices), repeats) if repeats else float("nan")
  finally:
    selected_kernel._forward_kernel = shipped
    jax.clear_caches()
  return ms, out


def main(argv=None):
  args = floor_cli.parse_args(argv, VARIANTS)
  t, config = args.seq_len, nsa_jax.NSAConfig()
  q, k, v = random_qkv(t, HKV)
  k_cmp, _ = nsa_jax.compress_kv(k, v, block=config.cmp_block, stride=config.cmp_stride)
  impl = "xla" if args.interpret else "pallas_gpu"
  block_indices = nsa_jax.select_blocks(q, k_cmp, config=config, implementation=impl)
  block_indices = selected_kernel.sorted_causal_block_indices(block_indices, config.slc_block)
  num_blocks = int(jnp.sum(block_indices >= 0))  # per (position, KV head) pair, summed
  block_bytes = config.slc_block * D * 2  # one block of K or of V in bfloat16
  flops = 4.0 * (HQ // HKV) * num_blocks * config.slc_block * D
  rows, reference = [], None
  for name in args.variants.split(","):
    ms, out = run_variant(name, q, k, v, block_indices, 0 if args.interpret else args.repeats,
                          args.interpret)
    moved = num_blocks * block_bytes * (1 if name == "loads_k" else 2)
    row = dict(variant=name, ms=ms, tb_per_s=moved / ms / 1e9, tflops=flops / ms / 1e9)
    if name == "kernel":
      reference = out
    if name in SAME_OUTPUT and reference is not None:
      row["max_abs_diff"] = float(jnp.max(jnp.abs(out.astype(jnp.float32)
                                                  - reference.astype(jnp.float32))))
    rows.append(row)
    diff = f"  max |diff| {row['max_abs_diff']:.2e}" if "max_abs_diff" in row else ""
    print(f"{name:>18} {ms:8.2f} ms {row['tb_per_s']:6.2f} TB/s {row['tflops']:6.1f} TF/s{diff}",
          flush=True)
  return floor_cli.record(args.out, seq_len=t, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
                          selected_blocks=num_blocks, rows=rows)


if __name__ == "__main__":
  main()

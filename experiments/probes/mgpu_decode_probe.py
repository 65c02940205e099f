"""Is Triton what holds the decode's compressed kernel at ~2.9 TB/s? The same kernel on Mosaic GPU.

    python -m experiments.probes.mgpu_decode_probe [--batch 1,8] [--splits 128,384,704,1408]
                                                   [--stages 2,3,4] [--out out/mgpu_probe.json]

The B=8 decode step at 64k spends a third of its time in `decode.compressed_partials` (Triton),
which streams the compressed cache at ~2.9 TB/s of the H200's ~4.8 (BENCHMARKS.md). This probe
writes that kernel on the Mosaic GPU backend, the way a port would: one CTA per (sequence, KV
head, split), K / V tiles of BK keys brought in by TMA through `plgpu.emit_pipeline`
(`stages` in flight), the two products on wgmma. wgmma's M side is 64 rows and a KV group has
16 query rows, so the keys are the M side (`S^T = K q^T`: `[BK, Gp]`, `O^T = V^T P^T`:
`[Dv, Gp]`), which wastes no tensor-core work (the first version padded the 16 rows to 64 and
ran 4x the MMA work: slower than Triton). Softmax statistics run over axis 0.

For each (batch, split, stages) it checks the probe (raw scores against XLA's, and the output
merged over the splits against the Triton kernel's) and times both from a profiler trace
(`gpu_trace.kernel_times`), the cache at the benchmark's 64k size (4224 compressed slots, 4093
visible). Prints a table, writes JSON. GPU only (Mosaic GPU has no CPU interpreter for wgmma);
the kernel's lowering is tested on the CPU (`tests/test_lowering.py`). The probe writes raw
scores, as the Triton kernel did when they were compared (2026-11-27); since then the Triton
kernel writes per-block probability sums instead (two row sums a tile more, half the score
bytes).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.decode_partials import merge_partials
from pallas_kernels.gpu import decode as triton_decode

LOG2E = math.log2(math.e)
BK = 64  # keys a pipeline step (wgmma M)
NUM_CMP, VISIBLE, HEADS, KV_HEADS, DIM = 4224, 4093, 64, 4, 128  # the 64k benchmark's cache
SCORE_SHIFT = 128  # the score of compressed block i is stored in row i + SCORE_SHIFT


def _smem_transforms(minor: int, dtype):
  """Tiling + swizzle of a half-precision SMEM tile whose minor dimension is `minor`."""
  item = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(minor * item * 8)
  return plgpu.TilingTransform((8, swizzle // item)), plgpu.SwizzleTransform(swizzle)


def compressed_partials_t(q_rows, k_cmp, v_cmp, count, *, scale: float, split: int, width: int,
                          shift: int, stages: int):
  """`decode.compressed_partials` on Mosaic GPU, its outputs transposed (keys / Dv before rows).

  Args:
    q_rows: `[B, Hkv, Gp, Dk]` (half precision); k_cmp, v_cmp: `[B, Hkv, Sc, Dk / Dv]`, Sc a
      multiple of `split`, `split` of BK.
    count: int32 scalar, the visible compressed blocks.
    scale: softmax scale; width, shift: rows of the scores, the score of block i in row
      `shift + i`.
    stages: K / V tiles in flight.

  Returns:
    `(scores [B, Hkv, width, Gp], acc [B, Hkv, Pp, Dv, Gp], row_max, row_sum [B, Hkv, Pp, Gp])`.
  """
  b, hkv, gp, dk = q_rows.shape
  num_cmp, dv = k_cmp.shape[2], v_cmp.shape[3]
  splits = num_cmp // split
  padded = 1 << (splits - 1).bit_length()
  dtype = q_rows.dtype

  def kernel(count_ref, q_ref, k_ref, v_ref, s_ref, acc_ref, m_ref, l_ref, q_smem, s_smem, p_smem,
             q_barrier):
    pair, part = lax.axis_index("pair"), lax.axis_index("split")
    bi, hi = pair // hkv, pair % hkv
    count, base = count_ref[0], part * split
    plgpu.copy_gmem_to_smem(q_ref.at[bi, hi], q_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)
    init = (plgpu.layout_cast(jnp.zeros((dv, gp), jnp.float32), plgpu.Layout.WGMMA),
            jnp.full((gp,), -jnp.inf, jnp.float32), jnp.zeros((gp,), jnp.float32))

    def step(index, k_smem, v_smem, carry):
      acc, row_max, row_sum = carry
      start = base + index[0] * BK

      def scores_of(acc_ref):
        plgpu.wgmma(acc_ref, k_smem, q_smem.T)
        return acc_ref[...]
      s = pl.run_scoped(scores_of, plgpu.ACC((BK, gp), jnp.float32))  # [BK, Gp]
      key = plgpu.broadcasted_iota(jnp.int32, (BK, gp), 0, layout=plgpu.Layout.WGMMA)
      s = jnp.where(key + start < count, s * (scale * LOG2E), -jnp.inf)
      s_smem[...] = s
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(s_smem, s_ref.at[bi, hi, pl.ds(shift + start, BK)])
      new_max = jnp.maximum(row_max, s.max(axis=0))
      safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
      correction = jnp.exp2(row_max - safe_max)
      probs = jnp.exp2(s - lax.broadcast_in_dim(safe_max, s.shape, [1]))
      row_sum = row_sum * correction + probs.sum(axis=0)
      acc = acc * lax.broadcast_in_dim(correction, acc.shape, [1])
      p_smem.T[...] = probs.astype(dtype)  # wgmma's B operand lives in SMEM
      plgpu.commit_smem()

      def add_values(acc_ref):
        plgpu.wgmma(acc_ref, v_smem.T, p_smem.T)
      acc = pl.run_state(add_values)(plgpu.ACC.init(acc))
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # s_smem is written again next step
      return acc, new_max, row_sum

    pipeline = plgpu.emit_pipeline(
        step, grid=(split // BK,),
        in_specs=[plgpu.BlockSpec((BK, dk), lambda t: (t, 0),
                                  transforms=_smem_transforms(dk, dtype)),
                  plgpu.BlockSpec((BK, dv), lambda t: (t, 0),
                                  transforms=_smem_transforms(dv, dtype))],
        max_concurrent_steps=stages, init_carry=init)
    keys = pl.ds(base, split)
    acc, row_max, row_sum = lax.cond(
        base < count, lambda: pipeline(k_ref.at[bi, hi, keys], v_ref.at[bi, hi, keys]),
        lambda: init)

    def store(acc_smem, max_smem, sum_smem):  # after the pipeline: its SMEM is free again
      acc_smem[...] = acc
      max_smem[...] = row_max
      sum_smem[...] = row_sum
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(acc_smem, acc_ref.at[bi, hi, part])
      plgpu.copy_smem_to_gmem(max_smem, m_ref.at[bi, hi, part])
      plgpu.copy_smem_to_gmem(sum_smem, l_ref.at[bi, hi, part])
      plgpu.wait_smem_to_gmem(0)
    pl.run_scoped(store, plgpu.SMEM((dv, gp), jnp.float32), plgpu.SMEM((gp,), jnp.float32),
                  plgpu.SMEM((gp,), jnp.float32))

  out_type = (jax.ShapeDtypeStruct((b, hkv, width, gp), jnp.float32),
              jax.ShapeDtypeStruct((b, hkv, padded, dv, gp), jnp.float32),
              jax.ShapeDtypeStruct((b, hkv, padded, gp), jnp.float32),
              jax.ShapeDtypeStruct((b, hkv, padded, gp), jnp.float32))
  scratch = (plgpu.SMEM((gp, dk), dtype, transforms=_smem_transforms(dk, dtype)),
             plgpu.SMEM((BK, gp), jnp.float32),
             plgpu.SMEM((gp, BK), dtype, transforms=_smem_transforms(BK, dtype)),
             plgpu.Barrier(num_barriers=1))
  call = plgpu.kernel(kernel, out_type=out_type, grid=(b * hkv, splits),
                      grid_names=("pair", "split"), scratch_types=scratch,
                      compiler_params=plgpu.CompilerParams(approx_math=True))
  return call(jnp.reshape(count, (1,)).astype(jnp.int32), q_rows, k_cmp, v_cmp)


def compare(batch: int, split: int, stages: int) -> dict:
  """Checks the probe against the Triton kernel and times both at the 64k cache."""
  from experiments.probes.gpu_trace import kernel_times  # needs the profiler; GPU runs only
  keys = jax.random.split(jax.random.key(batch * 1000 + split), 3)
  group = HEADS // KV_HEADS
  q = jax.random.normal(keys[0], (batch, KV_HEADS, group, DIM), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, KV_HEADS, NUM_CMP, DIM), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, KV_HEADS, NUM_CMP, DIM), jnp.bfloat16)
  shift = SCORE_SHIFT
  triton_split = triton_decode.cmp_split(batch, KV_HEADS, NUM_CMP)
  width = shift + NUM_CMP
  triton = jax.jit(functools.partial(
      triton_decode.compressed_partials, cmp_block=32, cmp_stride=16, slc_block=64,
      num_slc=2048, scale=0.1, split=triton_split))
  probe = jax.jit(functools.partial(compressed_partials_t, scale=0.1, split=split, width=width,
                                    shift=shift, stages=stages))
  position = jnp.int32((VISIBLE - 1) * 16 + 31)  # sees VISIBLE compressed blocks (l=32, d=16)
  count = jnp.int32(VISIBLE)
  want = triton(q, k, v, position)
  got = probe(q, k, v, count)
  got_scores = jnp.swapaxes(got[0], -1, -2)[..., shift:shift + VISIBLE]
  logits = jnp.einsum("bhgd,bhsd->bhgs", q, k[:, :, :VISIBLE], preferred_element_type=jnp.float32)
  score_err = jnp.max(jnp.abs(got_scores - logits * (0.1 * LOG2E)))
  merged = lambda acc, row_max, row_sum, used: merge_partials(
      acc[:, :, :used], row_max[:, :, :used], row_sum[:, :, :used], axis=2)[0]
  out_err = jnp.max(jnp.abs(
      merged(jnp.swapaxes(got[1], -1, -2), got[2], got[3], NUM_CMP // split)
      - merged(*want[1:], -(-NUM_CMP // triton_split))))
  time = lambda f, *a: sum(kernel_times(lambda: jax.block_until_ready(f(*a)), calls=20).values())
  gigabytes = batch * KV_HEADS * VISIBLE * DIM * 2 * 2 / 1e9
  triton_us, probe_us = time(triton, q, k, v, position), time(probe, q, k, v, count)
  return dict(batch=batch, split=split, stages=stages, triton_split=triton_split,
              max_score_error=float(score_err), max_output_error=float(out_err),
              triton_us=triton_us, mgpu_us=probe_us, triton_tb_s=gigabytes / triton_us * 1e3,
              mgpu_tb_s=gigabytes / probe_us * 1e3)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ints = lambda s: [int(x) for x in s.split(",")]
  parser.add_argument("--batch", type=ints, default=[1, 8])
  parser.add_argument("--splits", type=ints, default=[128, 384, 704, 1408])
  parser.add_argument("--stages", type=ints, default=[2, 3, 4])
  parser.add_argument("--out", default="out/mgpu_probe.json")
  args = parser.parse_args()
  rows = [compare(b, split, stages) for b in args.batch for split in args.splits
          for stages in args.stages]
  print(f"{'B':>3} {'split':>6} {'stages':>6} {'Triton us':>10} {'MGPU us':>8} {'Triton TB/s':>12}"
        f" {'MGPU TB/s':>10} {'score err':>10} {'out err':>9}")
  for r in rows:
    print(f"{r['batch']:>3} {r['split']:>6} {r['stages']:>6} {r['triton_us']:>10.2f}"
          f" {r['mgpu_us']:>8.2f} {r['triton_tb_s']:>12.2f} {r['mgpu_tb_s']:>10.2f}"
          f" {r['max_score_error']:>10.2e} {r['max_output_error']:>9.2e}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(device=jax.devices()[0].device_kind,
                                 date=datetime.date.today().isoformat(), rows=rows), indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()

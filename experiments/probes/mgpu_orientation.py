"""The selected forward's math per K/V block in two wgmma orientations, on Mosaic GPU.

`python -m experiments.probes.mgpu_orientation [--heads 16|8] [--out FILE.json]` (a Hopper GPU).

The Mosaic selected forward (`pallas_kernels.gpu.selected_attention_mgpu`) puts a tile's 64
query rows (4 positions x 16 heads at G = 16) on wgmma's M and multiplies every row by every
block of the tile's union, masking the rows whose position did not choose it: on a trained
selection 2.3x the useful MMA work at 64k (BENCHMARKS.md, the tile cost model). The other
orientation does only useful work: one position's 16 rows on N and a block's 64 keys on M,
`S^T = K Q^T`, the softmax over axis 0, `P^T` stored through a transposed SMEM view (the B
operand must come from SMEM), `O^T += V^T P^T` (M = Dv). Whether that pays depends on the rate
of wgmma at N = 16 (8 at G = 8), which this probe measures:

- `tile`: `S = Q K^T` for 64 rows (N = 64 keys), online softmax over axis 1, `O += P V` with the
  probabilities as wgmma's register operand (the kernel's own loop body);
- `position xP`: the transposed form for P positions of `--heads` rows each (16: G = 16; 8:
  wgmma's smallest N, a position's rows at G = 8, or G = 4 padded), independent chains over the
  same block (a tile's positions that chose it).

Each CTA loops `ITERS` times over one K / V block held in SMEM (no loads: the math alone), with
as many CTAs as 16 an SM; each variant's output is checked against `expected` first. Prints ms
and TF/s of MMA work (all of it useful in `position`; in
`tile` useful only where every row's position chose the block).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu.selected_attention_mgpu import _smem_transforms, _times

DTYPE = jnp.bfloat16
HEAD_DIM, BLOCK, ITERS, HEADS = 128, 64, 512, 16  # HEADS: a position's rows, by default
VARIANTS = {"tile": 0, "position x1": 1, "position x2": 2, "position x4": 4}


def _tiles(d):
  return _smem_transforms(d, DTYPE)


def _tile_loop(q_smem, k_smem, v_smem, iters):
  """The Mosaic forward's loop body on one block, `iters` times: `[64, D]` output."""
  rows = q_smem.shape[0]

  def body(_, carry):
    acc, row_max, row_sum = carry
    s = _times(q_smem, k_smem.T, (rows, BLOCK)) * 0.1
    new_max = jnp.maximum(row_max, s.max(axis=1))
    correction = jnp.exp2(row_max - new_max)
    probs = jnp.exp2(s - lax.broadcast_in_dim(new_max, s.shape, [0]))
    row_sum = row_sum * correction + probs.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
    acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, probs.astype(DTYPE), v_smem))(
        plgpu.ACC.init(acc))
    return acc, new_max, row_sum

  row = plgpu.Layout.WGMMA.reduce(1)
  init = (plgpu.layout_cast(jnp.zeros((rows, HEAD_DIM), jnp.float32), plgpu.Layout.WGMMA),
          plgpu.layout_cast(jnp.full((rows,), -1e30, jnp.float32), row),
          plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), row))
  acc, _, row_sum = lax.fori_loop(0, iters, body, init)
  return acc / lax.broadcast_in_dim(row_sum, acc.shape, [0])


def _position_loop(q_smem, k_smem, v_smem, p_smems, iters, heads):
  """The transposed form for `len(p_smems)` positions of `heads` rows: `[P, D, heads]` (O^T)."""
  column = plgpu.Layout.WGMMA.reduce(0)

  def one(p, state):
    acc, col_max, col_sum = state
    q_rows = q_smem.at[pl.ds(p * heads, heads)]
    s = _times(k_smem, q_rows.T, (BLOCK, heads)) * 0.1  # [keys, rows]
    new_max = jnp.maximum(col_max, s.max(axis=0))
    correction = jnp.exp2(col_max - new_max)
    probs = jnp.exp2(s - lax.broadcast_in_dim(new_max, s.shape, [1]))
    col_sum = col_sum * correction + probs.sum(axis=0)
    p_smems[p].T[...] = probs.astype(DTYPE)  # P^T, as wgmma's B operand [keys, rows]
    plgpu.commit_smem()
    acc = acc * lax.broadcast_in_dim(correction, acc.shape, [1]) + _times(
        v_smem.T, p_smems[p].T, (HEAD_DIM, heads))
    return acc, new_max, col_sum

  def body(_, states):
    return tuple(one(p, state) for p, state in enumerate(states))

  init = tuple((plgpu.layout_cast(jnp.zeros((HEAD_DIM, heads), jnp.float32),
                                  plgpu.Layout.WGMMA),
                plgpu.layout_cast(jnp.full((heads,), -1e30, jnp.float32), column),
                plgpu.layout_cast(jnp.zeros((heads,), jnp.float32), column))
               for _ in p_smems)
  return [acc / lax.broadcast_in_dim(col_sum, acc.shape, [1])
          for acc, _, col_sum in lax.fori_loop(0, iters, body, init)]


def query_rows(variant: str, heads: int = HEADS) -> int:
  """A CTA's query rows: 64 (tile) or `heads * P` (position xP)."""
  positions = VARIANTS[variant]
  return heads * positions if positions else 64


def build(variant: str, num_ctas: int, iters: int = ITERS, heads: int = HEADS):
  """The probe kernel of `variant`: `(q [C, query_rows, D], k, v [C, l', D]) -> out`."""
  positions, rows = VARIANTS[variant], query_rows(variant, heads)
  out_shape = (num_ctas, positions, HEAD_DIM, heads) if positions else (num_ctas, rows, HEAD_DIM)

  def kernel(q_ref, k_ref, v_ref, o_ref, q_smem, k_smem, v_smem, o_smem, barrier, *p_smems):
    cta = lax.axis_index("cta")
    for src, dst in ((q_ref, q_smem), (k_ref, k_smem), (v_ref, v_smem)):
      plgpu.copy_gmem_to_smem(src.at[cta], dst, barrier)
    plgpu.barrier_wait(barrier)
    if positions:
      for p, out in enumerate(_position_loop(q_smem, k_smem, v_smem, p_smems, iters, heads)):
        o_smem[p] = out
    else:
      o_smem[...] = _tile_loop(q_smem, k_smem, v_smem, iters)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[cta])
    plgpu.wait_smem_to_gmem(0)

  scratch = (plgpu.SMEM((rows, HEAD_DIM), DTYPE, transforms=_tiles(HEAD_DIM)),
             plgpu.SMEM((BLOCK, HEAD_DIM), DTYPE, transforms=_tiles(HEAD_DIM)),
             plgpu.SMEM((BLOCK, HEAD_DIM), DTYPE, transforms=_tiles(HEAD_DIM)),
             plgpu.SMEM(out_shape[1:], jnp.float32), plgpu.Barrier(num_arrivals=3),
             *(plgpu.SMEM((heads, BLOCK), DTYPE, transforms=_tiles(BLOCK)),) * positions)
  return plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct(out_shape, jnp.float32),
                      grid=(num_ctas,), grid_names=("cta",), scratch_types=scratch,
                      compiler_params=plgpu.CompilerParams(approx_math=True))


def inputs(variant: str, num_ctas: int, heads: int = HEADS):
  keys = jax.random.split(jax.random.key(0), 3)
  rows = query_rows(variant, heads)
  return (jax.random.normal(keys[0], (num_ctas, rows, HEAD_DIM)).astype(DTYPE),
          *(jax.random.normal(key, (num_ctas, BLOCK, HEAD_DIM)).astype(DTYPE)
            for key in keys[1:]))


def expected(variant: str, q, k, v, heads: int = HEADS):
  """What `build(variant)` computes, in the kernel's output layout: attention of each row over
  its CTA's block (repeating the block leaves the softmax unchanged), softmax base 2 of
  0.1 q . k; `[C, P, D, heads]` (O^T a position) for `position xP`."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  out = jax.nn.softmax(0.1 * math.log(2) * jnp.einsum("crd,ckd->crk", q, k), axis=-1) @ v
  positions = VARIANTS[variant]
  if positions:
    out = out.reshape(out.shape[0], positions, heads, HEAD_DIM).transpose(0, 1, 3, 2)
  return out


def time_variant(variant: str, num_ctas: int, repeats: int = 5, heads: int = HEADS) -> dict:
  fn = jax.jit(build(variant, num_ctas, heads=heads))
  args = inputs(variant, num_ctas, heads)
  error = float(jnp.max(jnp.abs(fn(*args) - expected(variant, *args, heads=heads))))
  if not error <= 2e-2:  # bfloat16 probabilities; catches NaN too
    raise RuntimeError(f"{variant}: output off the reference by {error}")
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn(*args).block_until_ready()
    times.append(time.perf_counter() - start)
  ms = min(times) * 1e3
  rows = query_rows(variant, heads)
  flops = num_ctas * ITERS * 4.0 * rows * BLOCK * HEAD_DIM
  return dict(variant=variant, rows=rows, ms=ms, tflops=flops / ms / 1e9, max_error=error)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=None, help="JSON file for the table")
  parser.add_argument("--ctas_per_sm", type=int, default=16)
  parser.add_argument("--heads", type=int, default=HEADS, choices=(8, 16),
                      help="a position's rows in the transposed form (wgmma's N)")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  num_ctas = getattr(device, "core_count", 132) * args.ctas_per_sm
  rows = [time_variant(variant, num_ctas, heads=args.heads) for variant in VARIANTS]
  print(f"{'variant':12s} {'rows':>5s} {'ms':>8s} {'TF/s of MMA work':>17s}")
  for row in rows:
    print(f"{row['variant']:12s} {row['rows']:5d} {row['ms']:8.3f} {row['tflops']:17.1f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(device=device.device_kind, date=str(datetime.date.today()),
                     jax_version=jax.__version__, iters=ITERS, num_ctas=num_ctas,
                     heads=args.heads, rows=rows),
                f, indent=2)


if __name__ == "__main__":
  main()

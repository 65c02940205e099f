"""The two numbers the TPU cost model rests on, measured: what one Pallas grid step costs, and
what one group of hand-issued block DMAs costs (`pallas_kernels/tpu/README.md`).

    python -m experiments.probes.tpu_overhead [--counts 1024,8192,65536] [--repeats 5]
                                              [--out out/tpu_overhead.json]

1. `grid step`: a kernel that copies an `[8, 128]` block, over grids of N steps (the block index
   fixed, so the pipeline issues no DMA after the first): time / N is the fixed cost of a step.
2. `dma group`: one grid step whose loop runs N groups, each DMAing `KV_BLOCKS` blocks of
   `[l', D]` (l' = 64, D = 128, bfloat16, at offsets read from SMEM, two buffers, the next
   group's copies started before this group's wait: `tile_math.double_buffered_loop`), as the
   selected forward / dQ kernels do (`selected_attention._walk_union`); `dma group + math` adds
   the forward's two matmuls of a group on 128 query rows. Time / N is the cost of a group; the
   model charges it a grid step's.

Each count is timed (median of `--repeats`, as `bench_kernels.median_ms`); the slope between the
largest and smallest count is printed as microseconds per step / group. Prints a table, writes
JSON. On a CPU, `--interpret` runs the same kernels under the TPU interpreter (plumbing only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from experiments.bench_kernels import median_ms
from pallas_kernels.tpu.selected_attention import KV_BLOCKS
from pallas_kernels.tpu.tile_math import dot_nn, dot_nt, double_buffered_loop

BLOCK, D, ROWS, NUM_BLOCKS = 64, 128, 128, 1024


def _params(interpret):
  return pltpu.InterpretParams() if interpret else False


def grid_steps(steps: int, interpret: bool):
  """A jitted function of one `[8, 128]` input running `steps` grid steps."""
  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0

  call = pl.pallas_call(
      kernel,
      grid=(steps,),
      in_specs=[pl.BlockSpec((8, 128), lambda i: (0, 0))],
      out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
      out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=_params(interpret), name="empty_steps")
  return jax.jit(call)


def dma_groups(groups: int, with_math: bool, interpret: bool):
  """A jitted function of `(blocks [groups * KV_BLOCKS] int32, q [ROWS, D], kv [NUM_BLOCKS *
  BLOCK, D])` running one grid step that DMAs `groups` groups of KV_BLOCKS blocks."""
  width = KV_BLOCKS * BLOCK

  def kernel(blocks_ref, q_ref, kv_hbm, o_ref, buf, sems):
    def copies(group, slot):
      return [pltpu.make_async_copy(
          kv_hbm.at[pl.ds(blocks_ref[group * KV_BLOCKS + j] * BLOCK, BLOCK), :],
          buf.at[slot, pl.ds(j * BLOCK, BLOCK), :], sems.at[slot, j]) for j in range(KV_BLOCKS)]

    def body(group, slot, acc):
      if not with_math:
        return acc + buf[slot, :8, :].astype(jnp.float32)[:1]
      kv = buf[slot]
      p = jnp.exp(dot_nt(q_ref[...], kv) - 1.0)  # [ROWS, width], the forward's two matmuls
      return acc + dot_nn(p.astype(kv.dtype), kv)[:1]

    o_ref[...] = double_buffered_loop(groups, copies, body, jnp.zeros((1, D), jnp.float32))

  call = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(1,),
          in_specs=[pl.BlockSpec((ROWS, D), lambda i, blocks: (0, 0)),
                    pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((1, D), lambda i, blocks: (0, 0)),
          scratch_shapes=[pltpu.VMEM((2, width, D), jnp.bfloat16),
                          pltpu.SemaphoreType.DMA((2, KV_BLOCKS))]),
      out_shape=jax.ShapeDtypeStruct((1, D), jnp.float32),
      interpret=_params(interpret), name="dma_groups")
  return jax.jit(call)


def measure(counts, repeats, interpret):
  """Rows `{kind, count, ms}` and the per-unit slope of each kind in microseconds."""
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (ROWS, D), jnp.bfloat16)
  kv = jax.random.normal(keys[1], (NUM_BLOCKS * BLOCK, D), jnp.bfloat16)
  rows, slopes = [], {}
  for kind in ("grid step", "dma group", "dma group + math"):
    times = {}
    for count in counts:
      if kind == "grid step":
        fn, args = grid_steps(count, interpret), (jnp.zeros((8, 128), jnp.float32),)
      else:
        blocks = jax.random.randint(keys[2], (count * KV_BLOCKS,), 0, NUM_BLOCKS)
        fn, args = dma_groups(count, kind.endswith("math"), interpret), (blocks, q, kv)
      times[count] = median_ms(fn, args, repeats)
      rows.append(dict(kind=kind, count=count, ms=times[count]))
      print(json.dumps(rows[-1]), flush=True)
    lo, hi = min(counts), max(counts)
    slopes[kind] = 1e3 * (times[hi] - times[lo]) / max(hi - lo, 1)
  return rows, slopes


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--counts", default="1024,8192,65536")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--interpret", action="store_true", help="TPU interpreter (CPU plumbing)")
  parser.add_argument("--out", default="out/tpu_overhead.json")
  args = parser.parse_args()
  counts = [int(x) for x in args.counts.split(",")]
  rows, slopes = measure(counts, args.repeats, args.interpret)
  device = jax.devices()[0].device_kind
  print(f"\n{device}: KV_BLOCKS = {KV_BLOCKS} blocks of [{BLOCK}, {D}] bf16 a group")
  for kind, us in slopes.items():
    print(f"{kind:>18}: {us:8.3f} us each")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(device=device, date=str(datetime.date.today()),
                                 jax_version=jax.__version__, rows=rows, us_each=slopes),
                            indent=2))


if __name__ == "__main__":
  main()

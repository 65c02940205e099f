"""The launch floor of a GPU decode step: what a chain of dependent kernels with no work in them
costs in `bench_decode`'s timed loop.

    python -m experiments.decode_floor [--batches 1,8] [--kernels 0,1,2,3,4,5]
                                       [--out out/decode_floor.json]

A step runs `k` dependent Pallas kernels of one program per (sequence, KV head), each reading
the previous kernel's `[G, D]` float32 tile and writing the next (the size of the combine's
output); the last also writes the step's output `[B, Hq, D]` in bfloat16. They run inside the
loop `bench_decode` times a one-layer step with (`stacked(layer, 1)`: the loop counter and the
output sum); k = 0 is that loop with the query as the output. The GPU NSA decode step is a chain
of four kernels, so its time minus the k = 4 floor is what its kernels' work costs, and the
floor bounds from below what any four-kernel step can reach (a 5x target at B = 1 against
cuDNN's dense step). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from experiments.bench_decode import D, DTYPE, HKV, HQ, random_inputs, stacked, time_steps

GROUP = HQ // HKV


def _step_kernel(x_ref, *out_refs):
  x = x_ref[...] * 0.5 + 1.0
  for ref in out_refs:
    ref[...] = x.astype(ref.dtype)


def _chained(x, with_output: bool, interpret: bool):
  """One kernel: `x [B, Hkv, G, D]` float32 -> the next tile (and the output in DTYPE)."""
  b = x.shape[0]
  spec = pl.BlockSpec((None, None, GROUP, D), lambda i, j: (i, j, 0, 0))
  dtypes = [jnp.float32] + ([DTYPE] if with_output else [])
  return pl.pallas_call(
      _step_kernel, grid=(b, HKV), in_specs=[spec], out_specs=[spec] * len(dtypes),
      out_shape=[jax.ShapeDtypeStruct(x.shape, dtype) for dtype in dtypes],
      interpret=interpret)(x)


def empty_layer(num_kernels: int, interpret: bool):
  """`(tile, q, k, v) -> (tile, out [B, Hq, D])`: `num_kernels` chained kernels (0: out = q)."""
  def layer(tile, q, k, v):
    del k, v
    if num_kernels == 0:
      return tile, q
    for _ in range(num_kernels - 1):
      tile, = _chained(tile, False, interpret)
    tile, out = _chained(tile, True, interpret)
    return tile, out.reshape(q.shape)
  return layer


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--kernels", default="0,1,2,3,4,5")
  parser.add_argument("--steps", type=int, default=48,
                      help="steps of the shorter timed loop (bench_decode.time_steps)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
  parser.add_argument("--out", default="out/decode_floor.json")
  args = parser.parse_args()
  rows = []
  for batch in map(int, args.batches.split(",")):
    inputs = random_inputs(batch, jax.random.key(0))
    for count in map(int, args.kernels.split(",")):
      state = ((jnp.zeros((batch, HKV, GROUP, D), jnp.float32),),
               jnp.zeros((batch, HQ, D), jnp.float32))
      seconds = time_steps(stacked(empty_layer(count, args.interpret), 1), state, inputs,
                           args.steps, args.repeats)
      rows.append(dict(batch=batch, kernels=count, us_per_step=1e6 * seconds))
      print(json.dumps(rows[-1]), flush=True)
  device = jax.devices()[0].device_kind
  print(f"\n{device}: a decode step of k dependent empty kernels, in bench_decode's loop")
  print(f"{'B':>3} {'kernels':>8} {'us/step':>8}")
  for r in rows:
    print(f"{r['batch']:>3} {r['kernels']:>8} {r['us_per_step']:>8.1f}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(device=device, date=datetime.date.today().isoformat(),
                                 rows=rows), indent=1))


if __name__ == "__main__":
  main()

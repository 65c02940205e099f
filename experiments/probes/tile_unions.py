"""What the Mosaic GPU selected kernels multiply and load: the union of blocks of each 64-row tile.

    python -m experiments.probes.tile_unions [--seq_len 65536] [--groups 4,8,16]
        [--trained_indices F] [--out out/tile_unions.json]

The selected forward and dQ on Mosaic GPU (`selected_attention_mgpu`) take a tile of 64 query
rows, `P = 64 / rows_per_position(G)` consecutive positions of one KV group, and loop over the
union of the blocks its positions chose: one K/V load a union block serves every position that
chose it, and every union block costs the whole tile's wgmma (M = 64 rows), each row masked to
its own position's blocks. So the kernels' work follows the union, not the 16 blocks a position
keeps. No kernel runs here: the selection (the XLA path, on any backend) and the counting do.

Per group size G (random inputs: one KV group of G heads, `q` and `k` standard normal, as
`bench_kernels`' rows, paper config; the selection of each KV head is independent of the others,
so one stands for all) and, with `--trained_indices`, on a trained selection (`selection_indices
_<run>.npz`, as `bench_kernels --trained_indices` uses it: its (row, KV head) selections as the
KV heads of the benchmark's Hq = 64, four of them G = 16), it counts the blocks a position
chose and the union a tile multiplies over, and scales them to the benchmark's whole layer (B = 1,
Hq = 64, Dk = Dv = 128, bfloat16):

- `masked_tflop`: the forward's wgmma work over the unions (`S = Q K^T` and `P V` for 64 rows a
  union block), against `useful_tflop` (each row over its own position's blocks);
- `kv_gb`: the K and V bytes of the union blocks (one load per tile and union block);
- `ms_at_mma` / `ms_at_l2`: those at `--mma_tflops` (410: the selected forward's wgmma rate on
  an H100, BENCHMARKS.md) and `--l2_tbps` (8.3: its K/V loads served from L2, measured by
  `selected_floor`): the forward's two floors, whichever is larger bounds it.

Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import nsa_jax
from experiments import bench_kernels
from experiments.plot import selection_sharing
from experiments.probes import floor_cli
from pallas_kernels.gpu import selected_attention_mgpu as selected_mgpu

HQ, D = bench_kernels.HQ, bench_kernels.D  # the benchmark's layer: B = 1, bfloat16
ROWS = selected_mgpu.ROWS


def tile_positions(group: int) -> int:
  """Positions a Mosaic tile holds at group size G."""
  return ROWS // selected_mgpu.rows_per_position(group)


def random_selection(seq_len: int, group: int, config, seed: int = 0):
  """Selected blocks `int32 [1, T, 1, n]` of one KV group of random inputs (the XLA path)."""
  kq, kk = jax.random.split(jax.random.key(seed))
  q = jax.random.normal(kq, (1, seq_len, group, D), jnp.float32)
  k = jax.random.normal(kk, (1, seq_len, 1, D), jnp.float32)
  k_cmp, _ = nsa_jax.compress_kv(k, k, block=config.cmp_block, stride=config.cmp_stride,
                                 implementation="xla")
  return np.asarray(nsa_jax.select_blocks(q, k_cmp, config=config, implementation="xla"))


def tile_work(indices, group: int, config, mma_tflops: float, l2_tbps: float):
  """The row of one selection `int [B, T, Hkv, n]` at group size G (see the module docstring)."""
  seq_len = indices.shape[1]
  positions = tile_positions(group)
  sharing = selection_sharing(indices, (1, positions))
  blocks, union = sharing[1]["mean"], sharing[positions]["mean"]
  tiles = seq_len * HQ // ROWS  # the layer's tiles: Hkv * T / P
  row_block_flop = config.slc_block * D * 2 * 2  # S = Q K^T and P V: one query row, one block
  masked = tiles * union * ROWS * row_block_flop  # every tile row over the union
  useful = seq_len * HQ * blocks * row_block_flop  # each query row over its own blocks
  kv_bytes = tiles * union * config.slc_block * 2 * D * 2
  return dict(group=group, positions=positions, blocks_a_position=blocks,
              union_a_tile=union, union_p90=sharing[positions]["p90"],
              masked_tflop=masked / 1e12, useful_tflop=useful / 1e12,
              masked_over_useful=masked / useful, kv_gb=kv_bytes / 1e9,
              ms_at_mma=masked / (mma_tflops * 1e12) * 1e3,
              ms_at_l2=kv_bytes / (l2_tbps * 1e12) * 1e3)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--seq_len", type=int, default=65536)
  parser.add_argument("--groups", default="4,8,16", help="group sizes G on random inputs")
  parser.add_argument("--trained_indices", default="",
                      help="a selection_indices_<run>.npz at --seq_len (its first layer)")
  parser.add_argument("--mma_tflops", type=float, default=410.0)
  parser.add_argument("--l2_tbps", type=float, default=8.3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  config = nsa_jax.NSAConfig()
  rows = []
  for group in (int(g) for g in filter(None, args.groups.split(","))):
    start = time.time()
    row = tile_work(random_selection(args.seq_len, group, config), group, config,
                    args.mma_tflops, args.l2_tbps)
    rows.append(dict(selection="random", seconds=round(time.time() - start, 1), **row))
  if args.trained_indices:
    stored = np.load(args.trained_indices)["indices"]  # [B', T, Hkv', n]
    num_kv_heads = stored.shape[0] * stored.shape[2]
    try:
      indices = bench_kernels.load_trained_indices(args.trained_indices, args.seq_len,
                                                   num_kv_heads, config)
    except ValueError as error:
      parser.error(f"--trained_indices: {error}")
    rows.append(dict(selection=args.trained_indices,
                     **tile_work(np.asarray(indices), HQ // num_kv_heads, config,
                                 args.mma_tflops, args.l2_tbps)))
  print(f"T = {args.seq_len}, Hq = {HQ}, D = {D}: a layer's selected forward on Mosaic GPU")
  print(f"{'selection':>10} {'G':>3} {'P':>3} {'blocks':>7} {'union':>6} {'masked TF':>10} "
        f"{'useful TF':>10} {'K/V GB':>7} {'ms MMA':>7} {'ms L2':>6}")
  for row in rows:
    name = "random" if row["selection"] == "random" else "trained"
    print(f"{name:>10} {row['group']:3d} {row['positions']:3d} {row['blocks_a_position']:7.2f} "
          f"{row['union_a_tile']:6.1f} {row['masked_tflop']:10.2f} {row['useful_tflop']:10.2f} "
          f"{row['kv_gb']:7.0f} {row['ms_at_mma']:7.1f} {row['ms_at_l2']:6.1f}")
  return floor_cli.record(args.out, seq_len=args.seq_len, mma_tflops=args.mma_tflops,
                          l2_tbps=args.l2_tbps, rows=rows)


if __name__ == "__main__":
  main()

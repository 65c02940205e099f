"""Block-size sweep of the GPU compressed-attention kernel (forward, with the fused selection).

    python -m experiments.tune_gpu [--seq_len 65536]

B=1, Hq=64, Hkv=4, D=128, bf16, paper config. Prints one line per (ROWS, KEYS, warps, stages).
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp

import nsa_jax
from experiments.bench_kernels import median_ms
from pallas_kernels.gpu import compressed_attention as kernel


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seq_len", type=int, default=65536)
  args = parser.parse_args()
  t, config = args.seq_len, nsa_jax.NSAConfig()
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (1, t, 64, 128), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, t, 4, 128), jnp.bfloat16)
  k_cmp, v_cmp = nsa_jax.compress_kv(k, k, block=config.cmp_block, stride=config.cmp_stride)
  for rows, tile, warps, stages in itertools.product((64, 128), (32, 64), (4, 8), (2,)):
    kernel.ROWS, kernel.KEYS, kernel.NUM_WARPS, kernel.NUM_STAGES = rows, tile, warps, stages
    plain = jax.jit(lambda q: kernel.compressed_attention(
        q, k_cmp, v_cmp, block=32, stride=16, scale=128 ** -0.5)[0])
    fused = jax.jit(lambda q: kernel.compressed_attention_and_selection(
        q, k_cmp, v_cmp, block=32, stride=16, slc_block=64, num_selected=16, num_initial=1,
        num_local=2, scale=128 ** -0.5)[2])
    try:
      print(f"ROWS={rows:>3} KEYS={tile:>3} warps={warps} stages={stages}: "
            f"compressed {median_ms(plain, (q,), 5):7.2f} ms, "
            f"+selection {median_ms(fused, (q,), 5):7.2f} ms", flush=True)
    except Exception as err:  # a configuration that does not compile is skipped
      print(f"ROWS={rows} KEYS={tile} warps={warps} stages={stages}: failed "
            f"({type(err).__name__}: {str(err)[:120]})", flush=True)


if __name__ == "__main__":
  main()

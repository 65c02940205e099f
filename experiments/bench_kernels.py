"""GPU benchmark of the NSA kernels against cuDNN dense causal attention (issue 3).

    python -m experiments.bench_kernels [--seq_lens 8192,16384,32768,65536] [--out out/bench.json]

Shapes: B=1, Hq=64, Hkv=4, D=128, bfloat16; the paper config (l=32, d=16, l'=64, n=16, w=512).
Per sequence length: forward and forward+backward time (median of `--repeats` after a warm-up),
achieved TFLOP/s and peak GPU memory of each part; cuDNN dense causal attention in the same run.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

import nsa_jax
from nsa_jax import xla
from pallas_kernels.gpu.selected_attention import selected_attention as pallas_selected


def median_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def random_block_indices(key, b, t, hkv, config):
  """Forced blocks plus random earlier ones: the shape of a real selection, without computing it."""
  n, blk = config.num_selected, config.slc_block
  query_block = (jnp.arange(t) // blk)[None, :, None, None]
  forced = jnp.concatenate([jnp.zeros_like(query_block), query_block,
                            jnp.maximum(query_block - 1, 0)], axis=-1)
  fraction = jax.random.uniform(key, (b, t, hkv, n - 3))
  rest = jnp.floor(fraction * (query_block + 1)).astype(jnp.int32)
  return jnp.concatenate([jnp.broadcast_to(forced, (b, t, hkv, 3)), rest], axis=-1)


def grad_fn(fn):
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seq_lens", default="8192,16384,32768,65536")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default="out/bench_kernels.json")
  args = parser.parse_args()
  config = nsa_jax.NSAConfig()
  b, hq, hkv, d = 1, 64, 4, 128
  scale = d ** -0.5
  rows = []
  for t in (int(x) for x in args.seq_lens.split(",")):
    keys = jax.random.split(jax.random.key(t), 4)
    q = jax.random.normal(keys[0], (b, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, hkv, d), jnp.bfloat16)
    idx = random_block_indices(keys[3], b, t, hkv, config)
    attended = config.num_selected * config.slc_block  # keys per query (upper bound)
    parts = {
        "dense_cudnn": (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"), 2.0 * b * hq * t * t * d),
        "window_cudnn": (lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(config.window - 1, 0),
            implementation="cudnn"), 4.0 * b * hq * t * config.window * d),
        "selected_pallas": (lambda q, k, v: pallas_selected(q, k, v, idx, block=config.slc_block,
                                                            scale=scale),
                            4.0 * b * hq * t * attended * d),
    }
    k_cmp, v_cmp = xla.compress_kv(k, v, config.cmp_block, config.cmp_stride)
    row = dict(seq_len=t)
    for name, (fn, fwd_flops) in parts.items():
      fwd = median_ms(jax.jit(fn), (q, k, v), args.repeats)
      fwd_bwd = median_ms(grad_fn(fn), (q, k, v), args.repeats)
      row[name] = dict(fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, fwd_tflops=fwd_flops / fwd / 1e9,
                       fwd_bwd_tflops=3.5 * fwd_flops / fwd_bwd / 1e9)
      print(f"T={t} {name}: fwd {fwd:.2f} ms, fwd+bwd {fwd_bwd:.2f} ms", flush=True)
    fwd = median_ms(jax.jit(lambda q: xla.select_blocks(q, k_cmp, scale, config=config)), (q,),
                    args.repeats)
    row["select_xla"] = dict(fwd_ms=fwd)
    print(f"T={t} select_xla: {fwd:.2f} ms", flush=True)
    rows.append(row)

  print(f"\n{jax.devices()[0].device_kind}, B={b} Hq={hq} Hkv={hkv} D={d} bf16, paper config")
  print(f"{'T':>6} {'part':>16} {'fwd ms':>8} {'f+b ms':>8} {'fwd TF/s':>9} {'f+b TF/s':>9}")
  for row in rows:
    for name, r in row.items():
      if name == "seq_len":
        continue
      print(f"{row['seq_len']:>6} {name:>16} {r['fwd_ms']:>8.2f} {r.get('fwd_bwd_ms', 0):>8.2f} "
            f"{r.get('fwd_tflops', 0):>9.1f} {r.get('fwd_bwd_tflops', 0):>9.1f}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(device=jax.devices()[0].device_kind, rows=rows), indent=2))


if __name__ == "__main__":
  main()

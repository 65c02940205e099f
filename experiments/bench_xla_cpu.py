"""Time and peak memory of the XLA path, forward and forward+backward, on the CPU.

    python -m experiments.bench_xla_cpu [--seq_lens 4096,16384,32768] [--out out/bench_xla_cpu.json]

Shapes: B=1, Hq=16, Hkv=1, D=64, float32, the paper's NSAConfig (issue 2's memory target: T=32768
forward and backward within 8 GB peak RSS on a 2-core machine). Each sequence length runs in its own
process so that its peak RSS (ru_maxrss) is its own. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import subprocess
import sys
import time


def measure(seq_len: int, repeats: int) -> dict:
  """Runs in the child process: compile, then time forward and forward+backward."""
  import jax
  import jax.numpy as jnp

  import nsa_jax

  config = nsa_jax.NSAConfig()
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (1, seq_len, 16, 64), jnp.float32)
  k = jax.random.normal(kk, (1, seq_len, 1, 64), jnp.float32)
  v = jax.random.normal(kv, (1, seq_len, 1, 64), jnp.float32)
  attend = lambda q, k, v: nsa_jax.nsa_attention(q, k, v, config=config, implementation="xla")
  forward = jax.jit(attend)
  forward_backward = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), (0, 1, 2)))

  def best_time(fn):
    jax.block_until_ready(fn(q, k, v))  # compile and warm up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(q, k, v))
      times.append(time.perf_counter() - start)
    return min(times)

  result = dict(seq_len=seq_len, fwd_s=best_time(forward), fwd_bwd_s=best_time(forward_backward))
  result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seq_lens", default="4096,16384,32768")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--out", default="out/bench_xla_cpu.json")
  parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.child, args.repeats)))
    return

  rows = []
  for seq_len in (int(t) for t in args.seq_lens.split(",")):
    child = subprocess.run([sys.executable, "-m", "experiments.bench_xla_cpu", "--child",
                            str(seq_len), "--repeats", str(args.repeats)],
                           capture_output=True, text=True, check=True)
    rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"T={seq_len}: done", file=sys.stderr)

  import jax
  header = f"{'T':>7} {'fwd s':>8} {'fwd+bwd s':>10} {'peak RSS GiB':>13}"
  print(f"XLA path on {platform.processor() or platform.machine()}, {jax.device_count()} "
        f"CPU device(s), B=1 Hq=16 Hkv=1 D=64 float32, paper NSAConfig")
  print(header)
  for r in rows:
    print(f"{r['seq_len']:>7} {r['fwd_s']:>8.2f} {r['fwd_bwd_s']:>10.2f} {r['peak_rss_gib']:>13.2f}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(jax_version=jax.__version__, cpu_count=__import__("os").cpu_count(),
                                 shape=dict(B=1, Hq=16, Hkv=1, D=64, dtype="float32"),
                                 rows=rows), indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()

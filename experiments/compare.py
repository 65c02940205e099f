"""Runs NSA and dense causal attention side by side on the CPU and prints a table.

    python -m experiments.compare --config experiments/configs/compare_cpu.py

For each sequence length: forward and forward+backward time of NSA (XLA path) and of dense causal
attention (`jax.nn.dot_product_attention`), the fraction of its causal prefix each query attends,
and, up to `check_max_len`, two correctness checks: the XLA path against the dense-mask reference,
and NSA with every block selected and a window covering the sequence against dense attention
(`nsa - o_cmp == 2 * dense`). Writes `workdir/results.json`.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from ml_collections import config_flags

import nsa_jax

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to the experiment config file.",
                                          lock_config=True)


def best_time(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def attended_fraction(seq_len, config: nsa_jax.NSAConfig):
  """Mean over queries of (keys NSA attends) / (t + 1), counting all three branches."""
  t = np.arange(seq_len)
  cmp_blocks = np.maximum((t - config.cmp_block) // config.cmp_stride + 1, 0)
  selected = np.minimum(config.num_selected * config.slc_block, t + 1)
  window = np.minimum(config.window, t + 1)
  return float(np.mean(np.minimum(cmp_blocks + selected + window, t + 1) / (t + 1)))


def run_one(seq_len, cfg, nsa_config, key):
  dtype = jnp.dtype(cfg.dtype)
  kq, kk, kv = jax.random.split(key, 3)
  shape = (cfg.batch_size, seq_len)
  q = jax.random.normal(kq, shape + (cfg.num_heads, cfg.head_dim)).astype(dtype)
  k = jax.random.normal(kk, shape + (cfg.num_kv_heads, cfg.head_dim)).astype(dtype)
  v = jax.random.normal(kv, shape + (cfg.num_kv_heads, cfg.head_dim)).astype(dtype)
  nsa = lambda q, k, v: nsa_jax.nsa_attention(q, k, v, config=nsa_config, implementation="xla")
  dense = lambda q, k, v: nsa_jax.dense_causal_attention(q, k, v)
  grad_of = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), (0, 1, 2)))
  row = dict(seq_len=seq_len, attended_fraction=attended_fraction(seq_len, nsa_config))
  for name, fn in (("nsa", nsa), ("dense", dense)):
    row[f"{name}_fwd_ms"] = 1e3 * best_time(jax.jit(fn), q, k, v, repeats=cfg.repeats)
    row[f"{name}_fwd_bwd_ms"] = 1e3 * best_time(grad_of(fn), q, k, v, repeats=cfg.repeats)
  if seq_len <= cfg.check_max_len:
    expected = nsa_jax.nsa_attention(q, k, v, config=nsa_config, implementation="reference")
    row["xla_vs_reference"] = float(jnp.max(jnp.abs(nsa(q, k, v) - expected)))
    # Every block selected and a window covering the sequence: both branches are dense attention.
    full = nsa_jax.NSAConfig(**{**nsa_config.__dict__, "window": seq_len,
                                "num_selected": max(nsa_config.num_selected,
                                                    nsa_config.num_slc_blocks(seq_len))})
    out = nsa_jax.nsa_attention(q, k, v, config=full, implementation="xla")
    k_cmp, v_cmp = nsa_jax.compress_kv(k, v, block=full.cmp_block, stride=full.cmp_stride)
    o_cmp, _ = nsa_jax.compressed_attention(q, k_cmp, v_cmp, block=full.cmp_block,
                                            stride=full.cmp_stride)
    row["degenerate_vs_dense"] = float(jnp.max(jnp.abs(out - o_cmp - 2 * dense(q, k, v))))
  return row


def main(_):
  cfg = _CONFIG.value
  nsa_config = nsa_jax.NSAConfig(**cfg.nsa.to_dict())
  seq_lens = [int(t) for t in str(cfg.seq_lens).split(",")]
  key = jax.random.key(cfg.seed)
  rows = []
  for seq_len in seq_lens:
    key, sub = jax.random.split(key)
    rows.append(run_one(seq_len, cfg, nsa_config, sub))
    print(f"T={seq_len}: done", flush=True)

  print(f"\nNSA (XLA path) vs dense causal attention on {jax.default_backend()}: "
        f"B={cfg.batch_size} Hq={cfg.num_heads} Hkv={cfg.num_kv_heads} D={cfg.head_dim} "
        f"{cfg.dtype}, {nsa_config}")
  print(f"{'T':>6} {'attended':>9} {'nsa fwd ms':>11} {'dense fwd ms':>13} {'nsa f+b ms':>11} "
        f"{'dense f+b ms':>13} {'|xla-ref|':>10} {'|degen-dense|':>14}")
  fmt = lambda r, key: f"{r[key]:.1e}" if key in r else "-"
  for r in rows:
    print(f"{r['seq_len']:>6} {r['attended_fraction']:>9.1%} {r['nsa_fwd_ms']:>11.1f} "
          f"{r['dense_fwd_ms']:>13.1f} {r['nsa_fwd_bwd_ms']:>11.1f} {r['dense_fwd_bwd_ms']:>13.1f} "
          f"{fmt(r, 'xla_vs_reference'):>10} {fmt(r, 'degenerate_vs_dense'):>14}")
  workdir = pathlib.Path(cfg.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "results.json").write_text(json.dumps(
      dict(config=cfg.to_dict(), jax_version=jax.__version__, backend=jax.default_backend(),
           rows=rows), indent=2))
  print(f"wrote {workdir / 'results.json'}")


if __name__ == "__main__":
  app.run(main)

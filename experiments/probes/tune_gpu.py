"""Where the time of the GPU compressed branch goes, and launch-setting sweeps of the kernels.

    python -m experiments.probes.tune_gpu [--seq_len 65536]
    python -m experiments.probes.tune_gpu --variants selected.FWD_NUM_STAGES=3 \
        compressed.NUM_STAGES=3,compressed.NUM_WARPS=8 [--no_breakdown]
    python -m experiments.probes.tune_gpu --num_kv_heads 16 \
        --variants selected.PACK_ROWS=16  # G = 4
    python -m experiments.probes.tune_gpu --variants selected.FORWARD=mosaic \
        selected.FORWARD=mosaic,selected.DQ=mosaic,selected_mgpu.STAGES=2  # Mosaic GPU kernels

B=1, Hq=64, Hkv=4 (`--num_kv_heads`), D=128, bf16, paper config. The breakdown: the compressed
kernel alone, with the fused selection scores, with the top-n kernel after it (for 1, 2, 4 warps),
XLA's top_k on the same scores. Then, for the modules' defaults and each variant
(`module.NAME=VALUE,...`, read by `experiments.kernel_settings`), a table row: the fused
compressed forward (output and scores), the compressed forward+backward (gradients of q, k_cmp
and v_cmp), and the selected kernel's forward and forward+backward on the real selection.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import nsa_jax
from experiments import kernel_settings
from experiments.bench_kernels import median_ms, random_qkv
from nsa_jax import block_selection
from pallas_kernels.gpu import compressed_attention as compressed_kernel
from pallas_kernels.gpu import selected_attention as selected_kernel
from pallas_kernels.gpu import top_n

COMMON = dict(block=32, stride=16, scale=128 ** -0.5)


def breakdown(q, k_cmp, v_cmp, t, config):
  kernel = compressed_kernel
  plain = jax.jit(lambda q: kernel.compressed_attention(q, k_cmp, v_cmp, **COMMON)[0])
  scored = jax.jit(lambda q: kernel.compressed_attention_with_scores(
      q, k_cmp, v_cmp, slc_block=64, **COMMON)[2])
  print(f"compressed kernel:              {median_ms(plain, (q,), 5):7.2f} ms", flush=True)
  print(f"  + fused scores (sliced copy):  {median_ms(scored, (q,), 5):7.2f} ms", flush=True)
  scores = scored(q)  # [1, 4, T, Ts]
  selection = dict(seq_len=t, num_selected=16, slc_block=64, num_initial=1, num_local=2)
  width = 1 << (scores.shape[-1] - 1).bit_length()
  padded = jnp.pad(scores, [(0, 0), (0, 0), (0, 0), (0, width - scores.shape[-1])])
  default_warps = top_n.NUM_WARPS
  for warps in (1, 2, 4):
    top_n.NUM_WARPS = warps
    fn = jax.jit(lambda s: top_n.top_n_blocks(s, **selection))
    print(f"top-n kernel, {warps} warp(s):         {median_ms(fn, (padded,), 5):7.2f} ms",
          flush=True)
  top_n.NUM_WARPS = default_warps
  xla_top = jax.jit(lambda s: block_selection.top_n_blocks(
      s.transpose(0, 2, 1, 3), jnp.arange(t)[:, None], config))
  print(f"XLA lax.top_k selection:        {median_ms(xla_top, (scores,), 5):7.2f} ms", flush=True)
  fused = jax.jit(lambda q: kernel.compressed_attention_and_selection(
      q, k_cmp, v_cmp, slc_block=64, num_selected=16, num_initial=1, num_local=2, **COMMON)[2])
  print(f"compressed + scores + top-n:    {median_ms(fused, (q,), 5):7.2f} ms", flush=True)


def time_kernels(q, k, v, k_cmp, v_cmp, block_indices):
  """ms of: fused compressed fwd, compressed fwd+bwd, selected fwd, selected fwd+bwd."""
  loss = lambda fn: lambda *args: jnp.sum(fn(*args).astype(jnp.float32))
  scored = lambda q, k_cmp, v_cmp: compressed_kernel.compressed_attention_with_scores(
      q, k_cmp, v_cmp, slc_block=64, **COMMON)[2]
  compressed = lambda q, k_cmp, v_cmp: compressed_kernel.compressed_attention(
      q, k_cmp, v_cmp, **COMMON)[0]
  # The indices are an argument, not a closed-over constant: XLA would constant-fold the
  # backward's block -> queries map (a sort of T * n entries) for minutes.
  selected = lambda q, k, v, block_indices: selected_kernel.selected_attention(
      q, k, v, block_indices, block=64, scale=COMMON["scale"], indices_sorted=True)
  return [median_ms(jax.jit(scored), (q, k_cmp, v_cmp), 5),
          median_ms(jax.jit(jax.grad(loss(compressed), (0, 1, 2))), (q, k_cmp, v_cmp), 5),
          median_ms(jax.jit(selected), (q, k, v, block_indices), 5),
          median_ms(jax.jit(jax.grad(loss(selected), (0, 1, 2))), (q, k, v, block_indices), 5)]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seq_len", type=int, default=65536)
  parser.add_argument("--variants", nargs="*", default=[])
  parser.add_argument("--no_breakdown", action="store_true")
  parser.add_argument("--num_kv_heads", type=int, default=4)
  args = parser.parse_args()
  t, config = args.seq_len, nsa_jax.NSAConfig()
  q, k, v = random_qkv(t, args.num_kv_heads)  # B=1, Hq=64, D=128, bf16
  k_cmp, v_cmp = nsa_jax.compress_kv(k, v, block=config.cmp_block, stride=config.cmp_stride)
  if not args.no_breakdown:
    breakdown(q, k_cmp, v_cmp, t, config)
  block_indices = nsa_jax.select_blocks(q, k_cmp, config=config, implementation="pallas_gpu")
  print(f"\n{'variant':>60} {'cmp fwd':>8} {'cmp f+b':>8} {'slc fwd':>8} {'slc f+b':>8} (ms)")
  for variant in args.variants:
    kernel_settings.parse(variant)  # a mistyped setting fails before any timing
  for variant in ["defaults"] + args.variants:
    with kernel_settings.applied("" if variant == "defaults" else variant):
      try:
        times = " ".join(f"{ms:8.2f}"
                         for ms in time_kernels(q, k, v, k_cmp, v_cmp, block_indices))
      except Exception as err:  # a setting Triton cannot compile (shared memory): report it
        times = f"failed: {type(err).__name__}: {str(err)[:80]}"
    print(f"{variant:>60} {times}", flush=True)


if __name__ == "__main__":
  main()

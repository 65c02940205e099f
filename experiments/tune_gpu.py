"""Where the time of the GPU compressed branch goes, and the top-n kernel's warps.

    python -m experiments.tune_gpu [--seq_len 65536] [--dkv_variants DKV_KEYS=64,DKV_NUM_WARPS=8 ...]

B=1, Hq=64, Hkv=4, D=128, bf16, paper config. Prints: the compressed kernel alone, with the fused
selection scores, with the top-n kernel after it (for 1, 2, 4 warps), XLA's top_k on the
same scores, and the compressed kernel's forward+backward, once per setting of its dK/dV constants
(`NAME=VALUE,...`; the first is the module's defaults).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import nsa_jax
from experiments.bench_kernels import median_ms
from nsa_jax import block_selection
from pallas_kernels.gpu import compressed_attention as kernel
from pallas_kernels.gpu import top_n


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seq_len", type=int, default=65536)
  parser.add_argument("--dkv_variants", nargs="*", default=[])
  args = parser.parse_args()
  t, config = args.seq_len, nsa_jax.NSAConfig()
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (1, t, 64, 128), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, t, 4, 128), jnp.bfloat16)
  k_cmp, v_cmp = nsa_jax.compress_kv(k, k, block=config.cmp_block, stride=config.cmp_stride)
  common = dict(block=32, stride=16, scale=128 ** -0.5)
  plain = jax.jit(lambda q: kernel.compressed_attention(q, k_cmp, v_cmp, **common)[0])
  scored = jax.jit(lambda q: kernel.compressed_attention_with_scores(
      q, k_cmp, v_cmp, slc_block=64, **common)[2])
  print(f"compressed kernel:              {median_ms(plain, (q,), 5):7.2f} ms", flush=True)
  print(f"  + fused scores (sliced copy):  {median_ms(scored, (q,), 5):7.2f} ms", flush=True)
  scores = scored(q)  # [1, 4, T, Ts]
  selection = dict(seq_len=t, num_selected=16, slc_block=64, num_initial=1, num_local=2)
  width = 1 << (scores.shape[-1] - 1).bit_length()
  padded = jnp.pad(scores, [(0, 0), (0, 0), (0, 0), (0, width - scores.shape[-1])])
  for warps in (1, 2, 4):
    top_n.NUM_WARPS = warps
    fn = jax.jit(lambda s: top_n.top_n_blocks(s, **selection))
    print(f"top-n kernel, {warps} warp(s):         {median_ms(fn, (padded,), 5):7.2f} ms",
          flush=True)
  top_n.NUM_WARPS = 1
  xla_top = jax.jit(lambda s: block_selection.top_n_blocks(
      s.transpose(0, 2, 1, 3), jnp.arange(t)[:, None], config))
  print(f"XLA lax.top_k selection:        {median_ms(xla_top, (scores,), 5):7.2f} ms", flush=True)
  fused = jax.jit(lambda q: kernel.compressed_attention_and_selection(
      q, k_cmp, v_cmp, slc_block=64, num_selected=16, num_initial=1, num_local=2, **common)[2])
  print(f"compressed + scores + top-n:    {median_ms(fused, (q,), 5):7.2f} ms", flush=True)
  defaults = {name: getattr(kernel, name) for name in dir(kernel) if name.startswith("DKV_")}
  for variant in ["defaults"] + args.dkv_variants:
    settings = {} if variant == "defaults" else dict(x.split("=") for x in variant.split(","))
    for name, value in {**defaults, **{n: int(v) for n, v in settings.items()}}.items():
      setattr(kernel, name, value)
    loss = lambda q, k_cmp, v_cmp: jnp.sum(kernel.compressed_attention(
        q, k_cmp, v_cmp, **common)[0].astype(jnp.float32))
    grad = jax.jit(jax.grad(loss, (0, 1, 2)))
    print(f"compressed fwd+bwd, {variant}: {median_ms(grad, (q, k_cmp, v_cmp), 5):7.2f} ms",
          flush=True)
  for name, value in defaults.items():
    setattr(kernel, name, value)

if __name__ == "__main__":
  main()

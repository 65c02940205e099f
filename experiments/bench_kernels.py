"""Benchmark of NSA's kernels against dense causal attention: on GPU `implementation=
"pallas_gpu"` against cuDNN, on TPU `"pallas_tpu"` against splash attention.

    python -m experiments.bench_kernels [--seq_lens 8192,16384,32768,65536,131072]
                                        [--repeats 10] [--out out/bench_kernels.json]
    python -m experiments.bench_kernels --trace 65536   # per-kernel time of full NSA at T (GPU)
    python -m experiments.bench_kernels --trace 65536 --documents 8  # ... of a packed row
    python -m experiments.bench_kernels --trace 65536 --trained_indices FILE  # ... on a trained
                                        # selection (the three branch calls, default kernels)
    python -m experiments.bench_kernels --num_kv_heads 16 --seq_lens 65536  # G = 4
    python -m experiments.bench_kernels --platform tpu  # the default on a TPU host
    python -m experiments.bench_kernels --seq_lens 65536 --documents 8,64  # packed rows
    python -m experiments.bench_kernels --seq_lens 8192 --trained_indices \
        experiments/results/gpu_2026-12-04/mqar_curriculum/selection_indices_c8k_nsa.npz \
        [--trained_layer 1]   # another layer's selection (files that hold every layer's)
    python -m experiments.bench_kernels --seq_lens 16384 --parts "dense_cudnn,nsa default" \
        --settings compressed.TAILS_APART=1  # a kernel option, against a run without it

Shapes: B=1, Hq=64, Hkv=4 (`--num_kv_heads`), D=128, bfloat16. Configs: the paper's (l=32, d=16,
l'=64, n=16, w=512) and fla-core's comparable one (l=d=l'=64, n=16, window excluded, as fla-core
times it). Per sequence length and part: forward and forward+backward time (median of `--repeats`
samples after a warm-up, each of back-to-back calls: `median_ms`), achieved TFLOP/s (useful FLOPs:
causal halves counted once) and the compiled program's GPU memory (arguments + outputs +
temporaries, from XLA's memory analysis). Parts (on GPU the plain ones with every selected kernel
on Triton, whatever the defaults): the whole `nsa_attention`, each branch (on GPU the compressed
one both as the public op's Pallas kernel and as nsa_attention runs it, cuDNN over folded
queries; the selected one, and NSA, also with the Mosaic GPU forward and dQ and Triton's dK/dV:
"... mosaic", with the Mosaic dK/dV instead: "... mosaic dkv" (the default on Hopper for G >= 8),
or with the Mosaic selection-score pass: "nsa mosaic scores"; with the kernels the defaults
choose for the shape, what a user runs: "nsa default"; that pass alone from the compressed
branch's log-sum-exp: "scores", "scores mosaic"), the fused compressed branch + selection, and
the dense baseline.
Prints a table and writes JSON.

Trained selections (`--trained_indices`, an `experiments.plot` `selection_indices_<run>.npz` of
`[B', T', Hkv', n]`): at `T = T'` more rows time the selected kernel on those indices
("selected trained") and NSA as three branch calls selecting with its own indices ("nsa
composed") or with the trained ones ("nsa trained"), on GPU also with the Mosaic GPU kernels
("selected trained mosaic", "nsa trained mosaic": their tiles' unions shrink where neighbouring
positions share blocks; "nsa trained default": the defaults' choice); the tensor's (row, KV
head) selections become the benchmark's KV heads, in order.

Packed rows (`--documents N,...`, paper config): the row of length T as N documents of T / N
tokens: "nsa packed/N" (`segment_ids`), "nsa batched/N" (the same documents as a batch of N
rows, unpacked) and "dense/N" (dense causal attention over that batch: exactly the attention of
the packed row), beside the one-document rows; "... default" with the default kernels, and
"nsa packed/N unaligned default" with each document one token later (starts off the blocks'
boundaries, which the whole-block route needs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

import nsa_jax
from experiments import kernel_settings
from experiments.probes import gpu_trace
from nsa_jax import cudnn_compressed, pallas_gpu, pallas_tpu
from pallas_kernels.gpu import compressed_attention as compressed_kernel
from pallas_kernels.gpu import selected_attention as selected_kernel
from pallas_kernels.tpu import compressed_attention as tpu_compressed_kernel
from pallas_kernels.tpu import selected_attention as tpu_selected_kernel
from pallas_kernels.tpu import sliding_window as tpu_window

B, HQ, HKV, D = 1, 64, 4, 128
PAPER = nsa_jax.NSAConfig()
FLA = nsa_jax.NSAConfig(cmp_block=64, cmp_stride=64, slc_block=64, num_selected=16, num_initial=1,
                        num_local=2, window=64)


def cudnn_causal(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def splash_causal(q, k, v):
  return tpu_window.causal_attention(q, k, v, scale=D ** -0.5)


# What each platform times: its implementation, the glue module whose fused compressed-and-select
# call it uses, its kernel modules, and its dense baseline.
PLATFORMS = {
    "gpu": types.SimpleNamespace(implementation="pallas_gpu", glue=pallas_gpu,
                                 compressed=compressed_kernel, selected=selected_kernel,
                                 dense_name="dense_cudnn", dense=cudnn_causal),
    "tpu": types.SimpleNamespace(implementation="pallas_tpu", glue=pallas_tpu,
                                 compressed=tpu_compressed_kernel, selected=tpu_selected_kernel,
                                 dense_name="dense_splash", dense=splash_causal),
}


SAMPLE_MS = 50.0  # each timing sample runs back-to-back calls for about this long


def median_ms(fn, args, repeats):
  """Milliseconds per call: the median over `repeats` samples, each of back-to-back calls (one
  sync at the end) lasting about SAMPLE_MS. Inside a jitted model nothing waits for the host
  between calls; one call per sync would add the host's dispatch of every kernel (~0.4 ms for
  NSA's ~15 launches, ~0.05 ms for cuDNN's one) to short runs."""
  jax.block_until_ready(fn(*args))  # warm-up (a jitted function compiles here)
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))  # a first estimate of one call
  calls = max(1, min(100, int(SAMPLE_MS / 1e3 / (time.perf_counter() - start))))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(calls)])
    times.append((time.perf_counter() - start) / calls)
  return 1e3 * statistics.median(times)


def compiled_and_gib(fn, args):
  """`(executable, GiB of arguments + outputs + temporaries)`: one compile for both (timing a
  `jax.jit` call and then lowering it again for its memory would compile twice)."""
  compiled = jax.jit(fn).lower(*args).compile()
  stats = compiled.memory_analysis()
  total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
  return compiled, total / 2**30


def sum_of(fn):
  """Scalar loss of a (q, k, v, inputs) -> out function, for timing forward+backward."""
  return lambda q, k, v, inputs: jnp.sum(fn(q, k, v, inputs).astype(jnp.float32))


def part_inputs(q, k, v, config, platform=PLATFORMS["gpu"]):
  """What the parts take besides q, k, v: the compressed keys / values and the selection. They
  are arguments of the timed programs, not closed-over constants, which XLA would fold at compile
  time (the selected kernel's index sorts and block -> queries map, for minutes at 64k)."""
  k_cmp, v_cmp = nsa_jax.compress_kv(k, v, block=config.cmp_block, stride=config.cmp_stride)
  inputs = dict(k_cmp=k_cmp, v_cmp=v_cmp, block_indices=nsa_jax.select_blocks(
      q, k_cmp, config=config, implementation=platform.implementation))
  # The compressed branch's log-sum-exp, which the selection-score pass reads.
  inputs["cmp_lse"] = nsa_jax.compressed_attention(
      q, k_cmp, v_cmp, block=config.cmp_block, stride=config.cmp_stride,
      implementation=platform.implementation)[1]
  return inputs


def load_trained_indices(path, t, num_kv_heads, config, layer=0):
  """Block indices `int32 [1, t, num_kv_heads, n]` from a trained model's `[B', T', Hkv', n]`
  (`experiments.plot`'s `selection_indices_<run>.npz`, of its layer `layer`): its first
  `num_kv_heads` (row, KV head) selections. Raises ValueError unless `T' = t`, the tensor's `n`
  and block size are the config's and the file holds that layer."""
  data = np.load(path)
  block = int(data["slc_block"])
  # Older files hold the first layer's selection only.
  layers = data["indices_by_layer"] if "indices_by_layer" in data else data["indices"][None]
  if layer >= len(layers):
    raise ValueError(f"trained indices {path}: layer {layer} asked, the file holds "
                     f"{len(layers)} layer(s)")
  indices = layers[layer]
  if (indices.shape[1], indices.shape[3], block) != (t, config.num_selected, config.slc_block):
    raise ValueError(f"trained indices {path}: [B, T, Hkv, n] = {indices.shape} with blocks of "
                     f"{block}; the benchmark needs T = {t}, n = {config.num_selected}, blocks "
                     f"of {config.slc_block}")
  heads = indices.transpose(0, 2, 1, 3).reshape(-1, t, indices.shape[3])  # [B' * Hkv', T, n]
  if heads.shape[0] < num_kv_heads:
    raise ValueError(f"trained indices {path}: {heads.shape[0]} (row, KV head) selections, the "
                     f"benchmark needs {num_kv_heads}")
  return jnp.asarray(heads[:num_kv_heads].transpose(1, 0, 2)[None], jnp.int32)


def trained_parts(config, platform, nsa_flops, slc_flops):
  """The parts on trained indices (`inputs["trained_indices"]`), as `parts_for` returns them."""
  scale = D ** -0.5

  def nsa_composed(trained):
    """The three branches as separate calls (gates None), selecting with the computed or
    the trained indices; the same program otherwise."""
    def fn(q, k, v, x):
      k_cmp, v_cmp = platform.glue.compress_kv(k, v, config.cmp_block, config.cmp_stride)
      o_cmp, idx = platform.glue.compressed_attention_and_selection(q, k_cmp, v_cmp, scale,
                                                                    config, False)
      if trained:  # replaced, not dropped: XLA would otherwise remove the selection's top-n
        idx = jnp.where(idx == -2, idx, x["trained_indices"])
      o_slc = platform.selected.selected_attention(q, k, v, idx, block=config.slc_block,
                                                   scale=scale)
      o_swa = nsa_jax.sliding_window_attention(q, k, v, window=config.window,
                                               implementation=platform.implementation)
      return o_cmp + o_slc + o_swa
    return fn

  parts = {
      "nsa composed": (nsa_composed(trained=False), nsa_flops, True),
      "nsa trained": (nsa_composed(trained=True), nsa_flops, True),
      "selected trained": (lambda q, k, v, x: platform.selected.selected_attention(
          q, k, v, x["trained_indices"], block=config.slc_block, scale=scale), slc_flops, True),
  }
  if platform is PLATFORMS["gpu"]:
    # Where neighbouring positions share blocks, the Mosaic tiles' unions shrink.
    for name in ("nsa trained", "selected trained"):
      parts[f"{name} mosaic"] = (on_mosaic(parts[name][0]),) + parts[name][1:]
      parts[f"{name} mosaic dkv"] = (on_mosaic(parts[name][0], "mosaic"),) + parts[name][1:]
    parts["nsa trained default"] = parts["nsa trained"]
    parts["nsa trained mosaic scores"] = (
        on_mosaic(parts["nsa trained"][0], scores="mosaic"),) + parts["nsa trained"][1:]
  return parts


def on_kernels(fn, choice: str, dkv: str | None = None, scores: str | None = None):
  """`fn` traced with the selected forward and dQ set to `choice` ("triton" or "mosaic":
  `selected_attention.FORWARD`, `DQ`, read when a call is traced), the dK/dV to `dkv` (`DKV`)
  and the selection-score pass to `scores` (`compressed_attention.SCORES`; None: defaults)."""
  def traced(*args):
    saved = (selected_kernel.FORWARD, selected_kernel.DQ, selected_kernel.DKV,
             compressed_kernel.SCORES)
    selected_kernel.FORWARD = selected_kernel.DQ = choice
    selected_kernel.DKV = dkv or selected_kernel.DKV
    compressed_kernel.SCORES = scores or compressed_kernel.SCORES
    try:
      return fn(*args)
    finally:
      (selected_kernel.FORWARD, selected_kernel.DQ, selected_kernel.DKV,
       compressed_kernel.SCORES) = saved
  return traced


def on_mosaic(fn, dkv: str = "triton", scores: str | None = None):
  """`fn` traced with the selected forward and dQ on Mosaic GPU (the dK/dV on `dkv`, the score
  pass on `scores`)."""
  return on_kernels(fn, "mosaic", dkv, scores)


def parts_for(t, config, with_window=True, platform=PLATFORMS["gpu"]):
  """name -> (function of (q, k, v, part_inputs), forward FLOPs, differentiable in q, k, v)."""
  scale = D ** -0.5
  num_cmp = config.num_cmp_blocks(t)
  flops = lambda keys: 4.0 * B * HQ * t * keys * D  # QK^T and PV over `keys` keys per query
  slc_keys = min(config.num_selected * config.slc_block, t / 2)
  nsa_keys = num_cmp / 2 + slc_keys + (min(config.window, t / 2) if with_window else 0)

  impl = platform.implementation

  def nsa_no_window(q, k, v, _):
    k_cmp, v_cmp = platform.glue.compress_kv(k, v, config.cmp_block, config.cmp_stride)
    o_cmp, idx = platform.glue.compressed_attention_and_selection(q, k_cmp, v_cmp, scale,
                                                                  config, False)
    o_slc = platform.selected.selected_attention(q, k, v, idx, block=config.slc_block,
                                                 scale=scale)
    return o_cmp + o_slc

  parts = {
      "nsa": ((lambda q, k, v, _: nsa_jax.nsa_attention(q, k, v, config=config,
                                                        implementation=impl))
              if with_window else nsa_no_window, flops(nsa_keys), True),
      "compressed": (lambda q, k, v, x: platform.compressed.compressed_attention(
          q, x["k_cmp"], x["v_cmp"], block=config.cmp_block, stride=config.cmp_stride,
          scale=scale)[0], flops(num_cmp / 2), True),
      "cmp+selection": (lambda q, k, v, x: nsa_jax.select_blocks(
          q, x["k_cmp"], config=config, implementation=impl), flops(num_cmp / 2), False),
      "selected": (lambda q, k, v, x: platform.selected.selected_attention(
          q, k, v, x["block_indices"], block=config.slc_block, scale=scale), flops(slc_keys),
                   True),
  }
  # The compressed and selected branches as a layer with separate K/V sets runs them
  # (`nsa_jax.nn`, separate_kv=True): the public ops apart (two passes over the compressed keys)
  # and `compressed_attention_and_selection` (one).
  def cmp_and_slc(fused):
    def fn(q, k, v, x):
      if fused:
        o_cmp, idx = nsa_jax.compressed_attention_and_selection(
            q, x["k_cmp"], x["v_cmp"], config=config, implementation=impl)
      else:
        o_cmp, _ = nsa_jax.compressed_attention(q, x["k_cmp"], x["v_cmp"], block=config.cmp_block,
                                                stride=config.cmp_stride, implementation=impl)
        idx = nsa_jax.select_blocks(q, x["k_cmp"], config=config, implementation=impl)
      return o_cmp + nsa_jax.selected_attention(q, k, v, idx, block=config.slc_block,
                                                implementation=impl)
    return fn, flops(num_cmp / 2 + slc_keys), True
  parts["cmp+slc apart"] = cmp_and_slc(fused=False)
  parts["cmp+slc fused"] = cmp_and_slc(fused=True)
  if platform is PLATFORMS["gpu"]:
    # The selected forward and dQ on Mosaic GPU (TMA + wgmma over 64-row tiles), Triton's dK/dV.
    parts["selected mosaic"] = (on_mosaic(parts["selected"][0]),) + parts["selected"][1:]
    parts["nsa mosaic"] = (on_mosaic(parts["nsa"][0]),) + parts["nsa"][1:]
    # ... and the dK/dV too (`DKV = "mosaic"`), or the score pass (`SCORES`, not the default).
    for name in ("selected", "nsa"):
      parts[f"{name} mosaic dkv"] = (on_mosaic(parts[name][0], "mosaic"),) + parts[name][1:]
    parts["nsa mosaic scores"] = (on_mosaic(parts["nsa"][0], scores="mosaic"),) + parts["nsa"][1:]
    # ... and on whatever the defaults choose for the shape ("auto": what a user runs).
    parts["nsa default"] = parts["nsa"]
  if platform is PLATFORMS["gpu"] and cudnn_compressed.available():
    # The compressed branch as nsa_attention runs it on GPU: cuDNN over folded queries (the
    # `compressed` row above is the Pallas kernel behind the public `compressed_attention`).
    parts["compressed_cudnn"] = (lambda q, k, v, x: cudnn_compressed.compressed_attention(
        q, x["k_cmp"], x["v_cmp"], scale, block=config.cmp_block, stride=config.cmp_stride)[0],
                                 flops(num_cmp / 2), True)
    # The selection-score pass alone, from that log-sum-exp (its FLOPs: `q . k_cmp` only), on
    # Triton and on Mosaic GPU.
    scores = lambda q, k, v, x: compressed_kernel.selection_scores_from_lse(
        q, x["k_cmp"], x["cmp_lse"], block=config.cmp_block, stride=config.cmp_stride,
        slc_block=config.slc_block, scale=scale)
    parts["scores"] = (scores, flops(num_cmp / 2) / 2, False)
    parts["scores mosaic"] = (on_mosaic(scores, scores="mosaic"), flops(num_cmp / 2) / 2, False)
  if with_window:
    parts["window"] = (lambda q, k, v, _: nsa_jax.sliding_window_attention(
        q, k, v, window=config.window, implementation=impl),
                       flops(min(config.window, t / 2)), True)
    parts[platform.dense_name] = (lambda q, k, v, _: platform.dense(q, k, v), flops(t / 2),
                                  True)
  return parts


def packed_parts(t, num_docs, config, platform=PLATFORMS["gpu"]):
  """Rows of `num_docs` documents of `t / num_docs` tokens packed in the one row of length `t`:
  NSA on the packed row (`segment_ids`), NSA on the same documents as a batch (the unpacked
  kernels on them), and dense attention over the same documents (causal over the batch), as
  `parts_for`'s name -> (function, forward FLOPs, differentiable)."""
  if t % num_docs:
    raise ValueError(f"--documents: {num_docs} documents do not split T = {t} evenly")
  length = t // num_docs
  segment_ids = jnp.repeat(jnp.arange(num_docs, dtype=jnp.int32), length)[None]
  as_batch = lambda x: x.reshape(num_docs, length, *x.shape[2:])
  per_doc = parts_for(length, config, platform=platform)
  flops = lambda name: num_docs * per_doc[name][1]
  # The same documents each one token later (the first one token longer, the last one shorter):
  # no document but the first starts on a block boundary.
  lengths = np.full(num_docs, length)
  lengths[0], lengths[-1] = length + 1, length - 1
  unaligned_ids = jnp.asarray(np.repeat(np.arange(num_docs), lengths), jnp.int32)[None]
  impl = platform.implementation
  packed = lambda ids: (lambda q, k, v, _: nsa_jax.nsa_attention(
      q, k, v, config=config, implementation=impl, segment_ids=ids))
  batched = lambda q, k, v, _: nsa_jax.nsa_attention(as_batch(q), as_batch(k), as_batch(v),
                                                     config=config, implementation=impl)
  parts = {
      f"nsa packed/{num_docs}": (packed(segment_ids), flops("nsa"), True),
      f"nsa batched/{num_docs}": (batched, flops("nsa"), True),
      f"dense/{num_docs}": (lambda q, k, v, _: platform.dense(as_batch(q), as_batch(k),
                                                              as_batch(v)),
                            flops(platform.dense_name), True),
  }
  # With the kernels the defaults choose (the plain rows pin every selected kernel to Triton).
  parts[f"nsa packed/{num_docs} default"] = parts[f"nsa packed/{num_docs}"]
  parts[f"nsa batched/{num_docs} default"] = parts[f"nsa batched/{num_docs}"]
  parts[f"nsa packed/{num_docs} unaligned default"] = (packed(unaligned_ids), flops("nsa"), True)
  return parts


def random_qkv(t, num_kv_heads):
  keys = jax.random.split(jax.random.key(t), 3)
  q = jax.random.normal(keys[0], (B, t, HQ, D), jnp.bfloat16)
  k = jax.random.normal(keys[1], (B, t, num_kv_heads, D), jnp.bfloat16)
  v = jax.random.normal(keys[2], (B, t, num_kv_heads, D), jnp.bfloat16)
  return q, k, v


def kernels_of_part(name, fn, platform):
  """`fn` as part `name` is timed: on GPU every selected kernel on Triton whatever the defaults,
  except in "... default" parts (the defaults' choice); parts built with `on_mosaic` set their
  own kernels inside this pin, so theirs win."""
  if platform is PLATFORMS["gpu"] and not name.endswith(("mosaic", "default")):
    return on_kernels(fn, "triton", "triton")
  return fn


def measure(t, config, with_window, repeats, num_kv_heads=HKV, platform=PLATFORMS["gpu"],
            only=None, trained_indices=None, documents=()):
  """Rows of every part (or of the parts named in `only`) at sequence length `t`, plus the
  trained-selection parts when `trained_indices [1, t, Hkv, n]` are given and the packed-row
  parts for each document count in `documents`."""
  q, k, v = random_qkv(t, num_kv_heads)
  inputs = part_inputs(q, k, v, config, platform)
  parts = parts_for(t, config, with_window, platform)
  if trained_indices is not None:
    inputs["trained_indices"] = trained_indices
    parts.update(trained_parts(config, platform, parts["nsa"][1], parts["selected"][1]))
  for num_docs in documents:
    parts.update(packed_parts(t, num_docs, config, platform))
  args = (q, k, v, inputs)
  rows = []
  for name, (fn, fwd_flops, differentiable) in parts.items():
    if only and name not in only:
      continue
    fn = kernels_of_part(name, fn, platform)
    # Traced afresh: switches such as `selected_attention.FORWARD` are read at trace time, and an
    # inner `jax.jit` (`nsa_attention`'s) would otherwise keep the previous part's choice.
    jax.clear_caches()
    forward, forward_gib = compiled_and_gib(fn, args)
    row = dict(seq_len=t, part=name, fwd_ms=median_ms(forward, args, repeats),
               fwd_gib=forward_gib)
    row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
    if differentiable:
      backward, backward_gib = compiled_and_gib(jax.grad(sum_of(fn), (0, 1, 2)), args)
      row["fwd_bwd_ms"] = median_ms(backward, args, repeats)
      row["fwd_bwd_gib"] = backward_gib
      row["fwd_bwd_tflops"] = 3.5 * fwd_flops / row["fwd_bwd_ms"] / 1e9  # bwd ~ 2.5x fwd
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def print_table(title, rows):
  print(f"\n{title}")
  print(f"{'T':>7} {'part':>16} {'fwd ms':>8} {'f+b ms':>8} {'fwd TF/s':>9} {'f+b TF/s':>9} "
        f"{'fwd GiB':>8} {'f+b GiB':>8}")
  for r in rows:
    get = lambda key, fmt: format(r[key], fmt) if key in r else "-"
    print(f"{r['seq_len']:>7} {r['part']:>16} {get('fwd_ms', '8.2f'):>8} "
          f"{get('fwd_bwd_ms', '8.2f'):>8} {get('fwd_tflops', '9.1f'):>9} "
          f"{get('fwd_bwd_tflops', '9.1f'):>9} {get('fwd_gib', '8.2f'):>8} "
          f"{get('fwd_bwd_gib', '8.2f'):>8}")


def trace(t, num_kv_heads=HKV, top=14, num_docs=0, trained_indices=None):
  """Per-kernel device time of full NSA (paper config) at `t`, forward and forward+backward;
  with `num_docs`, of the packed row of that many equal documents (`packed_parts`); with
  `trained_indices [1, t, Hkv, n]`, of the three branches selecting with them (the part "nsa
  trained" of `trained_parts`: separate branch calls on the default kernels)."""
  q, k, v = random_qkv(t, num_kv_heads)
  inputs = None
  if num_docs:
    nsa = packed_parts(t, num_docs, PAPER)[f"nsa packed/{num_docs}"][0]
    what = f"NSA packed/{num_docs}"
  elif trained_indices is not None:
    nsa = trained_parts(PAPER, PLATFORMS["gpu"], 0.0, 0.0)["nsa trained"][0]
    what, inputs = "NSA trained", dict(trained_indices=trained_indices)
  else:
    nsa, what = parts_for(t, PAPER)["nsa"][0], "NSA"
  for title, fn in (("forward", jax.jit(nsa)),
                    ("forward+backward", jax.jit(jax.grad(sum_of(nsa), (0, 1, 2))))):
    times = gpu_trace.kernel_times(lambda: jax.block_until_ready(fn(q, k, v, inputs)))
    print(f"\nT={t} {what} {title}: {sum(times.values()) / 1e3:.2f} ms of kernels")
    for name, us in list(times.items())[:top]:
      print(f"{us / 1e3:9.3f} ms  {name[:90]}")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seq_lens", default="8192,16384,32768,65536,131072")
  parser.add_argument("--fla_seq_lens", default="8192,16384,32768,65536")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default="out/bench_kernels.json")
  parser.add_argument("--num_kv_heads", type=int, default=HKV,
                      help=f"Hkv (G = {HQ} / Hkv): small groups load more K/V bytes per FLOP")
  parser.add_argument("--trace", type=int, default=0,
                      help="instead: per-kernel GPU time of full NSA at this sequence length "
                           "(of a packed row with --documents N: the first count given; on "
                           "--trained_indices: the part 'nsa trained')")
  parser.add_argument("--parts", default="",
                      help="comma-separated part names to time (default: all)")
  parser.add_argument("--trained_indices", default="",
                      help="a selection_indices_<run>.npz: also time the selection on it at its T")
  parser.add_argument("--trained_layer", type=int, default=0,
                      help="which layer's selection of --trained_indices (default: the first)")
  parser.add_argument("--documents", default="",
                      help="comma-separated document counts: also time packed rows of that many "
                           "equal documents (paper config), e.g. 8,64 at T = 65536")
  parser.add_argument("--platform", choices=sorted(PLATFORMS),
                      default="tpu" if jax.default_backend() == "tpu" else "gpu")
  parser.add_argument("--settings", default="",
                      help="GPU kernel constants for the whole run, module.NAME=VALUE,... "
                           "(experiments.kernel_settings), e.g. compressed.TAILS_APART=1: "
                           "time an option against a run without it")
  args = parser.parse_args()
  try:
    kernel_settings.parse(args.settings)
  except ValueError as error:
    parser.error(f"--settings: {error}")
  with kernel_settings.applied(args.settings):
    run(parser, args)


def run(parser, args):
  """`main` with the arguments parsed and the kernel settings in place."""
  if args.trace:
    if args.platform != "gpu":
      parser.error("--trace reads GPU profiler traces")
    documents = [int(x) for x in args.documents.split(",") if x]
    if documents and args.trained_indices:
      parser.error("--trace takes --documents or --trained_indices, not both")
    trained = (load_trained_indices(args.trained_indices, args.trace, args.num_kv_heads, PAPER,
                                    args.trained_layer) if args.trained_indices else None)
    trace(args.trace, args.num_kv_heads, num_docs=documents[0] if documents else 0,
          trained_indices=trained)
    return
  platform = PLATFORMS[args.platform]
  only = set(filter(None, args.parts.split(",")))
  paper, fla = [], []
  trained_len = (np.load(args.trained_indices)["indices"].shape[1] if args.trained_indices
                 else None)
  documents = [int(x) for x in args.documents.split(",") if x]
  for t in (int(x) for x in args.seq_lens.split(",") if x):
    trained = (load_trained_indices(args.trained_indices, t, args.num_kv_heads, PAPER,
                                    args.trained_layer)
               if t == trained_len else None)
    paper += measure(t, PAPER, True, args.repeats, args.num_kv_heads, platform, only, trained,
                     documents)
  for t in (int(x) for x in args.fla_seq_lens.split(",") if x):
    fla += measure(t, FLA, False, args.repeats, args.num_kv_heads, platform, only)
  device = jax.devices()[0].device_kind
  print_table(f"{device}, B={B} Hq={HQ} Hkv={args.num_kv_heads} D={D} bf16, paper config {PAPER}",
              paper)
  print_table(f"{device}, fla-core comparable config (l=d=l'=64, n=16, no window)", fla)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(device=device, date=str(datetime.date.today()),
                                 jax_version=jax.__version__, platform=args.platform,
                                 num_kv_heads=args.num_kv_heads,
                                 trained_indices=args.trained_indices or None,
                                 trained_layer=(args.trained_layer if args.trained_indices
                                                else None),
                                 settings=args.settings or None,
                                 paper=paper, fla=fla), indent=2))


if __name__ == "__main__":
  main()

"""Per-token decode latency of NSA against dense decoding, and the KV bytes each step reads.

    python -m experiments.bench_decode [--contexts 8192,16384,32768,65536,131072]
                                       [--batches 1,8] [--impls xla,pallas_gpu]
                                       [--steps 48] [--repeats 5] [--layers 1]
                                       [--out out/bench_decode.json]

Shapes: Hq=64, Hkv=4, D=128, bfloat16, the paper's NSA config. For each context length C the
cache holds C - 1 tokens and one step appends token C and attends it (cache update included, the
cache updated in place). Steps run in jitted loops of `--steps` and twice as many steps, and the
time per token is the difference of the two over `--steps` (`time_steps`), so the fixed cost of a
timed call (dispatch, launch, sync: ~0.3-0.45 ms, which a 2026-11-27 measurement found had added
5-7 us a token to earlier tables timed over 64 steps) is not counted; the context grows by
3 * steps * (repeats + 1) tokens over a measurement (864 by default, 1.3% at 64k). Dense
decoding is timed the same way: `dense_xla` (one einsum over the cache, masked past the length)
and `dense_cudnn` (`jax.nn.dot_product_attention` with `key_value_seq_lengths`, where cuDNN
takes it).

`--impls`: NSA decode implementations (`nsa_decode_step`'s), or `separate_kv_<implementation>`:
a layer with a K/V set per branch (`nsa_decode_step_separate_kv`).

`--layers L`: each step runs L decode layers, each with its own cache, each layer's output the
next layer's query, as a model's decode step does; times are per layer. With L = 1 (the default)
every layer also carries the timing loop's own cost per step (its counter and the output sum, 2-3
us of kernels at 64k on an H200, and the loop's per-iteration cost in the CUDA graph), which a
model's step spreads over all its layers.

Tokens read per step are the paper's Table 4 count: visible compressed blocks + n * l' + w for
NSA (2048, 2560, 3584, 5632 at 8k..64k), the context for dense. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

import nsa_jax
from nsa_jax.decode import DecodeCache, DenseCache, init_decode_cache, nsa_decode_step
from nsa_jax.decode import nsa_decode_step_separate_kv

HQ, HKV, D = 64, 4, 128
DTYPE = jnp.bfloat16
CONFIG = nsa_jax.NSAConfig()
CACHE_MARGIN = 1024  # cache slots past the context, for the timed steps' tokens


def time_steps(step, state, inputs, steps, repeats):
  """Device seconds per call of `state = step(state, *inputs)`: the slope between loops of
  `steps` and `2 * steps` calls.

  Each loop is one jitted `fori_loop` (state carried and donated, so caches update in place). A
  timed call also pays a fixed cost (dispatch, the loop's launch, the host's sync: 0.3-0.45 ms on
  the H200 at a 64k context, 5-7 us a step when it was spread over 64 steps); the medians of the
  two lengths, timed alternately, differ by `steps` calls and not by that cost, which a
  generation loop of thousands of tokens would spread to nothing. The state advances
  `3 * steps * (repeats + 1)` calls in all (warm-up included).
  """
  def loop(num_steps):
    @functools.partial(jax.jit, donate_argnums=0)
    def run(state):
      return jax.lax.fori_loop(0, num_steps, lambda _, s: step(s, *inputs), state)
    return run

  short, long = loop(steps), loop(2 * steps)
  state = jax.block_until_ready(long(jax.block_until_ready(short(state))))  # compile + warm-up
  times = ([], [])
  for _ in range(repeats):
    for run, samples in zip((short, long), times):
      start = time.perf_counter()
      state = jax.block_until_ready(run(state))
      samples.append(time.perf_counter() - start)
  return (statistics.median(times[1]) - statistics.median(times[0])) / steps


def check_steps_fit(parser, steps, repeats):
  """The caches keep CACHE_MARGIN free slots past the context: `time_steps` must fit in them."""
  if 3 * steps * (repeats + 1) > CACHE_MARGIN:
    parser.error(f"--steps {steps} with --repeats {repeats} appends {3 * steps * (repeats + 1)} "
                 f"tokens, more than the caches' {CACHE_MARGIN} free slots")


def random_inputs(batch, key):
  kq, kk, kv = jax.random.split(key, 3)
  q = jax.random.normal(kq, (batch, HQ, D), DTYPE)
  k = jax.random.normal(kk, (batch, HKV, D), DTYPE)
  v = jax.random.normal(kv, (batch, HKV, D), DTYPE)
  return q, k, v


def filled_nsa_cache(batch, context, key):
  """A cache of `context - 1` random tokens (compressed blocks = mean pooling of them)."""
  cache = init_decode_cache(batch, context + CACHE_MARGIN, HKV, D, config=CONFIG, dtype=DTYPE)
  kk, kv = jax.random.split(key)
  size = cache.k.shape[2]
  length = context - 1
  k = jax.random.normal(kk, (batch, HKV, size, D), DTYPE)
  v = jax.random.normal(kv, (batch, HKV, size, D), DTYPE)
  to_tokens = lambda x: x[:, :, :length].transpose(0, 2, 1, 3)
  k_cmp, v_cmp = nsa_jax.compress_kv(to_tokens(k), to_tokens(v), block=CONFIG.cmp_block,
                                     stride=CONFIG.cmp_stride)
  pad = lambda x: jax.lax.dynamic_update_slice(jnp.zeros_like(cache.k_cmp),
                                               x.transpose(0, 2, 1, 3), (0, 0, 0, 0))
  return DecodeCache(k=k, v=v, k_cmp=pad(k_cmp), v_cmp=pad(v_cmp),
                     length=jnp.asarray(length, jnp.int32), max_len=cache.max_len)


def nsa_layer(impl):
  """`(cache, q, k, v) -> (cache, out)`: one NSA decode layer."""
  def layer(cache, q, k, v):
    out, cache = nsa_decode_step(q, k, v, cache, config=CONFIG, implementation=impl)
    return cache, out
  return layer


def separate_kv_layer(impl):
  """A decode layer with a K/V set per branch (`nsa_decode_step_separate_kv`); the token's three
  sets are the same `k`, `v` (only the timing matters here)."""
  def layer(caches, q, k, v):
    out, caches = nsa_decode_step_separate_kv(q, [k] * 3, [v] * 3, caches, config=CONFIG,
                                              implementation=impl)
    return caches, out
  return layer


def filled_separate_kv_caches(batch, context, key):
  """`filled_nsa_cache` for set 0, random dense caches of the same length for sets 1 and 2."""
  cmp = filled_nsa_cache(batch, context, key)
  keys = jax.random.split(key, 4)
  dense = lambda kk, kv: DenseCache(k=jax.random.normal(kk, cmp.k.shape, DTYPE),
                                    v=jax.random.normal(kv, cmp.v.shape, DTYPE),
                                    length=jnp.copy(cmp.length))  # donated: one each
  return cmp, dense(*keys[:2]), dense(*keys[2:])


def dense_xla_layer(cache, q, k, v):
  """Dense GQA decode over a head-major cache `[B, Hkv, S, D]`, masked past the length."""
  k_cache, v_cache, length = cache
  k_cache = jax.lax.dynamic_update_slice(k_cache, k[:, :, None], (0, 0, length, 0))
  v_cache = jax.lax.dynamic_update_slice(v_cache, v[:, :, None], (0, 0, length, 0))
  b = q.shape[0]
  qg = q.reshape(b, HKV, HQ // HKV, D)
  s = jnp.einsum("bhgd,bhsd->bhgs", qg, k_cache, preferred_element_type=jnp.float32)
  s = jnp.where(jnp.arange(k_cache.shape[2]) <= length, s * D ** -0.5, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(DTYPE)
  out = jnp.einsum("bhgs,bhsd->bhgd", p, v_cache, preferred_element_type=jnp.float32)
  return (k_cache, v_cache, length + 1), out.reshape(b, HQ, D).astype(DTYPE)


def dense_cudnn_layer(cache, q, k, v):
  """Dense decode through `jax.nn.dot_product_attention` on a `[B, S, Hkv, D]` cache."""
  k_cache, v_cache, length = cache
  k_cache = jax.lax.dynamic_update_slice(k_cache, k[:, None], (0, length, 0, 0))
  v_cache = jax.lax.dynamic_update_slice(v_cache, v[:, None], (0, length, 0, 0))
  lengths = jnp.full((q.shape[0],), length + 1, jnp.int32)
  out = jax.nn.dot_product_attention(q[:, None], k_cache, v_cache,
                                     key_value_seq_lengths=lengths, implementation="cudnn")
  return (k_cache, v_cache, length + 1), out[:, 0]


def stacked(layer, layers):
  """`((cache per layer), total) -> same`: one token through `layers` decode layers, each with
  its own cache and each output the next layer's query, as in a model (whose other ops are left
  out); the sum keeps the last output live. With one layer the step also carries the timing
  loop's own cost (module docstring); a stack spreads it over its layers, as a model's step
  does."""
  def step(state, q, k, v):
    caches, total = state
    updated = []
    for cache in caches:
      cache, q = layer(cache, q, k, v)
      updated.append(cache)
    return tuple(updated), total + q.astype(jnp.float32)
  return step


def dense_cache(batch, context, key, heads_first):
  size = context + CACHE_MARGIN
  shape = (batch, HKV, size, D) if heads_first else (batch, size, HKV, D)
  kk, kv = jax.random.split(key)
  return (jax.random.normal(kk, shape, DTYPE), jax.random.normal(kv, shape, DTYPE),
          jnp.asarray(context - 1, jnp.int32))


def nsa_tokens_read(context):
  visible = CONFIG.num_cmp_blocks(context)
  return visible + min(CONFIG.num_selected * CONFIG.slc_block, context) + min(CONFIG.window,
                                                                             context)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--contexts", default="8192,16384,32768,65536,131072")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--impls", default="xla,pallas_gpu")
  parser.add_argument("--steps", type=int, default=48,
                      help="decode steps of the shorter timed loop (the longer runs twice as many)")
  parser.add_argument("--layers", type=int, default=1,
                      help="decode layers a step (each its own cache; time reported per layer)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="out/bench_decode.json")
  args = parser.parse_args()
  check_steps_fit(parser, args.steps, args.repeats)
  rows = []
  key = jax.random.key(0)
  for context in map(int, args.contexts.split(",")):
    for batch in map(int, args.batches.split(",")):
      inputs = random_inputs(batch, key)
      keys = jax.random.split(key, args.layers)
      total = lambda: jnp.zeros((batch, HQ, D), jnp.float32)  # a new one each run (donated)
      timings = {}
      for name, layer, heads_first in (("dense_xla", dense_xla_layer, True),
                                       ("dense_cudnn", dense_cudnn_layer, False)):
        try:
          state = (tuple(dense_cache(batch, context, k, heads_first) for k in keys), total())
          timings[name] = time_steps(stacked(layer, args.layers), state, inputs, args.steps,
                                     args.repeats) / args.layers
        except Exception as err:  # cuDNN may refuse a shape: report, keep going
          print(f"{name} at C={context} B={batch}: {type(err).__name__}: {str(err)[:120]}")
        state = None  # free the caches before the next ones are made
      for impl in args.impls.split(","):
        separate = impl.startswith("separate_kv_")
        fill = filled_separate_kv_caches if separate else filled_nsa_cache
        layer = (separate_kv_layer(impl.removeprefix("separate_kv_")) if separate
                 else nsa_layer(impl))
        state = (tuple(fill(batch, context, k) for k in keys), total())
        timings[f"nsa_{impl}"] = time_steps(stacked(layer, args.layers), state, inputs,
                                            args.steps, args.repeats) / args.layers
        state = None
      dense = min(t for n, t in timings.items() if n.startswith("dense"))
      for name, seconds in timings.items():
        tokens = context if name.startswith("dense") else nsa_tokens_read(context)
        rows.append(dict(context=context, batch=batch, layers=args.layers, impl=name,
                         us_per_token=1e6 * seconds,
                         speedup_vs_dense=dense / seconds, tokens_read=tokens,
                         kv_bytes_read=tokens * batch * HKV * D * 2 * 2))
        print(json.dumps(rows[-1]))
  device = jax.devices()[0].device_kind
  print(f"\n{device}, Hq={HQ} Hkv={HKV} D={D} bf16, {CONFIG}, {args.layers} layer(s) a step")
  print(f"{'C':>7} {'B':>3} {'impl':>16} {'us/token':>9} {'vs dense':>9} {'tokens read':>12}")
  for r in rows:
    print(f"{r['context']:>7} {r['batch']:>3} {r['impl']:>16} {r['us_per_token']:>9.1f} "
          f"{r['speedup_vs_dense']:>8.2f}x {r['tokens_read']:>12}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(device=device, date=datetime.date.today().isoformat(),
                                 config=str(CONFIG), rows=rows), indent=1))


if __name__ == "__main__":
  main()

"""The launch floor of a GPU decode step: what a chain of dependent kernels with no work in them
costs in `bench_decode`'s timed loop, and what one kernel with grid-wide barriers costs instead.

    python -m experiments.probes.decode_floor [--batches 1,8] [--kernels 0,1,2,3,4,5]
                                              [--persistent 128:2:128:flags:13,...]
                                              [--out out/decode_floor.json]

`--kernels`: a step runs `k` dependent Pallas kernels of one program per (sequence, KV head),
each reading the previous kernel's `[G, D]` float32 tile and writing the next (the size of the
combine's output); the last also writes the step's output `[B, Hq, D]` in bfloat16. They run
inside the loop `bench_decode` times a one-layer step with (`stacked(layer, 1)`: the loop counter
and the output sum); k = 0 is that loop with the query as the output. The GPU NSA decode step is
a chain of four kernels, so its time minus the k = 4 floor is what its kernels' work costs, and
the floor bounds from below what any four-kernel step can reach (a 5x target at B = 1 against
cuDNN's dense step).

`--persistent programs:barriers:load_rows:kind:picks`: a step of one kernel instead
(`persistent_layer`), `programs` programs passing `barriers` grid-wide barriers of `kind`
(`BARRIERS`), each phase loading `load_rows` rows of 128 bf16 values a program, phase 1 running
the sparse kernel's top-n (`picks` arg-max passes over a 2048-wide row): the fewest phases an NSA
decode step needs (the compressed log-sum-exp needs every split; the selected blocks' loads need
the top n; the output needs every partial: two barriers), with nearly none of its work. Prints a
table, writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from experiments.bench_decode import D, DTYPE, HKV, HQ, random_inputs, stacked, time_steps
from pallas_kernels.gpu import top_n
from pallas_kernels.row_layout import pow2

GROUP = HQ // HKV
# The top n of `--persistent`'s picks: the 64k benchmark's row (1040 selection blocks in 2048
# columns, the query in the last), 3 forced blocks (1 initial, 2 local) and `picks` more.
PICK_QUERY_BLOCK = 1039
PICK_FORCED = 3


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


# ---------------------------------------------------------------------------------------------
# One kernel a step, its phases separated by grid-wide barriers (`--persistent`).
#
# The alternative to a chain of kernels: one launch whose programs wait for each other between
# the phases the algorithm needs (the compressed log-sum-exp before the selection scores, the
# top n before the selected blocks' loads, every partial before the output). A barrier is only
# safe when every program is resident at once (the probe's 64-256 small programs are, on 132
# SMs); interpret mode runs programs one after another, so only `barriers = 0` runs on the CPU.
# Each barrier starts with a CTA barrier (every thread's stores issued) and an acquire-release
# atomic, as CUDA's grid sync does; the counters only grow, so they need no reset between calls.


def _barrier_counter(counter_ref, program, num_programs, *, spin_atomic: bool):
  """All programs add 1 to one int32 counter, then wait for the next multiple of the program
  count: reading it with atomics (`spin_atomic`), which queue behind the arrivals at the one
  address, or with volatile loads."""
  del program
  plgpu.debug_barrier()
  arrived = plgpu.atomic_add(counter_ref, (0,), jnp.int32(1))
  target = arrived - arrived % num_programs + num_programs
  read = ((lambda: plgpu.atomic_add(counter_ref, (0,), jnp.int32(0))) if spin_atomic
          else (lambda: plgpu.load(counter_ref, volatile=True)[0]))
  jax.lax.while_loop(lambda seen: seen < target, lambda _: read(), arrived + 1)
  plgpu.debug_barrier()


def _barrier_flags(flags_ref, program, num_programs):
  """One int32 flag a program (`flags_ref [pow2 >= programs]`): a program bumps its own (no
  contention) and waits, with volatile vector loads, until every flag has reached its new
  value."""
  plgpu.debug_barrier()
  generation = plgpu.atomic_add(flags_ref, (program,), jnp.int32(1)) + 1
  lanes = jnp.arange(flags_ref.shape[0]) < num_programs

  def behind(_):
    flags = plgpu.load(flags_ref, mask=lanes, other=generation, volatile=True)
    return jnp.min(flags) < generation

  jax.lax.while_loop(lambda waiting: waiting, behind, jnp.bool_(True))
  plgpu.debug_barrier()


BARRIERS = {
    "counter": functools.partial(_barrier_counter, spin_atomic=True),
    "volatile": functools.partial(_barrier_counter, spin_atomic=False),
    "flags": _barrier_flags,
}


def barrier_counters(kind: str, programs: int):
  """The zeroed int32 counter(s) a `kind` barrier of `programs` programs needs."""
  return jnp.zeros((pow2(programs) if kind == "flags" else 1,), jnp.int32)


def _persistent_kernel(x_ref, cache_ref, _counters, buf_ref, out_ref, counters_ref, *, barriers,
                       programs, outputs, load_rows, barrier, picks):
  """Phases 0..barriers. Phase k > 0 waits for every program, then reads the tile the next
  program stored in phase k - 1; phase 1 first runs the sparse kernel's top n (`picks` arg-max
  passes of `top_n.pick_top_n` over a row of 2048 scores made from the tile); every phase loads
  `load_rows` rows of a bf16 cache (as a decode phase loads its K / V tile) into the tile."""
  p = pl.program_id(0)
  tile = x_ref[p]
  for phase in range(barriers + 1):
    if phase:
      BARRIERS[barrier](counters_ref, p, programs)
      tile = buf_ref[phase - 1, (p + 1) % programs]
    if phase == 1 and picks:
      chosen = top_n.pick_top_n(jnp.abs(tile).reshape(GROUP * D), PICK_QUERY_BLOCK, 16,
                                num_selected=picks + PICK_FORCED, num_slc=PICK_QUERY_BLOCK + 1,
                                num_initial=1, num_local=PICK_FORCED - 1)
      tile = tile + jnp.sum(chosen).astype(jnp.float32)
    if load_rows:
      rows = cache_ref[pl.ds((p * (barriers + 1) + phase) * load_rows, load_rows), :]
      tile = tile + jnp.sum(rows.astype(jnp.float32), axis=0)[None, :]
    tile = tile * 0.5 + 1.0
    if phase < barriers:
      buf_ref[phase, p] = tile

  @pl.when(p < outputs)
  def _():
    out_ref[p] = tile.astype(out_ref.dtype)


def persistent_layer(programs: int, barriers: int, load_rows: int = 0, barrier: str = "flags",
                     picks: int = 0, interpret: bool = False):
  """`((counters, x [programs, G, D] f32, cache [rows, D] bf16), q, k, v) -> (same, out [B, Hq,
  D])`: one kernel of `programs` programs and `barriers` grid barriers of kind `barrier`
  (`BARRIERS`; `counters` from `barrier_counters`), phases as `_persistent_kernel` says; the
  first B * Hkv programs write the output. `cache` needs `programs * (barriers + 1) *
  load_rows` rows."""
  def layer(state, q, k, v):
    del k, v
    counters, x, cache = state
    outputs = q.shape[0] * HKV
    kernel = functools.partial(_persistent_kernel, barriers=barriers, programs=programs,
                               outputs=outputs, load_rows=load_rows, barrier=barrier,
                               picks=picks)
    _, out, counters = pl.pallas_call(
        kernel, grid=(programs,),
        out_shape=[jax.ShapeDtypeStruct((max(barriers, 1), programs, GROUP, D), jnp.float32),
                   jax.ShapeDtypeStruct((outputs, GROUP, D), DTYPE),
                   jax.ShapeDtypeStruct(counters.shape, jnp.int32)],
        input_output_aliases={2: 2}, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        name="persistent_floor")(x, cache, counters)
    return (counters, x, cache), out.reshape(q.shape)
  return layer


def persistent_state(batch: int, programs: int, barriers: int, load_rows: int, barrier: str,
                     key):
  """A random `(((counters, x, cache),), total)` for `stacked(persistent_layer(...), 1)`."""
  kx, kc = jax.random.split(key)
  x = jax.random.normal(kx, (programs, GROUP, D), jnp.float32)
  cache = jax.random.normal(kc, (max(load_rows, 1) * programs * (barriers + 1), D), DTYPE)
  return (((barrier_counters(barrier, programs), x, cache),),
          jnp.zeros((batch, HQ, D), jnp.float32))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--kernels", default="0,1,2,3,4,5")
  parser.add_argument("--persistent", default="",
                      help="one-kernel steps: programs:barriers:load_rows:kind:picks,... "
                           "(kind counter|volatile|flags, persistent_layer)")
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
    for spec in filter(None, args.persistent.split(",")):
      programs, barriers, load_rows, kind, picks = spec.split(":")
      programs, barriers, load_rows, picks = map(int, (programs, barriers, load_rows, picks))
      state = persistent_state(batch, programs, barriers, load_rows, kind, jax.random.key(1))
      layer = persistent_layer(programs, barriers, load_rows, kind, picks, args.interpret)
      seconds = time_steps(stacked(layer, 1), state, inputs, args.steps, args.repeats)
      rows.append(dict(batch=batch, kernels=1, programs=programs, barriers=barriers,
                       barrier=kind, load_rows=load_rows, picks=picks,
                       us_per_step=1e6 * seconds))
      print(json.dumps(rows[-1]), flush=True)
  device = jax.devices()[0].device_kind
  print(f"\n{device}: a decode step of k dependent empty kernels, in bench_decode's loop")
  print(f"{'B':>3} {'kernels':>8} {'programs':>9} {'barriers':>9} {'kind':>9} {'rows':>5} "
        f"{'picks':>6} {'us/step':>8}")
  for r in rows:
    print(f"{r['batch']:>3} {r['kernels']:>8} {r.get('programs', '-'):>9} "
          f"{r.get('barriers', '-'):>9} {r.get('barrier', '-'):>9} {r.get('load_rows', '-'):>5} "
          f"{r.get('picks', '-'):>6} {r['us_per_step']:>8.1f}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(device=device, date=datetime.date.today().isoformat(),
                                 rows=rows), indent=1))


if __name__ == "__main__":
  main()

"""Sharded training against one device: losses, gathered attention inputs and tokens/s per mesh.

    python -m experiments.scaling --config gpu_nsa --devices 2 [--attention nsa,dense]
        [--steps 20] [--warmup 5] [--rtol 0.01] [--set batch_size=32 ...] [--out out/s.json]

For a training config (a module of `experiments/configs`, fields changed by `--set
field=value`, dotted for nested ones, the value a Python literal or else a string) and a device
count N, trains
`--steps` steps of it, same seed and global batch, once per attention kind (`--attention`) on:
one device (the reference), then each mesh N allows: `(data=N)`, `(fsdp=N)` and, N even,
`(data=N/2, tensor=2)`. Each run is its own process that sees only its devices (GPU:
`CUDA_VISIBLE_DEVICES`; CPU: a forced host device count), so one host gives every row. Per run:
the per-step losses and their largest relative difference to the reference's (sharding changes
only summation order, so they agree to the compute dtype's noise: `--rtol`), the ranks of the
arrays the compiled train step all-gathers (FSDP gathers parameters, rank 2, and hidden states,
rank 3; the attention inputs `[B, T, H, D]`, rank 4, must never be), tokens/s (median over the
steps after `--warmup`) and tokens/s per device. Prints a markdown table, writes JSON.

With `--devices 1` only the references run: the one-device baseline of a later multi-device run.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

# JAX is imported inside the functions a worker runs, never at the top: the parent process must
# not claim the GPUs its workers train on.


def meshes_for(devices: int) -> list[tuple[int, int, int]]:
  """The `(data, fsdp, tensor)` meshes timed on `devices` besides the one-device reference."""
  if devices == 1:
    return []
  meshes = [(devices, 1, 1), (1, devices, 1)]
  if devices % 2 == 0:
    meshes.append((devices // 2, 1, 2))
  return meshes


def load_config(name: str, attention: str, steps: int, mesh, overrides=()):
  """`experiments/configs/<name>.py` with `overrides` (`"field=value"`, dotted for nested
  fields), `attention`, `steps` and `mesh` set, logging every step, evaluating once at the end
  and never checkpointing mid-run."""
  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  for override in overrides:
    field, sep, value = override.partition("=")
    if not sep:
      raise ValueError(f"--set takes field=value, got {override!r}")
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if leaf not in node:
      raise ValueError(f"--set {override!r}: the config has no field {field!r}")
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):  # a bare word: the string itself
      node[leaf] = value
  config.attention = attention
  config.steps, config.log_every, config.eval_every = steps, 1, steps
  config.checkpoint_every = steps
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  return config


def all_gather_shapes(config) -> list[str]:
  """Output shapes (e.g. `bf16[16,4096,512]`) of the all-gathers in the compiled train step of
  `config` on its mesh."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from experiments import parallel
  from experiments import train

  mesh = parallel.mesh_from_config(config)
  with jax.set_mesh(mesh):
    model = train.build_model(config, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, train.build_optimizer(config)[0], wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    state = jax.device_put(state, parallel.state_shardings(state, mesh))
    batches = train.build_data(config)
    tokens = parallel.global_batch(batches.batch("train", 1), mesh)
    weights = jnp.asarray(batches.loss_weights)

    @jax.jit
    def step(state, tokens):
      model, optimizer = nnx.merge(graphdef, state)
      return train.train_step(model, optimizer, tokens, weights)

    text = step.lower(state, tokens).compile().as_text()
  pattern = r"= \(?(\w+\[[\d,]*\])[^=]*? all-gather(?:-start)?\("
  return [m.group(1) for m in re.finditer(pattern, text)]


def gathered_ranks(shapes: list[str]) -> list[int]:
  """Ranks of `all_gather_shapes`' shapes (`f32[8,64]` -> 2)."""
  return [shape.count(",") + 1 for shape in shapes]


def worker(workdir: str, name: str, attention: str, steps: int, mesh, overrides=()) -> dict:
  """Trains one run in this process (on all the devices it sees) and returns its record."""
  import jax

  from experiments import train

  config = load_config(name, attention, steps, mesh, overrides)
  records = train.run(config, workdir)
  sharded = jax.device_count() > 1
  return dict(attention=attention, mesh=list(mesh), devices=jax.device_count(),
              device_kind=jax.devices()[0].device_kind,
              losses=[r["loss"] for r in records if "loss" in r],
              tokens_per_s=[r["tokens_per_s"] for r in records if "tokens_per_s" in r],
              held_out_loss=[r["held_out_loss"] for r in records if "held_out_loss" in r][-1],
              all_gathers=all_gather_shapes(config) if sharded else [])


def run_in_process(platform: str, name: str, attention: str, steps: int, mesh,
                   overrides=()) -> dict:
  """`worker` in a fresh process that sees `data * fsdp * tensor` devices."""
  devices = mesh[0] * mesh[1] * mesh[2]
  env = dict(os.environ)
  if platform == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(devices)))
    # NCCL's NVLink multicast (NVLS) stays off unless asked for: on shared hosts a program
    # using it can leave the GPUs unusable; the numbers recorded here are taken without it.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
  else:
    flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env.update(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  with tempfile.TemporaryDirectory() as workdir:
    command = [sys.executable, "-m", "experiments.scaling", "--worker", workdir, "--config",
               name, "--attention", attention, "--steps", str(steps),
               "--mesh", ",".join(map(str, mesh))]
    command += [arg for override in overrides for arg in ("--set", override)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(f"the run {attention} on mesh {mesh} failed:\n{done.stderr[-4000:]}")
    return json.loads(pathlib.Path(workdir, "result.json").read_text())


def summarize(run: dict, reference: dict, warmup: int, rtol: float) -> dict:
  """The table's row of `run` against the one-device `reference` of the same attention."""
  diffs = [abs(a - b) / abs(b) for a, b in zip(run["losses"], reference["losses"])]
  tokens_per_s = statistics.median(run["tokens_per_s"][warmup:])
  ranks = gathered_ranks(run["all_gathers"])
  return dict(attention=run["attention"], mesh="x".join(map(str, run["mesh"])),
              devices=run["devices"], tokens_per_s=tokens_per_s,
              tokens_per_s_per_device=tokens_per_s / run["devices"],
              final_loss=run["losses"][-1], held_out_loss=run["held_out_loss"],
              max_loss_rel_diff=max(diffs), losses_equal=max(diffs) <= rtol,
              attention_inputs_gathered=any(rank >= 4 for rank in ranks))


def print_table(rows: list[dict], steps: int, rtol: float):
  print(f"| attention | mesh (data x fsdp x tensor) | devices | tokens/s | tokens/s per device | "
        f"loss after {steps} steps | largest loss difference to 1 device (<= {rtol}) | "
        f"rank-4 (Q/K/V) gathers |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
  for r in rows:
    print(f"| {r['attention']} | {r['mesh']} | {r['devices']} | {r['tokens_per_s']:.4g} | "
          f"{r['tokens_per_s_per_device']:.4g} | {r['final_loss']:.4f} | "
          f"{r['max_loss_rel_diff']:.2e} {'ok' if r['losses_equal'] else 'DIFFERS'} | "
          f"{'YES' if r['attention_inputs_gathered'] else 'no'} |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="gpu_nsa", help="a module of experiments/configs")
  parser.add_argument("--devices", type=int, default=1, help="N: the meshes' device count")
  parser.add_argument("--attention", default="nsa,dense", help="comma-separated kinds")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s")
  parser.add_argument("--rtol", type=float, default=1e-2,
                      help="largest relative loss difference to one device counted as equal")
  parser.add_argument("--platform", choices=["gpu", "cpu"],
                      default="gpu" if shutil.which("nvidia-smi") else "cpu")
  parser.add_argument("--set", action="append", default=[], dest="overrides",
                      metavar="FIELD=VALUE", help="a config field to change (repeatable)")
  parser.add_argument("--out", default="")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # a run's workdir
  parser.add_argument("--mesh", default="1,1,1", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    mesh = tuple(int(x) for x in args.mesh.split(","))
    result = worker(args.worker, args.config, args.attention, args.steps, mesh, args.overrides)
    pathlib.Path(args.worker, "result.json").write_text(json.dumps(result))
    return
  if args.devices < 1:
    raise ValueError(f"--devices must be at least 1, got {args.devices}")
  if args.warmup >= args.steps:
    raise ValueError(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
  rows, runs = [], []
  for attention in args.attention.split(","):
    run = lambda mesh: run_in_process(args.platform, args.config, attention, args.steps, mesh,
                                      args.overrides)
    reference = run((1, 1, 1))
    runs.append(reference)
    rows.append(summarize(reference, reference, args.warmup, args.rtol))
    for mesh in meshes_for(args.devices):
      runs.append(run(mesh))
      rows.append(summarize(runs[-1], reference, args.warmup, args.rtol))
  print(f"{args.config}, {args.steps} steps, {runs[0]['device_kind']}")
  print_table(rows, args.steps, args.rtol)
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(dict(
        config=args.config, overrides=args.overrides, steps=args.steps, warmup=args.warmup,
        rtol=args.rtol, platform=args.platform, rows=rows, runs=runs), indent=1))


if __name__ == "__main__":
  main()

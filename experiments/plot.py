"""Plots of finished runs: loss curves, passkey retrieval by length and depth, and the selection.

    python -m experiments.plot --workdir out/nsa --workdir out/dense [--out out/plots]
        [--lengths 128,256,512,1024] [--depths 0.1,0.3,0.5,0.7,0.9] [--samples 8]

Writes into `--out` (default: the first workdir's `plots/`):
- `loss_curves.png`: training and held-out loss against step, every run on one figure;
- `passkey_<run>.png` + `.json`: passkey retrieval accuracy of the run's latest checkpoint by
  context length (default: half, 1x, 2x and 4x the training length, so lengths beyond training
  are included) and needle depth, as a heatmap (the paper's needle-in-a-haystack figure);
- `selection_<run>.png` (NSA runs): which selection blocks the first layer's first KV group chose
  for every query of one held-out sequence.

A run is a `workdir` written by `experiments.train` (its `config.json`, `metrics.jsonl` and
checkpoints); `<run>` is the workdir's name.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

import nsa_jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import parallel  # pylint: disable=wrong-import-position
from experiments import tasks  # pylint: disable=wrong-import-position
from experiments import train  # pylint: disable=wrong-import-position


MIN_PASSKEY_LEN = 96  # the needle and the question take 81 bytes


def load_run(workdir):
  """`(config, records, model)` of a finished run, the model at its latest checkpoint."""
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  model = train.build_model(config, nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(model, train.build_optimizer(config)[0], wrt=nnx.Param)
  with ocp.CheckpointManager((workdir / "checkpoints").absolute()) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    restored = manager.restore(step, args=ocp.args.Composite(
        train_state=ocp.args.StandardRestore(target)))
  nnx.update(model, restored.train_state["model"])
  return config, records, model


def plot_losses(runs, path):
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, (config, records, _) in runs.items():
    train_points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["held_out_loss"]) for r in records if "held_out_loss" in r]
    line, = ax.plot(*zip(*train_points), label=f"{name} ({config.attention}) train", alpha=0.8)
    if held_out:
      ax.plot(*zip(*held_out), "o--", color=line.get_color(),
              label=f"{name} ({config.attention}) held-out")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats per byte)")
  ax.set_title("NSA vs dense attention")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def passkey_grid(config, model, lengths, depths, samples):
  """`accuracy [len(lengths), len(depths)]` on held-out filler."""
  filler = train.build_data(config).splits["held_out"]
  logits = nnx.jit(lambda model, tokens: model(tokens))
  results = tasks.passkey_accuracy(lambda t: logits(model, jnp.asarray(t)), filler, lengths,
                                   depths, samples, seed=1)
  return np.array([[results[(length, depth)] for depth in depths] for length in lengths])


def plot_passkey(grid, lengths, depths, train_len, title, path):
  fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2.5, 0.6 * len(lengths) + 2))
  image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
  ax.set_yticks(range(len(lengths)),
                [f"{n}{' (train)' if n == train_len else ''}" for n in lengths])
  for i in range(len(lengths)):
    for j in range(len(depths)):
      ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
  ax.set_xlabel("needle depth")
  ax.set_ylabel("context length (bytes)")
  ax.set_title(title)
  fig.colorbar(image, ax=ax, label="retrieval accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def first_layer_selection(model, tokens):
  """Block indices `[T, n]` the first layer's first KV group chose for `tokens int [T]`."""
  layer = model.blocks[0].attention
  x = model.blocks[0].attention_norm(model.embed(jnp.asarray(tokens)[None]))
  q, keys, values = layer._project(x)  # pylint: disable=protected-access
  k_cmp, _ = layer._compress(keys[0], values[0])  # pylint: disable=protected-access
  indices = nsa_jax.select_blocks(q, k_cmp, config=layer.config,
                                  implementation=layer.implementation)
  return np.asarray(indices[0, :, 0])


def plot_selection(indices, slc_block, title, path):
  seq_len = indices.shape[0]
  chosen = np.zeros((seq_len, -(-seq_len // slc_block)))
  for t, row in enumerate(indices):
    chosen[t, row[row >= 0]] = 1
  fig, ax = plt.subplots(figsize=(6, 5))
  ax.imshow(chosen, aspect="auto", interpolation="nearest", cmap="Blues",
            extent=(0, chosen.shape[1], seq_len, 0))
  ax.set_xlabel(f"selection block ({slc_block} tokens)")
  ax.set_ylabel("query position")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def make_plots(workdirs, out, lengths=None, depths=(0.1, 0.3, 0.5, 0.7, 0.9), samples=8):
  """Writes the plots of `workdirs` into `out`; returns `{file name: path}`."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  runs, written = {}, {}
  for workdir in workdirs:
    config, records, model = load_run(workdir)
    name = pathlib.Path(workdir).name
    runs[name] = (config, records, model)
    with jax.set_mesh(parallel.mesh_from_config(config)):
      run_lengths = lengths or [n for n in (config.seq_len // 2, config.seq_len,
                                            2 * config.seq_len, 4 * config.seq_len)
                                if n >= MIN_PASSKEY_LEN]
      grid = passkey_grid(config, model, run_lengths, depths, samples)
      (out / f"passkey_{name}.json").write_text(json.dumps(dict(
          lengths=list(run_lengths), depths=list(depths), samples=samples,
          train_len=config.seq_len, accuracy=grid.tolist()), indent=1))
      written[f"passkey_{name}.png"] = out / f"passkey_{name}.png"
      plot_passkey(grid, run_lengths, depths, config.seq_len,
                   f"passkey retrieval: {name} ({config.attention})", out / f"passkey_{name}.png")
      if config.attention == "nsa":
        filler = train.build_data(config).splits["held_out"]
        indices = first_layer_selection(model, filler[:config.seq_len])
        written[f"selection_{name}.png"] = out / f"selection_{name}.png"
        plot_selection(indices, config.nsa.slc_block, f"blocks chosen by layer 0, KV head 0: {name}",
                       out / f"selection_{name}.png")
  written["loss_curves.png"] = out / "loss_curves.png"
  plot_losses(runs, out / "loss_curves.png")
  return written


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", action="append", required=True, help="a run (repeatable)")
  parser.add_argument("--out", default=None)
  parser.add_argument("--lengths", default=None, help="comma-separated context lengths")
  parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
  parser.add_argument("--samples", type=int, default=8)
  args = parser.parse_args()
  lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else None
  depths = tuple(float(d) for d in args.depths.split(","))
  out = args.out or pathlib.Path(args.workdir[0]) / "plots"
  for name, path in make_plots(args.workdir, out, lengths, depths, args.samples).items():
    print(f"wrote {path}")


if __name__ == "__main__":
  main()

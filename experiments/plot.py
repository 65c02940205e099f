"""Plots of finished runs: loss curves, passkey retrieval by length and depth, and the selection.

    python -m experiments.plot --workdir out/nsa --workdir out/dense [--out out/plots]
        [--lengths 128,256,512,1024] [--depths 0.1,0.3,0.5,0.7,0.9] [--samples 8]

Writes into `--out` (default: the first workdir's `plots/`):
- `loss_curves.png`: training and held-out loss against step, every run on one figure;
- `passkey_<run>.png` + `.json` (runs on text): passkey retrieval accuracy of the run's latest
  checkpoint by context length (default: half, 1x, 2x and 4x the training length, so lengths
  beyond training are included, each with the training's block phase: `default_lengths`) and
  needle depth, as a heatmap (the paper's needle-in-a-haystack figure);
- `mqar_<run>.png` + `.json` (MQAR runs): recall accuracy by context length (the same lengths)
  and by the depth of the queried pair (as many equal depth bins as `--depths` has values), as
  a heatmap;
- `selection_<run>.png` (NSA runs): which selection blocks the first layer's first KV group chose
  for every query of one held-out sequence; for MQAR and passkey runs also
  `selection_hits_<run>.json`: how often each layer's selection, at the queries, holds the
  block the query must read (the queried pair's value, the needle's key digit), the mean
  branch gates there, and the induction circuit's attention (previous-token and
  query-to-target weights of the window, query-to-target of the selected branch, the compressed
  branch's weight on the target's blocks; `experiments.diagnostics`);
- `selection_stats_<run>.json` + `selection_indices_<run>.npz` (NSA runs): how many distinct
  blocks 1, 2, 4, 8 consecutive query positions of a KV head select together (mean and
  percentiles), for the first layer on held-out sequences and on random queries and keys of
  the same shapes; and that layer's index tensor `[B, T, Hkv, n]` (input for kernel benchmarks
  on real selections).

A run is a `workdir` written by `experiments.train` (its `config.json`, `metrics.jsonl` and
checkpoints); `<run>` is the workdir's name.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import jax
import matplotlib
import ml_collections
import numpy as np
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

import nsa_jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import diagnostics  # pylint: disable=wrong-import-position
from experiments import parallel  # pylint: disable=wrong-import-position
from experiments import tasks  # pylint: disable=wrong-import-position
from experiments import train  # pylint: disable=wrong-import-position


MIN_PASSKEY_LEN = 96  # the needle and the question take 81 bytes


def load_run(workdir, compute_dtype=None):
  """`(config, records, model)` of a finished run, the model at its latest checkpoint (computing
  in `compute_dtype` if given, else the run's)."""
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  if compute_dtype:
    config.compute_dtype = compute_dtype
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  model = train.build_model(config, nnx.Rngs(config.seed))
  optimizer = nnx.Optimizer(model, train.build_optimizer(config)[0], wrt=nnx.Param)
  train.restore_model(model, optimizer, workdir)
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


def default_lengths(seq_len):
  """Sequence lengths (inputs + the last target) at 0.5x, 1x, 2x and 4x the training inputs'
  `seq_len`: `k * seq_len + 1`, so the answers sit at the same offset within every compression
  and selection block as in training (when `seq_len` is a multiple of the blocks). A trained
  model can depend on that offset: the 8k passkey model of 2026-12-05 retrieves 0.86 at 8193
  and 0.49-0.60 one token either side (RESULTS.md), so lengths off by one would mix length
  generalisation with a shifted block phase."""
  return [seq_len // 2 + 1, seq_len + 1, 2 * seq_len + 1, 4 * seq_len + 1]


def passkey_grid(config, model, lengths, depths, samples):
  """`accuracy [len(lengths), len(depths)]` on held-out filler."""
  filler = train.build_data(config).splits["held_out"]
  results = tasks.passkey_accuracy(train.logits_fn(model), filler, lengths, depths, samples,
                                   seed=1, digits=train.passkey_digits(config))
  return np.array([[results[(length, depth)] for depth in depths] for length in lengths])


def cell_label(accuracy: float) -> str:
  return "n/a" if np.isnan(accuracy) else f"{accuracy:.2f}"


def plot_passkey(grid, lengths, depths, train_len, title, path, xlabel="needle depth",
                 ylabel="context length (bytes)"):
  """Accuracy heatmap of `grid [lengths, depths]`; NaN cells (nothing measured there) are grey
  and read "n/a", never a red 0."""
  fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2.5, 0.6 * len(lengths) + 2))
  cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="lightgrey")
  image = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap=cmap, aspect="auto")
  ax.set_xticks(range(len(depths)), [d if isinstance(d, str) else f"{d:.0%}" for d in depths])
  ax.set_yticks(range(len(lengths)),
                [f"{n}{' (train)' if n == train_len else ''}" for n in lengths])
  for i in range(len(lengths)):
    for j in range(len(depths)):
      ax.text(j, i, cell_label(grid[i, j]), ha="center", va="center", fontsize=8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  fig.colorbar(image, ax=ax, label="retrieval accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def layer_selections(model, tokens):
  """Block indices `[L, B, T, Hkv, n]` every layer chose for `tokens int [B, T]`."""
  return diagnostics.layer_internals(model, tokens)[0]


def first_layer_selection(model, tokens):
  """Block indices `[T, n]` the first layer's first KV group chose for `tokens int [T]`."""
  return layer_selections(model, np.asarray(tokens)[None])[0, 0, :, 0]


SHARING_SPANS = (1, 2, 4, 8)


def selection_sharing(indices, spans=SHARING_SPANS):
  """Distinct selected blocks of `span` consecutive positions of one KV head, together.

  Args:
    indices: int `[B, T, Hkv, n]`, -1 for unused slots.

  Returns:
    `{span: {"mean", "p50", "p90", "p99"}}` over all groups of `span` positions.
  """
  b, t, hkv, n = indices.shape
  stats = {}
  for span in spans:
    used = t // span * span
    groups = indices[:, :used].reshape(b, used // span, span, hkv, n).transpose(0, 1, 3, 2, 4)
    groups = np.sort(groups.reshape(-1, span * n), axis=-1)
    distinct = (groups >= 0) & np.concatenate(
        [np.ones_like(groups[:, :1], bool), groups[:, 1:] != groups[:, :-1]], axis=-1)
    count = distinct.sum(-1)
    stats[span] = dict(mean=float(count.mean()), p50=float(np.percentile(count, 50)),
                       p90=float(np.percentile(count, 90)), p99=float(np.percentile(count, 99)))
  return stats


def selection_statistics(model, tokens, seed=0):
  """`(stats, indices)`: `selection_sharing` of the first layer on `tokens int [B, T]`, of each
  layer (`trained_by_layer`: deeper layers of a language model may share more), and on random
  queries and keys of the same shapes; every layer's indices `[L, B, T, Hkv, n]`."""
  by_layer = np.asarray(layer_selections(model, tokens))
  indices = by_layer[0]
  layer = model.blocks[0].attention
  b, t = tokens.shape
  kq, kk = jax.random.split(jax.random.key(seed))
  q = jax.random.normal(kq, (b, t, layer.num_heads, layer.head_dim))
  k_cmp = jax.random.normal(kk, (b, layer.config.num_cmp_blocks(t), layer.num_kv_heads,
                                 layer.head_dim))
  random = np.asarray(jax.jit(functools.partial(nsa_jax.select_blocks, config=layer.config))(
      q, k_cmp))
  stats = dict(trained=selection_sharing(indices), random=selection_sharing(random),
               trained_by_layer=[selection_sharing(chosen) for chosen in by_layer],
               shape=list(indices.shape), slc_block=layer.config.slc_block)
  return stats, by_layer


def answer_probe(config, samples, seed=1):
  """`diagnostics`' probe of a retrieval run at its training length: MQAR sequences (queries at
  the queried keys, targets the pairs' values) or passkey sequences with needles at random
  depths (queries at the question's answer positions, targets the needle's digits)."""
  data = config.data
  if data.source == "mqar":
    return diagnostics.mqar_probe(config.seq_len + 1, data.mqar_pairs, train.vocab_size(config),
                                  data.mqar_placement, samples, seed, data.get("mqar_ids", 0))
  filler = train.build_data(config).splits["held_out"]
  return diagnostics.passkey_probe(filler, config.seq_len + 1, samples, seed,
                                   train.passkey_digits(config))


def answer_diagnostics(config, model, samples, seed=1):
  """At the answers: does the selection hold the target's block, the gates there, and the
  token-level attention of the induction circuit (`diagnostics.at_answers`, `token_attention`)."""
  probe = answer_probe(config, samples, seed)
  return {**diagnostics.at_answers(model, *probe), **diagnostics.token_attention(model, *probe)}


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


def _mqar_plots(config, model, name, lengths, num_bins, samples, out):
  """The MQAR heatmap (and, for NSA, the selection hits) of one run; `{file name: path}`."""
  data = config.data
  grid = tasks.mqar_accuracy_by_depth(
      train.logits_fn(model), lengths, data.mqar_pairs,
      train.vocab_size(config), num_bins, samples, data.mqar_placement, seed=1,
      ids=data.get("mqar_ids", 0))
  bins = [f"{b / num_bins:.0%}-{(b + 1) / num_bins:.0%}" for b in range(num_bins)]
  result = dict(lengths=list(lengths), depth_bins=bins, samples=samples,
                train_len=config.seq_len + 1,
                accuracy=np.where(np.isnan(grid), None, grid).tolist())
  written = {f"mqar_{name}.png": out / f"mqar_{name}.png"}
  (out / f"mqar_{name}.json").write_text(json.dumps(result, indent=1))
  plot_passkey(grid, lengths, bins, config.seq_len + 1,
               f"MQAR recall: {name} ({config.attention})", out / f"mqar_{name}.png",
               xlabel="depth of the queried pair", ylabel="context length (tokens)")
  return written


def _held_out_inputs(config, samples):
  """Model inputs `int [<= samples, seq_len]`: the first held-out batch of the run's data."""
  return train.build_data(config).batch("held_out", 0)[:samples, :-1]


def _selection_statistics_files(config, model, name, inputs, out):
  """`selection_stats_<run>.json` and `selection_indices_<run>.npz` on held-out `inputs
  int [B, seq_len]` (`indices`: the first layer's `[B, T, Hkv, n]`; `indices_by_layer`: every
  layer's, `[L, B, T, Hkv, n]`)."""
  stats, by_layer = selection_statistics(model, inputs)
  (out / f"selection_stats_{name}.json").write_text(json.dumps(stats, indent=1))
  np.savez_compressed(out / f"selection_indices_{name}.npz", indices=by_layer[0].astype(np.int16),
                      indices_by_layer=by_layer.astype(np.int16),
                      slc_block=config.nsa.slc_block)
  return {f"selection_stats_{name}.json": out / f"selection_stats_{name}.json",
          f"selection_indices_{name}.npz": out / f"selection_indices_{name}.npz"}


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
      train_len = config.seq_len + 1  # the training sequences' tokens (inputs + last target)
      run_lengths = lengths or [n for n in default_lengths(config.seq_len)
                                if config.data.source == "mqar" or n >= MIN_PASSKEY_LEN]
      if config.data.source == "mqar":
        written.update(_mqar_plots(config, model, name, run_lengths, len(depths), samples, out))
      else:
        grid = passkey_grid(config, model, run_lengths, depths, samples)
        (out / f"passkey_{name}.json").write_text(json.dumps(dict(
            lengths=list(run_lengths), depths=list(depths), samples=samples,
            train_len=train_len, accuracy=grid.tolist()), indent=1))
        written[f"passkey_{name}.png"] = out / f"passkey_{name}.png"
        plot_passkey(grid, run_lengths, depths, train_len,
                     f"passkey retrieval: {name} ({config.attention})",
                     out / f"passkey_{name}.png")
      if config.attention == "nsa" and config.data.source in ("mqar", "passkey"):
        found = answer_diagnostics(config, model, samples)
        (out / f"selection_hits_{name}.json").write_text(json.dumps(dict(
            samples=samples, fraction_by_layer=found.pop("selection_hits"), **found), indent=1))
        written[f"selection_hits_{name}.json"] = out / f"selection_hits_{name}.json"
      if config.attention == "nsa":
        inputs = _held_out_inputs(config, samples)
        indices = first_layer_selection(model, inputs[0])
        written.update(_selection_statistics_files(config, model, name, inputs, out))
        written[f"selection_{name}.png"] = out / f"selection_{name}.png"
        plot_selection(indices, config.nsa.slc_block, f"blocks chosen by layer 0, KV head 0: "
                       f"{name}", out / f"selection_{name}.png")
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

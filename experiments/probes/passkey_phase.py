"""A trained passkey model's accuracy by sequence length, on many evaluation seeds: is it length
or the answers' offset within the blocks (their phase) that it depends on?

    python -m experiments.probes.passkey_phase --workdir out/pk/t8192 \
        [--lengths 8193,8192,8194,4097,16385] [--seeds 2-7] [--compute_dtype float32]
        [--out passkey_phase.json]

Training evaluates at `seq_len + 1` tokens (inputs + the last target), 12 sequences an
evaluation (`experiments.train`: depths 0.1 / 0.5 / 0.9, `eval_samples` each, the step as the
seed). This reruns that evaluation at other lengths and seeds: `seq_len + 1 +- k` moves the
question by k tokens against the compression and selection blocks; `m * seq_len + 1` keeps the
phase at another length. Prints accuracy per length (mean over seeds, and each seed's) and
writes JSON. `--compute_dtype` overrides the run's (float32 on the CPU: XLA's bfloat16 there
is slow, and rounds differently from the GPU kernels anyway).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from experiments import plot
from experiments import tasks
from experiments import train


def parse_seeds(text: str) -> list[int]:
  """`"2-7"` -> `[2, ..., 7]`; `"1,5,9"` -> `[1, 5, 9]`."""
  if "-" in text:
    first, last = (int(x) for x in text.split("-"))
    return list(range(first, last + 1))
  return [int(x) for x in text.split(",")]


def accuracy_by_length(model, config, lengths, seeds, depths=train.PASSKEY_DEPTHS) -> dict:
  """`{length: {"per_seed": [...], "mean": m, "sequences": n}}`: `tasks.passkey_accuracy` at each
  length with each seed, `config.eval_samples` sequences per depth, as training evaluates."""
  filler = train.build_data(config).splits["held_out"]
  logits = train.logits_fn(model)
  result = {}
  for length in lengths:
    per_seed = []
    for seed in seeds:
      accuracy = tasks.passkey_accuracy(logits, filler, [length], depths,
                                        config.eval_samples, seed=seed,
                                        digits=train.passkey_digits(config))
      per_seed.append(float(np.mean(list(accuracy.values()))))
    result[length] = dict(per_seed=per_seed, mean=float(np.mean(per_seed)),
                          sequences=len(seeds) * len(depths) * config.eval_samples)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished passkey run")
  parser.add_argument("--lengths", default=None,
                      help="comma-separated lengths (default: seq_len + 1 and +-1 of it)")
  parser.add_argument("--seeds", default="2-7")
  parser.add_argument("--compute_dtype", default=None)
  parser.add_argument("--out", default="passkey_phase.json")
  args = parser.parse_args()
  config, _, model = plot.load_run(args.workdir, compute_dtype=args.compute_dtype)
  lengths = ([int(x) for x in args.lengths.split(",")] if args.lengths
             else [config.seq_len + 1, config.seq_len, config.seq_len + 2])
  result = accuracy_by_length(model, config, lengths, parse_seeds(args.seeds))
  print(f"{'length':>8} {'phase':>6} {'accuracy':>9} {'sequences':>10}  per seed")
  for length, row in result.items():
    phase = (length - 1 - config.seq_len) % config.nsa.slc_block
    print(f"{length:>8} {phase:>6} {row['mean']:>9.2f} {row['sequences']:>10}  "
          + " ".join(f"{a:.2f}" for a in row["per_seed"]))
  pathlib.Path(args.out).write_text(json.dumps(dict(
      workdir=str(args.workdir), seq_len=config.seq_len, compute_dtype=config.compute_dtype,
      accuracy=result), indent=1))


if __name__ == "__main__":
  main()

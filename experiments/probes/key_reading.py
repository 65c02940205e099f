"""Where a passkey model's answers look: each layer's token-level attention at the answers, on the
digit to emit, its neighbours, and the whole key.

    python -m experiments.probes.key_reading --workdir out/pk [--workdir ...] [--samples 16]
        [--out key_reading.json]

`experiments.diagnostics.token_attention` logs the weight on the digit itself; a model can also
read a neighbour that carries the digit (a later token whose first layer copied it) or spread
its weight over the key. For every layer (NSA: the selected and the window branch; dense: full
attention) this prints the best head's mean weight at offsets -1, 0, +1, +2 from the digit each
answer emits, and on the key's span. Held-out sequences of `experiments.plot.answer_probe`.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

from experiments import diagnostics
from experiments import plot

OFFSETS = (-1, 0, 1, 2)


def reading_profile(model, tokens, queries, targets) -> list[dict]:
  """Per layer and token-level branch: `{"layer", "branch", "at_offset": {offset: weight},
  "on_key": weight}`, each the best head's mean over sequences and answers.

  Args:
    model: a `DecoderLM` (NSA layers, ablations or dense).
    tokens: int `[B, T]`; queries: int `[Q]`, the answer positions; targets: int `[B, Q]`, the
      position of the digit each answer emits (the key's digits in order).
  """
  rows = jnp.broadcast_to(jnp.asarray(queries), targets.shape)
  key_start, key_stop = targets.min(axis=1, keepdims=True), targets.max(axis=1, keepdims=True)
  profile = []
  x = model.embed(jnp.asarray(tokens))
  for number, block in enumerate(model.blocks, start=1):
    layer, normed = block.attention, block.attention_norm(x)
    branches = [b for b in ("slc", "swa") if b in getattr(layer, "branches", ())] or ["full"]
    for branch in branches:
      probs = diagnostics.attention_rows(layer, normed, rows,
                                         branch="swa" if branch == "full" else branch)
      keys_at = jnp.arange(probs.shape[-1])
      on_key = (keys_at >= key_start) & (keys_at <= key_stop)  # [B, T]
      profile.append(dict(
          layer=number, branch=branch,
          at_offset={offset: float(diagnostics.weight_on(
              probs, jnp.clip(targets + offset, 0, None))) for offset in OFFSETS},
          on_key=float((probs * on_key[:, None, None, :]).sum(-1).mean(axis=(0, 2)).max())))
    x = block(x)
  return profile


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", action="append", required=True)
  parser.add_argument("--samples", type=int, default=16)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  results = {}
  print(f"{'run':<24} {'layer':>5} {'branch':>6} " + " ".join(f"{o:>+6d}" for o in OFFSETS)
        + f" {'on key':>7}")
  for workdir in args.workdir:
    config, _, model = plot.load_run(workdir)
    if config.data.source != "passkey":
      parser.error(f"--workdir {workdir}: a passkey run is needed, got {config.data.source!r}")
    results[workdir] = reading_profile(model, *plot.answer_probe(config, args.samples))
    for row in results[workdir]:
      print(f"{workdir[-24:]:<24} {row['layer']:>5} {row['branch']:>6} "
            + " ".join(f"{row['at_offset'][o]:6.3f}" for o in OFFSETS) + f" {row['on_key']:7.3f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()

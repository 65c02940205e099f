"""Where a passkey model's answers look: each layer's attention at the answers, on the digit to
emit, its neighbours, the whole key and the tokens after it.

    python -m experiments.probes.key_reading --workdir out/pk [--workdir ...] [--samples 16]
        [--out key_reading.json]

`experiments.diagnostics.token_attention` logs the weight on the digit itself; a model can also
read a neighbour that carries the digit (a later token whose first layer copied it), spread its
weight over the key, or read a compressed summary. For every layer (NSA: the compressed, the
selected and the window branch; dense: full attention) this prints the best head's mean weight
at offsets -1, 0, +1, +2 from the digit each answer emits, on the key's span and on the 64
tokens after it (compressed branch: on the blocks that overlap each span); then, at each of the
16 positions after the key, each layer's weight on the key (a head that copies the key forward).
Held-out sequences of `experiments.plot.answer_probe`.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np

from experiments import diagnostics
from experiments import plot

OFFSETS = (-1, 0, 1, 2)
AFTER = 64
COPY_SPAN = 16


def reading_profile(model, tokens, queries, targets, after: int = AFTER) -> list[dict]:
  """Per layer and branch: `{"layer", "branch", "at_offset": {offset: weight}, "on_key": weight,
  "after_key": weight}`, each the best head's mean over sequences and answers of the weight on
  the keys that cover the span (for the compressed branch: the blocks that overlap it).

  Args:
    model: a `DecoderLM` (NSA layers, ablations or dense).
    tokens: int `[B, T]`; queries: int `[Q]`, the answer positions; targets: int `[B, Q]`, the
      position of the digit each answer emits (the key's digits in order).
    after: the length of the span after the key's last digit (`after_key`), where a first layer
      that attends to the key can have left a copy of it.
  """
  rows = jnp.broadcast_to(jnp.asarray(queries), targets.shape)
  key_start = jnp.broadcast_to(targets.min(axis=1, keepdims=True), targets.shape)
  key_stop = jnp.broadcast_to(targets.max(axis=1, keepdims=True), targets.shape)
  spans = {**{offset: (targets + offset,) * 2 for offset in OFFSETS},
           "on_key": (key_start, key_stop), "after_key": (key_stop + 1, key_stop + after)}
  profile = []
  for number, branch, layer, normed in _layer_branches(model, tokens):
    probs, first, last = _branch_rows(layer, normed, rows, branch)
    weights = {name: weight_on_span(probs, first, last, *span) for name, span in spans.items()}
    profile.append(dict(layer=number, branch=branch,
                        at_offset={offset: weights[offset] for offset in OFFSETS},
                        on_key=weights["on_key"], after_key=weights["after_key"]))
  return profile


def copy_profile(model, tokens, targets, span: int = COPY_SPAN) -> list[dict]:
  """Per layer and branch: `{"layer", "branch", "on_key": [span] weights}`, at each of the `span`
  positions after the key's last digit the best head's mean weight on the key: a head that puts
  its weight there copies the key forward, where a later layer can read it (RESULTS.md: the
  needle's " Remember it." holds the key this way). Arguments as `reading_profile`'s."""
  key_start = targets.min(axis=1, keepdims=True)  # [B, 1]
  key_stop = targets.max(axis=1, keepdims=True)
  rows = key_stop + jnp.arange(1, span + 1)  # [B, span]
  profile = []
  for number, branch, layer, normed in _layer_branches(model, tokens):
    probs, first, last = _branch_rows(layer, normed, rows, branch)
    weights = _weights_on_span(probs, first, last, key_start, key_stop).mean(0).max(0)  # [span]
    profile.append(dict(layer=number, branch=branch, on_key=np.asarray(weights).tolist()))
  return profile


def _layer_branches(model, tokens):
  """Yields `(layer number, branch, attention layer, its normed input)` for every layer's
  branches (NSA: "cmp", "slc", "swa" where the layer has them; dense: "full")."""
  x = model.embed(jnp.asarray(tokens))
  for number, block in enumerate(model.blocks, start=1):
    layer, normed = block.attention, block.attention_norm(x)
    kinds = getattr(layer, "branches", ())
    for branch in [b for b in ("cmp", "slc", "swa") if b in kinds] or ["full"]:
      yield number, branch, layer, normed
    x = block(x)


def _branch_rows(layer, normed, rows, branch):
  """`(probs [B, Hq, R, S], first [S], last [S])`: `branch`'s attention weights at `rows` and
  the first and last token each of its keys covers (a compressed key covers its block)."""
  if branch == "cmp":
    probs, _ = diagnostics.compressed_rows(layer, normed, rows, rows)
    first = jnp.arange(probs.shape[-1]) * layer.config.cmp_stride
    return probs, first, first + layer.config.cmp_block - 1
  probs = diagnostics.attention_rows(layer, normed, rows,
                                     branch="swa" if branch == "full" else branch)
  keys_at = jnp.arange(probs.shape[-1])
  return probs, keys_at, keys_at


def weight_on_span(probs, first, last, start, stop) -> float:
  """The best head's mean weight of `probs [B, Hq, Q, S]` on the keys whose tokens
  `first[s]..last[s]` overlap `start..stop` (`int [B, Q]` each)."""
  return float(_weights_on_span(probs, first, last, start, stop).mean(axis=(0, 2)).max())


def _weights_on_span(probs, first, last, start, stop):
  """`[B, Hq, Q]`: each row's weight on the keys overlapping its span (`weight_on_span`'s args)."""
  overlap = (first <= stop[..., None]) & (last >= start[..., None])  # [B, Q, S]
  return (probs * overlap[:, None]).sum(-1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", action="append", required=True)
  parser.add_argument("--samples", type=int, default=16)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  results = {}
  for workdir in args.workdir:
    config, _, model = plot.load_run(workdir)
    if config.data.source != "passkey":
      parser.error(f"--workdir {workdir}: a passkey run is needed, got {config.data.source!r}")
    tokens, queries, targets = plot.answer_probe(config, args.samples)
    results[workdir] = {"answers": reading_profile(model, tokens, queries, targets),
                        "after_key": copy_profile(model, tokens, targets)}
  print("At the answers: the weight on the digit to emit (offset 0) and its neighbours, on the "
        f"key, and on the {AFTER} tokens after it")
  print(f"{'run':<24} {'layer':>5} {'branch':>6} " + " ".join(f"{o:>+6d}" for o in OFFSETS)
        + f" {'on key':>7} {'after':>7}")
  for workdir, found in results.items():
    for row in found["answers"]:
      print(f"{workdir[-24:]:<24} {row['layer']:>5} {row['branch']:>6} "
            + " ".join(f"{row['at_offset'][o]:6.3f}" for o in OFFSETS)
            + f" {row['on_key']:7.3f} {row['after_key']:7.3f}")
  print(f"At the {COPY_SPAN} positions after the key: the weight on the key")
  for workdir, found in results.items():
    for row in found["after_key"]:
      print(f"{workdir[-24:]:<24} {row['layer']:>5} {row['branch']:>6} "
            + " ".join(f"{w:4.2f}" for w in row["on_key"]))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()

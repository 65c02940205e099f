"""Training with NSA's branches re-weighted or the compressed branch's K/V gradient cut: what keeps
an ablation from learning?

    python -m experiments.probes.branch_mix --scale swa=2 [--scale cmp=0.5] [--detach_cmp_kv] \
        -- --config experiments/configs/mqar_cpu.py --workdir out/probe [--config.<field>=...]

Everything after `--` is `experiments.train`'s command line; the run writes the same metrics,
checkpoints and plots input. `--scale branch=factor` multiplies that branch's gate in every NSA
layer (`nsa_jax.nn.BRANCHES`: `cmp`, `slc`, `swa`), so its output enters the mix `factor` times
stronger, and its gradient with it; `--detach_cmp_kv` stops the compressed branch's gradient
from reaching the K/V projections it shares with the other branches (its compression MLP still
learns). Neither is a model a user would train: they test explanations of a training result
(RESULTS.md, "Why `nsa_no_selection` does not learn MQAR at T = 64").
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import jax
import jax.numpy as jnp
from absl import app

from experiments import train
from nsa_jax import nn


def parse_scales(items) -> dict[str, float]:
  """`["swa=2", "cmp=0.5"]` -> `{"swa": 2.0, "cmp": 0.5}`; a `ValueError` for an unknown branch."""
  scales = {}
  for item in items:
    branch, _, factor = item.partition("=")
    if branch not in nn.BRANCHES or not factor:
      raise ValueError(f"--scale takes branch=factor, a branch of {nn.BRANCHES}; got {item!r}")
    scales[branch] = float(factor)
  return scales


@contextlib.contextmanager
def branch_mix(scales: dict[str, float], detach_cmp_kv: bool = False):
  """Within the block, NSA layers scale their branch gates by `scales` (also the gates that
  `experiments.diagnostics` reports) and, with `detach_cmp_kv`, compress stop-gradient copies of
  their keys and values."""
  # pylint: disable=protected-access
  layer = nn.NativeSparseAttention
  original_gates, original_compress = layer._gates, layer._compress
  factors = jnp.array([scales.get(branch, 1.0) for branch in nn.BRANCHES])

  def gates(self, x, dtype):
    found = original_gates(self, x, dtype)
    if found is None:
      raise ValueError("branch scales need sigmoid gates (model.gating = 'sigmoid')")
    return (found.astype(jnp.float32) * factors).astype(dtype)

  def compress(self, k, v, segment_ids=None):
    if detach_cmp_kv:
      k, v = jax.lax.stop_gradient(k), jax.lax.stop_gradient(v)
    return original_compress(self, k, v, segment_ids)

  layer._gates, layer._compress = gates, compress
  try:
    yield
  finally:
    layer._gates, layer._compress = original_gates, original_compress


def main():
  argv = sys.argv[1:]
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--scale", action="append", default=[], help="branch=factor, repeatable")
  parser.add_argument("--detach_cmp_kv", action="store_true")
  args = parser.parse_args(argv[:split])
  with branch_mix(parse_scales(args.scale), args.detach_cmp_kv):
    app.run(train.main, argv=[sys.argv[0], *argv[split + 1:]])


if __name__ == "__main__":
  main()

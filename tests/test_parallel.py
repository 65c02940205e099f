"""Sharded training: a (2, 2, 2) mesh of 8 CPU devices gives the single-device losses, and the
attention inputs are never all-gathered."""

import json
import os
import subprocess
import sys

import jax
import pytest

from experiments import parallel
from nsa_jax.sharding import make_mesh


def run_worker(workdir, mesh, devices):
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-m", "tests.mesh_worker", str(workdir), *map(str, mesh)],
                 check=True, env=env, capture_output=True, timeout=600)
  with open(workdir / "result.json") as f:
    return json.load(f)


def test_a_2x2x2_mesh_gives_the_single_device_losses_without_gathering_qkv(tmp_path):
  sharded = run_worker(tmp_path / "sharded", (2, 2, 2), 8)
  single = run_worker(tmp_path / "single", (1, 1, 1), 1)
  assert sharded["devices"] == 8 and single["devices"] == 1
  assert len(single["losses"]) == 4
  # Same math in another summation order (sharded matmuls and reductions).
  assert sharded["losses"] == pytest.approx(single["losses"], rel=2e-4)
  assert sharded["held_out"] == pytest.approx(single["held_out"], rel=2e-4)
  # FSDP gathers parameters (rank 2) and the hidden states [B, T, F] across the fsdp-split
  # features; the rank-4 attention inputs [B, T, H, D] (Q, K, V, compressed K/V) never are.
  ranks = [shape.count(",") + 1 for shape in sharded["all_gathers"]]
  assert ranks and 2 in ranks, sharded["all_gathers"]
  assert max(ranks) <= 3, sharded["all_gathers"]
  assert single["all_gathers"] == []


def test_mesh_sizes_are_checked():
  with pytest.raises(ValueError, match="at most one of them -1"):
    make_mesh(-1, -1, 1)
  with pytest.raises(ValueError, match="needs 4 devices"):
    make_mesh(2, 2, 1, devices=jax.devices()[:1])


def test_a_mesh_that_cannot_split_the_batch_or_the_groups_is_a_clear_error():
  from experiments.configs import demo
  config = demo.get_config()
  mesh = jax.sharding.AbstractMesh((1, 3, 2), ("data", "fsdp", "tensor"))
  with pytest.raises(ValueError, match="batch_size / grad_accum_steps"):
    parallel.check_divisible(config, mesh)
  config.batch_size = 6
  with pytest.raises(ValueError, match="num_kv_heads"):
    parallel.check_divisible(config, mesh)

"""Every experiment config loads, and the TPU pod config's sharding is valid for its mesh."""

import importlib
import pathlib

import jax
import pytest
from flax import nnx

from experiments import parallel
from experiments import train

CONFIGS = sorted(p.stem for p in pathlib.Path("experiments/configs").glob("*.py")
                 if p.stem not in ("__init__", "compare_cpu"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_its_model_and_states_its_command(name):
  module = importlib.import_module(f"experiments.configs.{name}")
  assert f"experiments/configs/{name}.py" in module.__doc__  # the command that runs it
  for field in ("Hardware:", "Runtime:", "Expected:"):
    assert field in module.__doc__
  config = module.get_config()
  model = nnx.eval_shape(lambda: train.build_model(config, nnx.Rngs(0)))
  assert model.config.attention == config.attention


def test_tpu_pod_sharding_divides_every_dimension():
  from experiments.configs import tpu_pod
  config = tpu_pod.get_config()
  sizes = dict(data=2, fsdp=config.mesh.fsdp, tensor=config.mesh.tensor)  # a 64-chip slice
  mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
  parallel.check_divisible(config, mesh)
  model = nnx.eval_shape(lambda: train.build_model(config, nnx.Rngs(0)))
  optimizer = nnx.eval_shape(
      lambda: nnx.Optimizer(train.build_model(config, nnx.Rngs(0)),
                            train.build_optimizer(config)[0], wrt=nnx.Param))
  split_axes = set()
  for state in (nnx.state(model), nnx.state(optimizer)):
    shardings = parallel.state_shardings(state, mesh)
    for x, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
      for dim, axis in zip(x.shape, sharding.spec):
        if axis is not None:
          assert dim % mesh.shape[axis] == 0
          split_axes.add(axis)
  assert split_axes == {"fsdp", "tensor"}  # both parameter axes are used
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert 1.0e9 < params < 1.6e9

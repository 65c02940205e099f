"""Run by `tests/test_parallel.py` in a subprocess (the device count is fixed at JAX start-up).

    python -m tests.mesh_worker WORKDIR DATA FSDP TENSOR

Trains the tiny config below on the given mesh and writes `WORKDIR/result.json`: the losses, and
the shapes of every all-gather in the compiled train step.
"""

import json
import re
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import parallel
from experiments import train
from experiments.configs import demo


def tiny_config(data, fsdp, tensor):
  config = demo.get_config()
  config.steps, config.log_every, config.eval_every, config.checkpoint_every = 4, 1, 4, 4
  config.batch_size, config.seq_len, config.eval_batches = 8, 64, 1
  config.model.num_heads, config.model.num_kv_heads = 4, 2
  config.model.num_features, config.model.mlp_hidden = 64, 128
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
  return config


def all_gather_shapes(config):
  """Output shapes of the all-gathers in the compiled (sharded) train step."""
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


def main():
  workdir, sizes = sys.argv[1], [int(x) for x in sys.argv[2:5]]
  config = tiny_config(*sizes)
  records = train.run(config, workdir)
  result = dict(devices=jax.device_count(),
                losses=[r["loss"] for r in records if "loss" in r],
                held_out=[r["held_out_loss"] for r in records if "held_out_loss" in r],
                all_gathers=all_gather_shapes(config))
  with open(f"{workdir}/result.json", "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main()

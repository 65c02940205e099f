"""Run by `tests/test_parallel.py` in a subprocess (the device count is fixed at JAX start-up).

    python -m tests.mesh_worker WORKDIR DATA FSDP TENSOR

Trains the tiny config below on the given mesh and writes `WORKDIR/result.json`: the losses, and
the shapes of every all-gather in the compiled train step.
"""

import json
import sys

import jax

from experiments import train
from experiments.configs import demo
from experiments.scaling import all_gather_shapes


def tiny_config(data, fsdp, tensor):
  config = demo.get_config()
  config.steps, config.log_every, config.eval_every, config.checkpoint_every = 4, 1, 4, 4
  config.batch_size, config.seq_len, config.eval_batches = 8, 64, 1
  config.model.num_heads, config.model.num_kv_heads = 4, 2
  config.model.num_features, config.model.mlp_hidden = 64, 128
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
  return config


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

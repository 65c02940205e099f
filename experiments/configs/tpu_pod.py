"""NSA on a TPU pod slice (multi-host): a 1.3B-parameter byte-level LM at 32k context.

Command:   on every host of the slice (e.g. `gcloud compute tpus tpu-vm ssh ... --worker=all`):
           python -m experiments.train --config experiments/configs/tpu_pod.py \
               --workdir gs://BUCKET/nsa_tpu_pod
Hardware:  a v5p-64 slice (32 chips, 8 hosts; `mesh.data` fills whatever the slice has).
Runtime:   not measured: no TPU was available to the project. The sharding is tested on CPU
           (tests/test_configs.py: every parameter and optimizer-state dimension divides its
           mesh axes, batch and GQA groups split evenly); the kernels run under the TPU
           interpreter in the CPU suite.
Expected:  unmeasured. Parameters and optimizer state are FSDP-sharded over 8 devices and the
           attention heads over 4 (tensor); the batch over data x fsdp.
"""

from experiments.configs import demo


def get_config():
  config = demo.get_config()
  config.multihost = True  # jax.distributed.initialize() on every host
  config.mesh.update(dict(data=-1, fsdp=8, tensor=4))
  config.steps = 20_000
  config.batch_size = 64
  config.seq_len = 32768
  config.compute_dtype = "bfloat16"
  config.log_every = 20
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.model.update(dict(num_layers=24, num_features=2048, num_heads=32, num_kv_heads=4,
                           head_dim=64, mlp_hidden=5632))
  config.nsa.update(dict(cmp_block=32, cmp_stride=16, slc_block=64, num_selected=16,
                         num_initial=1, num_local=2, window=512))
  config.optimizer.update(dict(peak_learning_rate=3e-4, warmup_steps=2000))
  config.data.update(dict(source="stdlib", max_bytes=200_000_000))
  return config

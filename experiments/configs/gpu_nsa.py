"""NSA on one GPU: a 6-layer byte-level LM at 4k context, trained on passkey sequences.

Command:   python -m experiments.train --config experiments/configs/gpu_nsa.py --workdir out/gpu_nsa
           then `python -m experiments.plot --workdir out/gpu_nsa --workdir out/gpu_dense`.
Hardware:  one H100 / H200 (implementation="pallas_gpu" is the default there), bfloat16 compute.
Runtime:   about 4 minutes on an H200 (222 s measured, compilation included; RESULTS.md).
Expected:  held-out loss about that of the matching dense run (`gpu_dense.py`, same data, steps
           and model); the sequences are standard-library text with a passkey needle, so the
           loss is mostly language modelling and the passkey accuracy shows retrieval.
"""

from experiments.configs import demo


def get_config():
  config = demo.get_config()
  config.steps = 500
  config.batch_size = 16
  config.seq_len = 4096
  config.compute_dtype = "bfloat16"
  config.log_every = 50
  config.eval_every = 125
  config.eval_batches = 8
  config.checkpoint_every = 250
  config.model.update(dict(num_layers=6, num_features=512, num_heads=16, num_kv_heads=2,
                           head_dim=64, mlp_hidden=1536))
  config.nsa.update(dict(cmp_block=32, cmp_stride=16, slc_block=64, num_selected=16,
                         num_initial=1, num_local=2, window=512))
  config.optimizer.update(dict(peak_learning_rate=1e-3, warmup_steps=50))
  config.data.update(dict(source="passkey", max_bytes=40_000_000))
  return config

"""Dense attention on one GPU: `gpu_nsa.py` with `attention = "dense"` (cuDNN flash attention).

Command:   python -m experiments.train --config experiments/configs/gpu_dense.py \
               --workdir out/gpu_dense
Hardware:  one H100 / H200, bfloat16 compute.
Runtime:   about 2 minutes on an H200 (120 s measured, compilation included; RESULTS.md).
Expected:  the baseline of `gpu_nsa.py`: same model, data and steps.
"""

from experiments.configs import gpu_nsa


def get_config():
  config = gpu_nsa.get_config()
  config.attention = "dense"
  return config

"""NSA against dense causal attention on random inputs (`make compare`).

Command:   python -m experiments.compare --config experiments/configs/compare_cpu.py
           (any field overridable, e.g. --config.seq_lens=512,1024 --config.workdir=/tmp/cmp)
Hardware:  CPU, 2 cores.
Runtime:   about a minute.
Expected:  a table where the XLA path matches the dense-mask reference to ~5e-7, NSA with every
           block selected and a full window equals `o_cmp + 2 * dense` to ~5e-7, and the keys a
           query attends (all branches, capped at its prefix) fall below its prefix as T grows
           (78% at T=4096, where NSA's forward overtakes dense attention on the CPU).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.seq_lens = "512,1024,2048,4096"
  config.batch_size = 1
  config.num_heads = 8
  config.num_kv_heads = 2
  config.head_dim = 64
  config.dtype = "float32"
  config.check_max_len = 1024  # reference comparisons (O(T^2) memory) up to this length
  config.repeats = 3
  config.workdir = "out/compare_cpu"

  config.nsa = ml_collections.ConfigDict()
  config.nsa.cmp_block = 32
  config.nsa.cmp_stride = 16
  config.nsa.slc_block = 64
  config.nsa.num_selected = 16
  config.nsa.num_initial = 1
  config.nsa.num_local = 2
  config.nsa.window = 512
  return config

"""MQAR at an 8k context on one GPU: does NSA's selected branch find a cluster of pairs 8k back?

Task: T = 8192 tokens; 8 key-value pairs one after another (16 tokens) at a random place among
filler, then 8 queries (keys drawn with replacement) each followed by its value; vocabulary 32
(16 filler, 8 key and 8 value ids). The loss is on the 8 answers. A compressed block (l = 32)
holds the whole cluster in one summary, the window (512 tokens) reaches it for 6% of the
places: recall elsewhere leans on the selected branch (n = 16 blocks of 64 of the 128, 3 forced)
picking the cluster's block. `experiments/configs/mqar_cluster_cpu.py` is the same task at
T = 256 on the CPU.

Command:   python -m experiments.train --config experiments/configs/mqar_gpu.py \
               --workdir out/mqar_gpu
           (the baseline and ablations: --config.attention=dense | nsa_no_selection | window)
           then `python -m experiments.plot --workdir out/mqar_gpu [--workdir out/... ]`: loss
           curves, recall by length (0.5x-4x) and pair depth, the selection's hit rate, and the
           trained selection's index tensor and sharing statistics.
Hardware:  one H100 / H200 (implementation="pallas_gpu"), bfloat16 compute.
Runtime:   about 3 minutes on an H200 (2026-12-04: 3000 steps, 393M tokens, NSA at ~2.9M
           tokens/s, nsa_no_selection ~3.9M; compilation and evaluations included).
Expected:  not yet a recall result. Measured 2026-12-04 (RESULTS.md): after 3000 steps NSA and
           nsa_no_selection both stay on the plateau (mqar_accuracy 0.16-0.27, held-out loss
           1.83 / 1.97: the values of the cluster, not which key each belongs to), where the
           same task at T = 256 (`mqar_cluster_cpu.py`) is learned in ~600 steps. Next: 10-20k
           steps (7-14 minutes), or a length curriculum.
"""

from experiments.configs import mqar_cpu


def get_config():
  config = mqar_cpu.get_config()
  config.seq_len = 8192
  config.batch_size = 16
  config.compute_dtype = "bfloat16"
  config.steps = 3000
  config.log_every = 100
  config.eval_every = 500
  config.eval_samples = 16
  config.checkpoint_every = 1000
  config.model.update(dict(num_layers=2, num_features=256, num_heads=4, num_kv_heads=1,
                           head_dim=64, mlp_hidden=512))
  config.nsa.update(dict(cmp_block=32, cmp_stride=16, slc_block=64, num_selected=16,
                         num_initial=1, num_local=2, window=512))
  config.data.update(dict(mqar_pairs=8, mqar_placement="cluster"))
  return config

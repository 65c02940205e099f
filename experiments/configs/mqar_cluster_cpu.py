"""MQAR with the pairs in one cluster, on the CPU: does NSA's selection help recall?

Task: T = 256 tokens; 8 key-value pairs one after another (16 tokens) at a random place among
filler, then 8 queries (keys drawn with replacement) each followed by its value; vocabulary 32
(16 filler, 8 key and 8 value ids). The loss is on the 8 answers. A compressed block (l = 8
tokens) summarises 4 pairs at once and the window (16 tokens) reaches the cluster only when it
is recent, so recall leans on the selected branch finding the cluster's blocks (n = 4 of 16, 2
of them free picks) and attending to its tokens.

Command:   python -m experiments.train --config experiments/configs/mqar_cluster_cpu.py \
               --workdir out/mqar_cluster_cpu
           (the baseline and ablations: --config.attention=dense | nsa_no_selection | window)
Hardware:  CPU, 2 cores.
Runtime:   about 11 minutes for NSA (2026-12-04, 2-core AMD EPYC, ~19k tokens/s), 5.5 for
           nsa_no_selection.
Expected:  mqar_accuracy >= 0.9 at the last evaluation. Measured 2026-12-04 (RESULTS.md), at
           steps 300 / 600 / 900 / 1200 / 1500: NSA 0.44 / 0.86 / 0.91 / 0.99 / 0.95;
           nsa_no_selection 0.33 / 0.27 / 0.66 / 0.92 / 0.91 (later: a learned compression of 8
           tokens still tells 4 pairs apart at this size).
"""

from experiments.configs import mqar_cpu


def get_config():
  config = mqar_cpu.get_config()
  config.seq_len = 256
  config.nsa.update(dict(num_selected=4))
  config.data.update(dict(mqar_pairs=8, mqar_placement="cluster"))
  return config

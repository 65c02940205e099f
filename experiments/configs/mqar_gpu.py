"""MQAR at an 8k context on one GPU: does NSA's selected branch find a cluster of pairs 8k back?

Task: T = 8192 tokens; 8 key-value pairs one after another (16 tokens) at a random place among
filler, then 8 queries (keys drawn with replacement) each followed by its value; vocabulary 32
(16 filler, 8 key and 8 value ids). The loss is on the 8 answers. A compressed block (l = 32)
holds the whole cluster in one summary, the window (512 tokens) reaches it for 6% of the
places: recall elsewhere was meant to lean on the selected branch (n = 16 blocks of 64 of the
128, 3 forced) picking the cluster's block, but with 8 keys and 8 values the compressed
summaries carried most of it (RESULTS.md: the selection held the answer's block for 39% / 14%
of the queries in layers 1 / 2). `experiments/configs/mqar_cluster_cpu.py` is the same task at
T = 256 on the CPU.

Command:   a length curriculum, three runs each started from the last (`config.init_from`);
           from scratch at T = 8192 no model left the plateau (see Expected):
             C="--config experiments/configs/mqar_gpu.py --config.attention=nsa"
             python -m experiments.train $C --workdir out/c64 --config.seq_len=64 \
                 --config.batch_size=64 --config.steps=3000 --config.eval_every=1000
             python -m experiments.train $C --workdir out/c1k --config.seq_len=1024 \
                 --config.batch_size=32 --config.steps=500 --config.eval_every=250 \
                 --config.init_from=out/c64
             python -m experiments.train $C --workdir out/c8k --config.steps=2000 \
                 --config.eval_every=500 --config.init_from=out/c1k
           (the baseline and ablations: --config.attention=dense | nsa_no_selection | window)
           then `python -m experiments.plot --workdir out/c8k [--workdir out/... ]`: loss
           curves, recall by length (0.5x-4x) and pair depth, the selection's hit rate, and the
           trained selection's index tensor and sharing statistics.
Hardware:  one H100 / H200 (implementation="pallas_gpu"), bfloat16 compute.
Runtime:   about 3 minutes for the three stages on an H200 (2026-12-04, NSA: 48 + 24 + 105 s,
           compilation and evaluations included; at 8k NSA trains at ~3.2M tokens/s, dense 4.0M).
Expected:  mqar_accuracy 1.00 at T = 8192 for NSA and dense (NSA 0.62 / 0.99 / 1.00 / 1.00 at
           steps 500-2000 of the last stage, dense 1.00 from step 500); `window` 0.52 (0.28 on
           first-time queries); `nsa_no_selection` did not learn (0.35; already 0.28 at T = 64,
           a trap of its branch mix: `mqar_t64_cpu.py`; start its T = 64 stage from the window
           run's instead, `--config.init_from=out/c64_window`).
           From scratch at T = 8192 (3000 steps) or T = 1024 (4000 steps) every variant stayed
           on the plateau (0.16-0.38: the cluster's values, not which key each belongs to).
           RESULTS.md has the tables, the plots and the selection's hit rates.
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

"""MQAR on the CPU, the learning check: a 2-layer NSA model learns multi-query associative recall.

Task: T = 64 tokens, 4 key-value pairs at random places among filler, then 4 queries (keys drawn
with replacement) each followed by its value; vocabulary 32 (16 filler, 8 key and 8 value ids).
The loss is on the 4 answers.

Command:   python -m experiments.train --config experiments/configs/mqar_cpu.py --workdir out/mqar_cpu
           (the baseline and ablations: --config.attention=dense | nsa_no_selection | window)
Hardware:  CPU, 2 cores.
Runtime:   177 s (2026-12-04, 2-core AMD EPYC, NSA at ~20k tokens/s, compiles included);
           166 s on 2026-12-07 (commit 5a1e027, the same machine type, nothing else running;
           3:51 with a test run beside it), mqar_accuracy 0.98 at the last evaluation.
Expected:  mqar_accuracy >= 0.9 at the last evaluation. Measured 2026-12-04 with this config:
           NSA 0.25 / 0.48 / 1.00 / 0.95 / 0.98 at steps 300-1500 (held-out loss 1.37 -> 0.06).
           Dense attention on the same batches (evaluated every 250 steps) stayed at 0.39-0.56
           (loss 1.02 at step 1500: it knows the context's values but not which key each
           belongs to).
           The vocabulary matters most: with 64 keys / 64 values (vocab 256) no model left that
           plateau within 3 minutes; a dense model on 16-token sequences with 32 key ids left it
           only after ~6500 steps.
"""

from experiments.configs import demo


def get_config():
  config = demo.get_config()
  config.steps = 1500
  config.batch_size = 32
  config.seq_len = 64
  config.log_every = 100
  config.eval_every = 300
  config.eval_batches = 2
  config.eval_samples = 16
  config.checkpoint_every = 1500
  # 32 ids: 16 filler, 8 keys, 8 values.
  config.model.update(dict(vocab_size=32, num_layers=2, num_features=64, num_heads=2,
                           num_kv_heads=2, head_dim=32, mlp_hidden=128))
  # Blocks sized so that the window (16 tokens) sees few of the pairs: recall needs the
  # compressed and selected branches.
  config.nsa.update(dict(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3,
                         num_initial=1, num_local=1, window=16))
  config.optimizer.update(dict(peak_learning_rate=1e-3, warmup_steps=100, weight_decay=0.0))
  config.data.update(dict(source="mqar", mqar_pairs=4, mqar_placement="uniform",
                          other_weight=0.0))
  return config

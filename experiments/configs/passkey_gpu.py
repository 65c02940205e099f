"""Passkey retrieval at an 8k context on one GPU: a 5-digit key in standard-library text.

Task: byte-level sequences of T = 8192 bytes of standard-library source text with the needle
" The pass key is 73914. Remember it. " at a uniformly random depth and the question " What is
the pass key? The pass key is 73914" at the end (`experiments/tasks.py`); the loss is on the 5
key digits of the question only (`data.other_weight = 0`). Same model and NSA configuration as
`mqar_gpu.py` (2 layers, 256 wide, 4 query heads, 1 KV head; l = 32, d = 16, l' = 64, n = 16,
w = 512): the key is 10^5 random digits in one 64-byte block, so a query that recalls it must
read that block's tokens, which only the selection (or dense attention) gives it beyond the
window.

Command:   a length curriculum as for `mqar_gpu.py` (T = 128 first: the needle and question take
           81 bytes), each stage started from the last (`experiments/curriculum.py`):
             python -m experiments.curriculum --config experiments/configs/passkey_gpu.py \
                 --config.attention=nsa --workdir out/passkey_nsa \
                 --stages 128:64:3000,1024:32:500,8192:16:2000
           (the baseline and ablations: --config.attention=dense | nsa_no_selection | window)
           then `python -m experiments.plot --workdir out/passkey_nsa/t8192 [--workdir ...]`:
           passkey retrieval by length (0.5x-4x) and needle depth, the selection's hit rate on
           the needle, loss curves.
Hardware:  one H100 / H200 (implementation="pallas_gpu"), bfloat16 compute.
Runtime:   the four variants at once on one H200: ~3 minutes for the T = 128 and 1024 stages,
           the 8k stage ~5 minutes per 1000 steps each (alone a variant is ~3x faster).
Expected:  measured 2026-12-04 (RESULTS.md): dense 1.00 at every stage and at 8k from step
           500; NSA 1.00 at T = 128 and 1024, then 0.00 at 8k through step 1100 (lost on
           entering 8k; not understood yet); `window` at chance at 8k, `nsa_no_selection`
           0.00. On the CPU at T = 512 and 1024 (smaller model and blocks) the selection learned
           to hold the needle's block for 89-99% of the answers. Next: a longer 8k stage, the
           same on implementation="xla", and a ladder 1k -> 4k -> 8k.
"""

from experiments.configs import mqar_gpu


def get_config():
  config = mqar_gpu.get_config()
  config.eval_samples = 4  # sequences per needle depth (5 depths) at each evaluation
  config.model.vocab_size = 256
  config.data.update(dict(source="passkey", max_bytes=8_000_000, other_weight=0.0))
  return config

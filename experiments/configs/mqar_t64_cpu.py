"""The GPU MQAR curriculum's first stage at half width, on the CPU: where `nsa_no_selection` stalls.

Task: `mqar_gpu`'s (8 pairs one after another at a random place, vocabulary 32, loss on the 8
answers) at its first stage's length T = 64, and its NSA settings (l = 32, d = 16, l' = 64,
n = 16, w = 512: at T = 64 the window and the selected branch both see every token). The model
is `mqar_gpu`'s at half its width: 2 layers, 128 wide, 2 query heads of 64, 1 KV head.

Command:   python -m experiments.train --config experiments/configs/mqar_t64_cpu.py \
               --workdir out/t64 --config.attention=nsa_no_selection   # or window, nsa, dense
           Re-weighted branches: python -m experiments.probes.branch_mix --scale swa=2 -- \
               --config experiments/configs/mqar_t64_cpu.py --workdir out/t64_swa2 \
               --config.attention=nsa_no_selection
Hardware:  CPU, 2 cores.
Runtime:   ~5.5 minutes for `window` / `nsa_no_selection` (2026-12-05, ~13k tokens/s); NSA's
           selected branch is slow on the CPU's XLA path (~1.4k tokens/s: ~50 minutes).
Expected:  `window` 1.00 from step 1000; `nsa` 1.00 at step 1000; `nsa_no_selection` stays on
           the plateau (0.27-0.37 at every evaluation, held-out loss ~1.6), its layers' window
           attention without the induction circuit (`previous_token_attention` and
           `induction_attention` <= 0.12 against 0.44-0.48 for `window`). With the compressed
           branch's gate scaled by 0.1 or the window's by 2 it learns (0.83, 0.71 at step 2000).
           RESULTS.md, "Why `nsa_no_selection` does not learn MQAR at T = 64".
"""

from experiments.configs import mqar_cpu


def get_config():
  config = mqar_cpu.get_config()
  config.steps = 2000
  config.eval_every = 500
  config.checkpoint_every = 2000
  config.model.update(dict(num_features=128, num_heads=2, num_kv_heads=1, head_dim=64,
                           mlp_hidden=256))
  config.nsa.update(dict(cmp_block=32, cmp_stride=16, slc_block=64, num_selected=16,
                         num_initial=1, num_local=2, window=512))
  config.data.update(dict(mqar_pairs=8, mqar_placement="cluster"))
  return config

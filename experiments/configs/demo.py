"""Demo: a small byte-level NSA language model trained on the Python standard library's sources.

Command:   python -m experiments.train --config experiments/configs/demo.py --workdir out/demo
           (override any field, e.g. --config.attention=dense --config.steps=200)
Hardware:  CPU, 2 cores.
Runtime:   under a minute (44 s on a 2-core AMD EPYC, 2026-11-27).
Expected:  training loss falls from ~5.5 nats per byte (uniform over 256) to about 2 in 150
           steps, held-out loss about 1.9 (measured 1.87); metrics in out/demo/metrics.jsonl,
           checkpoints in out/demo/checkpoints. Rerunning resumes from the latest checkpoint (a
           finished run has nothing left to do: raise --config.steps to continue it).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.steps = 150
  config.batch_size = 8
  config.grad_accum_steps = 1  # micro-batches per update (must divide batch_size)
  config.compute_dtype = "float32"  # or "bfloat16" (parameters stay float32)
  config.seq_len = 256
  config.log_every = 10
  config.eval_every = 50
  config.eval_batches = 4
  config.eval_samples = 4  # task sequences per accuracy (passkey: per depth) at each evaluation
  config.checkpoint_every = 50
  config.keep_checkpoints = 2
  # A workdir whose latest checkpoint initialises the model (same model, any seq_len: a length
  # curriculum's next stage); optimizer and data start afresh. Ignored when resuming.
  config.init_from = ""
  # Device mesh (data, fsdp, tensor); -1 fills the remaining devices. One CPU device here.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.multihost = False  # True on multi-host TPU slices: jax.distributed.initialize()

  config.attention = "nsa"  # or "dense"
  # NSA's compression phi ("mlp": the paper's learned one, "mean": pooling) and branch gates
  # ("sigmoid" per head, or "sum").
  config.model = ml_collections.ConfigDict(dict(
      num_layers=2, num_features=128, num_heads=4, num_kv_heads=1, head_dim=32, mlp_hidden=384,
      compression="mlp", gating="sigmoid"))
  config.nsa = ml_collections.ConfigDict(dict(
      cmp_block=16, cmp_stride=8, slc_block=32, num_selected=4, num_initial=1, num_local=1,
      window=64))

  config.optimizer = ml_collections.ConfigDict(dict(
      peak_learning_rate=3e-3, warmup_steps=20, weight_decay=0.01, clip_norm=1.0))
  # "stdlib": bytes of the standard library's sources; "passkey": needles in them; "mqar":
  # multi-query associative recall over the model's vocab_size token ids (`mqar_pairs` pairs
  # placed "uniform"-ly, at the "start", or one after another in a "cluster" at a random place;
  # `mqar_ids` > 0: keys and values from only the first that many of their ids, a curriculum's
  # early stage);
  # "text": bytes of the files matching the glob `path`; "tokens": ids in the .npy / .bin
  # (`dtype`) files matching `path`. The tasks' loss weighs their answers 1 and the other targets
  # `other_weight` (1: plain language modelling). `pack_documents` ("stdlib" / "text"): each file
  # a document, rows packed across files with segment ids (attention and loss stay in a file);
  # `pack_align` (> 1): each file padded (no loss on the padding) to a multiple of this many bytes
  # and rows starting on one, so packed documents start on selection blocks (the nsa.slc_block:
  # the packed GPU kernels' whole-block route, `selected_attention.WHOLE_BLOCK_DOCUMENTS`).
  # `passkey_digits`: the passkey's length ("passkey"); `passkey_min_distance`: training needles
  # end at least this many positions before the answers (>= the window: beyond its reach);
  # `passkey_max_shift`: each row's question ends 0..this many bytes before the row's end, so the
  # answers meet the blocks at every offset (0: always at the end).
  config.data = ml_collections.ConfigDict(dict(
      source="stdlib", max_bytes=4_000_000, path="", dtype="uint16", mqar_pairs=8,
      mqar_placement="uniform", mqar_ids=0, other_weight=1.0, pack_documents=False, pack_align=0,
      passkey_digits=5, passkey_min_distance=0, passkey_max_shift=0))
  return config

"""NSA on packed rows on one GPU: the `gpu_nsa.py` model on standard-library files packed into
16k-byte rows, each file a document (`segment_ids`: attention, RoPE positions, compressed and
selection blocks and the window restart at each file; no loss on a file's first byte). The
files are long: a row holds 1.8 of them on average (1-7 in the first 40 rows).

Command:   python -m experiments.train --config experiments/configs/gpu_packed.py \
               --workdir out/gpu_packed
           (unpacked, for comparison: --config.data.pack_documents=false; dense:
           --config.attention=dense, which runs packed rows through the XLA path; files
           padded to multiples of 64 bytes, so documents start on selection blocks and the
           selected kernels run on whole blocks: --config.data.pack_align=64)
Hardware:  one H100 / H200 (implementation="pallas_gpu": every NSA kernel takes packed rows),
           bfloat16 compute.
Runtime:   about 2 minutes on an H200 (300 steps, compilation included); 189 k tokens/s
           packed, 224 k unpacked (2026-12-04, RESULTS.md "Packed rows"); on an H100 at
           3c1342e, 185-199 k packed, 209-232 k with pack_align=64, 223-245 k unpacked.
Expected:  held-out loss 1.32 at the end, the same as the unpacked run's.
"""

from experiments.configs import gpu_nsa


def get_config():
  config = gpu_nsa.get_config()
  config.seq_len = 16384
  config.batch_size = 4
  config.steps = 300
  config.eval_every = 100
  config.data.update(dict(source="stdlib", pack_documents=True))
  return config

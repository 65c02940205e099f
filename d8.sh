#!/bin/bash
# G = 4 / 8 at 64k against cuDNN, default allocator (d6 ran with the platform allocator: not timings).
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
for h in 16 8; do
  timeout 140 python -m experiments.bench_kernels --fla_seq_lens "" --seq_lens 65536 --num_kv_heads $h --repeats 5 --parts "dense_cudnn,nsa mosaic" --out $OUT/g_hkv$h.json 2>&1 | grep "^ *65536 " | sed "s/^/hkv=$h /"
done

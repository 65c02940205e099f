#!/bin/bash
# Validation + timing of the selection-glue changes (score buffer, top-n launches, block map).
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
R=experiments/results/gpu_2026-12-06
F="grep -v ^W\|^I0\|Warning"
nvidia-smi --query-gpu=name --format=csv,noheader
python -m experiments.bench_kernels --trace 65536 --trained_indices $R/lm_64k_selection/selection_indices_lm64_layer2.npz 2>&1 | grep -v "^W\|^I0" > $OUT/trace64.txt
head -25 $OUT/trace64.txt
B="python -m experiments.bench_kernels --fla_seq_lens ''"
python -m experiments.bench_kernels --fla_seq_lens "" --seq_lens 8192 --parts "dense_cudnn,nsa mosaic" --out $OUT/b8k.json 2>&1 | grep "^ *8192 "
python -m experiments.bench_kernels --fla_seq_lens "" --seq_lens 16384 --trained_indices $R/passkey_16k_selection/selection_indices_k16_2.npz --trained_layer 1 --parts "dense_cudnn,nsa mosaic,nsa trained mosaic" --out $OUT/b16k.json 2>&1 | grep "^ *16384 "
python -m experiments.bench_kernels --fla_seq_lens "" --seq_lens 65536 --trained_indices $R/lm_64k_selection/selection_indices_lm64_layer2.npz --parts "dense_cudnn,nsa mosaic,nsa trained mosaic" --out $OUT/b64k.json 2>&1 | grep "^ *65536 "
XLA_FLAGS="--xla_gpu_autotune_level=0" timeout 280 python -m pytest -q -m gpu -n 12 tests/test_pallas_gpu.py tests/test_properties.py tests/test_block_maps.py -k "(scores or select or top_n or compressed_branch or public_api or all_group_sizes or long_sequence or one_cudnn_pass or bfloat16_gradients) and not every_short_length" 2>&1 | tail -8

"""Pallas kernels for Native Sparse Attention, one sub-package per backend (`gpu`, `tpu`).

Kernels import only jax (never `nsa_jax`); `nsa_jax.ops` wires them in as
`implementation="pallas_gpu"` / `"pallas_tpu"`.
"""

"""Scratch (not committed): a few B=8 64k decode steps for ncu."""
import jax
import jax.numpy as jnp
from experiments.bench_decode import filled_nsa_cache, random_inputs, nsa_step

batch = 8
cache = filled_nsa_cache(batch, 65536, jax.random.key(0))
q, k, v = random_inputs(batch, jax.random.key(1))
step = jax.jit(nsa_step("pallas_gpu"))
state = (cache, jnp.zeros((batch, 64, 128), jnp.float32))
for _ in range(4):
  state = jax.block_until_ready(step(state, q, k, v))
print("done")

"""`experiments.gpu_trace`: per-kernel device time from a profiler trace (here on the CPU, where
every complete event counts: the XLA ops and the host's own frames)."""

import jax
import jax.numpy as jnp

from experiments import gpu_trace


def test_kernel_times_reports_the_ops_of_the_traced_calls():
  x = jnp.ones((512, 512))
  f = jax.jit(lambda x: jnp.tanh(x @ x) @ x)
  one = gpu_trace.kernel_times(lambda: jax.block_until_ready(f(x)))
  three = gpu_trace.kernel_times(lambda: jax.block_until_ready(f(x)), calls=3)
  assert list(one.values()) == sorted(one.values(), reverse=True)
  assert all(us >= 0 for us in one.values())
  ops = lambda times: {name for name in times if "tanh" in name or "fusion" in name}
  assert ops(one) and ops(one) == ops(three)  # the computation's ops, in every traced call
  assert all(one[name] > 0 for name in ops(one))

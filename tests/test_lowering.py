"""The Pallas kernels lower for real GPU and TPU targets, checked on the CPU.

Interpret mode checks what the kernels compute, not whether their backends accept them: Triton
needs power-of-two array shapes and takes only some ops (e.g. no masked strided loads in every
form), Mosaic needs TPU-tiled block shapes. Lowering for an abstract device runs the Pallas
Triton and Mosaic lowerings here, without a GPU or TPU, so CI catches a kernel its backend would
refuse. (The backend compilers themselves, ptxas and libtpu, still run only on the device.)

Each test counts the Pallas custom calls in the lowered program, so it also fails if a path
silently fell back to XLA.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

import nsa_jax
from nsa_jax import NSAConfig
from nsa_jax.decode import init_decode_cache, nsa_decode_step

TARGETS = {  # platform -> (an abstract device of it, the custom call a Pallas kernel lowers to)
    "cuda": (jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="cuda"), "custom_call @__gpu$xla.gpu.triton"),
    "tpu": (jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
            "custom_call @tpu_custom_call"),
}
IMPLEMENTATION = {"cuda": "pallas_gpu", "tpu": "pallas_tpu"}

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")


def pallas_calls(platform, fn, *args):
  """Lowers `jax.jit(fn)(*args)` for `platform` on this CPU; the number of Pallas kernel calls."""
  device, call = TARGETS[platform]
  mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                   abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
  return lowered.as_text().count(call)


def zeros(shape, dtype):
  return jnp.zeros(shape, dtype)


# fwd + bwd kernels: GPU: compressed lse pass, compressed output + scores, top-n, selected forward,
# selected dQ, selected dK/dV, compressed dQ + dK/dV (7; the window is cuDNN on a GPU, XLA here).
# TPU: compressed (lse, fused output + scores, dQ, dK/dV), selected (forward, dQ, dK/dV), and
# splash attention's window (forward, dQ, dK/dV): 10.
EXPECTED_TRAINING_CALLS = {"cuda": 7, "tpu": 10}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim,head_dim_v", [
    (jnp.bfloat16, 16, 1, 128, 128),  # G = 16, the paper's head size
    (jnp.float32, 4, 4, 64, 64),  # MHA (G = 1)
    (jnp.float16, 64, 1, 192, 128),  # G = 64, Dk != Dv
])
def test_nsa_forward_and_backward_kernels_lower(platform, dtype, num_heads, num_kv_heads,
                                                head_dim, head_dim_v):
  if platform == "tpu" and dtype == jnp.float16:
    pytest.skip("TPUs have no float16")
  t = 1000  # not a multiple of any block
  q = zeros((2, t, num_heads, head_dim), dtype)
  k = zeros((2, t, num_kv_heads, head_dim), dtype)
  v = zeros((2, t, num_kv_heads, head_dim_v), dtype)

  def loss(q, k, v):
    out = nsa_jax.nsa_attention(q, k, v, config=NSAConfig(),
                                implementation=IMPLEMENTATION[platform])
    return out.astype(jnp.float32).sum()

  grads = jax.grad(loss, argnums=(0, 1, 2))
  assert pallas_calls(platform, grads, q, k, v) == EXPECTED_TRAINING_CALLS[platform]


# Decode: GPU: append, compressed partials, selection scores, top-n, sparse partials, combine.
# TPU: the compressed and the selected + window kernels.
EXPECTED_DECODE_CALLS = {"cuda": 6, "tpu": 2}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype,group,gated", [(jnp.bfloat16, 16, True),
                                               (jnp.float32, 64, False),
                                               (jnp.bfloat16, 3, False)])
def test_decode_step_kernels_lower(platform, dtype, group, gated):
  b, hkv, d = 2, 2, 128
  config = NSAConfig()
  cache = init_decode_cache(b, 10_000, hkv, d, config=config, dtype=dtype)
  q_t = zeros((b, hkv * group, d), dtype)
  k_t = zeros((b, hkv, d), dtype)
  gates = zeros((b, hkv * group, 3), jnp.float32) if gated else None
  step = functools.partial(nsa_decode_step, config=config, gates=gates,
                           implementation=IMPLEMENTATION[platform])
  assert pallas_calls(platform, step, q_t, k_t, k_t, cache) == EXPECTED_DECODE_CALLS[platform]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_standalone_compressed_attention_kernels_lower(platform):
  # `compressed_attention` on its own runs the unfused forward (no selection scores), which the
  # NSA path above does not use.
  q = zeros((1, 777, 8, 64), jnp.bfloat16)
  k_cmp = zeros((1, 47, 2, 64), jnp.bfloat16)

  def loss(q, k_cmp):
    out, _ = nsa_jax.compressed_attention(q, k_cmp, k_cmp, block=32, stride=16,
                                          implementation=IMPLEMENTATION[platform])
    return out.astype(jnp.float32).sum()

  # Forward, dQ and dK/dV kernels at least; none would mean the XLA path ran.
  assert pallas_calls(platform, jax.grad(loss, argnums=(0, 1)), q, k_cmp) >= 3

"""The Pallas kernels lower for real GPU and TPU targets, checked on the CPU.

Interpret mode checks what the kernels compute, not whether their backends accept them: Triton
needs power-of-two array shapes and takes only some ops (e.g. no masked strided loads in every
form), Mosaic needs TPU-tiled block shapes. Lowering for an abstract device runs the Pallas
Triton and Mosaic lowerings here, without a GPU or TPU, so CI catches a kernel its backend would
refuse. (The backend compilers themselves, ptxas and libtpu, still run only on the device.)

Each test lists the Pallas kernels in the lowered program, so it also says which kernels a path
runs, and fails if one silently fell back to XLA.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

import nsa_jax
from nsa_jax import NSAConfig
from nsa_jax.decode import init_decode_cache, nsa_decode_step
from pallas_kernels.gpu import compressed_attention as compressed_kernel
from pallas_kernels.gpu import decode as gpu_decode
from pallas_kernels.gpu import selected_attention as selected_kernel
from pallas_kernels.gpu import selected_attention_mgpu as selected_mgpu

TARGETS = {  # platform -> (an abstract device of it, the custom call a Pallas kernel lowers to)
    "cuda": (jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="cuda"), "custom_call @__gpu$xla.gpu.triton"),
    "tpu": (jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
            "custom_call @tpu_custom_call"),
}
IMPLEMENTATION = {"cuda": "pallas_gpu", "tpu": "pallas_tpu"}

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")


def lowered_text(platform, fn, *args) -> str:
  """`jax.jit(fn)(*args)` lowered for `platform` on this CPU, as text."""
  device, _ = TARGETS[platform]
  mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                   abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def pallas_kernels(platform, fn, *args):
  """Lowers `jax.jit(fn)(*args)` for `platform` on this CPU; the Pallas kernels' names, sorted."""
  call = TARGETS[platform][1]
  calls = [line for line in lowered_text(platform, fn, *args).splitlines() if call in line]
  return sorted(re.search(r'name = "([^"]+)"', line).group(1) for line in calls)


# Forward + backward. GPU: the window is cuDNN on a GPU (XLA here), the rest Pallas; on a GPU the
# compressed branch of half-precision inputs is cuDNN too, with the kernels of
# `test_selection_from_cudnn_lse_kernels_lower` for the selection. TPU: the window is splash
# attention's kernels.
TRAINING_KERNELS = {
    "cuda": ["nsa_compressed_dkv", "nsa_compressed_dq", "nsa_compressed_fwd", "nsa_selected_dkv",
             "nsa_selected_dq", "nsa_selected_fwd", "nsa_top_n"],
    "tpu": ["nsa_compressed_dkv_tpu", "nsa_compressed_dq_tpu", "nsa_compressed_lse_tpu",
            "nsa_compressed_output_scores_tpu", "nsa_selected_dkv_tpu", "nsa_selected_dq_tpu",
            "nsa_selected_fwd_tpu", "splash_mqa_dkv_no_residuals", "splash_mqa_dq_no_residuals",
            "splash_mqa_fwd_residuals"],
}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim,head_dim_v", [
    (jnp.bfloat16, 16, 1, 128, 128),  # G = 16, the paper's head size
    (jnp.float32, 4, 4, 64, 64),  # MHA (G = 1)
    (jnp.float16, 64, 1, 192, 128),  # G = 64, Dk != Dv
    (jnp.float32, 8, 2, 192, 128),  # G = 4 packed, wide float32 rows (fewer dK/dV rows a step)
    (jnp.float32, 64, 1, 256, 256),  # G = 64, widest float32: dK/dV steps, dQ programs of
                                     # half a query
])
def test_nsa_forward_and_backward_kernels_lower(platform, dtype, num_heads, num_kv_heads,
                                                head_dim, head_dim_v):
  if platform == "tpu" and dtype == jnp.float16:
    pytest.skip("TPUs have no float16")
  if platform == "tpu" and head_dim != head_dim_v:
    pytest.skip("Dk != Dv: the TPU window branch is XLA (splash takes Dk == Dv only)")
  t = 1000  # not a multiple of any block
  q = jnp.zeros((2, t, num_heads, head_dim), dtype)
  k = jnp.zeros((2, t, num_kv_heads, head_dim), dtype)
  v = jnp.zeros((2, t, num_kv_heads, head_dim_v), dtype)

  def loss(q, k, v):
    out = nsa_jax.nsa_attention(q, k, v, config=NSAConfig(),
                                implementation=IMPLEMENTATION[platform])
    return out.astype(jnp.float32).sum()

  grads = jax.grad(loss, argnums=(0, 1, 2))
  assert pallas_kernels(platform, grads, q, k, v) == TRAINING_KERNELS[platform]


# Packed rows: GPU, the compressed branch on its Pallas kernels (cuDNN's folded call cannot mask
# per document), the packed score pass; TPU, the compressed kernels with their SMEM walk tables
# and splash attention with segment ids; on both, the selected kernels once for each of the
# packed routes (whole blocks, the padded row, halves: a `lax.switch`), the lists below hold
# them once (GPU: twice, the selection and the window's early positions), as with the routes
# switched off.
PACKED_KERNELS = {
    "cuda": ["nsa_compressed_dkv", "nsa_compressed_dq", "nsa_compressed_fwd",
             "nsa_packed_selection_scores", "nsa_selected_dkv", "nsa_selected_dkv",
             "nsa_selected_dq", "nsa_selected_dq", "nsa_selected_fwd", "nsa_selected_fwd",
             "nsa_top_n"],
    "tpu": ["nsa_compressed_dkv_tpu", "nsa_compressed_dq_tpu", "nsa_compressed_lse_tpu",
            "nsa_compressed_output_scores_tpu", "nsa_selected_dkv_tpu", "nsa_selected_dq_tpu",
            "nsa_selected_fwd_tpu", "splash_mqa_dkv_segmented_no_residuals",
            "splash_mqa_dq_segmented_no_residuals", "splash_mqa_fwd_segmented_residuals"],
}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_nsa_kernels_on_packed_rows_lower(platform, monkeypatch):
  t = 1000
  q = jnp.zeros((2, t, 16, 128), jnp.bfloat16)
  kv = jnp.zeros((2, t, 1, 128), jnp.bfloat16)
  segment_ids = jnp.zeros((2, t), jnp.int32).at[:, 300:].set(1)
  impl = IMPLEMENTATION[platform]

  def nsa_loss(q, k, v):
    return nsa_jax.nsa_attention(q, k, v, config=NSAConfig(), implementation=impl,
                                 segment_ids=segment_ids).astype(jnp.float32).sum()

  def compressed_loss(q, k_cmp):  # the unfused forward of `compressed_attention` alone
    return nsa_jax.compressed_attention(q, k_cmp, k_cmp, block=32, stride=16, implementation=impl,
                                        segment_ids=segment_ids)[0].astype(jnp.float32).sum()

  grads = jax.grad(nsa_loss, argnums=(0, 1, 2))
  selected = [name for name in PACKED_KERNELS[platform] if "selected" in name]
  assert pallas_kernels(platform, grads, q, kv, kv) == sorted(PACKED_KERNELS[platform]
                                                              + selected * 2)
  if platform == "cuda":
    from pallas_kernels.gpu import selected_attention, top_n
    with monkeypatch.context() as patch:
      patch.setattr(selected_attention, "WHOLE_BLOCK_DOCUMENTS", False)
      patch.setattr(top_n, "PACKED_NARROW_WIDTHS", False)
      jax.clear_caches()  # `nsa_attention`'s jit reads the switches when it traces
      assert pallas_kernels(platform, grads, q, kv, kv) == PACKED_KERNELS[platform]
    jax.clear_caches()
  suffix = {"cuda": "", "tpu": "_tpu"}[platform]
  k_cmp = jnp.zeros((2, NSAConfig().num_cmp_blocks(t), 1, 128), jnp.bfloat16)
  assert pallas_kernels(platform, jax.grad(compressed_loss, argnums=(0, 1)), q, k_cmp) == sorted(
      f"nsa_compressed_{part}{suffix}" for part in ("fwd", "dq", "dkv"))


def selection_from_lse_call(group, config):
  """`(selection_from_lse with config's settings, (q, k_cmp, lse))` at B = 2, T = 1000, Hkv = 2,
  bfloat16, D = 128."""
  t, hkv = 1000, 2
  q = jnp.zeros((2, t, hkv * group, 128), jnp.bfloat16)
  k_cmp = jnp.zeros((2, config.num_cmp_blocks(t), hkv, 128), jnp.bfloat16)
  lse = jnp.zeros((2, t, hkv * group), jnp.float32)
  select = functools.partial(
      compressed_kernel.selection_from_lse, block=config.cmp_block, stride=config.cmp_stride,
      slc_block=config.slc_block, num_selected=config.num_selected,
      num_initial=config.num_initial, num_local=config.num_local, scale=0.1, ascending=False)
  return select, (q, k_cmp, lse)


@pytest.mark.parametrize("group", [1, 3, 16, 64])
def test_selection_from_cudnn_lse_kernels_lower(group):
  # On a GPU, nsa_attention's compressed branch is cuDNN over folded queries (not lowerable
  # here) and the selection comes from its log-sum-exp: the score pass (its own tile sizes,
  # SCORE_ROWS / SCORE_KEYS) and the top-n kernel.
  select, args = selection_from_lse_call(group, NSAConfig())
  assert pallas_kernels("cuda", select, *args) == ["nsa_selection_scores", "nsa_top_n"]


@pytest.mark.parametrize("group", [8, 16])
def test_selection_with_tails_apart_lowers_for_cuda(monkeypatch, group):
  # `TAILS_APART`: the score pass has a second output, the top-n kernel a second input.
  monkeypatch.setattr(compressed_kernel, "TAILS_APART", True)
  select, args = selection_from_lse_call(group, NSAConfig())
  text = lowered_text("cuda", select, *args)
  assert pallas_kernels("cuda", select, *args) == ["nsa_selection_scores", "nsa_top_n"]
  assert re.search(r"nsa_selection_scores.*-> \(tensor<[^>]+>, tensor<[^>]+>\)", text)


@pytest.mark.parametrize("tails_apart", [False, True])
def test_selection_over_folded_queries_lowers_for_cuda(monkeypatch, tails_apart):
  # `FOLDED_SCORES`: the score pass reads cuDNN's folded q `[B, C, Hkv * d * G, D]` and
  # log-sum-exp `[B, Hkv * d * G, C]` (paper config, G = 16: a chunk's 256 rows a program).
  monkeypatch.setattr(compressed_kernel, "TAILS_APART", tails_apart)
  config, t, chunks = NSAConfig(), 1000, 62
  qf = jnp.zeros((2, chunks, 2 * 256, 128), jnp.bfloat16)
  k_cmp = jnp.zeros((2, config.num_cmp_blocks(t), 2, 128), jnp.bfloat16)
  lse = jnp.zeros((2, 2 * 256, chunks), jnp.float32)
  select = functools.partial(
      compressed_kernel.selection_from_folded, seq_len=t, block=config.cmp_block,
      stride=config.cmp_stride, slc_block=config.slc_block, num_selected=config.num_selected,
      num_initial=config.num_initial, num_local=config.num_local, scale=0.1, ascending=False)
  assert pallas_kernels("cuda", select, qf, k_cmp, lse) == ["nsa_selection_scores", "nsa_top_n"]


@pytest.mark.parametrize("group,config", [
    (16, NSAConfig()), (4, NSAConfig()), (1, NSAConfig()),
    (8, NSAConfig(cmp_block=64, cmp_stride=64, slc_block=64, num_selected=16, window=64))])
def test_mosaic_selection_scores_lower_for_cuda(monkeypatch, group, config):
  # `SCORES = "mosaic"`: the score pass is a Mosaic GPU kernel (its layouts and SMEM budget
  # checked at lowering), the top-n Triton's; the paper's config and fla-core's (l = d = l').
  monkeypatch.setattr(compressed_kernel, "SCORES", "mosaic")
  select, args = selection_from_lse_call(group, config)
  assert pallas_kernels("cuda", select, *args) == ["nsa_top_n"]
  assert lowered_text("cuda", select, *args).count("custom_call @mosaic_gpu") == 1


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_nsa_kernels_lower_under_vmap(platform):
  # vmap over an extra leading axis: Pallas batches the BlockSpec kernels with a grid axis and
  # runs those with batched scalar-prefetch tables (the TPU selected kernels) in a loop. (The TPU
  # interpreter cannot run the former in JAX 0.11.2: it pairs grid axes with the
  # dimension_semantics without the vmapped axis, so vmap is checked here, not run, on TPU.)
  q = jnp.zeros((2, 1, 1000, 16, 128), jnp.bfloat16)
  kv = jnp.zeros((2, 1, 1000, 1, 128), jnp.bfloat16)
  loss = lambda q, k, v: nsa_jax.nsa_attention(
      q, k, v, config=NSAConfig(), implementation=IMPLEMENTATION[platform]).astype(
          jnp.float32).sum()
  grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))
  assert pallas_kernels(platform, grads, q, kv, kv) == TRAINING_KERNELS[platform]


DECODE_KERNELS = {
    "cuda": sorted(["nsa_decode_compressed", "nsa_decode_selection_scores", "nsa_decode_sparse",
                    "nsa_decode_combine"]),  # the compressed kernel appends the token
    "tpu": ["nsa_decode_compressed", "nsa_decode_sparse"],  # XLA in between (split_decode.py)
}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype,group,gated", [(jnp.bfloat16, 16, True),
                                               (jnp.float32, 64, False),
                                               (jnp.bfloat16, 3, False)])
def test_decode_step_kernels_lower(platform, dtype, group, gated):
  b, hkv, d = 2, 2, 128
  config = NSAConfig()
  cache = init_decode_cache(b, 10_000, hkv, d, config=config, dtype=dtype)
  q_t = jnp.zeros((b, hkv * group, d), dtype)
  k_t = jnp.zeros((b, hkv, d), dtype)
  gates = jnp.zeros((b, hkv * group, 3), jnp.float32) if gated else None
  step = functools.partial(nsa_decode_step, config=config, gates=gates,
                           implementation=IMPLEMENTATION[platform])
  assert pallas_kernels(platform, step, q_t, k_t, k_t, cache) == DECODE_KERNELS[platform]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_standalone_compressed_attention_kernels_lower(platform):
  # `compressed_attention` on its own runs the unfused forward (no selection scores), which the
  # NSA path above does not use.
  q = jnp.zeros((1, 777, 8, 64), jnp.bfloat16)
  k_cmp = jnp.zeros((1, 47, 2, 64), jnp.bfloat16)

  def loss(q, k_cmp):
    out, _ = nsa_jax.compressed_attention(q, k_cmp, k_cmp, block=32, stride=16,
                                          implementation=IMPLEMENTATION[platform])
    return out.astype(jnp.float32).sum()

  suffix = {"cuda": "", "tpu": "_tpu"}[platform]
  expected = sorted(f"nsa_compressed_{part}{suffix}" for part in ("fwd", "dq", "dkv"))
  assert pallas_kernels(platform, jax.grad(loss, argnums=(0, 1)), q, k_cmp) == expected


@pytest.mark.parametrize("pack_rows,num_heads", [(0, 4), (32, 16)])
def test_selected_kernels_with_other_packings_lower_for_cuda(monkeypatch, pack_rows, num_heads):
  monkeypatch.setattr(selected_kernel, "PACK_ROWS", pack_rows)
  q = jnp.zeros((2, 1000, num_heads, 128), jnp.bfloat16)
  k = v = jnp.zeros((2, 1000, 1, 128), jnp.bfloat16)
  idx = jnp.zeros((2, 1000, 1, 16), jnp.int32)

  def loss(q, k, v):
    return nsa_jax.selected_attention(q, k, v, idx, block=64, implementation="pallas_gpu").astype(
        jnp.float32).sum()

  assert pallas_kernels("cuda", jax.grad(loss, argnums=(0, 1, 2)), q, k, v) == [
      "nsa_selected_dkv", "nsa_selected_dq", "nsa_selected_fwd"]


def selected_gradients(num_heads, head_dims, block):
  """`(jax.grad of a selected-attention loss in q, k, v; q, k, v)`, B = 2, T = 1000, one KV head,
  bfloat16, 16 blocks a query."""
  q = jnp.zeros((2, 1000, num_heads, head_dims[0]), jnp.bfloat16)
  k = jnp.zeros((2, 1000, 1, head_dims[0]), jnp.bfloat16)
  v = jnp.zeros((2, 1000, 1, head_dims[1]), jnp.bfloat16)
  idx = jnp.zeros((2, 1000, 1, 16), jnp.int32)

  def loss(q, k, v):
    return nsa_jax.selected_attention(q, k, v, idx, block=block,
                                      implementation="pallas_gpu").astype(jnp.float32).sum()

  return jax.grad(loss, argnums=(0, 1, 2)), q, k, v


@pytest.mark.parametrize("probs_in_registers", [False, True])
@pytest.mark.parametrize("num_heads,head_dims,block", [(64, (128, 128), 64), (4, (64, 128), 128),
                                                      (1, (256, 256), 64), (16, (192, 128), 64)])
def test_mosaic_selected_kernels_lower_for_cuda(monkeypatch, num_heads, head_dims, block,
                                                probs_in_registers):
  # `FORWARD = DQ = "mosaic"`: the forward and dQ are Mosaic GPU kernels (their layout
  # inference and SMEM budgets run at lowering), dK/dV Triton's. The probabilities' register
  # form runs only on a GPU (the interpreter takes SMEM operands): lowered here.
  monkeypatch.setattr(selected_kernel, "FORWARD", "mosaic")
  monkeypatch.setattr(selected_kernel, "DQ", "mosaic")
  monkeypatch.setattr(selected_kernel, "DKV", "triton")
  monkeypatch.setattr(selected_mgpu, "PROBS_IN_REGISTERS", probs_in_registers)
  grad, q, k, v = selected_gradients(num_heads, head_dims, block)
  assert pallas_kernels("cuda", grad, q, k, v) == ["nsa_selected_dkv"]
  assert lowered_text("cuda", grad, q, k, v).count("custom_call @mosaic_gpu") == 2


@pytest.mark.parametrize("num_heads,head_dims,block", [(64, (128, 128), 64), (8, (64, 128), 128),
                                                      (16, (256, 256), 64), (16, (192, 128), 64),
                                                      (4, (128, 128), 64)])
def test_mosaic_selected_dkv_lowers_for_cuda(monkeypatch, num_heads, head_dims, block):
  # `DKV = "mosaic"` too: the whole selected backward on Mosaic GPU, no Triton kernel left.
  for choice in ("FORWARD", "DQ", "DKV"):
    monkeypatch.setattr(selected_kernel, choice, "mosaic")
  grad, q, k, v = selected_gradients(num_heads, head_dims, block)
  assert pallas_kernels("cuda", grad, q, k, v) == []
  assert lowered_text("cuda", grad, q, k, v).count("custom_call @mosaic_gpu") == 3


@pytest.mark.usefixtures("fresh_jit_caches")  # the jitted kernels read constants when traced
def test_decode_step_with_multi_block_sparse_programs_lowers_for_cuda(monkeypatch):
  monkeypatch.setattr(gpu_decode, "SPARSE_BLOCKS", 4)
  monkeypatch.setattr(gpu_decode, "SPARSE_MULTI_MIN_PAIRS", 1)  # B * Hkv = 4 here
  config = NSAConfig()
  cache = init_decode_cache(2, 10_000, 2, 128, config=config, dtype=jnp.bfloat16)
  q_t, k_t = jnp.zeros((2, 32, 128), jnp.bfloat16), jnp.zeros((2, 2, 128), jnp.bfloat16)
  step = functools.partial(nsa_decode_step, config=config, implementation="pallas_gpu")
  assert pallas_kernels("cuda", step, q_t, k_t, k_t, cache) == DECODE_KERNELS["cuda"]


@pytest.mark.parametrize("multi_block", [False, True])
@pytest.mark.usefixtures("fresh_jit_caches")  # the jitted kernels read constants when traced
def test_separate_kv_decode_step_lowers_for_cuda(monkeypatch, multi_block):
  # A K/V set per branch: the same four kernels, the sparse kernel's programs choosing the
  # selected or the window set by a branch (one block a program, or a walk of several).
  if multi_block:
    monkeypatch.setattr(gpu_decode, "SPARSE_BLOCKS", 4)
    monkeypatch.setattr(gpu_decode, "SPARSE_MULTI_MIN_PAIRS", 1)
  config = NSAConfig()
  caches = nsa_jax.init_separate_kv_cache(2, 10_000, 2, 128, config=config, dtype=jnp.bfloat16)
  q_t, k_t = jnp.zeros((2, 32, 128), jnp.bfloat16), jnp.zeros((2, 2, 128), jnp.bfloat16)
  step = lambda q_t, k_t, caches: nsa_jax.nsa_decode_step_separate_kv(
      q_t, [k_t] * 3, [k_t] * 3, caches, config=config, implementation="pallas_gpu")
  assert pallas_kernels("cuda", step, q_t, k_t, caches) == DECODE_KERNELS["cuda"]


def test_tpu_benchmark_kernels_lower():
  # experiments/probes/tpu_overhead.py and bench_kernels' dense baseline: they must lower
  # before a TPU run.
  from experiments.probes import tpu_overhead  # pylint: disable=g-import-not-at-top
  from pallas_kernels.tpu import sliding_window  # pylint: disable=g-import-not-at-top
  q = jnp.zeros((tpu_overhead.ROWS, tpu_overhead.D), jnp.bfloat16)
  kv = jnp.zeros((tpu_overhead.NUM_BLOCKS * tpu_overhead.BLOCK, tpu_overhead.D), jnp.bfloat16)
  blocks = jnp.zeros((8 * tpu_overhead.KV_BLOCKS,), jnp.int32)
  assert pallas_kernels("tpu", tpu_overhead.grid_steps(16, False),
                        jnp.zeros((8, 128), jnp.float32)) == ["empty_steps"]
  for with_math in (False, True):
    assert pallas_kernels("tpu", tpu_overhead.dma_groups(8, with_math, False), blocks, q,
                          kv) == ["dma_groups"]
  x = jnp.zeros((1, 1024, 8, 128), jnp.bfloat16)
  causal = lambda q, k, v: sliding_window.causal_attention(q, k, v, scale=0.1)
  assert pallas_kernels("tpu", causal, x, x[:, :, :2], x[:, :, :2]) == ["splash_mqa_fwd_no_residuals"]


@pytest.mark.parametrize("stages", [2, 4])
def test_mosaic_gpu_decode_probe_kernel_lowers(stages):
  # experiments/probes/mgpu_decode_probe.py: Mosaic GPU's layout inference runs at lowering, so
  # a probe whose wgmma operands' SMEM tilings disagree (or whose reductions have no layout)
  # fails here.
  from experiments.probes import mgpu_decode_probe as probe  # pylint: disable=g-import-not-at-top
  q, kv = jnp.zeros((2, 2, 16, 128), jnp.bfloat16), jnp.zeros((2, 2, 256, 128), jnp.bfloat16)
  kernel = functools.partial(probe.compressed_partials_t, scale=0.1, split=128, width=384,
                             shift=128, stages=stages)
  lowered = jax.jit(kernel).trace(q, kv, kv, jnp.int32(100)).lower(lowering_platforms=("cuda",))
  assert "custom_call @mosaic_gpu" in lowered.as_text()

"""Pallas GPU kernels: interpret mode on CPU (default suite) and real sizes on a GPU (marked `gpu`)."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import block_selection, cudnn_compressed, pallas_gpu, reference, xla
from nsa_jax.attention_math import combine_branches
from pallas_kernels.block_maps import distinct_ascending, document_block_columns
from pallas_kernels.gpu import compressed_attention as compressed_kernel
from pallas_kernels.gpu import selected_attention as selected_kernel
from pallas_kernels.gpu import selected_attention_mgpu as selected_mgpu
from pallas_kernels.gpu import top_n
from pallas_kernels.gpu.selected_attention import selected_attention
from tests.helpers import assert_close, assert_grads_close, assert_valid_selection
from tests.helpers import fresh_key, random_gates, random_qkv


def random_indices(b, t, hkv, n, num_blocks):
  """Any values: -1s, repeats, future and out-of-range blocks included."""
  return jax.random.randint(jax.random.key(t * n), (b, t, hkv, n), -1, num_blocks + 2)


def check_selected(q, k, v, block, n, impl_ref, interpret, dtype):
  num_blocks = -(-q.shape[1] // block)
  idx = random_indices(q.shape[0], q.shape[1], k.shape[2], n, num_blocks)
  scale = q.shape[-1] ** -0.5
  cotangent = jax.random.normal(jax.random.key(1), q.shape[:3] + (v.shape[-1],)).astype(dtype)

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

  kernel = lambda q, k, v: selected_attention(q, k, v, idx, block=block, scale=scale,
                                              interpret=interpret)
  expected = lambda q, k, v: impl_ref.selected_attention(q, k, v, idx, scale, block=block)
  # Jitted: in interpret mode the kernels' programs then compile once, not op by op.
  grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), (0, 1, 2), has_aux=True))
  (_, out), grads = grad(kernel)(q, k, v)
  (_, ref), ref_grads = grad(expected)(*[x.astype(jnp.float32) for x in (q, k, v)])
  assert out.dtype == dtype
  assert_close(out, ref, dtype)
  assert_grads_close(grads, ref_grads, dtype)


# (B, T, Hq, Hkv, Dk, Dv, block, n): MHA, GQA, MQA, Dk != Dv, a block that is not a power of two,
# T not a multiple of the block.
INTERPRET_CASES = [
    (1, 40, 2, 2, 16, 16, 16, 2),
    (2, 37, 4, 2, 16, 8, 16, 3),
    (1, 45, 4, 1, 8, 16, 12, 3),
]


@pytest.mark.parametrize("case", INTERPRET_CASES)
def test_selected_attention_kernel_in_interpret_mode(case):
  b, t, hq, hkv, dk, dv, block, n = case
  q, k, v = random_qkv(b, t, hq, hkv, dk, dv)
  check_selected(q, k, v, block, n, reference, interpret=True, dtype=jnp.float32)


# Position packing other than the default PACK_ROWS = 16 (which the tests above run): off (one
# position a program, heads padded to 16 rows) and 32 rows. G = 1 (32 positions a program), G = 3
# (padded heads, T not a multiple of the positions), G = 4 (B = 2, Dk != Dv).
PACKED_CASES = [(1, 45, 2, 2, 16, 16, 16, 3), (1, 45, 6, 2, 16, 16, 16, 3),
                (2, 37, 4, 1, 16, 8, 16, 3)]


@pytest.mark.parametrize("pack_rows", [0, 32])
@pytest.mark.parametrize("case", PACKED_CASES)
def test_selected_attention_kernel_with_other_packings_in_interpret_mode(monkeypatch, case,
                                                                         pack_rows):
  monkeypatch.setattr(selected_kernel, "PACK_ROWS", pack_rows)
  b, t, hq, hkv, dk, dv, block, n = case
  q, k, v = random_qkv(b, t, hq, hkv, dk, dv)
  check_selected(q, k, v, block, n, reference, interpret=True, dtype=jnp.float32)


def test_mosaic_kernels_take_what_fits_their_shared_memory():
  x = lambda d, dtype=jnp.bfloat16: jnp.zeros((1, 8, 4, d), dtype)
  assert selected_mgpu.supported(x(256), x(256)[:, :, :1], x(256)[:, :, :1], 64)
  assert not selected_mgpu.supported(x(256), x(256)[:, :, :1], x(256)[:, :, :1], 128)
  # Not: a head dim that is no multiple of 64, float32, l' = 32.
  assert not selected_mgpu.supported(x(96), x(96)[:, :, :1], x(96)[:, :, :1], 64)
  assert not selected_mgpu.supported(x(64, jnp.float32), x(64, jnp.float32)[:, :, :1],
                                     x(64, jnp.float32)[:, :, :1], 64)
  assert not selected_mgpu.supported(x(64), x(64)[:, :, :1], x(64)[:, :, :1], 32)


@pytest.mark.parametrize("positions,owned", [(5, 1), (5, 2), (5, 8), (16, 16), (32, 16)])
def test_shift_one_block_moves_each_column_one_right(positions, owned):
  # Column j gets column j - 1, column 0 the carry; the new carry is the last column, bit for bit.
  x = jax.random.normal(jax.random.key(owned), (positions, owned))
  carry = jax.random.normal(jax.random.key(owned + 1), (positions,))
  previous, last = compressed_kernel._shift_one_block(x, carry)
  np.testing.assert_array_equal(previous, np.concatenate([carry[:, None], x[:, :-1]], axis=1))
  np.testing.assert_array_equal(last, x[:, -1])


@pytest.mark.parametrize("positions,seq_len", [(4, 24), (16, 48), (32, 64)])
def test_tile_unions_against_brute_force(positions, seq_len):
  # 32 positions: the last owner's bit is int32's sign bit.
  n, num_blocks = 5, 9
  idx = random_indices(2, seq_len, 3, n, num_blocks).transpose(0, 2, 1, 3)  # [B, Hkv, T, n]
  idx = distinct_ascending(jnp.where(idx < num_blocks, idx, -1))
  union, count, member = selected_mgpu.tile_unions(idx, positions)
  idx, union, count, member = map(np.asarray, (idx, union, count, member))
  member = member.view(np.uint32)  # bit 31 read as a bit, not a sign
  for b, h, tile in np.ndindex(*count.shape):
    chosen = [set(idx[b, h, tile * positions + p]) - {-1} for p in range(positions)]
    want = sorted(set().union(*chosen))
    assert count[b, h, tile] == len(want)
    np.testing.assert_array_equal(union[b, h, tile], want + [-1] * (positions * n - len(want)))
    for slot, block in enumerate(want):
      assert member[b, h, tile, slot] == sum(1 << p for p in range(positions)
                                             if block in chosen[p])
    assert not member[b, h, tile, len(want):].any()


# The Mosaic GPU forward and dQ (`FORWARD = DQ = "mosaic"`, Triton's dK/dV) under the GPU
# interpreter, against the oracle: tiles of 64 rows over the union of their positions' blocks.
# T = 1, T < l' (one tile), T = 150 at G = 8 (8 positions a tile, the last cut), G = 1 (padded
# to 2 rows, 32 positions a tile), l' = 128 with Dk != Dv; float16 where it can (its tolerance
# catches a 1% error in dq, bfloat16's does not). (The interpreter runs wgmma synchronously, so
# reusing a K / V buffer before its products finished would only show on a GPU.)
MOSAIC_CASES = [(1, 1, 16, 1, 64, 64, 64, 3, jnp.bfloat16),
                (1, 40, 16, 1, 64, 64, 64, 3, jnp.float16),
                (2, 150, 8, 2, 64, 128, 64, 4, jnp.bfloat16),
                (1, 70, 1, 1, 64, 64, 64, 3, jnp.float16),
                (1, 140, 4, 1, 128, 64, 128, 2, jnp.float16)]


def test_mosaic_kernels_read_q_and_do_in_natural_layout_where_rows_are_whole_groups():
  # Both paths run in the interpret cases: G = 16 and 8 natural (a position's G heads fill whole
  # 8-row SMEM tiles), G = 4, 1 and 2 (padded to 2 rows) the rows layout.
  def natural(group):
    return selected_mgpu.natural_layout(group, selected_mgpu.rows_per_position(group))
  assert natural(16) and natural(8) and natural(64)
  assert not natural(4) and not natural(1) and not natural(12)  # 12: padded to 16 rows
  assert not selected_mgpu.natural_layout(4, selected_mgpu.dkv_heads(4))  # dK/dV pads to 8


@pytest.mark.parametrize("case", MOSAIC_CASES)
def test_selected_attention_mosaic_kernels_in_interpret_mode(monkeypatch, case):
  monkeypatch.setattr(selected_kernel, "FORWARD", "mosaic")
  monkeypatch.setattr(selected_kernel, "DQ", "mosaic")
  b, t, hq, hkv, dk, dv, block, n, dtype = case
  q, k, v = random_qkv(b, t, hq, hkv, dk, dv, dtype=dtype)
  assert selected_mgpu.supported(q, k, v, block)
  check_selected(q, k, v, block, n, reference, interpret=True, dtype=dtype)


def test_selected_attention_mosaic_kernels_at_one_stage_in_interpret_mode(monkeypatch):
  # One K / V block in flight (the GPU forward's default for tiles of <= 4 positions): each
  # block's TMA copy is issued only after the previous block's products, into the same buffer.
  monkeypatch.setattr(selected_kernel, "FORWARD", "mosaic")
  monkeypatch.setattr(selected_kernel, "DQ", "mosaic")
  monkeypatch.setattr(selected_mgpu, "STAGES", 1)
  q, k, v = random_qkv(1, 300, 16, 1, 64, 64, dtype=jnp.float16)
  check_selected(q, k, v, 64, 3, reference, interpret=True, dtype=jnp.float16)


# The Mosaic dK/dV (`DKV = "mosaic"`) after the Mosaic forward and dQ: G = 16 and 8 (4 and 8
# queries a step), T = 1 and T < l', l' = 128 with Dk != Dv, one step's rows held at a time
# (Dk = Dv = 256), and work items cut to 5 queries (DKV_CHUNK), so the forced blocks' queries
# span many items and steps end part-way through an item; G = 4 and 1, a query's rows padded to
# 8 (`dkv_heads`).
MOSAIC_DKV_CASES = [((1, 1, 16, 1, 64, 64, 64, 3, jnp.bfloat16), 256),
                    ((1, 40, 16, 1, 64, 64, 64, 3, jnp.float16), 256),
                    ((1, 150, 16, 2, 64, 128, 64, 4, jnp.bfloat16), 256),
                    ((1, 140, 8, 1, 128, 64, 128, 2, jnp.float16), 256),
                    ((1, 20, 16, 1, 256, 256, 64, 2, jnp.bfloat16), 256),
                    ((1, 150, 16, 2, 64, 64, 64, 4, jnp.float16), 5),
                    ((1, 130, 8, 2, 64, 64, 64, 3, jnp.float16), 256),
                    ((1, 70, 1, 1, 64, 64, 64, 3, jnp.float16), 256)]


def test_mosaic_dkv_pads_heads_that_the_forward_tiles_do_not():
  # G = 4: the forward and dQ tiles hold 16 positions of 4 rows (`rows_per_position`); only the
  # dK/dV's steps pad a query to 8 rows (its per-query TMA copies fill whole 8-row SMEM tiles).
  q, _, v = random_qkv(1, 100, 8, 2, 64, dtype=jnp.bfloat16)
  idx = jnp.zeros((1, 100, 2, 4), jnp.int32)
  tiles = selected_kernel._mosaic_layout(selected_kernel._layout(q, v, idx, 64), 4)
  assert (tiles.heads, tiles.positions) == (4, 16)
  assert selected_mgpu.dkv_heads(4) == 8 and selected_mgpu.dkv_heads(16) == 16


@pytest.mark.parametrize("case,chunk", MOSAIC_DKV_CASES)
def test_selected_attention_mosaic_dkv_in_interpret_mode(monkeypatch, case, chunk):
  for choice in ("FORWARD", "DQ", "DKV"):
    monkeypatch.setattr(selected_kernel, choice, "mosaic")
  monkeypatch.setattr(selected_kernel, "DKV_CHUNK", chunk)
  b, t, hq, hkv, dk, dv, block, n, dtype = case
  q, k, v = random_qkv(b, t, hq, hkv, dk, dv, dtype=dtype)
  assert selected_mgpu.dkv_supported(q, k, v, block)
  if dk == 256:
    assert selected_mgpu.dkv_stages(dk, dv, block, dtype) == 1
  check_selected(q, k, v, block, n, reference, interpret=True, dtype=dtype)


def test_selected_attention_mosaic_dq_after_triton_forward_in_interpret_mode(monkeypatch):
  # The Triton forward's lse (its rows: 16 a position) feeds the Mosaic dQ (its tiles); and
  # MAX_POSITIONS = 4 at G = 2: each position padded to 16 rows, 4 positions a tile.
  monkeypatch.setattr(selected_kernel, "DQ", "mosaic")
  monkeypatch.setattr(selected_mgpu, "MAX_POSITIONS", 4)
  assert selected_mgpu.rows_per_position(2) == 16
  q, k, v = random_qkv(1, 30, 4, 2, 64, 64, dtype=jnp.float16)
  check_selected(q, k, v, 64, 3, reference, interpret=True, dtype=jnp.float16)


def test_selected_attention_triton_dq_after_mosaic_forward_in_interpret_mode(monkeypatch):
  # The Mosaic forward's lse (in this module's rows, as the Triton forward leaves it) feeds the
  # Triton dQ.
  monkeypatch.setattr(selected_kernel, "FORWARD", "mosaic")
  q, k, v = random_qkv(1, 70, 8, 1, 64, 64, dtype=jnp.float16)
  check_selected(q, k, v, 64, 3, reference, interpret=True, dtype=jnp.float16)


def test_selected_attention_mosaic_dkv_after_triton_forward_and_dq_in_interpret_mode(monkeypatch):
  # What DKV = "auto" gives on Hopper where FORWARD / DQ are pinned to Triton: the Triton
  # forward's lse and output (delta) feed the Mosaic dK/dV, at G = 8 (packed Triton rows).
  monkeypatch.setattr(selected_kernel, "FORWARD", "triton")
  monkeypatch.setattr(selected_kernel, "DQ", "triton")
  monkeypatch.setattr(selected_kernel, "DKV", "mosaic")
  q, k, v = random_qkv(1, 90, 16, 2, 64, 64, dtype=jnp.bfloat16)
  check_selected(q, k, v, 64, 3, reference, interpret=True, dtype=jnp.bfloat16)


def test_selected_attention_backward_over_part_of_a_query_in_interpret_mode(monkeypatch):
  # Wide float32 heads make a dK/dV step gather, and a dQ program hold, fewer rows than one
  # query's heads (G = 64 with Dk = Dv = 256: 32 of 64); force 16 rows against G = 32.
  monkeypatch.setattr(selected_kernel, "DKV_STEP_BYTES", 1)
  monkeypatch.setattr(selected_kernel, "DQ_PROGRAM_BYTES", 1)
  q, k, v = random_qkv(1, 40, 32, 1, 16, 16)
  lay = selected_kernel._layout(q, v, jnp.zeros((1, 40, 1, 3), jnp.int32), 16)
  assert selected_kernel._dkv_step_rows(lay, jnp.float32) == 16 < lay.heads
  assert selected_kernel._dq_split(lay, jnp.float32) == 2
  check_selected(q, k, v, 16, 3, reference, interpret=True, dtype=jnp.float32)


@pytest.fixture
def on_triton(monkeypatch):
  """The Triton selected forward and dQ, whatever the default (`FORWARD`, `DQ`)."""
  monkeypatch.setattr(selected_kernel, "FORWARD", "triton")
  monkeypatch.setattr(selected_kernel, "DQ", "triton")


def test_selected_kernel_choice_auto_is_mosaic_on_hopper_only():
  q, k, v = random_qkv(1, 128, 16, 1, 64, dtype=jnp.bfloat16)
  def on_mosaic(choice, interpret):
    return selected_kernel._on_mosaic(choice, q, k, v, None, 64, interpret)
  assert not on_mosaic("auto", True) and not on_mosaic("triton", False)
  assert on_mosaic("auto", False) == selected_kernel._hopper()
  with pytest.raises(ValueError, match="FORWARD / DQ / DKV must be one of .* got 'cuda'"):
    on_mosaic("cuda", False)


def test_backward_runs_the_kernels_chosen_when_the_call_was_traced(monkeypatch):
  """A caller that sets `DQ` / `DKV` around the call only (as `bench_kernels` does) gets those
  kernels in the backward too, which JAX traces after the call has returned."""
  q, k, v = random_qkv(1, 128, 16, 1, 64, dtype=jnp.bfloat16)
  idx = random_indices(1, 128, 1, 4, 2)
  ran = []
  for name in ("_dq", "_dkv", "_mosaic_dq", "_mosaic_dkv", "_triton_operands"):
    def spy(*args, _name=name, _kernel=getattr(selected_kernel, name), **kwargs):
      ran.append(_name)
      return _kernel(*args, **kwargs)
    monkeypatch.setattr(selected_kernel, name, spy)

  def loss_with(dq, dkv):
    def loss(q, k, v):
      saved = selected_kernel.DQ, selected_kernel.DKV
      selected_kernel.DQ, selected_kernel.DKV = dq, dkv
      try:
        out = selected_attention(q, k, v, idx, block=64, scale=0.125, interpret=True)
      finally:
        selected_kernel.DQ, selected_kernel.DKV = saved
      return jnp.sum(out.astype(jnp.float32))
    return loss

  # The Triton kernels' rows are built only where one of them runs.
  for dq, dkv, expected in [("mosaic", "mosaic", ["_mosaic_dq", "_mosaic_dkv"]),
                            ("mosaic", "triton", ["_triton_operands", "_mosaic_dq", "_dkv"]),
                            ("triton", "mosaic", ["_triton_operands", "_dq", "_mosaic_dkv"])]:
    ran.clear()
    jax.eval_shape(jax.grad(loss_with(dq, dkv), (0, 1, 2)), q, k, v)  # traces, runs nothing
    assert ran == expected, (dq, dkv)


@pytest.mark.parametrize("group", [1, 2, 4, 8, 16, 64])
def test_selected_dkv_auto_is_mosaic_on_hopper_where_no_head_is_padded(monkeypatch, group):
  q, k, v = random_qkv(1, 128, 2 * group, 2, 64, dtype=jnp.bfloat16)
  dkv_on_mosaic = lambda: selected_kernel._dkv_on_mosaic(q, k, v, None, 64, False)
  monkeypatch.setattr(selected_kernel, "_hopper", lambda: True)
  monkeypatch.setattr(selected_kernel, "DKV", "auto")
  assert dkv_on_mosaic() == (group >= selected_mgpu.MIN_DKV_HEADS)
  monkeypatch.setattr(selected_kernel, "DKV", "mosaic")  # forced: padded heads too
  assert dkv_on_mosaic()
  assert not selected_kernel._dkv_on_mosaic(q.astype(jnp.float32), k.astype(jnp.float32),
                                            v.astype(jnp.float32), None, 64, False)
  monkeypatch.setattr(selected_kernel, "_hopper", lambda: False)
  monkeypatch.setattr(selected_kernel, "DKV", "auto")
  assert not dkv_on_mosaic()


@pytest.mark.gpu
@pytest.mark.usefixtures("on_triton")
@pytest.mark.parametrize("pack_rows", [0, 16])
@pytest.mark.parametrize("group", [1, 2, 4, 8, 16, 32, 64])
def test_selected_attention_kernel_all_group_sizes_on_gpu(monkeypatch, group, pack_rows):
  monkeypatch.setattr(selected_kernel, "PACK_ROWS", pack_rows)
  q, k, v = random_qkv(1, 2048 + 17, 2 * group, 2, 64, dtype=jnp.bfloat16)
  check_selected(q, k, v, 64, 16, xla, interpret=False, dtype=jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.usefixtures("on_triton")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (192, 128), (256, 256)])
def test_selected_attention_kernel_dtypes_and_head_dims_on_gpu(dtype, dims):
  q, k, v = random_qkv(2, 1000, 8, 2, dims[0], dims[1], dtype=dtype)
  check_selected(q, k, v, 64, 16, xla, interpret=False, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("probs_in_registers,max_positions", [(False, 32), (True, 32), (False, 4)])
@pytest.mark.parametrize("group", [1, 2, 4, 8, 16, 32, 64])
def test_selected_attention_mosaic_kernels_all_group_sizes_on_gpu(monkeypatch, group,
                                                                   probs_in_registers,
                                                                   max_positions):
  monkeypatch.setattr(selected_kernel, "FORWARD", "mosaic")
  monkeypatch.setattr(selected_kernel, "DQ", "mosaic")
  monkeypatch.setattr(selected_mgpu, "PROBS_IN_REGISTERS", probs_in_registers)
  monkeypatch.setattr(selected_mgpu, "MAX_POSITIONS", max_positions)
  monkeypatch.setattr(selected_kernel, "DKV", "mosaic" if max_positions == 4 else "triton")
  q, k, v = random_qkv(1, 2048 + 17, 2 * group, 2, 64, dtype=jnp.bfloat16)
  check_selected(q, k, v, 64, 16, xla, interpret=False, dtype=jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", [(1, 64, 64, 64), (17, 128, 128, 64), (1000, 128, 128, 64),
                                   (1000, 256, 256, 64), (1000, 128, 64, 128),
                                   (65536, 128, 128, 64)])
@pytest.mark.parametrize("dkv", ["triton", "mosaic"])
def test_selected_attention_mosaic_kernels_shapes_on_gpu(monkeypatch, dtype, shape, dkv):
  # (T, Dk, Dv, l'): T = 1 and T < l', head dims 64-256, l' = 128, the 64k benchmark's shape;
  # the dK/dV on either kernel.
  monkeypatch.setattr(selected_kernel, "FORWARD", "mosaic")
  monkeypatch.setattr(selected_kernel, "DQ", "mosaic")
  monkeypatch.setattr(selected_kernel, "DKV", dkv)
  t, dk, dv, block = shape
  q, k, v = random_qkv(2 if t < 65536 else 1, t, 64, 4, dk, dv, dtype=dtype)
  assert selected_mgpu.supported(q, k, v, block)
  check_selected(q, k, v, block, 16, xla, interpret=False, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.usefixtures("on_triton")
def test_selected_attention_kernel_at_long_sequence_on_gpu():
  q, k, v = random_qkv(1, 65536, 64, 4, 128, dtype=jnp.bfloat16)
  check_selected(q, k, v, 64, 16, xla, interpret=False, dtype=jnp.bfloat16)


def check_compressed_branch(branch, q, k, v, config, impl_ref, dtype, long_reduction=False,
                            lse_atol=1e-4):
  """Values, lse and gradients (through out and lse) of `branch(q, k_cmp, v_cmp, scale) ->
  (out, lse)` against `impl_ref`'s compressed attention; returns `(k_cmp, lse)`."""
  k_cmp, v_cmp = xla.compress_kv(k, v, config.cmp_block, config.cmp_stride)
  scale = q.shape[-1] ** -0.5
  keys = jax.random.split(jax.random.key(q.shape[1]), 2)
  d_out = jax.random.normal(keys[0], q.shape[:3] + (v.shape[-1],))
  d_lse = jax.random.normal(keys[1], q.shape[:3])

  def loss(fn, q, k_cmp, v_cmp):
    out, lse = fn(q, k_cmp, v_cmp)
    finite_lse = jnp.where(jnp.isinf(lse), 0.0, lse)
    return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(finite_lse * d_lse), (out, lse)

  expected = lambda q, k_cmp, v_cmp: impl_ref.compressed_attention(
      q, k_cmp, v_cmp, scale, block=config.cmp_block, stride=config.cmp_stride)
  grad = lambda fn, *args: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), (0, 1, 2),
                                                      has_aux=True))(*args)
  (_, (out, lse)), grads = grad(lambda *a: branch(*a, scale), q, k_cmp, v_cmp)
  upcast = [x.astype(jnp.float32) for x in (q, k_cmp, v_cmp)]
  (_, (ref, ref_lse)), ref_grads = grad(expected, *upcast)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert_close(out, ref, dtype)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
  assert_close(jnp.where(jnp.isinf(lse), 0, lse), jnp.where(jnp.isinf(ref_lse), 0, ref_lse),
               jnp.float32, atol=lse_atol, rtol=1e-4)
  assert_grads_close(grads, ref_grads, dtype, long_reduction)
  return k_cmp, lse


def check_compressed(q, k, v, config, impl_ref, interpret, dtype, long_reduction=False):
  """`check_compressed_branch` of the Pallas kernel, then its fused selection scores."""
  kernel = lambda q, k_cmp, v_cmp, scale: compressed_kernel.compressed_attention(
      q, k_cmp, v_cmp, block=config.cmp_block, stride=config.cmp_stride, scale=scale,
      interpret=interpret)
  k_cmp, _ = check_compressed_branch(kernel, q, k, v, config, impl_ref, dtype, long_reduction)
  scale = q.shape[-1] ** -0.5
  _, _, scores = compressed_kernel.compressed_attention_with_scores(
      q, k_cmp, k_cmp, block=config.cmp_block, stride=config.cmp_stride,
      slc_block=config.slc_block, scale=scale, interpret=interpret)
  ref_scores = reference.selection_scores(q.astype(jnp.float32), k_cmp.astype(jnp.float32),
                                          scale, config)  # [B, T, Hkv, Ts]
  assert_close(scores.transpose(0, 2, 1, 3), ref_scores, jnp.float32, atol=1e-4, rtol=1e-4)


# (B, T, Hq, Hkv, Dk, Dv, config): G = 1 (64 positions per tile, score maps on tensor cores),
# GQA with Dk != Dv, G = 3 (a padded head row that must not count in the group's scores), T < l,
# an overlap that spills into the next key tile's blocks (l > d), l' = d; G = 16 (4 positions a
# row tile), where the row tile ending at 131 sees exactly one key tile (32 blocks) and that tile's
# last tail sum is the next block's score (stored after the loop); l = d (no tail sums).
INTERPRET_CONFIGS = [
    (1, 150, 2, 2, 16, 16, nsa_jax.NSAConfig(8, 4, 16, 3, 1, 1, 20)),
    (2, 77, 8, 2, 16, 8, nsa_jax.NSAConfig(16, 4, 8, 4, 1, 1, 20)),
    (1, 77, 6, 2, 16, 16, nsa_jax.NSAConfig(16, 4, 8, 4, 1, 1, 20)),
    (1, 7, 4, 1, 16, 16, nsa_jax.NSAConfig(8, 4, 16, 3, 1, 1, 20)),
    (1, 300, 4, 1, 8, 8, nsa_jax.NSAConfig(8, 2, 2, 3, 1, 1, 20)),
    (1, 140, 16, 1, 16, 16, nsa_jax.NSAConfig(8, 4, 16, 3, 1, 1, 20)),
    (1, 200, 8, 1, 16, 16, nsa_jax.NSAConfig(4, 4, 8, 3, 1, 1, 20)),
]


@pytest.mark.parametrize("case", INTERPRET_CONFIGS)
def test_compressed_attention_kernel_in_interpret_mode(case):
  b, t, hq, hkv, dk, dv, config = case
  q, k, v = random_qkv(b, t, hq, hkv, dk, dv)
  check_compressed(q, k, v, config, reference, interpret=True, dtype=jnp.float32)


def test_compressed_attention_kernel_with_dkv_in_row_chunks_and_a_narrower_lse_tile(monkeypatch):
  # At long T the dK/dV kernel splits each key tile's rows over several programs; force it small.
  # Wide float32 heads make each dK/dV step load part of a row tile; force 16 rows a step.
  # The log-sum-exp pass's key tiles are a tuning knob (default 64, here the output pass's 32).
  monkeypatch.setattr(compressed_kernel, "MIN_DKV_CHUNK", 1)
  monkeypatch.setattr(compressed_kernel, "DKV_STEP_BYTES", 1)
  monkeypatch.setattr(compressed_kernel, "DKV_PROGRAMS", 10**6)
  monkeypatch.setattr(compressed_kernel, "LSE_KEYS", 32)
  b, t, hq, hkv, dk, dv, config = INTERPRET_CONFIGS[1]
  lay = compressed_kernel._layout(jnp.zeros((b, t, hq, dk)), jnp.zeros((b, 1, hkv, dk)),
                                  jnp.zeros((b, 1, hkv, dv)), config.cmp_block, config.cmp_stride)
  assert compressed_kernel._dkv_chunks(lay) == (1, lay.num_row_tiles)
  assert compressed_kernel._dkv_step_rows(lay, jnp.float32) == 16 < lay.rows
  q, k, v = random_qkv(b, t, hq, hkv, dk, dv)
  check_compressed(q, k, v, config, reference, interpret=True, dtype=jnp.float32)


def check_folded(q, k, v, config, impl_ref, use_cudnn, dtype, branch=None):
  """`check_compressed_branch` of the branch as one causal attention over folded queries
  (`cudnn_compressed.compressed_attention`, jitted), or of `branch`; returns `(k_cmp, lse)`."""
  folded = branch or (lambda q, k_cmp, v_cmp, scale: cudnn_compressed.compressed_attention(
      q, k_cmp, v_cmp, scale, block=config.cmp_block, stride=config.cmp_stride,
      use_cudnn=use_cudnn))
  return check_compressed_branch(jax.jit(folded, static_argnums=3), q, k, v, config, impl_ref,
                                 dtype, lse_atol=1e-4 if dtype == jnp.float32 else 2e-2)


def check_scores_from_lse(q, k_cmp, lse, config, interpret):
  """`selection_scores_from_lse` against the reference scores, and its top-n a valid selection."""
  scale = q.shape[-1] ** -0.5
  kwargs = dict(block=config.cmp_block, stride=config.cmp_stride, slc_block=config.slc_block,
                scale=scale, interpret=interpret)
  scores = compressed_kernel.selection_scores_from_lse(q, k_cmp, lse, **kwargs)
  t = q.shape[1]
  ref_scores = reference.selection_scores(q.astype(jnp.float32), k_cmp.astype(jnp.float32),
                                          scale, config)  # [B, T, Hkv, Ts]
  # Defined for the blocks up to each query's own (the top-n candidates); later ones are not.
  candidate = (jnp.arange(ref_scores.shape[-1])[None, :]
               <= jnp.arange(t)[:, None] // config.slc_block)[None, :, None, :]
  got = scores[:, :, :t, :ref_scores.shape[-1]].transpose(0, 2, 1, 3)
  assert_close(jnp.where(candidate, got, 0.0), ref_scores, jnp.float32, atol=1e-4, rtol=1e-3)
  kwargs.pop("scale"), kwargs.pop("interpret")
  picks = compressed_kernel.selection_from_lse(
      q, k_cmp, lse, num_selected=config.num_selected, num_initial=config.num_initial,
      num_local=config.num_local, scale=scale, interpret=interpret, **kwargs)
  assert_valid_selection(picks, ref_scores, config, atol=1e-4)


@pytest.mark.parametrize("case", INTERPRET_CONFIGS)
def test_compressed_attention_over_folded_queries_matches_reference(case):
  # The fold (positions l - 1 + c*d + j -> heads of chunk c) with XLA's causal attention in place
  # of cuDNN's: every INTERPRET_CONFIGS case, T < l (no chunk) and G = 3 included.
  b, t, hq, hkv, dk, dv, config = case
  q, k, v = random_qkv(b, t, hq, hkv, dk, dv)
  check_folded(q, k, v, config, reference, use_cudnn=False, dtype=jnp.float32)


def test_folded_attention_runs_again_only_for_an_lse_gradient(monkeypatch):
  # nsa_attention differentiates only the output (the lse feeds the integer selection): its
  # backward must be cuDNN's alone, with no extra attention (forward and its values' gradient)
  # for a zero lse cotangent.
  calls = []
  attention = cudnn_compressed._attention
  monkeypatch.setattr(cudnn_compressed, "_attention", lambda *a: calls.append(1) or attention(*a))
  q, k, v = random_qkv(1, 64, 4, 2, 16)
  fn = lambda q, lse_weight: cudnn_compressed.compressed_attention(
      q, k[:, :13], v[:, :13], 0.25, block=8, stride=4, use_cudnn=False)
  for lse_weight, expected in [(0.0, 1), (1.0, 2)]:
    calls.clear()
    loss = lambda q: sum(jnp.sum(jnp.where(jnp.isinf(x), 0.0, x)) * w for x, w in
                         zip(fn(q, lse_weight), (1.0, lse_weight)) if w)
    jax.grad(loss)(q)
    assert len(calls) == expected


# T = 262, G = 16: the last score tile's last query (261) owns block 65, which no key it sees
# reaches (the key tile holding its first key starts at 256 + l - 1 = 263): the kernel zeros that
# candidate column itself (num_local = 0 leaves it to the top-n).
UNREACHED_BLOCK_CASE = (1, 262, 16, 1, 16, 16, nsa_jax.NSAConfig(8, 4, 4, 3, 0, 0, 20))


@pytest.mark.parametrize("case", INTERPRET_CONFIGS + [UNREACHED_BLOCK_CASE])
def test_selection_scores_from_a_given_lse_in_interpret_mode(case):
  b, t, hq, hkv, dk, _, config = case
  q, k, _ = random_qkv(b, t, hq, hkv, dk)
  k_cmp, _ = xla.compress_kv(k, k, config.cmp_block, config.cmp_stride)
  _, lse = reference.compressed_attention(q, k_cmp, k_cmp, dk ** -0.5, block=config.cmp_block,
                                          stride=config.cmp_stride)
  check_scores_from_lse(q, k_cmp, lse, config, interpret=True)


# The Mosaic GPU score pass (`SCORES = "mosaic"`) under the GPU interpreter: the paper's config
# at G = 16 (16 positions a CTA) and G = 4 (64), G = 1 (64 rows); l = d = l' (64 blocks a key
# tile, no spill); l = 12, d = 4, l' = 8, num_local = 0 at T = 266: the last position (265) owns
# block 33, which no key it sees reaches (its key tile starts at 256 + l - 1): zeros; T < l;
# float16.
MOSAIC_SCORE_CASES = [
    (1, 300, 16, 1, jnp.bfloat16, nsa_jax.NSAConfig(32, 16, 64, 4, 1, 2, 64)),
    (2, 700, 8, 2, jnp.bfloat16, nsa_jax.NSAConfig(8, 4, 8, 4, 1, 1, 20)),
    (1, 200, 1, 1, jnp.float16, nsa_jax.NSAConfig(8, 4, 16, 3, 1, 1, 20)),
    (1, 600, 4, 1, jnp.bfloat16, nsa_jax.NSAConfig(4, 4, 4, 5, 1, 2, 20)),
    (1, 266, 16, 1, jnp.bfloat16, nsa_jax.NSAConfig(12, 4, 8, 3, 0, 0, 20)),
    (1, 20, 16, 1, jnp.bfloat16, nsa_jax.NSAConfig(32, 16, 64, 4, 1, 2, 64))]


@pytest.mark.parametrize("case", MOSAIC_SCORE_CASES)
def test_mosaic_selection_scores_in_interpret_mode(monkeypatch, case):
  monkeypatch.setattr(compressed_kernel, "SCORES", "mosaic")
  b, t, hq, hkv, dtype, config = case
  q, k, _ = random_qkv(b, t, hq, hkv, 64, dtype=dtype)
  k_cmp, _ = xla.compress_kv(k, k, config.cmp_block, config.cmp_stride)
  _, lse = reference.compressed_attention(
      q.astype(jnp.float32), k_cmp.astype(jnp.float32), k_cmp.astype(jnp.float32), 64 ** -0.5,
      block=config.cmp_block, stride=config.cmp_stride)
  assert compressed_kernel.selection_scores_mgpu.supported(q, k_cmp, config.cmp_block,
                                                           config.cmp_stride, config.slc_block)
  check_scores_from_lse(q, k_cmp, lse, config, interpret=True)


def check_tails_apart(monkeypatch, q, k_cmp, lse, config, interpret):
  """`TAILS_APART` (the tail sums stored one column right apart, added by the top-n kernel):
  their sum equals the scores with the tails shifted in the pass bit for bit on the candidate
  columns, the picks are the same, and both match the reference (`check_scores_from_lse`)."""
  kwargs = dict(block=config.cmp_block, stride=config.cmp_stride, slc_block=config.slc_block,
                scale=q.shape[-1] ** -0.5, interpret=interpret)
  select = dict(num_selected=config.num_selected, num_initial=config.num_initial,
                num_local=config.num_local, **kwargs)
  monkeypatch.setattr(compressed_kernel, "TAILS_APART", False)
  shifted, no_tails = compressed_kernel.selection_score_parts(q, k_cmp, lse, **kwargs)
  assert no_tails is None
  shifted_picks = compressed_kernel.selection_from_lse(q, k_cmp, lse, **select)
  monkeypatch.setattr(compressed_kernel, "TAILS_APART", True)
  scores, tails = compressed_kernel.selection_score_parts(q, k_cmp, lse, **kwargs)
  assert tails is not None and tails.shape == scores.shape == shifted.shape
  t, num_slc = q.shape[1], -(-q.shape[1] // config.slc_block)
  cols = jnp.arange(shifted.shape[3])[None, :]
  candidate = (cols <= jnp.arange(t)[:, None] // config.slc_block) & (cols < num_slc)
  np.testing.assert_array_equal(jnp.where(candidate, scores[:, :, :t] + tails[:, :, :t], 0.0),
                                jnp.where(candidate, shifted[:, :, :t], 0.0))
  np.testing.assert_array_equal(compressed_kernel.selection_from_lse(q, k_cmp, lse, **select),
                                shifted_picks)
  check_scores_from_lse(q, k_cmp, lse, config, interpret)


# G = 16 (block sums with tails: l = 2d): T = 1, a few blocks, and the unreached block's case.
TAILS_CASES = [(1, 1, 16, 1, 16, 16, nsa_jax.NSAConfig(8, 4, 16, 3, 1, 1, 20)),
               INTERPRET_CONFIGS[5], UNREACHED_BLOCK_CASE]


@pytest.mark.parametrize("case", TAILS_CASES)
def test_selection_scores_with_tails_apart_in_interpret_mode(monkeypatch, case):
  b, t, hq, hkv, dk, _, config = case
  q, k, _ = random_qkv(b, t, hq, hkv, dk)
  k_cmp, _ = xla.compress_kv(k, k, config.cmp_block, config.cmp_stride)
  _, lse = reference.compressed_attention(q, k_cmp, k_cmp, dk ** -0.5, block=config.cmp_block,
                                          stride=config.cmp_stride)
  check_tails_apart(monkeypatch, q, k_cmp, lse, config, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len,group", [(1, 16), (47, 16), (4096 + 5, 16), (1000, 8)])
def test_selection_scores_with_tails_apart_on_gpu(monkeypatch, seq_len, group):
  q, k, _ = random_qkv(1, seq_len, 2 * group, 2, 128, dtype=jnp.bfloat16)
  config = nsa_jax.NSAConfig()
  k_cmp, _ = xla.compress_kv(k, k, config.cmp_block, config.cmp_stride)
  _, lse = xla.compressed_attention(q, k_cmp, k_cmp, 128 ** -0.5, block=config.cmp_block,
                                    stride=config.cmp_stride)
  check_tails_apart(monkeypatch, q, k_cmp, lse, config, interpret=False)


def check_folded_selection(monkeypatch, q, k_cmp, config, interpret, use_cudnn):
  """`FOLDED_SCORES` (the score pass reading the compressed branch's folded queries and
  log-sum-exp in place): the scores on the candidate columns, the branch's output and the picks
  bit for bit those of the score pass over a rows copy of q and the unfolded log-sum-exp."""
  scale, t = q.shape[-1] ** -0.5, q.shape[1]
  kwargs = dict(block=config.cmp_block, stride=config.cmp_stride, slc_block=config.slc_block,
                scale=scale, interpret=interpret)
  o_want, lse = cudnn_compressed.compressed_attention(
      q, k_cmp, k_cmp, scale, block=config.cmp_block, stride=config.cmp_stride,
      use_cudnn=use_cudnn)
  scores = compressed_kernel.selection_scores_from_lse(q, k_cmp, lse, **kwargs)
  _, qf, lse_folded = cudnn_compressed.compressed_attention_folded(
      q, k_cmp, k_cmp, scale, block=config.cmp_block, stride=config.cmp_stride,
      use_cudnn=use_cudnn)
  folded, tails = compressed_kernel.folded_score_parts(qf, k_cmp, lse_folded, seq_len=t,
                                                       **kwargs)
  if tails is not None:
    folded = folded + tails
  cols = jnp.arange(scores.shape[3])[None, :]
  candidate = cols <= jnp.arange(t)[:, None] // config.slc_block
  np.testing.assert_array_equal(jnp.where(candidate, folded[:, :, :t, :scores.shape[3]], 0.0),
                                jnp.where(candidate, scores[:, :, :t], 0.0))
  want = compressed_kernel.selection_from_lse(
      q, k_cmp, lse, block=config.cmp_block, stride=config.cmp_stride,
      slc_block=config.slc_block, num_selected=config.num_selected,
      num_initial=config.num_initial, num_local=config.num_local, scale=scale,
      ascending=False, interpret=interpret)
  monkeypatch.setattr(compressed_kernel, "FOLDED_SCORES", True)
  assert compressed_kernel.folded_selection_applies(q, k_cmp.shape[2], config.cmp_stride)
  o_got, got = pallas_gpu._folded_compressed_and_selection(
      q, k_cmp, k_cmp, scale, config, interpret, ascending=False, use_cudnn=use_cudnn)
  np.testing.assert_array_equal(o_got, o_want)
  np.testing.assert_array_equal(got, want)


# (B, T, Hq, Hkv, SCORE_ROWS, config, TAILS_APART): d * G rows a chunk, SCORE_ROWS of them:
# the paper's config at G = 16 (T = l: one chunk, padded to two), d = 4 at G = 16 over two KV
# groups and a batch of two, the unreached block's case (l = 12, d = 4, l' = 8, no local block),
# and l = 16, l' = 4, n = 2 (no forced block): positions 8 .. 14 choose among more blocks than n
# before their first compressed key (l - 1 = 15), all scored 0 (rows the folded pass does not
# reach); with the tail sums shifted in the pass, or apart.
FOLDED_CASES = [(1, 300, 16, 1, 256, nsa_jax.NSAConfig(32, 16, 64, 3, 1, 2, 20), True),
                (1, 32, 16, 1, 256, nsa_jax.NSAConfig(32, 16, 64, 3, 1, 2, 20), False),
                (2, 140, 32, 2, 64, nsa_jax.NSAConfig(8, 4, 16, 3, 1, 1, 20), False),
                (1, 262, 16, 1, 64, nsa_jax.NSAConfig(12, 4, 8, 3, 0, 0, 20), True),
                (1, 100, 16, 1, 64, nsa_jax.NSAConfig(16, 4, 4, 2, 0, 0, 20), False)]


@pytest.mark.parametrize("case", FOLDED_CASES)
def test_selection_over_folded_queries_in_interpret_mode(monkeypatch, case):
  b, t, hq, hkv, score_rows, config, tails_apart = case
  monkeypatch.setattr(compressed_kernel, "SCORE_ROWS", score_rows)
  monkeypatch.setattr(compressed_kernel, "TAILS_APART", tails_apart)
  q, k, _ = random_qkv(b, t, hq, hkv, 16)
  k_cmp, _ = xla.compress_kv(k, k, config.cmp_block, config.cmp_stride)
  check_folded_selection(monkeypatch, q, k_cmp, config, interpret=True, use_cudnn=False)


def test_folded_selection_differentiates_the_output_only(monkeypatch):
  # The folded pass reads cuDNN's log-sum-exp behind a stop_gradient: the backward is the
  # output's alone, with no extra attention for a zero lse cotangent.
  monkeypatch.setattr(compressed_kernel, "SCORE_ROWS", 64)
  monkeypatch.setattr(compressed_kernel, "FOLDED_SCORES", True)
  calls = []
  attention = cudnn_compressed._attention
  monkeypatch.setattr(cudnn_compressed, "_attention", lambda *a: calls.append(1) or attention(*a))
  config = nsa_jax.NSAConfig(8, 4, 16, 3, 1, 1, 20)
  q, k, _ = random_qkv(1, 64, 16, 1, 16)
  k_cmp, _ = xla.compress_kv(k, k, config.cmp_block, config.cmp_stride)

  def loss(q):
    o_cmp, _ = pallas_gpu._folded_compressed_and_selection(q, k_cmp, k_cmp, 0.25, config, True,
                                                           ascending=False, use_cudnn=False)
    return jnp.sum(o_cmp)

  jax.grad(loss)(q)
  assert len(calls) == 1


def test_nsa_attention_over_folded_queries_in_interpret_mode(monkeypatch):
  # The whole layer on the cuDNN route with the fold read in place, XLA standing in for cuDNN:
  # the output and gradients bit for bit the route's over q's rows, and the reference's to
  # float32 rounding (G = 16, d = 4: a chunk's 64 rows a program).
  monkeypatch.setattr(pallas_gpu, "cudnn_compressed_applies", lambda *args: True)
  attention = cudnn_compressed._xla_attention
  monkeypatch.setattr(cudnn_compressed, "_attention",
                      lambda qf, kf, vf, scale, use_cudnn: attention(qf, kf, vf, scale))
  monkeypatch.setattr(compressed_kernel, "SCORE_ROWS", 64)
  config = nsa_jax.NSAConfig(8, 4, 16, 3, 1, 1, 20)
  q, k, v = random_qkv(1, 90, 16, 1, 16)
  gates = random_gates(q)
  k_cmp, v_cmp = xla.compress_kv(k, v, config.cmp_block, config.cmp_stride)
  cotangent = jax.random.normal(jax.random.key(5), q.shape)

  def output_and_grads(nsa, folded):
    monkeypatch.setattr(compressed_kernel, "FOLDED_SCORES", folded)
    jax.clear_caches()
    out, vjp = jax.vjp(lambda *a: nsa(*a, gates, k_cmp, v_cmp, 0.25, config=config), q, k, v)
    return out, vjp(cotangent)

  interpreted = functools.partial(pallas_gpu.nsa_attention, interpret=True)
  want, want_grads = output_and_grads(interpreted, False)
  got, grads = output_and_grads(interpreted, True)
  jax.clear_caches()
  np.testing.assert_array_equal(got, want)
  for x, y in zip(grads, want_grads):
    np.testing.assert_array_equal(x, y)
  ref, ref_grads = output_and_grads(reference.nsa_attention, True)
  assert_close(got, ref)
  assert_grads_close(grads, ref_grads)


def test_folded_selection_applies_only_where_a_chunk_fills_the_rows(monkeypatch):
  q = jnp.zeros((1, 100, 32, 128), jnp.bfloat16)
  applies = lambda q, hkv, d: compressed_kernel.folded_selection_applies(q, hkv, d)
  monkeypatch.setattr(compressed_kernel, "FOLDED_SCORES", False)
  assert not applies(q, 2, 16)
  monkeypatch.setattr(compressed_kernel, "FOLDED_SCORES", True)
  assert applies(q, 2, 16) and not applies(q, 4, 16) and not applies(q, 2, 8)
  assert not applies(jnp.zeros((1, 100, 24, 128)), 2, 16)  # G = 12
  assert not applies(jnp.zeros((1, 100, 32, 96)), 2, 16)  # a padded head dim
  with pytest.raises(ValueError, match="T >= l = 32"):
    cudnn_compressed.compressed_attention_folded(q[:, :31], q[:, :1, :2], q[:, :1, :2], 0.1,
                                                 block=32, stride=16)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", [32, 47, 4096 + 5])
def test_selection_over_folded_queries_on_gpu(monkeypatch, seq_len):
  # cuDNN's folded branch at G = 16 (two KV groups) in the paper's config, T = l included.
  config = nsa_jax.NSAConfig()
  q, k, _ = random_qkv(1, seq_len, 32, 2, 128, dtype=jnp.bfloat16)
  k_cmp, _ = xla.compress_kv(k, k, config.cmp_block, config.cmp_stride)
  check_folded_selection(monkeypatch, q, k_cmp, config, interpret=False, use_cudnn=True)


@pytest.mark.gpu
def test_nsa_attention_with_folded_scores_on_gpu(monkeypatch):
  # End to end: the output bit for bit that of the score pass over q's rows (the same picks),
  # the gradients to bfloat16 rounding (the two programs round the gradients' float32 sums
  # apart: 3 of 1M elements of dK one bfloat16 step apart, H100, 2026-12-07).
  config = nsa_jax.NSAConfig()
  q, k, v = random_qkv(1, 4096 + 5, 32, 2, 128, dtype=jnp.bfloat16)
  gates = random_gates(q)
  k_cmp, v_cmp = xla.compress_kv(k, v, config.cmp_block, config.cmp_stride)
  cotangent = jax.random.normal(jax.random.key(3), q.shape).astype(q.dtype)

  def output_and_grads(folded):
    monkeypatch.setattr(compressed_kernel, "FOLDED_SCORES", folded)
    jax.clear_caches()
    out, vjp = jax.vjp(lambda *a: pallas_gpu.nsa_attention(
        *a, gates, k_cmp, v_cmp, 128 ** -0.5, config=config), q, k, v)
    return out, vjp(cotangent)

  want, want_grads = output_and_grads(False)
  got, grads = output_and_grads(True)
  jax.clear_caches()
  np.testing.assert_array_equal(got, want)
  assert_grads_close(grads, want_grads, jnp.bfloat16)


def test_top_n_tails_must_match_the_scores():
  scores = jnp.zeros((1, 2, 64, 16))
  with pytest.raises(ValueError, match="tails must be shaped as scores"):
    top_n.top_n_blocks(scores, seq_len=64, num_selected=2, slc_block=8, num_initial=1,
                       num_local=1, interpret=True, tails=scores[:, :1])


def test_selection_scores_from_lse_checks_its_shape():
  q = jnp.zeros((1, 40, 4, 16))
  k_cmp = jnp.zeros((1, 9, 2, 16))
  with pytest.raises(ValueError, match="lse must be"):
    compressed_kernel.selection_scores_from_lse(q, k_cmp, jnp.zeros((1, 40, 2)), block=8,
                                                stride=4, slc_block=16, scale=0.25,
                                                interpret=True)


@pytest.mark.parametrize("seq_len,config", [
    (4096 + 5, nsa_jax.NSAConfig(cmp_block=64, cmp_stride=64, slc_block=64, num_selected=16)),
    (4096 + 5, nsa_jax.NSAConfig()), (266, nsa_jax.NSAConfig(12, 4, 8, 3, 0, 0, 20))])
def test_mosaic_score_pass_rows_fill_whole_tma_tiles(monkeypatch, seq_len, config):
  # A TMA store's GMEM rows are a multiple of its 8-row tiling, which neither the interpreter
  # nor the CPU lowering checks (l = d = l' at T = 4101 asked for 129 rows and failed on a GPU).
  monkeypatch.setattr(compressed_kernel, "SCORES", "mosaic")
  seen = []

  class Recorded(Exception):
    pass

  def record(*args, num_score_rows, **kwargs):
    seen.append(num_score_rows)
    raise Recorded  # the rows are all this test needs
  monkeypatch.setattr(compressed_kernel.selection_scores_mgpu, "selection_scores", record)
  q = jnp.zeros((1, seq_len, 16, 64), jnp.bfloat16)
  k_cmp = jnp.zeros((1, config.num_cmp_blocks(seq_len), 1, 64), jnp.bfloat16)
  with pytest.raises(Recorded):
    compressed_kernel.selection_scores_from_lse(
        q, k_cmp, jnp.zeros(q.shape[:3]), block=config.cmp_block, stride=config.cmp_stride,
        slc_block=config.slc_block, scale=0.125)
  num_blocks = -(-seq_len // config.slc_block)
  assert seen[0] % 8 == 0 and seen[0] >= num_blocks


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 3, 16])
@pytest.mark.parametrize("config", [  # the paper's; fla-core's l = d = l' (64 positions a chunk)
    nsa_jax.NSAConfig(),
    nsa_jax.NSAConfig(cmp_block=64, cmp_stride=64, slc_block=64, num_selected=16, window=64)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_compressed_branch_through_cudnn_matches_xla_on_gpu(group, config, dtype):
  # B = 2, T with an odd chunk count (cuDNN's padded chunk), then the scores from cuDNN's lse.
  q, k, v = random_qkv(2, 4096 + 5, 2 * group, 2, 128, dtype=dtype)
  k_cmp, lse = check_folded(q, k, v, config, xla, use_cudnn=True, dtype=dtype)
  check_scores_from_lse(q, k_cmp, lse, config, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 16])
@pytest.mark.parametrize("config", [  # the paper's; fla-core's l = d = l' (64 blocks a key tile)
    nsa_jax.NSAConfig(),
    nsa_jax.NSAConfig(cmp_block=64, cmp_stride=64, slc_block=64, num_selected=16, window=64)])
def test_mosaic_selection_scores_on_gpu(monkeypatch, group, config):
  # `SCORES = "mosaic"` on cuDNN's lse, against the reference scores; T with a partial key tile.
  monkeypatch.setattr(compressed_kernel, "SCORES", "mosaic")
  q, k, v = random_qkv(2, 4096 + 5, 2 * group, 2, 128, dtype=jnp.bfloat16)
  k_cmp, v_cmp = xla.compress_kv(k, v, config.cmp_block, config.cmp_stride)
  assert compressed_kernel.selection_scores_mgpu.supported(q, k_cmp, config.cmp_block,
                                                           config.cmp_stride, config.slc_block)
  _, lse = cudnn_compressed.compressed_attention(q, k_cmp, v_cmp, 128 ** -0.5,
                                                 block=config.cmp_block,
                                                 stride=config.cmp_stride)
  check_scores_from_lse(q, k_cmp, lse, config, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", [1, 31, 32, 47, 64, 2048 + 7])  # T < l, T = l, T < l', ...
def test_public_compressed_attention_takes_cudnn_in_half_precision_on_gpu(seq_len):
  q, k, v = random_qkv(1, seq_len, 8, 2, 128, dtype=jnp.bfloat16)
  config = nsa_jax.NSAConfig()
  assert pallas_gpu.cudnn_compressed_applies(q, v, config.cmp_stride)
  public = lambda q, k_cmp, v_cmp, scale: nsa_jax.compressed_attention(
      q, k_cmp, v_cmp, block=config.cmp_block, stride=config.cmp_stride, scale=scale,
      implementation="pallas_gpu")
  check_folded(q, k, v, config, xla, use_cudnn=True, dtype=jnp.bfloat16, branch=public)


@pytest.mark.gpu
def test_compressed_attention_and_selection_is_one_cudnn_pass_on_gpu(monkeypatch):
  # The NNX layer with separate K/V sets: one cuDNN forward gives both the output and the lse
  # the selection scores come from, equal to the two public ops apart (two forwards).
  q, k, v = random_qkv(1, 4096 + 7, 16, 2, 128, dtype=jnp.bfloat16)
  config = nsa_jax.NSAConfig()
  k_cmp, v_cmp = nsa_jax.compress_kv(k, v, block=config.cmp_block, stride=config.cmp_stride)
  calls = []
  attention = cudnn_compressed._attention
  monkeypatch.setattr(cudnn_compressed, "_attention", lambda *a: calls.append(1) or attention(*a))
  jax.clear_caches()  # traces cached by earlier tests would not call the patched function
  out, idx = nsa_jax.compressed_attention_and_selection(q, k_cmp, v_cmp, config=config,
                                                        implementation="pallas_gpu")
  assert len(calls) == 1
  expected, _ = nsa_jax.compressed_attention(q, k_cmp, v_cmp, block=config.cmp_block,
                                             stride=config.cmp_stride, implementation="pallas_gpu")
  expected_idx = nsa_jax.select_blocks(q, k_cmp, config=config, implementation="pallas_gpu")
  assert len(calls) == 3
  assert_close(out, expected, jnp.bfloat16)
  assert np.mean(np.asarray(idx == expected_idx)) > 0.9999  # float near-ties may flip a rare slot


@pytest.mark.gpu
@pytest.mark.parametrize("group,head_dim", [(64, 256), (4, 128)])
def test_selection_scores_from_lse_with_float32_heads_on_gpu(group, head_dim):
  # The score pass's rows shrink to keep float32 q within shared memory (SCORE_Q_BYTES).
  q, k, _ = random_qkv(1, 1000, group, 1, head_dim)
  config = nsa_jax.NSAConfig()
  k_cmp, _ = xla.compress_kv(k, k, config.cmp_block, config.cmp_stride)
  _, lse = xla.compressed_attention(q, k_cmp, k_cmp, head_dim ** -0.5, block=config.cmp_block,
                                    stride=config.cmp_stride)
  check_scores_from_lse(q, k_cmp, lse, config, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 3, 4, 16, 64])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compressed_attention_kernel_on_gpu(group, dtype):
  q, k, v = random_qkv(1, 4096 + 5, 2 * group, 2, 128, dtype=dtype)
  check_compressed(q, k, v, nsa_jax.NSAConfig(), xla, interpret=False, dtype=dtype,
                   long_reduction=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("dims", [(64, 64), (192, 128), (256, 256)])
def test_compressed_attention_kernel_dtypes_and_head_dims_on_gpu(dtype, dims):
  # The widest float32 tiles are where shared memory runs out first (as it did for the selected
  # dK/dV kernel); B = 2 and G = 4.
  q, k, v = random_qkv(2, 1000, 8, 2, dims[0], dims[1], dtype=dtype)
  check_compressed(q, k, v, nsa_jax.NSAConfig(), xla, interpret=False, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["selected", "compressed"])
def test_kernels_with_group_64_and_the_widest_float32_heads_on_gpu(kernel):
  # G = 64 rows a position with float32 Dk = Dv = 256: the backward takes part of one position's
  # rows (selected dQ programs and dK/dV steps: 32 of 64; compressed dK/dV: half a row tile).
  q, k, v = random_qkv(1, 1000, 64, 1, 256, dtype=jnp.float32)
  if kernel == "selected":
    check_selected(q, k, v, 64, 16, xla, interpret=False, dtype=jnp.float32)
  else:
    check_compressed(q, k, v, nsa_jax.NSAConfig(), xla, interpret=False, dtype=jnp.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [  # the paper's (l < l'), fla-core's l = d = l' (no tail sums)
    nsa_jax.NSAConfig(),
    nsa_jax.NSAConfig(cmp_block=64, cmp_stride=64, slc_block=64, num_selected=16, window=64)])
def test_select_blocks_from_fused_scores_matches_xla_on_gpu(config):
  q, k, _ = random_qkv(2, 8192 + 100, 32, 4, 128)
  k_cmp, _ = xla.compress_kv(k, k, config.cmp_block, config.cmp_stride)
  fused = nsa_jax.select_blocks(q, k_cmp, config=config, implementation="pallas_gpu")
  expected = nsa_jax.select_blocks(q, k_cmp, config=config, implementation="xla")
  assert np.mean(np.asarray(fused == expected)) > 0.9999  # float near-ties may flip a rare slot


@pytest.mark.parametrize("min_row_width", [2, 128])  # 2: launches over 3-4 ranges of rows
@pytest.mark.parametrize("config", [nsa_jax.NSAConfig(8, 4, 16, 4, 1, 2, 8),
                                    nsa_jax.NSAConfig(8, 4, 8, 5, 0, 0, 8)])
def test_top_n_kernel_matches_the_selection_rule_with_ties(config, min_row_width, monkeypatch):
  monkeypatch.setattr(top_n, "MIN_ROW_WIDTH", min_row_width)
  b, t, h, width = 2, 70, 3, 16  # Ts = ceil(70 / l') <= 9 < width: padding columns ignored
  # Few distinct values, so many scores tie and the lower index must win.
  scores = jax.random.randint(jax.random.key(5), (b, h, t + 3, width), 0, 3).astype(jnp.float32)
  # A matrix wider than pow2(Ts) and not a power of two, as the fused kernel makes: the kernel
  # reads the first pow2(Ts) columns, and the blocks past Ts are never candidates; nor are the
  # blocks after a query's own, which the score pass leaves undefined (NaN here).
  future = jnp.arange(width)[None, :] > jnp.arange(t + 3)[:, None] // config.slc_block
  wider = jnp.pad(jnp.where(future, jnp.nan, scores), [(0, 0), (0, 0), (0, 0), (0, 8)],
                  constant_values=100.0)
  got = top_n.top_n_blocks(wider, seq_len=t, num_selected=config.num_selected,
                           slc_block=config.slc_block, num_initial=config.num_initial,
                           num_local=config.num_local, interpret=True)
  num_slc = config.num_slc_blocks(t)
  expected = block_selection.top_n_blocks(
      scores[:, :, :t, :num_slc].transpose(0, 2, 1, 3), jnp.arange(t)[:, None], config)
  np.testing.assert_array_equal(got, expected)
  # Pick order (what nsa_attention hands the selected kernels): the same blocks, -1 last.
  picks = top_n.top_n_blocks(wider, seq_len=t, num_selected=config.num_selected,
                             slc_block=config.slc_block, num_initial=config.num_initial,
                             num_local=config.num_local, ascending=False, interpret=True)
  np.testing.assert_array_equal(distinct_ascending(picks), expected)
  valid = np.asarray(picks >= 0)
  assert np.all(valid[..., :-1] >= valid[..., 1:])  # no pick after a -1


# 4: a program reads 4, 8 or all 16 columns; False: the whole row (the default)
@pytest.mark.parametrize("min_row_width, narrow", [(4, True), (128, True), (4, False)])
@pytest.mark.parametrize("config", [nsa_jax.NSAConfig(8, 4, 16, 4, 1, 2, 8),
                                    nsa_jax.NSAConfig(8, 4, 8, 5, 0, 0, 8)])
def test_packed_top_n_kernel_matches_the_selection_rule_with_ties(config, min_row_width, narrow,
                                                                  monkeypatch):
  """Packed rows: each query's candidates are its document's blocks `<= query_blocks[t]`, read
  over the narrowest width that holds them; columns past them (NaN here) never enter a pick."""
  monkeypatch.setattr(top_n, "MIN_ROW_WIDTH", min_row_width)
  monkeypatch.setattr(top_n, "PACKED_NARROW_WIDTHS", narrow)
  b, t, h, width = 2, 70, 3, 16
  scores = jax.random.randint(fresh_key(), (b, h, t, width), 0, 3).astype(jnp.float32)
  query_blocks = jax.random.randint(fresh_key(), (b, t), 0, config.num_slc_blocks(t))
  future = jnp.arange(width) > query_blocks[:, None, :, None]
  got = top_n.top_n_blocks(jnp.where(future, jnp.nan, scores), seq_len=t,
                           num_selected=config.num_selected, slc_block=config.slc_block,
                           num_initial=config.num_initial, num_local=config.num_local,
                           interpret=True, query_blocks=query_blocks)
  expected = block_selection.top_n_blocks(
      scores[..., :config.num_slc_blocks(t)].transpose(0, 2, 1, 3),
      (query_blocks * config.slc_block)[..., None], config)
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("narrow", [True, False])
def test_packed_top_n_kernel_reads_the_two_score_planes_in_place(narrow, monkeypatch):
  """Packed score planes: document block `j` of row `t` is `suffix[t, c + j] + prefix[t, c + j +
  1]` (`c = first_columns[t]`), 0 past the planes' last column: the picks equal those on the
  columns gathered (`document_block_columns`) and summed first, ties included."""
  monkeypatch.setattr(top_n, "MIN_ROW_WIDTH", 4)
  monkeypatch.setattr(top_n, "PACKED_NARROW_WIDTHS", narrow)
  config = nsa_jax.NSAConfig(8, 4, 8, 4, 1, 1, 8)
  b, t, h, width = 2, 70, 3, 20  # wider than the 16 a row is read as; columns past 20 read 0
  suffix, prefix = (jax.random.randint(fresh_key(), (b, h, t, width), 0, 3).astype(jnp.float32)
                    for _ in range(2))
  query_blocks = jax.random.randint(fresh_key(), (b, t), 0, config.num_slc_blocks(t))
  first_columns = jax.random.randint(fresh_key(), (b, t), 0, width)
  got = top_n.top_n_blocks(suffix, seq_len=t, num_selected=config.num_selected,
                           slc_block=config.slc_block, num_initial=config.num_initial,
                           num_local=config.num_local, interpret=True, query_blocks=query_blocks,
                           first_columns=first_columns, tails=prefix)
  starts = first_columns * config.slc_block
  scores = (document_block_columns(suffix, starts, config.slc_block)
            + document_block_columns(prefix, starts, config.slc_block, shift=1))
  expected = block_selection.top_n_blocks(
      scores[..., :config.num_slc_blocks(t)].transpose(0, 2, 1, 3),
      (query_blocks * config.slc_block)[..., None], config)
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("num_initial,num_local", [(1, 2), (3, 0), (0, 3), (2, 2)])
@pytest.mark.parametrize("position", [0, 17, 40, 69])
def test_decode_top_n_kernel_matches_the_selection_rule_with_ties(position, num_initial,
                                                                  num_local):
  # Forced blocks fill the first slots without an arg-max pass; at the first positions fewer
  # blocks exist than are forced, and initial and local blocks overlap.
  config = nsa_jax.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=4,
                             num_initial=num_initial, num_local=num_local, window=8)
  b, h, num_slc, width = 2, 3, 9, 16
  scores = jax.random.randint(jax.random.key(position), (b, h, width), 0, 3).astype(jnp.float32)
  picks = top_n.top_n_blocks_decode(scores, jnp.int32(position), num_selected=4, slc_block=8,
                                    num_slc=num_slc, num_initial=num_initial,
                                    num_local=num_local, interpret=True)
  assert picks.shape == (b, h, 4)
  got = jnp.sort(jnp.where(picks >= 0, picks, 10**6), axis=-1)  # pick order -> the SPEC's
  got = jnp.where(got < 10**6, got, -1)
  expected = block_selection.top_n_blocks(scores[..., :num_slc], jnp.int32(position), config)
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("with_gates", [False, True])
def test_public_api_pallas_gpu_in_interpret_mode(with_gates):
  config = nsa_jax.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3,
                             num_initial=1, num_local=1, window=12)
  q, k, v = random_qkv(1, 37, 4, 2, 16)
  gates = random_gates(q) if with_gates else None

  def loss(impl, q, k, v):
    out = nsa_jax.nsa_attention(q, k, v, config=config, gates=gates, implementation=impl,
                                interpret=impl == "pallas_gpu")
    return jnp.sum(out ** 2), out

  values_and_grads = jax.jit(jax.value_and_grad(loss, (1, 2, 3), has_aux=True), static_argnums=0)
  (_, out), grads = values_and_grads("pallas_gpu", q, k, v)
  (_, ref), ref_grads = values_and_grads("reference", q, k, v)
  assert_close(out, ref)
  assert_grads_close(grads, ref_grads)
  idx = nsa_jax.select_blocks(q, nsa_jax.compress_kv(k, v, block=8, stride=4)[0], config=config)
  assert_close(nsa_jax.selected_attention(q, k, v, idx, block=16, implementation="pallas_gpu",
                                          interpret=True),
               nsa_jax.selected_attention(q, k, v, idx, block=16, implementation="reference"))


def test_public_api_pallas_gpu_under_vmap_in_interpret_mode():
  # The ops are pure functions: vmapped over an extra leading axis (the kernels' batching), the
  # values and gradients are each slice's.
  config = nsa_jax.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3,
                             num_initial=1, num_local=1, window=12)
  q, k, v = (x[:, None] for x in random_qkv(2, 40, 4, 2, 16))  # [2, B=1, T, H, D]

  def loss(impl, q, k, v):
    fn = lambda q, k, v: nsa_jax.nsa_attention(q, k, v, config=config, implementation=impl,
                                               interpret=impl == "pallas_gpu")
    out = jax.vmap(fn)(q, k, v)
    return jnp.sum(out ** 2), out

  values_and_grads = jax.jit(jax.value_and_grad(loss, (1, 2, 3), has_aux=True), static_argnums=0)
  (_, out), grads = values_and_grads("pallas_gpu", q, k, v)
  (_, ref), ref_grads = values_and_grads("reference", q, k, v)
  assert_close(out, ref)
  assert_grads_close(grads, ref_grads)


def test_pallas_gpu_needs_a_concrete_scale():
  q, k, v = random_qkv(1, 16, 2, 1, 16)
  idx = jnp.zeros((1, 16, 1, 2), jnp.int32)
  fn = jax.jit(lambda scale: nsa_jax.selected_attention(q, k, v, idx, block=16, scale=scale,
                                                        implementation="pallas_gpu",
                                                        interpret=True))
  with pytest.raises(ValueError, match="scale must be a Python number"):
    fn(0.25)


def test_cudnn_routes_only_take_head_sizes_cudnn_supports():
  # Elsewhere the window and compressed branches fall back (XLA / Pallas) instead of raising.
  assert pallas_gpu.cudnn_takes_head_dim(128, "8.0") and pallas_gpu.cudnn_takes_head_dim(256, "9.0")
  assert not pallas_gpu.cudnn_takes_head_dim(256, "8.6")
  assert not pallas_gpu.cudnn_takes_head_dim(100, "9.0")
  assert not pallas_gpu.cudnn_takes_head_dim(264, "10.0")


@pytest.mark.gpu
def test_default_implementation_on_gpu_is_pallas_gpu():
  assert nsa_jax.ops.default_implementation() == "pallas_gpu"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_public_api_pallas_gpu_matches_xla_on_gpu(dtype):
  """The selection is a valid top-n of the oracle's scores, and the whole op with its indices
  equals the XLA branches combined on float32 inputs, values and gradients.

  The indices are compared up to near-ties, not slot by slot: the fused kernel sums the scores in
  another order than XLA, and in about one row in 10^4 two blocks' scores are within that rounding
  (seen on an H200: blocks 12 and 22 of one row swapped, in float32), which changes the output.
  """
  config = nsa_jax.NSAConfig()
  q, k, v = random_qkv(2, 4096 + 33, 16, 2, 128, dtype=dtype)
  gates = random_gates(q)
  scale = q.shape[-1] ** -0.5
  k_cmp, _ = xla.compress_kv(k, v, config.cmp_block, config.cmp_stride)
  block_indices = nsa_jax.select_blocks(q, k_cmp, config=config, implementation="pallas_gpu")
  score = reference.selection_scores(q.astype(jnp.float32), k_cmp.astype(jnp.float32), scale,
                                     config)
  assert_valid_selection(block_indices, score, config, atol=1e-5)

  def pallas_nsa(q, k, v, gates):
    return nsa_jax.nsa_attention(q, k, v, config=config, gates=gates, implementation="pallas_gpu")

  def xla_nsa_with_these_indices(q, k, v, gates):
    k_cmp, v_cmp = xla.compress_kv(k, v, config.cmp_block, config.cmp_stride)
    o_cmp, _ = xla.compressed_attention(q, k_cmp, v_cmp, scale, block=config.cmp_block,
                                        stride=config.cmp_stride)
    o_slc = xla.selected_attention(q, k, v, block_indices, scale, block=config.slc_block)
    o_swa = xla.sliding_window_attention(q, k, v, scale, window=config.window)
    return combine_branches(o_cmp, o_slc, o_swa, gates).astype(q.dtype)

  def loss(fn, *args):
    out = fn(*args)
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), (0, 1, 2, 3),
                                               has_aux=True))
  (_, out), grads = grad(pallas_nsa)(q, k, v, gates)
  upcast = [x.astype(jnp.float32) for x in (q, k, v, gates)]
  (_, ref), ref_grads = grad(xla_nsa_with_these_indices)(*upcast)
  assert out.dtype == dtype
  assert_close(out, ref, dtype)
  assert_grads_close(grads, ref_grads, dtype)

"""The probes under `experiments/probes/` (one-off measurements behind BENCHMARKS.md's findings), on
the CPU: their harness (arguments, tables, JSON) in interpret mode, and what their probe kernels
compute. They run for real only on a lent GPU or TPU, where a broken script wastes device time."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.probes import (branch_mix, decode_floor, gpu_trace, key_reading,
                                mgpu_orientation, passkey_phase, score_floor, selected_floor,
                                tile_unions, tpu_overhead)
from nsa_jax import NSAConfig, nn


def test_decode_floor_times_chains_of_empty_kernels_and_writes_json(monkeypatch, tmp_path):
  out = tmp_path / "floor.json"
  monkeypatch.setattr("sys.argv", ["decode_floor", "--interpret", "--batches", "2",
                                   "--kernels", "0,3", "--steps", "4", "--repeats", "3",
                                   "--out", str(out)])
  decode_floor.main()
  rows = json.loads(out.read_text())["rows"]
  assert [(row["batch"], row["kernels"]) for row in rows] == [(2, 0), (2, 3)]
  # Times only (no property of them: the difference of two loops' times is noise-level on a
  # busy CPU, even for three interpreted kernels).
  assert all(np.isfinite(row["us_per_step"]) for row in rows)


def test_decode_floor_layer_chains_its_kernels():
  tile = jax.random.normal(jax.random.key(0), (1, decode_floor.HKV, decode_floor.GROUP,
                                               decode_floor.D))
  q = jnp.zeros((1, decode_floor.HQ, decode_floor.D), decode_floor.DTYPE)
  new_tile, out = decode_floor.empty_layer(3, interpret=True)(tile, q, None, None)
  expected = tile
  for _ in range(3):
    expected = expected * 0.5 + 1.0
  np.testing.assert_allclose(new_tile, expected, rtol=1e-6)
  np.testing.assert_allclose(out.astype(jnp.float32), expected.reshape(q.shape), rtol=1e-2)
  assert out.dtype == decode_floor.DTYPE


def persistent_reference(x, cache, barriers, load_rows, outputs):
  """What `decode_floor.persistent_layer`'s kernel writes: phase k reads the next program's tile
  of phase k - 1, adds its cache rows and maps `t -> t / 2 + 1`."""
  programs = x.shape[0]
  tile = x
  for phase in range(barriers + 1):
    if phase:
      tile = jnp.roll(tile, -1, axis=0)  # program p reads program p + 1's tile
    if load_rows:
      starts = (jnp.arange(programs) * (barriers + 1) + phase) * load_rows
      rows = cache[starts[:, None] + jnp.arange(load_rows)[None, :]].astype(jnp.float32)
      tile = tile + jnp.sum(rows, axis=1)[:, None, :]
    tile = tile * 0.5 + 1.0
  return tile[:outputs]


def run_persistent(batch, programs, barriers, load_rows, kind, interpret):
  """One call of the persistent probe kernel: `(output [B * Hkv, G, D], expected, counters)`."""
  state = decode_floor.persistent_state(batch, programs, barriers, load_rows, kind,
                                        jax.random.key(3))
  (layer_state,), _ = state
  q = jnp.zeros((batch, decode_floor.HQ, decode_floor.D), decode_floor.DTYPE)
  layer = decode_floor.persistent_layer(programs, barriers, load_rows, kind,
                                        interpret=interpret)
  (counters, x, cache), out = jax.jit(lambda s, q: layer(s, q, None, None))(layer_state, q)
  expected = persistent_reference(x, cache, barriers, load_rows, batch * decode_floor.HKV)
  return out.reshape(expected.shape), expected, counters


def test_decode_floor_persistent_kernel_without_barriers():
  # Interpret mode runs programs one after another, so only a barrier-free step runs here.
  out, expected, _ = run_persistent(2, 8, 0, 4, "flags", interpret=True)
  np.testing.assert_allclose(out.astype(jnp.float32), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kind", sorted(decode_floor.BARRIERS))
def test_decode_floor_persistent_kernel_lowers_for_a_gpu(kind):
  from tests.test_lowering import pallas_kernels  # pylint: disable=g-import-not-at-top
  state = decode_floor.persistent_state(1, 128, 2, 64, kind, jax.random.key(0))
  (layer_state,), _ = state
  layer = decode_floor.persistent_layer(128, 2, 64, kind, picks=13)
  q = jnp.zeros((1, decode_floor.HQ, decode_floor.D), decode_floor.DTYPE)
  assert pallas_kernels("cuda", lambda s, q: layer(s, q, None, None), layer_state,
                        q) == ["persistent_floor"]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", sorted(decode_floor.BARRIERS))
def test_decode_floor_grid_barriers_order_the_phases_on_a_gpu(kind):
  # A program that passed a barrier before its neighbour stored would read an unwritten tile.
  out, expected, counters = run_persistent(1, 128, 3, 16, kind, interpret=False)
  np.testing.assert_allclose(out.astype(jnp.float32), expected, rtol=1e-2, atol=1e-2)
  arrivals = 3 * (128 if kind != "flags" else 1)  # every program passed every barrier
  np.testing.assert_array_equal(counters[:1 if kind != "flags" else 128], arrivals)


ORIENTATION_CASES = [(variant, 16) for variant in sorted(mgpu_orientation.VARIANTS)] + [
    (variant, 8) for variant in sorted(mgpu_orientation.VARIANTS) if variant != "tile"]


@pytest.mark.parametrize("variant,heads", ORIENTATION_CASES)
def test_mgpu_orientation_kernels_lower_for_a_gpu(variant, heads):
  # Mosaic GPU's layout inference (the transposed P^T store, the softmax over axis 0) runs at
  # lowering: a kernel it refuses fails here, not on the device. heads = 8: wgmma's smallest N.
  from tests.test_lowering import lowered_text  # pylint: disable=g-import-not-at-top
  text = lowered_text("cuda", mgpu_orientation.build(variant, 4, heads=heads),
                      *mgpu_orientation.inputs(variant, 4, heads))
  assert text.count("custom_call @mosaic_gpu") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("variant,heads", ORIENTATION_CASES)
def test_mgpu_orientation_kernels_compute_attention_over_their_block_on_a_gpu(variant, heads):
  # Repeating one block leaves the softmax unchanged: each variant's output is attention of its
  # rows over the block, softmax base 2 of 0.1 q.k (O^T a position in `position xP`).
  q, k, v = mgpu_orientation.inputs(variant, 8, heads)
  out = jax.jit(mgpu_orientation.build(variant, 8, iters=3, heads=heads))(q, k, v)
  np.testing.assert_allclose(out, mgpu_orientation.expected(variant, q, k, v, heads=heads),
                             rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("variant,heads,position,row", [("position x2", 16, 1, 5),
                                                       ("position x4", 8, 3, 2)])
def test_mgpu_orientation_reference_lays_out_positions_as_the_kernel_does(variant, heads,
                                                                          position, row):
  # `position xP` writes O^T a position: [C, P, D, heads], row r of position p at [:, p, :, r].
  q, k, v = mgpu_orientation.inputs(variant, 3, heads)  # 32 rows: P positions of `heads`
  tile = mgpu_orientation.expected("tile", jnp.concatenate([q, q], axis=1), k, v)  # 64 rows
  per_position = mgpu_orientation.expected(variant, q, k, v, heads=heads)
  np.testing.assert_allclose(per_position[:, position, :, row], tile[:, position * heads + row],
                             rtol=1e-6)


def test_tpu_overhead_times_steps_and_dma_groups_and_writes_json(monkeypatch, tmp_path):
  out = tmp_path / "overhead.json"
  monkeypatch.setattr("sys.argv", ["tpu_overhead", "--interpret", "--counts", "2,3",
                                   "--repeats", "1", "--out", str(out)])
  tpu_overhead.main()
  result = json.loads(out.read_text())
  assert set(result["us_each"]) == {"grid step", "dma group", "dma group + math"}
  assert len(result["rows"]) == 6 and all(row["ms"] > 0 for row in result["rows"])


def test_selected_floor_variants_run_in_interpret_mode_and_write_json(tmp_path):
  # Each variant swaps the selected forward kernel's body; those that keep its output must match
  # the shipped kernel (the JSON holds their largest difference), the others only run.
  out = tmp_path / "floor.json"
  result = selected_floor.main(["--seq_len", "256", "--interpret", "--out", str(out)])
  rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
  assert set(rows) == set(selected_floor.VARIANTS) and result["selected_blocks"] > 0
  for name in selected_floor.SAME_OUTPUT:
    assert rows[name]["max_abs_diff"] < 1e-2  # bfloat16 outputs, other summation orders


def test_score_floor_variants_run_in_interpret_mode_and_write_json(tmp_path):
  # Each variant swaps the score pass's kernel body; those that keep its output (SAME_OUTPUT:
  # the same scores by other means) must match the shipped pass, the others only run.
  out = tmp_path / "score_floor.json"
  # 1280 positions: the last row tiles see whole key tiles (the unmasked loop runs).
  score_floor.main(["--seq_len", "1280", "--interpret", "--out", str(out)])
  rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
  assert set(rows) == set(score_floor.VARIANTS)
  assert not [row for row in rows.values() if "error" in row]
  for name in score_floor.SAME_OUTPUT:
    assert rows[name]["max_rel_diff"] < 2e-6


@pytest.mark.parametrize("probe", [score_floor, selected_floor])
def test_floor_probes_refuse_an_unknown_variant(probe, capsys):
  with pytest.raises(SystemExit):
    probe.main(["--interpret", "--variants", "kernel,no_such_variant"])
  assert "no_such_variant" in capsys.readouterr().err


@pytest.mark.parametrize("variant", sorted(score_floor.VARIANTS))
def test_score_floor_kernels_lower_for_a_gpu(variant):
  # Triton's lowering refuses some of what the interpreter runs (a `%` inside `lax.cond` once).
  from tests.test_lowering import pallas_kernels  # pylint: disable=g-import-not-at-top
  config, t = NSAConfig(), 1024
  k_cmp = jax.ShapeDtypeStruct((1, config.num_cmp_blocks(t), 4, 128), jnp.bfloat16)
  args = (jax.ShapeDtypeStruct((1, t, 64, 128), jnp.bfloat16), k_cmp,
          jax.ShapeDtypeStruct((1, t, 64), jnp.float32))
  fn = score_floor.score_pass(config)
  if score_floor.is_folded(variant):  # cuDNN's fold: C = 63 chunks, 64 with cuDNN's even pad
    args = (jax.ShapeDtypeStruct((1, 64, 4 * 256, 128), jnp.bfloat16), k_cmp,
            jax.ShapeDtypeStruct((1, 4 * 256, 64), jnp.float32))
    fn = score_floor.score_pass(config, seq_len=t)
  with score_floor.variant_installed(variant):
    assert pallas_kernels("cuda", fn, *args) == ["nsa_selection_scores"]


def test_exp2_poly_is_exp2_to_float32_precision():
  x = jax.random.uniform(jax.random.key(np.random.randint(2**31)), (100_000,), jnp.float32,
                         -130.0, 0.0)
  x = jnp.concatenate([x, jnp.array([0.0, -0.5, -126.0, -127.0, -1e30, -jnp.inf], jnp.float32)])
  got, want = np.asarray(score_floor.exp2_poly(x)), np.exp2(np.asarray(x, np.float64))
  normal = want >= 2.0 ** -126
  np.testing.assert_allclose(got[normal], want[normal], rtol=5e-7)
  assert np.all(got[np.asarray(x) <= -127.0] == 0.0)  # -inf included


def test_gpu_trace_reports_the_ops_of_the_traced_calls():
  # On the CPU every complete event of the trace counts: the XLA ops and the host's own frames.
  x = jnp.ones((512, 512))
  f = jax.jit(lambda x: jnp.tanh(x @ x) @ x)
  one = gpu_trace.kernel_times(lambda: jax.block_until_ready(f(x)))
  three = gpu_trace.kernel_times(lambda: jax.block_until_ready(f(x)), calls=3)
  assert list(one.values()) == sorted(one.values(), reverse=True)
  assert all(us >= 0 for us in one.values())
  ops = lambda times: {name for name in times if "tanh" in name or "fusion" in name}
  assert ops(one) and ops(one) == ops(three)  # the computation's ops, in every traced call
  assert all(one[name] > 0 for name in ops(one))


def _ablation_layer():
  config = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=2, num_initial=1,
                     num_local=1, window=8)
  return nn.make_attention("nsa_no_selection", num_features=32, num_heads=2, num_kv_heads=1,
                           head_dim=16, config=config, implementation="xla", rngs=nnx.Rngs(0))


def test_branch_mix_scales_a_branchs_share_of_the_output():
  layer = _ablation_layer()
  x = jax.random.normal(jax.random.key(0), (2, 40, 32))
  outputs = []
  for factor in (0.0, 1.0, 2.0):
    with branch_mix.branch_mix({"swa": factor}):
      outputs.append(layer(x))
  unscaled = layer(x)  # the context restores the layer
  np.testing.assert_allclose(outputs[1], unscaled, rtol=1e-6)
  # The mix is affine in the window's factor, and the factor does change it.
  np.testing.assert_allclose(outputs[2] - outputs[1], outputs[1] - outputs[0], rtol=1e-4,
                             atol=1e-5)
  assert float(jnp.abs(outputs[2] - outputs[1]).max()) > 1e-3
  with pytest.raises(ValueError, match="--scale takes branch=factor"):
    branch_mix.parse_scales(["slc2"])
  assert branch_mix.parse_scales(["cmp=0.5", "swa=2"]) == {"cmp": 0.5, "swa": 2.0}


@pytest.mark.parametrize("detach", [False, True])
def test_branch_mix_cuts_the_compressed_branchs_gradient_into_k_and_v(detach):
  layer = _ablation_layer()
  x = jax.random.normal(jax.random.key(1), (2, 40, 32))
  with branch_mix.branch_mix({"swa": 0.0}, detach_cmp_kv=detach):  # the compressed branch alone
    grads = nnx.grad(lambda layer: jnp.sum(layer(x) ** 2))(layer)
  k_grad = float(jnp.abs(grads.k_proj.kernel.get_value()).max())
  compress_grad = float(jnp.abs(grads.k_compress.hidden.kernel.get_value()).max())
  assert compress_grad > 0 and ((k_grad == 0) if detach else (k_grad > 0))


def test_branch_mix_runs_a_training_command(tmp_path):
  root = pathlib.Path(__file__).parents[1]
  result = subprocess.run(
      [sys.executable, "-m", "experiments.probes.branch_mix", "--scale", "swa=10", "--",
       "--config", str(root / "experiments/configs/mqar_cpu.py"), "--workdir", str(tmp_path),
       "--config.attention=nsa_no_selection", "--config.steps=2", "--config.log_every=1",
       "--config.eval_every=2", "--config.checkpoint_every=2"],
      capture_output=True, text=True, timeout=300, cwd=root)
  assert result.returncode == 0, result.stderr[-2000:]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [1, 2]
  # The window's gate, scaled by 10, is past a sigmoid's range in both layers.
  gates = [r["gates_at_answers"] for r in records if "gates_at_answers" in r][-1]
  assert all(layer[2] > 1 for layer in gates) and all(layer[0] < 1 for layer in gates)


def test_key_reading_weighs_the_keys_that_overlap_a_span():
  # One sequence, two heads, one answer, six keys; tokens 0-5, or blocks of 3 with stride 2.
  probs = jnp.array([[[[0.1, 0.2, 0.3, 0.4, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.5, 0.5, 0.0]]]])
  tokens, blocks = jnp.arange(6), jnp.arange(6) * 2
  span = lambda a, b: (jnp.array([[a]]), jnp.array([[b]]))
  assert key_reading.weight_on_span(probs, tokens, tokens, *span(1, 2)) == pytest.approx(0.5)
  assert key_reading.weight_on_span(probs, tokens, tokens, *span(3, 3)) == pytest.approx(0.5)
  assert key_reading.weight_on_span(probs, tokens, tokens, *span(4, 9)) == pytest.approx(0.5)
  # Blocks 0-2, 2-4, 4-6, ...: token 4 lies in the second and the third, token 5 in the third.
  assert key_reading.weight_on_span(probs, blocks, blocks + 2, *span(4, 4)) == pytest.approx(0.5)
  assert key_reading.weight_on_span(probs, blocks, blocks + 2, *span(5, 5)) == pytest.approx(0.3)


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_key_reading_profiles_each_layers_token_level_attention(attention):
  from experiments import train  # pylint: disable=import-outside-toplevel
  from experiments.configs import demo  # pylint: disable=import-outside-toplevel
  config = demo.get_config()
  config.attention = attention
  model = train.build_model(config, nnx.Rngs(0))
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, 96), 0, 256))
  queries = np.array([70, 71, 72])
  # A "key" spanning every position the answers can see: dense attention puts all of its
  # weight there; a key at positions 10-12 gets only part of it; after a key at 0-2, a span of
  # 200 tokens holds everything else the answers see.
  whole, part = np.tile(np.array([0, 36, 72]), (2, 1)), np.tile(np.array([10, 11, 12]), (2, 1))
  early = np.tile(np.array([0, 1, 2]), (2, 1))
  profile = key_reading.reading_profile(model, tokens, queries, whole)
  branches = ["cmp", "slc", "swa"] if attention == "nsa" else ["full"]
  assert [(row["layer"], row["branch"]) for row in profile] == [
      (layer, branch) for layer in range(1, config.model.num_layers + 1) for branch in branches]
  for row, row_part, row_early in zip(
      profile, key_reading.reading_profile(model, tokens, queries, part),
      key_reading.reading_profile(model, tokens, queries, early, after=200)):
    assert all(0 <= w <= 1 for w in row["at_offset"].values())
    assert row_part["at_offset"][0] <= row_part["on_key"] + 1e-6  # each digit is in the key
    if row["branch"] in ("full", "cmp"):  # both see every (compressed) key before the answers
      assert row["on_key"] == pytest.approx(1.0, abs=1e-5) and row_part["on_key"] < 0.5
      assert row["after_key"] == pytest.approx(0.0, abs=1e-6)  # nothing visible after 72
      assert row_early["on_key"] + row_early["after_key"] >= 1 - 1e-5
  # After a key that spans 0-72, every compressed block the next 16 positions see overlaps it;
  # each position also sees itself, outside the key.
  for row in key_reading.copy_profile(model, tokens, whole):
    assert len(row["on_key"]) == key_reading.COPY_SPAN
    if row["branch"] == "cmp":
      assert row["on_key"] == pytest.approx([1.0] * key_reading.COPY_SPAN, abs=1e-5)
    if row["branch"] == "full":
      assert all(0 < w < 1 - 1e-4 for w in row["on_key"])


def test_passkey_phase_reads_seed_ranges_and_lists():
  assert passkey_phase.parse_seeds("2-4") == [2, 3, 4]
  assert passkey_phase.parse_seeds("1,5") == [1, 5] and passkey_phase.parse_seeds("7") == [7]


def test_passkey_phase_evaluates_a_run_at_each_length_and_seed(monkeypatch, tmp_path):
  from experiments import train  # pylint: disable=import-outside-toplevel
  from tests.test_train import small_config  # pylint: disable=import-outside-toplevel
  config = small_config(seq_len=128)
  config.data.source = "passkey"
  train.run(config, str(tmp_path / "pk"))
  out = tmp_path / "phase.json"
  monkeypatch.setattr("sys.argv", [
      "passkey_phase", "--workdir", str(tmp_path / "pk"), "--lengths", "129,128",
      "--seeds", "1-2", "--compute_dtype", "bfloat16", "--out", str(out)])
  passkey_phase.main()
  result = json.loads(out.read_text())
  assert result["seq_len"] == 128 and result["compute_dtype"] == "bfloat16"  # the override
  assert list(result["accuracy"]) == ["129", "128"]
  for row in result["accuracy"].values():
    assert len(row["per_seed"]) == 2 and all(0 <= a <= 1 for a in row["per_seed"])
    assert row["mean"] == pytest.approx(np.mean(row["per_seed"]))
    assert row["sequences"] == 2 * len(train.PASSKEY_DEPTHS) * config.eval_samples


def test_tile_unions_counts_each_tiles_union_of_blocks():
  # G = 16: tiles of 4 positions. Positions 0-3 choose {0}, {0, 1}, {1, 0}, {2}: union {0, 1, 2};
  # positions 4-7 all {3, 4}: union {3, 4}. The work scales with the union (64 rows a block).
  config = NSAConfig()
  chosen = [[0, -1], [0, 1], [1, 0], [2, -1]] + [[3, 4]] * 4
  row = tile_unions.tile_work(np.array(chosen)[None, :, None, :], 16, config, 400.0, 8.0)
  assert row["positions"] == 4
  assert row["union_a_tile"] == 2.5 and row["blocks_a_position"] == 14 / 8
  assert row["masked_over_useful"] == pytest.approx(2.5 / (14 / 8))
  flop_a_block = 64 * config.slc_block * 2 * 128 * 2  # S and P V over 64 rows
  tiles = 8 * 64 // 64  # the benchmark's layer: T * Hq / 64 rows a tile
  assert row["masked_tflop"] * 1e12 == pytest.approx(tiles * 2.5 * flop_a_block)
  assert row["ms_at_mma"] == pytest.approx(row["masked_tflop"] / 400.0 * 1e3)


def test_tile_unions_on_random_inputs_writes_json(tmp_path):
  # Random selections at G = 4 (16 positions a tile) and 16 (4): a tile's union holds at least
  # one position's blocks and at most all of them.
  out = tmp_path / "unions.json"
  tile_unions.main(["--seq_len", "2048", "--groups", "4,16", "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert [(row["group"], row["positions"]) for row in rows] == [(4, 16), (16, 4)]
  for row in rows:
    assert row["blocks_a_position"] <= row["union_a_tile"]
    assert row["union_a_tile"] <= row["positions"] * row["blocks_a_position"] + 1e-9
    assert row["union_a_tile"] < row["positions"] * 16  # neighbours share the forced blocks

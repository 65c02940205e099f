"""The accelerator benchmark scripts' plumbing, on the CPU: they run only on a lent GPU (or a
TPU), where a broken script wastes scarce device time. The kernels are swapped for the XLA
path here, so these tests check the harness (arguments, tables, JSON), not any timing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from experiments import bench_decode, bench_kernels, decode_floor, selected_floor, tpu_overhead
from nsa_jax import cudnn_compressed


def on_xla(fn):
  """`fn` with `implementation` forced to "xla" (the GPU path's stand-in)."""
  return lambda *args, **kwargs: fn(*args, **{**kwargs, "implementation": "xla"})


@pytest.mark.parametrize("platform,dense", [("gpu", "dense_cudnn"), ("tpu", "dense_splash")])
def test_bench_kernels_times_every_part_and_writes_json(monkeypatch, tmp_path, platform, dense):
  monkeypatch.setattr(bench_kernels, "HQ", 4)
  for name in ("select_blocks", "nsa_attention", "sliding_window_attention",
               "compressed_attention", "compressed_attention_and_selection",
               "selected_attention"):
    monkeypatch.setattr(nsa_jax, name, on_xla(getattr(nsa_jax, name)))
  kernels = bench_kernels.PLATFORMS[platform]
  monkeypatch.setattr(kernels.compressed, "compressed_attention", on_xla(
      lambda q, k_cmp, v_cmp, **kw: nsa_jax.compressed_attention(q, k_cmp, v_cmp, **kw)))
  monkeypatch.setattr(kernels.selected, "selected_attention", on_xla(
      lambda q, k, v, idx, **kw: nsa_jax.selected_attention(q, k, v, idx, **kw)))
  monkeypatch.setattr(kernels, "dense", lambda q, k, v: q)  # no cuDNN or splash here
  folded = cudnn_compressed.compressed_attention
  monkeypatch.setattr(cudnn_compressed, "compressed_attention",
                      lambda *args, **kw: folded(*args, use_cudnn=False, **kw))
  out = tmp_path / "bench.json"
  gpu_only = {"compressed_cudnn"} if platform == "gpu" else set()
  expected = {"nsa", "compressed", "cmp+selection", "selected", "cmp+slc apart", "cmp+slc fused",
              "window", dense} | gpu_only
  # The separate-K/V pair is the same on both platforms: left out of the TPU run by --parts
  # (which times only the parts it names).
  named = expected - ({"cmp+slc apart", "cmp+slc fused"} if platform == "tpu" else set())
  monkeypatch.setattr("sys.argv", ["bench_kernels", "--seq_lens", "256", "--fla_seq_lens", "",
                                   "--repeats", "1", "--num_kv_heads", "2", "--out", str(out),
                                   "--platform", platform, "--parts", ",".join(sorted(named))])
  bench_kernels.main()
  result = json.loads(out.read_text())
  assert result["num_kv_heads"] == 2 and result["platform"] == platform
  parts = {row["part"]: row for row in result["paper"]}
  assert set(parts) == named
  assert all(row["fwd_ms"] > 0 and row["fwd_gib"] > 0 for row in parts.values())
  assert "fwd_bwd_ms" in parts["selected"] and "fwd_bwd_ms" not in parts["cmp+selection"]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("layers", [1, 2])
def test_bench_decode_runs_the_xla_decode_and_writes_json(monkeypatch, tmp_path, layers):
  out = tmp_path / "decode.json"
  monkeypatch.setattr("sys.argv", ["bench_decode", "--contexts", "512", "--batches", "1",
                                   "--impls", "xla,separate_kv_xla", "--steps", "4",
                                   "--repeats", "3",
                                   "--layers", str(layers), "--out", str(out)])
  bench_decode.main()
  rows = json.loads(out.read_text())["rows"]
  impls = {row["impl"] for row in rows}
  assert {"dense_xla", "nsa_xla", "nsa_separate_kv_xla"} <= impls  # cuDNN is refused on the CPU
  assert all(row["us_per_token"] > 0 and row["layers"] == layers for row in rows)


def test_bench_decode_refuses_more_timed_tokens_than_the_cache_holds(monkeypatch, capsys):
  # 3 * 64 * 6 = 1152 tokens appended by the two timed loops and their warm-ups > 1024 free slots.
  monkeypatch.setattr("sys.argv", ["bench_decode", "--steps", "64", "--repeats", "5"])
  with pytest.raises(SystemExit):
    bench_decode.main()
  assert "1152 tokens, more than the caches' 1024 free slots" in capsys.readouterr().err


def test_decode_floor_times_chains_of_empty_kernels_and_writes_json(monkeypatch, tmp_path):
  out = tmp_path / "floor.json"
  monkeypatch.setattr("sys.argv", ["decode_floor", "--interpret", "--batches", "2",
                                   "--kernels", "0,3", "--steps", "4", "--repeats", "3",
                                   "--out", str(out)])
  decode_floor.main()
  rows = json.loads(out.read_text())["rows"]
  assert [(row["batch"], row["kernels"]) for row in rows] == [(2, 0), (2, 3)]
  # A step of no kernel takes microseconds on the CPU, within the noise of the two loops' times;
  # three interpreted kernels take milliseconds.
  assert np.isfinite(rows[0]["us_per_step"]) and rows[1]["us_per_step"] > 0


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

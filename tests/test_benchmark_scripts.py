"""The accelerator benchmark scripts' plumbing, on the CPU: they run only on a lent GPU (or a
TPU), where a broken script wastes scarce device time. The kernels are swapped for the XLA
path here, so these tests check the harness (arguments, tables, JSON), not any timing."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from experiments import bench_decode, bench_kernels, kernel_settings
from nsa_jax import cudnn_compressed
from pallas_kernels.gpu import compressed_attention as compressed_kernel


def on_xla(fn):
  """`fn` with `implementation` forced to "xla" (the GPU path's stand-in)."""
  return lambda *args, **kwargs: fn(*args, **{**kwargs, "implementation": "xla"})


@pytest.mark.parametrize("platform,dense", [("gpu", "dense_cudnn"), ("tpu", "dense_splash")])
def test_bench_kernels_times_each_part_and_writes_json(monkeypatch, tmp_path, platform, dense):
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
  if platform == "gpu":
    scores = kernels.compressed.selection_scores_from_lse
    monkeypatch.setattr(kernels.compressed, "selection_scores_from_lse",
                        lambda *args, **kw: scores(*args, interpret=True, **kw))
  folded = cudnn_compressed.compressed_attention
  monkeypatch.setattr(cudnn_compressed, "compressed_attention",
                      lambda *args, **kw: folded(*args, use_cudnn=False, **kw))
  out = tmp_path / "bench.json"
  gpu_only = ({"compressed_cudnn", "selected mosaic", "nsa mosaic", "selected mosaic dkv",
               "nsa mosaic dkv", "nsa mosaic scores", "nsa default", "scores", "scores mosaic"}
              if platform == "gpu" else set())
  expected = {"nsa", "compressed", "cmp+selection", "selected", "cmp+slc apart", "cmp+slc fused",
              "window", dense} | gpu_only
  assert set(bench_kernels.parts_for(256, bench_kernels.PAPER, platform=kernels)) == expected
  # Timed: the parts that compile a program of their own here. Left out by --parts (which times
  # only the parts it names): the separate-K/V pair on TPU (the same on both platforms), and the
  # GPU parts that are another part under kernel switches (`on_mosaic`, tested below; "nsa
  # default" is "nsa"), the same program through the XLA stand-ins.
  switched = {"selected mosaic", "nsa mosaic", "selected mosaic dkv", "nsa mosaic dkv",
              "nsa mosaic scores", "nsa default", "scores mosaic"}
  named = expected - ({"cmp+slc apart", "cmp+slc fused"} if platform == "tpu" else switched)
  monkeypatch.setattr("sys.argv", ["bench_kernels", "--seq_lens", "256", "--fla_seq_lens", "",
                                   "--repeats", "1", "--num_kv_heads", "2", "--out", str(out),
                                   "--platform", platform, "--parts", ",".join(sorted(named))])
  bench_kernels.main()
  result = json.loads(out.read_text())
  assert result["num_kv_heads"] == 2 and result["platform"] == platform
  assert result["settings"] is None
  parts = {row["part"]: row for row in result["paper"]}
  assert set(parts) == named
  assert all(row["fwd_ms"] > 0 and row["fwd_gib"] > 0 for row in parts.values())
  assert "fwd_bwd_ms" in parts["selected"] and "fwd_bwd_ms" not in parts["cmp+selection"]


def test_kernel_settings_read_each_value_as_its_default_type():
  assert kernel_settings.setting_value(16, "32") == 32
  assert kernel_settings.setting_value("triton", "mosaic") == "mosaic"
  assert kernel_settings.setting_value(False, "1") is True
  assert kernel_settings.setting_value(True, "0") is False
  with pytest.raises(ValueError, match="boolean"):
    kernel_settings.setting_value(False, "yes")


@pytest.mark.parametrize("text", ["compressed.TAILS_APART", "nowhere.X=1", "compressed.nope=1",
                                  "compressed.jnp=1", "compressed.SCORE_ROWS=many"])
def test_kernel_settings_refuse_what_is_no_setting(text):
  with pytest.raises(ValueError):
    kernel_settings.parse(text)


def test_kernel_settings_are_in_place_inside_and_restored_after():
  compressed = kernel_settings.MODULES["compressed"]
  defaults = compressed.TAILS_APART, compressed.SCORE_ROWS
  with kernel_settings.applied("compressed.TAILS_APART=0,compressed.SCORE_ROWS=128"):
    assert (compressed.TAILS_APART, compressed.SCORE_ROWS) == (False, 128)
  assert (compressed.TAILS_APART, compressed.SCORE_ROWS) == defaults
  with pytest.raises(RuntimeError), kernel_settings.applied("compressed.SCORE_ROWS=32"):
    raise RuntimeError  # restored on the way out of an error too
  assert compressed.SCORE_ROWS == defaults[1]


def test_bench_kernels_runs_under_its_settings_and_records_them(monkeypatch, tmp_path):
  seen = []
  monkeypatch.setattr(bench_kernels, "run", lambda parser, args: seen.append(
      (compressed_kernel.TAILS_APART, args.settings)))
  monkeypatch.setattr("sys.argv", ["bench_kernels", "--settings", "compressed.TAILS_APART=0"])
  bench_kernels.main()
  assert seen == [(False, "compressed.TAILS_APART=0")] and compressed_kernel.TAILS_APART
  monkeypatch.setattr("sys.argv", ["bench_kernels", "--settings", "compressed.NO_SUCH=1"])
  with pytest.raises(SystemExit):
    bench_kernels.main()


def test_mosaic_parts_trace_with_the_mosaic_kernels():
  kernel, scores, seen = bench_kernels.selected_kernel, bench_kernels.compressed_kernel, []
  defaults = (kernel.FORWARD, kernel.DQ, kernel.DKV, scores.SCORES)
  record = lambda: seen.append((kernel.FORWARD, kernel.DQ, kernel.DKV, scores.SCORES))
  bench_kernels.on_mosaic(record)()
  bench_kernels.on_mosaic(record, "mosaic")()
  bench_kernels.on_mosaic(record, scores="mosaic")()
  assert seen == [("mosaic", "mosaic", "triton", defaults[3]),
                  ("mosaic", "mosaic", "mosaic", defaults[3]),
                  ("mosaic", "mosaic", "triton", "mosaic")]
  assert (kernel.FORWARD, kernel.DQ, kernel.DKV, scores.SCORES) == defaults


def test_plain_parts_run_triton_and_default_parts_the_defaults():
  kernel, seen = bench_kernels.selected_kernel, []
  defaults = (kernel.FORWARD, kernel.DQ, kernel.DKV)
  record = lambda: seen.append((kernel.FORWARD, kernel.DQ, kernel.DKV))
  gpu = bench_kernels.PLATFORMS["gpu"]
  for name in ("nsa", "nsa default", "nsa trained default", "nsa mosaic"):
    bench_kernels.kernels_of_part(name, record, gpu)()
  bench_kernels.kernels_of_part("nsa", record, bench_kernels.PLATFORMS["tpu"])()
  assert seen == [("triton",) * 3, defaults, defaults, defaults, defaults]
  assert (kernel.FORWARD, kernel.DQ, kernel.DKV) == defaults


def test_bench_kernels_times_the_selection_on_trained_indices(monkeypatch, tmp_path):
  """`--trained_indices`: the tensor's (row, KV head) selections become the KV heads, and the
  parts on them run at its length only."""
  monkeypatch.setattr(bench_kernels, "HQ", 4)
  for name in ("select_blocks", "nsa_attention", "sliding_window_attention",
               "compressed_attention", "selected_attention",
               "compressed_attention_and_selection"):
    monkeypatch.setattr(nsa_jax, name, on_xla(getattr(nsa_jax, name)))
  kernels = bench_kernels.PLATFORMS["gpu"]
  monkeypatch.setattr(kernels.selected, "selected_attention", on_xla(
      lambda q, k, v, idx, **kw: nsa_jax.selected_attention(q, k, v, idx, **kw)))
  monkeypatch.setattr(kernels.glue, "compressed_attention_and_selection",
                      lambda q, k_cmp, v_cmp, scale, config, interpret:
                      nsa_jax.compressed_attention_and_selection(q, k_cmp, v_cmp, config=config,
                                                                 scale=scale))
  config = bench_kernels.PAPER
  q, k, _ = bench_kernels.random_qkv(256, 1)
  q = q[:, :, :4]
  k_cmp, _ = nsa_jax.compress_kv(k, k, block=config.cmp_block, stride=config.cmp_stride)
  one = np.asarray(nsa_jax.select_blocks(q, k_cmp, config=config, implementation="xla"))
  saved = np.concatenate([one, one[:, :, :, ::-1]])  # [2, 256, 1, 16]: two rows
  path = tmp_path / "selection_indices_run.npz"
  by_layer = np.stack([saved, saved[::-1]])  # [L = 2, B, T, Hkv, n]: layer 1 swaps the rows
  np.savez_compressed(path, indices=saved.astype(np.int16), slc_block=config.slc_block,
                      indices_by_layer=by_layer.astype(np.int16))
  loaded = bench_kernels.load_trained_indices(path, 256, 2, config)
  np.testing.assert_array_equal(loaded[0, :, 1], saved[1, :, 0])
  second = bench_kernels.load_trained_indices(path, 256, 2, config, layer=1)
  np.testing.assert_array_equal(second[0, :, 1], saved[0, :, 0])
  with pytest.raises(ValueError, match="layer 2 asked, the file holds 2 layer"):
    bench_kernels.load_trained_indices(path, 256, 2, config, layer=2)
  with pytest.raises(ValueError, match=r"the benchmark needs T = 512"):
    bench_kernels.load_trained_indices(path, 512, 2, config)
  with pytest.raises(ValueError, match="2 \\(row, KV head\\) selections, the benchmark needs 4"):
    bench_kernels.load_trained_indices(path, 256, 4, config)
  out = tmp_path / "bench.json"
  monkeypatch.setattr("sys.argv", [
      "bench_kernels", "--seq_lens", "128,256", "--fla_seq_lens", "", "--repeats", "1",
      "--num_kv_heads", "2", "--out", str(out), "--trained_indices", str(path),
      "--parts", "selected,selected trained,nsa composed,nsa trained"])
  bench_kernels.main()
  result = json.loads(out.read_text())
  assert [(r["seq_len"], r["part"]) for r in result["paper"]] == [
      (128, "selected"), (256, "selected"), (256, "nsa composed"), (256, "nsa trained"),
      (256, "selected trained")]
  # The GPU's other trained parts are these under kernel switches (the same programs here).
  switched = {f"{name}{switch}" for name in ("nsa trained", "selected trained")
              for switch in (" mosaic", " mosaic dkv")}
  assert set(bench_kernels.trained_parts(config, kernels, 0.0, 0.0)) == {
      "nsa composed", "nsa trained", "selected trained", "nsa trained default",
      "nsa trained mosaic scores"} | switched
  assert result["trained_indices"] == str(path)
  assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in result["paper"])


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


def test_bench_kernels_packed_rows_are_the_batched_documents():
  """`--documents N`: the packed row's NSA equals NSA on its documents as a batch, and the dense
  row is causal attention within each document (so the three rows time the same attention)."""
  platform = types.SimpleNamespace(
      implementation="xla", glue=None, compressed=None, selected=None, dense_name="dense",
      dense=lambda q, k, v: nsa_jax.dense_causal_attention(q, k, v))
  parts = bench_kernels.packed_parts(256, 2, bench_kernels.PAPER, platform)
  assert set(parts) == {"nsa packed/2", "nsa batched/2", "dense/2", "nsa packed/2 default",
                        "nsa batched/2 default", "nsa packed/2 unaligned default"}
  q, k, v = bench_kernels.random_qkv(256, 2)
  q = q[:, :, :4].astype(jnp.float32)
  k, v = k.astype(jnp.float32), v.astype(jnp.float32)
  packed = parts["nsa packed/2"][0](q, k, v, None)
  batched = parts["nsa batched/2"][0](q, k, v, None).reshape(packed.shape)
  np.testing.assert_allclose(packed, batched, atol=2e-5, rtol=2e-5)
  segment_ids = jnp.repeat(jnp.arange(2), 128)[None]
  np.testing.assert_allclose(
      parts["dense/2"][0](q, k, v, None).reshape(packed.shape),
      nsa_jax.dense_causal_attention(q, k, v, segment_ids=segment_ids), atol=2e-5, rtol=2e-5)
  # One token later: the first document one longer, the second one shorter.
  unaligned = parts["nsa packed/2 unaligned default"][0](q, k, v, None)
  alone = lambda start, end: nsa_jax.nsa_attention(q[:, start:end], k[:, start:end],
                                                   v[:, start:end], config=bench_kernels.PAPER,
                                                   implementation="xla")
  np.testing.assert_allclose(unaligned, jnp.concatenate([alone(0, 129), alone(129, 256)], 1),
                             atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match="3 documents do not split T = 256"):
    bench_kernels.packed_parts(256, 3, bench_kernels.PAPER, platform)


def test_bench_kernels_trace_of_a_packed_row_profiles_the_packed_function(monkeypatch, capsys):
  """`--trace T --documents N` profiles NSA on the packed row (here on the XLA path: the CPU's
  profiler events stand in for the GPU's kernels)."""
  platform = types.SimpleNamespace(
      implementation="xla", glue=None, compressed=None, selected=None, dense_name="dense",
      dense=lambda q, k, v: nsa_jax.dense_causal_attention(q, k, v))
  calls = []
  packed_parts = bench_kernels.packed_parts

  def on_xla(t, num_docs, config):
    calls.append((t, num_docs))
    return packed_parts(t, num_docs, config, platform)
  monkeypatch.setattr(bench_kernels, "packed_parts", on_xla)
  monkeypatch.setattr("sys.argv", ["bench_kernels", "--trace", "128", "--documents", "2,8"])
  bench_kernels.main()
  assert calls == [(128, 2)]
  printed = capsys.readouterr().out
  assert "T=128 NSA packed/2 forward:" in printed
  assert "T=128 NSA packed/2 forward+backward:" in printed


def test_bench_kernels_trace_on_trained_indices_profiles_them(monkeypatch, capsys, tmp_path):
  """`--trace T --trained_indices FILE` profiles the three branches on the file's selection (the
  part `nsa trained`; here a stand-in on the XLA path that records the indices it gets)."""
  monkeypatch.setattr(bench_kernels, "HQ", 4)
  config = bench_kernels.PAPER
  t, n = 128, config.num_selected
  saved = np.random.default_rng(0).integers(-1, 2, size=(2, t, 1, n))  # two rows, one KV head
  path = tmp_path / "selection_indices_run.npz"
  np.savez_compressed(path, indices=saved.astype(np.int16), slc_block=config.slc_block)
  seen = []

  def trained_parts(config, platform, nsa_flops, slc_flops):
    def fn(q, k, v, x):
      jax.debug.callback(lambda indices: seen.append(np.asarray(indices)), x["trained_indices"])
      return nsa_jax.dense_causal_attention(q, k, v)
    return {"nsa trained": (fn, nsa_flops, True)}
  monkeypatch.setattr(bench_kernels, "trained_parts", trained_parts)
  monkeypatch.setattr("sys.argv", ["bench_kernels", "--trace", str(t), "--num_kv_heads", "2",
                                   "--trained_indices", str(path)])
  bench_kernels.main()
  printed = capsys.readouterr().out
  assert "T=128 NSA trained forward:" in printed
  assert "T=128 NSA trained forward+backward:" in printed
  assert seen, "the traced function never ran"
  np.testing.assert_array_equal(seen[0], bench_kernels.load_trained_indices(path, t, 2, config))
  monkeypatch.setattr("sys.argv", ["bench_kernels", "--trace", str(t), "--documents", "2",
                                   "--trained_indices", str(path)])
  with pytest.raises(SystemExit):
    bench_kernels.main()

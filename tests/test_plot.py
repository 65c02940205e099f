"""experiments.plot: the figures of two tiny finished runs (NSA and dense)."""

import json

import numpy as np

from experiments import plot
from experiments import train
from tests.test_train import small_config


def test_plots_of_an_nsa_and_a_dense_run(tmp_path):
  # NSA on passkey sequences (T = 128), dense on plain text (T = 64).
  nsa = small_config(seq_len=128)
  nsa.data.source = "passkey"
  train.run(nsa, str(tmp_path / "nsa"))
  train.run(small_config(attention="dense"), str(tmp_path / "dense"))
  written = plot.make_plots([tmp_path / "nsa", tmp_path / "dense"], tmp_path / "plots",
                            lengths=[96, 128], depths=(0.2, 0.8), samples=2)
  assert set(written) == {"loss_curves.png", "passkey_nsa.png", "passkey_dense.png",
                          "selection_nsa.png", "selection_hits_nsa.json",
                          "selection_stats_nsa.json", "selection_indices_nsa.npz"}
  for name, path in written.items():
    if name.endswith(".png"):
      assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  grid = json.loads((tmp_path / "plots" / "passkey_nsa.json").read_text())
  assert grid["lengths"] == [96, 128] and grid["depths"] == [0.2, 0.8]
  accuracy = grid["accuracy"]
  assert len(accuracy) == 2 and all(len(row) == 2 and all(0 <= a <= 1 for a in row)
                                    for row in accuracy)
  # T = 128 has 4 selection blocks of 32, n = 4: every block is selected, so the selection
  # at every answer position holds the needle's digits.
  hits = json.loads((tmp_path / "plots" / "selection_hits_nsa.json").read_text())
  assert hits["fraction_by_layer"] == [1.0] * nsa.model.num_layers
  # Every layer's selection is saved and counted; the first is also the file's `indices`.
  stats = json.loads((tmp_path / "plots" / "selection_stats_nsa.json").read_text())
  saved = np.load(tmp_path / "plots" / "selection_indices_nsa.npz")
  assert saved["indices_by_layer"].shape == (nsa.model.num_layers,) + saved["indices"].shape
  np.testing.assert_array_equal(saved["indices_by_layer"][0], saved["indices"])
  assert len(stats["trained_by_layer"]) == nsa.model.num_layers
  assert stats["trained_by_layer"][0] == stats["trained"]


def test_the_selection_picture_shows_valid_causal_blocks(tmp_path):
  train.run(small_config(), str(tmp_path / "nsa"))
  config, _, model = plot.load_run(tmp_path / "nsa")
  tokens = train.build_data(config).splits["held_out"][:config.seq_len]
  indices = plot.first_layer_selection(model, tokens)
  assert indices.shape == (config.seq_len, config.nsa.num_selected)
  query_block = np.arange(config.seq_len) // config.nsa.slc_block
  assert all(row.max() <= qb for row, qb in zip(indices, query_block))
  assert all(0 in row and qb in row for row, qb in zip(indices, query_block))  # forced blocks


def test_plots_of_an_mqar_run(tmp_path):
  config = small_config(steps=2)
  config.data.source, config.data.mqar_pairs, config.data.other_weight = "mqar", 4, 0.0
  config.model.vocab_size = 64
  train.run(config, str(tmp_path / "nsa"))
  written = plot.make_plots([tmp_path / "nsa"], tmp_path / "plots", lengths=[48, 64],
                            depths=(0.25, 0.75), samples=2)
  assert set(written) == {"loss_curves.png", "mqar_nsa.png", "selection_nsa.png",
                          "selection_hits_nsa.json", "selection_stats_nsa.json",
                          "selection_indices_nsa.npz"}
  grid = json.loads((tmp_path / "plots" / "mqar_nsa.json").read_text())
  assert grid["lengths"] == [48, 64] and len(grid["depth_bins"]) == 2
  assert all(a is None or 0 <= a <= 1 for row in grid["accuracy"] for a in row)
  # T = 64 has 2 selection blocks of 32, n = 4: every block is selected, so every query's
  # selection holds its pair's block.
  hits = json.loads((tmp_path / "plots" / "selection_hits_nsa.json").read_text())
  assert hits["fraction_by_layer"] == [1.0] * config.model.num_layers
  assert len(hits["induction_attention"]) == config.model.num_layers


def test_a_heatmap_cell_with_nothing_measured_reads_n_a_not_zero(tmp_path):
  assert plot.cell_label(np.nan) == "n/a" and plot.cell_label(0.0) == "0.00"
  plot.plot_passkey(np.array([[np.nan, 0.0], [1.0, 0.5]]), [64, 128], ["a", "b"], 64, "t",
                    tmp_path / "grid.png")
  assert (tmp_path / "grid.png").stat().st_size > 0


def test_selection_sharing_counts_distinct_blocks_of_consecutive_positions():
  # One batch row, 4 positions, 1 KV head, n = 2: blocks {0, 1}, {0, 1}, {0, 2}, {3, -1}.
  indices = np.array([[0, 1], [0, 1], [0, 2], [3, -1]]).reshape(1, 4, 1, 2)
  stats = plot.selection_sharing(indices, spans=(1, 2, 4))
  assert stats[1]["mean"] == (2 + 2 + 2 + 1) / 4
  assert stats[2]["mean"] == (2 + 3) / 2  # {0, 1} and {0, 2, 3}
  assert stats[4]["mean"] == 4  # {0, 1, 2, 3}


def test_default_lengths_keep_the_answers_block_phase_of_training():
  # Training inputs of 128 tokens, blocks of 16 / 32 / 64: at every default length the inputs
  # (length - 1) end at the same offset within each block as in training.
  lengths = plot.default_lengths(128)
  assert lengths == [65, 129, 257, 513]
  for block in (16, 32, 64):
    assert all((n - 1) % block == 128 % block for n in lengths)

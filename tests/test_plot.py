"""experiments.plot: the figures of two tiny finished runs (NSA and dense)."""

import json

import numpy as np

from experiments import plot
from experiments import train
from tests.test_train import small_config


def test_plots_of_an_nsa_and_a_dense_run(tmp_path):
  for attention in ("nsa", "dense"):
    train.run(small_config(attention=attention), str(tmp_path / attention))
  written = plot.make_plots([tmp_path / "nsa", tmp_path / "dense"], tmp_path / "plots",
                            lengths=[96, 128], depths=(0.2, 0.8), samples=2)
  assert set(written) == {"loss_curves.png", "passkey_nsa.png", "passkey_dense.png",
                          "selection_nsa.png"}
  for path in written.values():
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  grid = json.loads((tmp_path / "plots" / "passkey_nsa.json").read_text())
  assert grid["lengths"] == [96, 128] and grid["depths"] == [0.2, 0.8]
  accuracy = grid["accuracy"]
  assert len(accuracy) == 2 and all(len(row) == 2 and all(0 <= a <= 1 for a in row)
                                    for row in accuracy)


def test_the_selection_picture_shows_valid_causal_blocks(tmp_path):
  train.run(small_config(), str(tmp_path / "nsa"))
  config, _, model = plot.load_run(tmp_path / "nsa")
  tokens = train.build_data(config).splits["held_out"][:config.seq_len]
  indices = plot.first_layer_selection(model, tokens)
  assert indices.shape == (config.seq_len, config.nsa.num_selected)
  query_block = np.arange(config.seq_len) // config.nsa.slc_block
  assert all(row.max() <= qb for row, qb in zip(indices, query_block))
  assert all(0 in row and qb in row for row, qb in zip(indices, query_block))  # forced blocks

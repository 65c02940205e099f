"""The training entry point: the demo config runs, resume is exact, config errors are clear."""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import data as data_lib
from experiments import plot
from experiments import tasks
from experiments import train
from experiments.configs import demo
from tests.helpers import tensorboard_scalars


def small_config(**overrides):
  config = demo.get_config()
  config.steps, config.log_every, config.eval_every, config.checkpoint_every = 6, 1, 3, 3
  config.batch_size, config.seq_len, config.eval_batches = 2, 64, 1
  config.data.max_bytes = 200_000
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_demo_config_trains_and_writes_metrics(tmp_path, attention):
  records = train.run(small_config(attention=attention), str(tmp_path))
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 6 and losses[-1] < losses[0]
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == records
  assert any("held_out_loss" in r for r in records)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]
  assert (tmp_path / "checkpoints" / "6" / "data_iterator").exists()  # grain iterator state
  assert json.loads((tmp_path / "config.json").read_text())["attention"] == attention
  # The same scalars as TensorBoard events.
  logged = tensorboard_scalars(tmp_path / "tensorboard", "loss")
  assert logged == [(r["step"], pytest.approx(r["loss"])) for r in records if "loss" in r]
  # The command's last words: the final held-out loss and where every output is.
  final = [r for r in records if "held_out_loss" in r][-1]
  text = train.summary(str(tmp_path))
  assert f"step {final['step']}): held_out_loss {final['held_out_loss']:.4g}" in text
  for path in ("metrics.jsonl", "checkpoints", "tensorboard"):
    assert str(tmp_path / path) in text
  assert f"python -m experiments.plot --workdir {tmp_path}" in text


@pytest.mark.parametrize("pack_documents", [False, True])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, pack_documents):
  def config(**overrides):
    config = small_config(**overrides)
    config.data.pack_documents = pack_documents  # packed rows: the data iterator's own state
    return config
  full = train.run(config(), str(tmp_path / "full"))
  first = train.run(config(steps=3), str(tmp_path / "resumed"))
  second = train.run(config(), str(tmp_path / "resumed"))  # resumes from step 3
  drop_speed = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_s"}
                                for r in records]
  assert drop_speed(first + second) == drop_speed(full)


def test_init_from_starts_the_model_from_another_runs_last_checkpoint(tmp_path):
  source = train.run(small_config(), str(tmp_path / "source"))
  # With a zero learning rate the warm-started model is the source's last one: the same
  # held-out loss on the same held-out batches.
  frozen = small_config(steps=1, eval_every=1, init_from=str(tmp_path / "source"))
  frozen.optimizer.peak_learning_rate = 0.0
  records = train.run(frozen, str(tmp_path / "frozen"))
  held_out = lambda records: [r["held_out_loss"] for r in records if "held_out_loss" in r]
  assert held_out(records) == pytest.approx(held_out(source)[-1:], rel=1e-6)
  cold = small_config(steps=1, eval_every=1)
  cold.optimizer.peak_learning_rate = 0.0
  assert held_out(train.run(cold, str(tmp_path / "cold"))) != pytest.approx(held_out(records))
  # (A next stage at another length: `test_a_curriculum_trains_its_stages_each_from_the_last`.)
  with pytest.raises(ValueError, match="init_from=.*holds no checkpoint"):
    train.run(small_config(init_from=str(tmp_path / "nowhere")), str(tmp_path / "bad"))


def test_init_from_a_run_of_another_attention_kind_loads_the_shared_parameters(tmp_path):
  """A `window` run starts `nsa_no_selection`: every parameter the window model has is loaded,
  the compression MLPs it lacks keep this model's initialisation."""
  train.run(small_config(attention="window", steps=2), str(tmp_path / "window"))
  target = small_config(attention="nsa_no_selection", steps=1, eval_every=1,
                        init_from=str(tmp_path / "window"))
  target.optimizer.peak_learning_rate = 0.0  # the checkpoint holds the warm-started model
  train.run(target, str(tmp_path / "target"))
  flat = lambda model: {"/".join(map(str, path)): np.asarray(param.get_value())
                        for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  source = flat(plot.load_run(tmp_path / "window")[2])
  started = flat(plot.load_run(tmp_path / "target")[2])
  fresh = flat(train.build_model(target, nnx.Rngs(target.seed)))
  compression = {name for name in started if "_compress" in name}
  assert compression and compression.isdisjoint(source)
  assert set(started) - compression == set(source)
  for name, value in started.items():
    np.testing.assert_array_equal(value, fresh[name] if name in compression else source[name])
  assert not np.array_equal(source["embed/embedding"], fresh["embed/embedding"])
  wider = small_config(attention="nsa_no_selection", init_from=str(tmp_path / "window"))
  wider.model.mlp_hidden *= 2
  with pytest.raises(ValueError, match=r"init_from=.*parameter .*mlp.* has shape"):
    train.run(wider, str(tmp_path / "bad"))


def test_unknown_or_ill_typed_override_fails_before_running(tmp_path):
  for override, message in (("--config.stpes=3", "stpes"), ("--config.steps=many", "steps")):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config", demo.__file__,
         "--workdir", str(tmp_path), override], capture_output=True, text=True, timeout=120,
        cwd=pathlib.Path(__file__).parents[1])
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_config_errors_are_clear(tmp_path):
  with pytest.raises(ValueError, match="data.source must be one of"):
    train.run(small_config(data=dict(source="web", max_bytes=10)), str(tmp_path))
  with pytest.raises(ValueError, match="NSAConfig.slc_block"):
    train.run(small_config(nsa=dict(cmp_block=16, cmp_stride=8, slc_block=12, num_selected=4,
                                    num_initial=1, num_local=1, window=64)), str(tmp_path))


def test_gradient_accumulation_gives_the_same_updates(tmp_path):
  whole = train.run(small_config(batch_size=4), str(tmp_path / "whole"))
  accumulated = train.run(small_config(batch_size=4, grad_accum_steps=2), str(tmp_path / "acc"))
  losses = lambda records: [r["loss"] for r in records if "loss" in r]
  np.testing.assert_allclose(losses(accumulated), losses(whole), rtol=2e-5)
  with pytest.raises(ValueError, match=r"grad_accum_steps \(3\) must be >= 1 and divide"):
    train.run(small_config(batch_size=4, grad_accum_steps=3), str(tmp_path / "bad"))


def test_bfloat16_compute_trains(tmp_path):
  records = train.run(small_config(compute_dtype="bfloat16"), str(tmp_path))
  losses = [r["loss"] for r in records if "loss" in r]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  with pytest.raises(ValueError, match="compute_dtype must be one of"):
    train.run(small_config(compute_dtype="float8"), str(tmp_path / "bad"))


def test_passkey_source_trains_and_reports_retrieval_accuracy(tmp_path):
  config = small_config(seq_len=96)
  config.data.source = "passkey"
  records = train.run(config, str(tmp_path))
  accuracies = [r["passkey_accuracy"] for r in records if "passkey_accuracy" in r]
  assert len(accuracies) == 2 and all(0.0 <= a <= 1.0 for a in accuracies)
  assert np.isfinite([r["loss"] for r in records if "loss" in r]).all()
  # What the selection found: T = 96 has 3 blocks of 32 and n = 4, so every answer's selection
  # holds the needle; the sigmoid gates are strictly inside (0, 1).
  evaluations = [r for r in records if "passkey_accuracy" in r]
  assert all(r["selection_hits"] == [1.0] * config.model.num_layers for r in evaluations)
  gates = np.array([r["gates_at_answers"] for r in evaluations])
  assert gates.shape == (2, config.model.num_layers, 3) and np.all((gates > 0) & (gates < 1))
  assert tensorboard_scalars(tmp_path / "tensorboard", "gates_at_answers/1/2") == [
      (r["step"], pytest.approx(r["gates_at_answers"][1][2])) for r in evaluations]


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_mqar_source_trains_and_logs_recall_accuracy(tmp_path, monkeypatch, attention):
  config = small_config(steps=3, attention=attention)
  config.seq_len, config.data.source, config.data.mqar_pairs = 96, "mqar", 4
  config.model.vocab_size, config.data.other_weight = 64, 0.0
  config.data.mqar_ids = 5  # an id-range curriculum's stage
  made = []  # the (placement, ids) of every MQAR row: training, accuracy and probe rows alike
  example = tasks.mqar_example
  monkeypatch.setattr(tasks, "mqar_example", lambda *args: made.append(args[4:]) or example(*args))
  records = train.run(config, str(tmp_path))
  assert len(made) > 2 * config.batch_size and set(made) == {("uniform", 5)}
  evaluations = [r for r in records if "mqar_accuracy" in r]
  assert evaluations and all(0.0 <= r[name] <= 1.0 for r in evaluations
                             for name in ("mqar_accuracy", "mqar_first_accuracy"))
  assert "mqar_first_accuracy" in train.summary(str(tmp_path))
  # The induction circuit's attention, per layer, for every attention kind.
  for name in ("induction_attention", "previous_token_attention"):
    assert all(len(r[name]) == config.model.num_layers and all(0 < a <= 1 for a in r[name])
               for r in evaluations)
  for name in ("selection_hits", "selected_induction_attention", "compressed_target_attention"):
    assert (name in evaluations[0]) == (attention == "nsa")


@pytest.mark.parametrize("other_weight", [0.0, 0.25])
def test_task_loss_weighs_the_answers(other_weight):
  """The loss is the weighted mean cross-entropy: with `other_weight = 0`, the mean over the
  answers alone."""
  config = small_config()
  config.seq_len, config.data.source, config.data.mqar_pairs = 48, "mqar", 3
  config.model.vocab_size, config.data.other_weight = 64, other_weight
  batches = train.build_data(config)
  tokens = jnp.asarray(batches.batch("train", 1))
  answers = np.flatnonzero(batches.loss_weights == 1.0)
  np.testing.assert_array_equal(answers, tasks.mqar_answer_targets(49, 3))
  assert np.all(np.delete(batches.loss_weights, answers) == other_weight)
  model = train.build_model(config, nnx.Rngs(0))
  losses = optax.softmax_cross_entropy_with_integer_labels(model(tokens[:, :-1]), tokens[:, 1:])
  w = jnp.asarray(batches.loss_weights)
  expected = jnp.sum(losses * w) / (losses.shape[0] * jnp.sum(w))
  if other_weight == 0.0:
    expected = jnp.mean(losses[:, answers])
  np.testing.assert_allclose(train.loss_fn(model, tokens, w), expected, rtol=1e-6)


def test_passkey_digits_sets_the_key_and_its_answers():
  config = small_config(seq_len=160)
  config.data.update(dict(source="passkey", passkey_digits=32, other_weight=0.0))
  batches = train.build_data(config)
  tokens = batches.batch("train", 1)
  answers = np.flatnonzero(batches.loss_weights)
  np.testing.assert_array_equal(answers, np.arange(160 - 32, 160))
  for row in tokens:  # the weighted targets tokens[1:] are the needle's 32-digit key
    text = row.astype(np.uint8).tobytes()
    start = text.index(b"pass key is ") + len(b"pass key is ")
    assert row[1:][answers].astype(np.uint8).tobytes() == text[start:start + 32]
  config.seq_len = 120  # needle and question take 81 + 2 * 27 bytes
  with pytest.raises(ValueError, match="shorter than the needle and question"):
    train.build_data(config)


def test_shifted_passkey_rows_put_the_loss_on_each_rows_answers(tmp_path):
  """With `passkey_max_shift` the answers sit at a different place in every row: the loss is
  the mean over each row's own answers, in one batch or in micro-batches."""
  config = small_config(steps=2, seq_len=160, batch_size=4, grad_accum_steps=2)
  config.data.update(dict(source="passkey", other_weight=0.0, passkey_max_shift=40))
  batches = train.build_data(config)
  tokens, weights = batches.batch("train", 1), batches.weights("train", 1)
  shifts = batches.shifts("train", 1)
  assert len(set(shifts)) > 1
  model = train.build_model(config, nnx.Rngs(0))
  losses = optax.softmax_cross_entropy_with_integer_labels(
      model(jnp.asarray(tokens[:, :-1])), jnp.asarray(tokens[:, 1:]))
  expected = np.mean([losses[i, 160 - s - 5:160 - s] for i, s in enumerate(shifts)])
  np.testing.assert_allclose(train.loss_fn(model, jnp.asarray(tokens), jnp.asarray(weights)),
                             expected, rtol=1e-5)
  optimizer = nnx.Optimizer(model, train.build_optimizer(config)[0], wrt=nnx.Param)
  loss = train.train_step(model, optimizer, jnp.asarray(tokens), jnp.asarray(weights),
                          accum_steps=2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  records = train.run(config, str(tmp_path))
  assert np.isfinite([r["loss"] for r in records if "loss" in r]).all()


@pytest.mark.parametrize("attention", ["nsa_no_selection", "window"])
def test_ablations_train(tmp_path, attention):
  config = small_config(attention=attention, steps=3, seq_len=96)
  config.data.source = "passkey"
  records = train.run(config, str(tmp_path))
  assert np.isfinite([r["loss"] for r in records if "loss" in r]).all()
  # Their gates at the answers are logged; they have no selection to report.
  evaluation = [r for r in records if "passkey_accuracy" in r][-1]
  assert np.array(evaluation["gates_at_answers"]).shape == (config.model.num_layers, 3)
  assert "selection_hits" not in evaluation


def test_users_text_and_token_files_are_data_sources(tmp_path):
  (tmp_path / "corpus").mkdir()
  for i in range(2):
    (tmp_path / "corpus" / f"part{i}.txt").write_bytes(bytes(range(256)) * 400)
  text = small_config()
  text.data.source, text.data.path = "text", str(tmp_path / "corpus" / "*.txt")
  batches = train.build_data(text)
  assert batches.batch("train", 1).shape == (2, 65)

  ids = np.arange(100_000) % 256
  np.save(tmp_path / "ids.npy", ids.astype(np.int32))
  ids.astype(np.uint16).tofile(tmp_path / "ids.bin")
  for name in ("ids.npy", "ids.bin"):
    tokens = small_config(steps=2)
    tokens.data.source, tokens.data.path = "tokens", str(tmp_path / name)
    batch = train.build_data(tokens).batch("train", 1)
    assert batch.dtype == np.int32 and np.all(np.diff(batch, axis=1) % 256 == 1)  # consecutive
    assert train.run(tokens, str(tmp_path / name.replace(".", "_")))[-1]["step"] == 2

  np.save(tmp_path / "big.npy", np.array([0, 300, 5] * 1000, np.int32))
  bad = small_config()
  bad.data.source, bad.data.path = "tokens", str(tmp_path / "big.npy")
  with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 256\)"):
    train.build_data(bad)
  bad.data.path = str(tmp_path / "nothing*.npy")
  with pytest.raises(FileNotFoundError, match="matches no file"):
    train.build_data(bad)
  bad.data.source, bad.data.path = "text", ""
  with pytest.raises(ValueError, match="data.path"):
    train.build_data(bad)


def test_packed_documents_keep_attention_and_loss_inside_each_file(tmp_path):
  (tmp_path / "corpus").mkdir()
  lengths = [30, 5, 1, 70, 44] * 20  # short files, so that windows cross file boundaries
  for i, n in enumerate(lengths):
    (tmp_path / "corpus" / f"{i:03d}.txt").write_bytes(bytes([97 + i % 26]) * n)
  config = small_config(steps=4, seq_len=48)
  config.data.source, config.data.path = "text", str(tmp_path / "corpus" / "*.txt")
  config.data.pack_documents = True
  batches = train.build_data(config)
  batch = batches.batch("train", 3)
  assert batch.shape == (2, 2, 49)
  tokens, ids = batch[:, 0], batch[:, 1]
  # Every file holds one byte value: the document ids change exactly where the bytes do.
  np.testing.assert_array_equal(np.diff(ids, axis=1) != 0, np.diff(tokens, axis=1) != 0)
  assert (np.diff(ids, axis=1) != 0).any()
  # The loss is the mean, over targets in the same document as their input, of the model run
  # on each document alone.
  model = train.build_model(config, nnx.Rngs(0))
  weights = jnp.asarray(batches.loss_weights)
  losses = []
  for row_tokens, row_ids in zip(tokens, ids):
    for doc in np.unique(row_ids):
      doc_tokens = row_tokens[row_ids == doc]
      if len(doc_tokens) > 1:
        logits = model(jnp.asarray(doc_tokens[None, :-1]))
        losses += list(optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.asarray(doc_tokens[None, 1:]))[0])
  assert float(train.loss_fn(model, jnp.asarray(batch), weights)) == pytest.approx(
      np.mean(losses), rel=1e-5)
  records = train.run(config, str(tmp_path / "run"))
  assert records[-1]["step"] == 4 and np.isfinite([r["loss"] for r in records if "loss" in r]).all()
  config.data.source = "mqar"
  with pytest.raises(ValueError, match="data.pack_documents packs the files"):
    train.build_data(config)


def test_aligned_documents_pad_each_run_of_ids_to_a_multiple():
  text, ids, padding = data_lib.aligned_documents(
      np.array([1, 2, 3, 4, 5, 6, 7, 8, 9], np.uint8), np.array([3, 3, 3, 5, 5, 5, 5, 3, 3]), 4)
  pad = data_lib.PAD_BYTE
  np.testing.assert_array_equal(text, [1, 2, 3, pad, 4, 5, 6, 7, 8, 9, pad, pad])
  np.testing.assert_array_equal(ids, [3] * 4 + [5] * 4 + [3] * 4)  # runs, not values
  np.testing.assert_array_equal(padding, text == pad)
  with pytest.raises(ValueError, match="align must be >= 1"):
    data_lib.aligned_documents(text, ids, 0)


def test_aligned_packed_documents_start_on_multiples_and_their_padding_has_no_loss(tmp_path):
  (tmp_path / "corpus").mkdir()
  lengths = [30, 5, 1, 70, 44, 16] * 20
  for i, n in enumerate(lengths):
    (tmp_path / "corpus" / f"{i:03d}.txt").write_bytes(bytes([97 + i % 26]) * n)
  config = small_config(steps=3, seq_len=48)
  config.data.source, config.data.path = "text", str(tmp_path / "corpus" / "*.txt")
  config.data.pack_documents, config.data.pack_align = True, 16
  batches = train.build_data(config)
  model = train.build_model(config, nnx.Rngs(0))
  for split, step in (("train", 1), ("train", 2), ("held_out", 1)):
    batch, weights = batches.batch(split, step), batches.weights(split, step)
    tokens, ids = batch[:, 0], batch[:, 1]
    starts = np.flatnonzero((np.diff(ids, axis=1) != 0).ravel()) % (ids.shape[1] - 1) + 1
    assert len(starts) and np.all(starts % 16 == 0), starts
    np.testing.assert_array_equal(weights, tokens[:, 1:] != data_lib.PAD_BYTE)
  # The held-out batch's loss is that of each document's own bytes run alone, padding and all
  # else unseen (one batch: each document length compiles the model once more).
  batch, weights = batches.batch("held_out", 1), batches.weights("held_out", 1)
  tokens, ids = batch[:, 0], batch[:, 1]
  losses = []
  for row_tokens, row_ids in zip(tokens, ids):
    for doc in np.unique(row_ids):
      doc_tokens = row_tokens[(row_ids == doc) & (row_tokens != data_lib.PAD_BYTE)]
      if len(doc_tokens) > 1:
        logits = model(jnp.asarray(doc_tokens[None, :-1]))
        losses += list(optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.asarray(doc_tokens[None, 1:]))[0])
  assert float(train.loss_fn(model, jnp.asarray(batch), jnp.asarray(weights))) == (
      pytest.approx(np.mean(losses), rel=1e-5))
  config.data.pack_documents = False
  with pytest.raises(ValueError, match="data.pack_align"):
    train.build_data(config)


def test_a_curriculum_trains_its_stages_each_from_the_last(tmp_path):
  from experiments import curriculum
  stages = curriculum.parse_stages("64:2:3:8, 128:2:2:data.other_weight=0.25:log_every=2")
  assert stages == [curriculum.Stage(64, 2, 3, 8),
                    curriculum.Stage(128, 2, 2, None, (("data.other_weight", "0.25"),
                                                       ("log_every", "2")))]
  window = small_config().nsa.window
  records = curriculum.run(small_config(), stages, tmp_path)
  assert [sum("loss" in r for r in stage) for stage in records] == [3, 1]  # log_every=2
  first, second = (json.loads((tmp_path / name / "config.json").read_text())
                   for name in ("t64", "t128"))
  assert (first["seq_len"], first["steps"], first["init_from"]) == (64, 3, "")
  assert (second["seq_len"], second["steps"], second["eval_every"]) == (128, 2, 2)
  assert second["init_from"] == str(tmp_path / "t64")
  assert (first["nsa"]["window"], second["nsa"]["window"]) == (8, window)  # a stage's own window
  # A stage's overrides, typed as the field, for that stage only.
  assert (first["data"]["other_weight"], second["data"]["other_weight"]) == (1.0, 0.25)
  assert (first["log_every"], second["log_every"]) == (1, 2)
  assert curriculum.run(small_config(), stages, tmp_path) == [[], []]  # finished: nothing to do
  for bad in ("128:2", "128:2:2:16:1", "128:2:2:0", "128:2:log_every=2:2"):
    with pytest.raises(ValueError, match=f"seq_len:batch_size:steps.* got '{bad}'"):
      curriculum.parse_stages(f"64:2:3,{bad}")
  # A second stage at the same length (e.g. a fine-tune with other data) gets its own workdir.
  repeated = curriculum.stage_configs(small_config(), curriculum.parse_stages(
      "64:2:3,128:2:2,64:2:1:data.other_weight=0.5,64:2:1"), tmp_path)
  assert [d.name for _, d in repeated] == ["t64", "t128", "t64_2", "t64_3"]
  assert repeated[3][0].init_from == str(tmp_path / "t64_2")
  for bad, message in (("nsa.windw=8", "no config field 'nsa.windw'"),
                       ("steps=x", "steps is int, got 'x'"),
                       ("data.pack_documents=maybe", "data.pack_documents is a boolean")):
    with pytest.raises(ValueError, match=message):
      curriculum.stage_configs(small_config(), curriculum.parse_stages(f"64:2:3:{bad}"), tmp_path)

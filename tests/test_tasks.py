"""The passkey task: the needle sits where asked, the answer is the needle's key, and the accuracy
metric tells a model that retrieves from one that does not."""

import numpy as np
import pytest

from experiments import tasks

FILLER = np.frombuffer(b"lorem ipsum dolor sit amet " * 400, np.uint8)


@pytest.mark.parametrize("digits", [tasks.DIGITS, 32])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_at_depth_and_answer_is_its_key(depth, digits):
  tokens, key = tasks.passkey_example(np.random.default_rng(1), FILLER, 300, depth, digits)
  assert tokens.shape == (300,) and tokens.dtype == np.int32
  text = tokens.astype(np.uint8).tobytes()
  needle = tasks.NEEDLE.replace(b"{key}", key)
  position = text.index(needle)
  filler_len = 300 - len(needle) - len(tasks.QUESTION.replace(b"{key}", key))
  assert position == round(depth * filler_len)
  assert text.endswith(key) and len(key) == digits and key.isdigit()
  start = tasks.passkey_key_start(300, depth, digits)
  assert text[start:start + digits] == key
  # The answers are the targets (tokens[1:]) that are the question's key digits.
  answers = tasks.passkey_answer_targets(300, digits)
  assert tokens[1:][answers].astype(np.uint8).tobytes() == key


def test_a_key_without_digits_is_rejected():
  with pytest.raises(ValueError, match="digits"):
    tasks.passkey_example(np.random.default_rng(0), FILLER, 300, 0.5, 0)


def test_too_short_a_sequence_is_rejected():
  with pytest.raises(ValueError, match="shorter than the needle and question"):
    tasks.passkey_example(np.random.default_rng(0), FILLER, 40, 0.5)


@pytest.mark.parametrize("digits", [tasks.DIGITS, 24])
def test_accuracy_of_a_retrieving_and_a_guessing_model(digits):
  def oracle(tokens):  # reads the key from the needle: perfect retrieval
    logits = np.zeros(tokens.shape + (256,))
    for b, row in enumerate(tokens):
      text = row.astype(np.uint8).tobytes()
      start = text.index(b"pass key is ") + len(b"pass key is ")
      key = text[start:start + digits]
      for i in range(digits):
        logits[b, len(row) - digits + i, key[i]] = 1.0  # predicts token len - digits + 1 + i
    return logits

  def guesser(tokens):
    return np.zeros(tokens.shape + (256,))  # always byte 0

  grid = dict(lengths=[200, 300], depths=[0.1, 0.9], samples=4)
  assert set(tasks.passkey_accuracy(oracle, FILLER, **grid, digits=digits).values()) == {1.0}
  assert set(tasks.passkey_accuracy(guesser, FILLER, **grid, digits=digits).values()) == {0.0}


VOCAB = 64


@pytest.mark.parametrize("placement", ["uniform", "start", "cluster"])
def test_mqar_sequence_asks_back_its_pairs_and_answers_are_their_values(placement):
  tokens, pair_positions = tasks.mqar_example(np.random.default_rng(3), 200, 6, VOCAB, placement)
  assert tokens.shape == (200,) and tokens.dtype == np.int32
  (f0, f1), (k0, k1), (v0, v1) = tasks.mqar_vocab(VOCAB)
  context, queries = tokens[:200 - 12], tokens[200 - 12:]
  assert np.all((queries[0::2] >= k0) & (queries[0::2] < k1))
  assert np.all((queries[1::2] >= v0) & (queries[1::2] < v1))
  # Each queried key sits once in the context, its value right after it.
  np.testing.assert_array_equal(context[pair_positions], queries[0::2])
  np.testing.assert_array_equal(context[pair_positions + 1], queries[1::2])
  key_positions = np.flatnonzero((context >= k0) & (context < k1))
  assert len(key_positions) == 6 and set(pair_positions.tolist()) <= set(key_positions.tolist())
  assert np.all((context[key_positions + 1] >= v0) & (context[key_positions + 1] < v1))
  others = np.delete(context, np.concatenate([key_positions, key_positions + 1]))
  assert np.all((others >= f0) & (others < f1))  # the rest is filler
  # The answers are the queries' values, as targets tokens[1:].
  targets = tasks.mqar_answer_targets(200, 6)
  np.testing.assert_array_equal(tokens[1:][targets], queries[1::2])
  if placement == "start":
    assert set(pair_positions.tolist()) <= set(range(0, 12, 2))
  if placement == "cluster":  # the 6 pairs one after another: 12 tokens
    np.testing.assert_array_equal(np.diff(key_positions), 2)


def test_clustered_mqar_pairs_sit_anywhere_in_the_context():
  rng = np.random.default_rng(1)
  firsts = [tasks.mqar_example(rng, 1000, 4, VOCAB, "cluster")[1].min() for _ in range(200)]
  # The cluster (8 tokens) starts anywhere in [0, 984] of the 992 context tokens.
  assert min(firsts) < 100 and max(firsts) > 880 and 350 < np.mean(firsts) < 640


def test_mqar_queries_are_drawn_with_replacement():
  """Keys asked back at random, repeats allowed: the last query's answer cannot be found by
  elimination (the values not yet asked)."""
  rng = np.random.default_rng(0)
  asked = [len(set(tasks.mqar_example(rng, 64, 4, VOCAB)[1].tolist())) for _ in range(200)]
  assert min(asked) >= 1 and max(asked) <= 4
  # 4 draws from 4 pairs: all distinct with probability 4! / 4^4 = 0.09.
  assert 0.03 < np.mean(np.array(asked) == 4) < 0.2


def test_uniform_mqar_placement_spreads_the_pairs_over_the_context():
  rng = np.random.default_rng(0)
  positions = np.concatenate([tasks.mqar_example(rng, 1000, 4, VOCAB)[1] for _ in range(200)])
  assert positions.min() < 100 and positions.max() > 880  # near both ends of 992 context tokens
  assert 350 < positions.mean() < 640


def test_mqar_accuracy_of_a_recalling_and_a_guessing_model():
  def oracle(tokens):  # looks each key up in the context: the logits at a key predict its value
    logits = np.zeros(tokens.shape + (VOCAB,))
    (_, _), (k0, k1), _ = tasks.mqar_vocab(VOCAB)
    for b, row in enumerate(tokens):
      value_of = {}
      for p, token in enumerate(row):
        if k0 <= token < k1:
          if token not in value_of:  # its first occurrence, in the context
            value_of[token] = row[p + 1]
          logits[b, p, value_of[token]] = 1
    return logits

  assert tasks.mqar_accuracy(oracle, 300, 8, VOCAB, samples=3) == 1.0
  assert tasks.mqar_accuracy(lambda t: np.zeros(t.shape + (VOCAB,)), 300, 8, VOCAB,
                             samples=3) == 0.0
  assert tasks.mqar_accuracies(oracle, 300, 8, VOCAB, samples=3) == dict(
      mqar_accuracy=1.0, mqar_first_accuracy=1.0)


def test_mqar_first_accuracy_does_not_count_answers_copied_from_earlier_queries():
  def repeat_copier(tokens):  # answers a query only if its key was asked before, from that query
    logits = np.zeros(tokens.shape + (VOCAB,))
    query_start = tokens.shape[1] + 1 - 2 * 8
    for b, row in enumerate(tokens):
      for p in range(query_start, tokens.shape[1], 2):
        earlier = [q for q in range(query_start, p, 2) if row[q] == row[p]]
        if earlier:
          logits[b, p, row[earlier[0] + 1]] = 1
    return logits

  scores = tasks.mqar_accuracies(repeat_copier, 300, 8, VOCAB, samples=8)
  # 8 draws of 8 keys: about (7/8)^8 = 34% of the queries repeat an earlier one.
  assert 0.15 < scores["mqar_accuracy"] < 0.55 and scores["mqar_first_accuracy"] == 0.0


def test_mqar_ids_draw_keys_and_values_from_the_first_ids_of_their_ranges():
  """An id-range curriculum's early stage: the pairs use only 3 key and 3 value ids, all of
  them over enough rows; 0 means every id of the ranges."""
  assert tasks.mqar_vocab(VOCAB, 3) == ((0, 32), (32, 35), (48, 51))
  assert tasks.mqar_vocab(VOCAB, 0) == tasks.mqar_vocab(VOCAB) == ((0, 32), (32, 48), (48, 64))
  rows = tasks.mqar_batch(np.random.default_rng(4), 50, 40, 3, VOCAB, "uniform", ids=3)
  pairs = np.concatenate([rows[:, -6::2], rows[:, -5::2]], axis=1)
  assert set(np.unique(pairs).tolist()) == {32, 33, 34, 48, 49, 50}
  context = rows[:, :-6]
  assert np.all((context < 32) | np.isin(context, [32, 33, 34, 48, 49, 50]))
  wide = tasks.mqar_batch(np.random.default_rng(4), 50, 40, 3, VOCAB, "uniform")
  assert np.unique(wide[:, -6::2]).size > 10  # the default draws from all 16 keys


@pytest.mark.parametrize("args,match", [
    ((60, 16, VOCAB), "shorter than 16 pairs asked back"),
    ((200, 17, VOCAB), "exceeds the 16 key ids"),
    ((200, 2, 8), "at least 16"),
    ((200, 4, VOCAB, "uniform", 3), r"exceeds the 3 key ids of vocab_size 64 \(ids 3\)"),
    ((200, 2, VOCAB, "uniform", 17), r"ids \(17\) must be in \[0, 16\]"),
    ((200, 2, VOCAB, "uniform", -1), r"ids \(-1\) must be in"),
])
def test_bad_mqar_arguments_are_rejected(args, match):
  with pytest.raises(ValueError, match=match):
    tasks.mqar_example(np.random.default_rng(0), *args)


def test_passkey_answers_are_the_key_digits():
  tokens, key = tasks.passkey_example(np.random.default_rng(2), FILLER, 300, 0.4)
  assert tokens[1:][tasks.passkey_answer_targets(300)].astype(np.uint8).tobytes() == key


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_key_start_is_where_the_needle_holds_the_key(depth):
  tokens, key = tasks.passkey_example(np.random.default_rng(3), FILLER, 200, depth)
  start = tasks.passkey_key_start(200, depth)
  assert tokens[start:start + tasks.DIGITS].astype(np.uint8).tobytes() == key
  assert tokens[start - 7:start].astype(np.uint8).tobytes() == b"key is "


def key_distance(tokens, digits=tasks.DIGITS):
  """Positions from the needle's last key digit to the query of the first answer digit."""
  start = tokens.astype(np.uint8).tobytes().index(b"key is ") + 7
  return len(tokens) - 1 - digits - (start + digits - 1)


@pytest.mark.parametrize("min_distance", [64, 250])
def test_passkey_needles_keep_a_minimum_distance_from_the_answer(min_distance):
  seq_len = 300
  tokens = tasks.passkey_batch(np.random.default_rng(min_distance), FILLER, 64, seq_len,
                               min_distance=min_distance)
  distances = [key_distance(row) for row in tokens]
  assert min(distances) >= min_distance
  # The bound is tight: the deepest needle allowed is exactly that far back.
  deepest = tasks.passkey_max_depth(seq_len, min_distance)
  assert tasks.passkey_key_start(seq_len, deepest) + tasks.DIGITS - 1 == (
      seq_len - 1 - tasks.DIGITS - min_distance)
  # No constraint: 0, or a distance that the needle's tail and the question keep anyway (54).
  assert tasks.passkey_max_depth(seq_len, 0) == tasks.passkey_max_depth(seq_len, 30) == 1.0
  with pytest.raises(ValueError, match="min_distance: no needle in 300 bytes ends 280"):
    tasks.passkey_max_depth(seq_len, 280)


def test_shifted_rows_end_their_question_before_the_end():
  seq_len, shifts = 300, np.array([0, 1, 17, 63, 5])
  tokens = tasks.passkey_batch(np.random.default_rng(3), FILLER, 5, seq_len, min_distance=100,
                               shifts=shifts)
  assert tokens.shape == (5, seq_len)
  for row, shift in zip(tokens, shifts):
    length = seq_len - shift  # the row up to its question's end is a passkey sequence
    text = row[:length].astype(np.uint8).tobytes()
    key = text[-tasks.DIGITS:]
    assert text.endswith(b"The pass key is " + key) and key.isdigit()
    assert text.count(b"The pass key is " + key + b". Remember it.") == 1
    assert row[1:][tasks.passkey_answer_targets(length)].astype(np.uint8).tobytes() == key
    assert key_distance(row[:length]) >= 100
  # No shifts: the same rows as before shifts existed, from the same generator.
  np.testing.assert_array_equal(
      tasks.passkey_batch(np.random.default_rng(3), FILLER, 4, seq_len),
      tasks.passkey_batch(np.random.default_rng(3), FILLER, 4, seq_len, shifts=np.zeros(4, int)))
  with pytest.raises(ValueError, match=r"shifts must be 4 non-negative ints, got shape \(3,\)"):
    tasks.passkey_batch(np.random.default_rng(3), FILLER, 4, seq_len, shifts=[0, 1, 2])


def test_passkey_batches_weigh_each_rows_answers_when_shifted():
  from experiments import data
  batches = data.PasskeyBatches(FILLER, 64, 299, 7, other_weight=0.0, max_shift=63)
  for split in ("train", "held_out"):
    tokens, weights = batches.batch(split, 2), batches.weights(split, 2)
    assert weights.shape == (64, 299)
    shifts = batches.shifts(split, 2)
    assert shifts.min() >= 0 and shifts.max() <= 63 and len(set(shifts)) > 10
    for row, row_weights, shift in zip(tokens, weights, shifts):
      answers = np.flatnonzero(row_weights)  # exactly the key's digits in the question
      np.testing.assert_array_equal(answers, np.arange(299 - shift - 5, 299 - shift))
      key = row[1:][answers].astype(np.uint8).tobytes()
      assert row.astype(np.uint8).tobytes().count(b"The pass key is " + key) == 2
  # A pure function of (split, step): a fresh source makes the same rows and weights.
  again = data.PasskeyBatches(FILLER, 64, 299, 7, other_weight=0.0, max_shift=63)
  np.testing.assert_array_equal(again.batch("held_out", 2), tokens)
  np.testing.assert_array_equal(again.weights("held_out", 2), weights)
  unshifted = data.PasskeyBatches(FILLER, 4, 299, 7, other_weight=0.0)
  np.testing.assert_array_equal(unshifted.weights("train", 1),
                                np.broadcast_to(unshifted.loss_weights, (4, 299)))
  with pytest.raises(ValueError, match=r"max_shift must be in \[0, seq_len = 299\), got 299"):
    data.PasskeyBatches(FILLER, 4, 299, 7, max_shift=299)
  with pytest.raises(ValueError, match="shorter than the needle and question"):
    data.PasskeyBatches(FILLER, 4, 299, 7, max_shift=250)


def test_passkey_batches_keep_the_distance_in_training_only():
  from experiments import data
  batches = data.PasskeyBatches(FILLER, 64, 299, 0, min_distance=200)
  assert min(key_distance(row) for row in batches.batch("train", 1)) >= 200
  assert min(key_distance(row) for row in batches.batch("held_out", 1)) < 200


def test_mqar_accuracy_by_depth_bins_the_queried_pairs():
  """A model that recalls only pairs in the first half of the context scores 1 on the first
  depth bin and 0 on the last."""
  (_, _), (k0, k1), _ = tasks.mqar_vocab(VOCAB)

  def first_half_oracle(tokens):
    logits = np.zeros(tokens.shape + (VOCAB,))
    half = (tokens.shape[1] + 1 - 2 * 4) // 2
    for b, row in enumerate(tokens):
      value_of = {row[p]: row[p + 1] for p in range(half) if k0 <= row[p] < k1}
      for p in range(tokens.shape[1] + 1 - 2 * 4, tokens.shape[1]):
        if row[p] in value_of:
          logits[b, p, value_of[row[p]]] = 1
    return logits

  grid = tasks.mqar_accuracy_by_depth(first_half_oracle, [200, 400], 4, VOCAB, num_bins=4,
                                      samples=8)
  assert grid.shape == (2, 4)
  np.testing.assert_array_equal(grid[:, 0], 1.0)
  np.testing.assert_array_equal(grid[:, 3], 0.0)

"""The passkey task: the needle sits where asked, the answer is the needle's key, and the accuracy
metric tells a model that retrieves from one that does not."""

import numpy as np
import pytest

from experiments import tasks

FILLER = np.frombuffer(b"lorem ipsum dolor sit amet " * 400, np.uint8)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_at_depth_and_answer_is_its_key(depth):
  tokens, key = tasks.passkey_example(np.random.default_rng(1), FILLER, 300, depth)
  assert tokens.shape == (300,) and tokens.dtype == np.int32
  text = tokens.astype(np.uint8).tobytes()
  needle = tasks.NEEDLE.replace(b"{key}", key)
  position = text.index(needle)
  filler_len = 300 - len(needle) - len(tasks.QUESTION.replace(b"{key}", key))
  assert position == round(depth * filler_len)
  assert text.endswith(key) and len(key) == tasks.DIGITS and key.isdigit()


def test_too_short_a_sequence_is_rejected():
  with pytest.raises(ValueError, match="shorter than the needle and question"):
    tasks.passkey_example(np.random.default_rng(0), FILLER, 40, 0.5)


def test_accuracy_of_a_retrieving_and_a_guessing_model():
  def oracle(tokens):  # reads the key from the needle: perfect retrieval
    logits = np.zeros(tokens.shape + (256,))
    for b, row in enumerate(tokens):
      text = row.astype(np.uint8).tobytes()
      start = text.index(b"pass key is ") + len(b"pass key is ")
      key = text[start:start + tasks.DIGITS]
      for i in range(tasks.DIGITS):
        logits[b, len(row) - tasks.DIGITS + i, key[i]] = 1.0  # predicts token len - DIGITS + 1 + i
    return logits

  def guesser(tokens):
    return np.zeros(tokens.shape + (256,))  # always byte 0

  grid = dict(lengths=[200, 300], depths=[0.1, 0.9], samples=4)
  assert set(tasks.passkey_accuracy(oracle, FILLER, **grid).values()) == {1.0}
  assert set(tasks.passkey_accuracy(guesser, FILLER, **grid).values()) == {0.0}


def test_mqar_sequence_asks_back_every_pair_and_answers_point_at_the_values():
  tokens, answers = tasks.mqar_example(np.random.default_rng(3), FILLER, 200, 6)
  assert tokens.shape == (200,) and tokens.dtype == np.int32
  text = tokens.astype(np.uint8).tobytes()
  pairs = dict(item.split(b"=") for item in text[:6 * 6].split())
  assert len(pairs) == 6 and all(len(k) == 2 and len(v) == 2 for k, v in pairs.items())
  queries = text[-6 * 6:].split()
  assert sorted(queries) == sorted(k + b"=" + v for k, v in pairs.items())
  for q, query in enumerate(queries):  # answers are the value bytes of the queries, in order
    assert tokens[answers[2 * q:2 * q + 2]].astype(np.uint8).tobytes() == pairs[query[:2]]


def test_mqar_accuracy_of_a_recalling_and_a_guessing_model():
  def oracle(tokens):  # looks each queried key up among the pairs at the start
    logits = np.zeros(tokens.shape + (256,))
    for b, row in enumerate(tokens):
      text = row.astype(np.uint8).tobytes()
      pairs = dict(item.split(b"=") for item in text[:8 * 6].split())
      for p in range(len(text) - 8 * 6, len(text)):  # logits at p predict byte p + 1
        if text[p:p + 1] == b"=" and text[p - 3:p - 2] == b" ":  # " ab=": first digit next
          logits[b, p, pairs[text[p - 2:p]][0]] = 1
        if text[p - 1:p] == b"=" and text[p - 4:p - 3] == b" ":  # " ab=4": second digit next
          logits[b, p, pairs[text[p - 3:p - 1]][1]] = 1
    return logits

  assert tasks.mqar_accuracy(oracle, FILLER, 300, 8, samples=3) == 1.0
  assert tasks.mqar_accuracy(lambda t: np.zeros(t.shape + (256,)), FILLER, 300, 8,
                             samples=3) == 0.0


def test_too_short_an_mqar_sequence_is_rejected():
  with pytest.raises(ValueError, match="shorter than 8 pairs asked back"):
    tasks.mqar_example(np.random.default_rng(0), FILLER, 60, 8)

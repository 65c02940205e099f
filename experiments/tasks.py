"""Synthetic long-context tasks made in-process: passkey retrieval (the paper's needle test).

A sequence is filler text with a needle "The pass key is 73914. Remember it." at a chosen depth,
ending in the question "What is the pass key? The pass key is 73914": a model that retrieves the
needle predicts the last `DIGITS` bytes. Everything is a pure function of the random generator.
"""

from __future__ import annotations

import numpy as np

DIGITS = 5
NEEDLE = b" The pass key is {key}. Remember it. "
QUESTION = b" What is the pass key? The pass key is {key}"


def passkey_example(rng: np.random.Generator, filler: np.ndarray, seq_len: int, depth: float):
  """One sequence of exactly `seq_len` bytes.

  Args:
    rng: the random generator (key digits, filler window).
    filler: uint8 text to cut the filler from.
    seq_len: tokens in the sequence.
    depth: where the needle goes, 0 (start) to 1 (just before the question).

  Returns:
    `(tokens int32 [seq_len], key bytes)`; the key is the last `DIGITS` tokens.
  """
  key = bytes(b"0123456789"[d] for d in rng.integers(0, 10, DIGITS))
  needle = np.frombuffer(NEEDLE.replace(b"{key}", key), np.uint8)
  question = np.frombuffer(QUESTION.replace(b"{key}", key), np.uint8)
  filler_len = seq_len - len(needle) - len(question)
  if filler_len < 0:
    raise ValueError(f"seq_len ({seq_len}) is shorter than the needle and question "
                     f"({len(needle) + len(question)} bytes)")
  start = rng.integers(0, len(filler) - filler_len)
  text = filler[start:start + filler_len]
  cut = int(round(depth * filler_len))
  tokens = np.concatenate([text[:cut], needle, text[cut:], question]).astype(np.int32)
  return tokens, key


def passkey_batch(rng, filler, batch_size: int, seq_len: int):
  """int32 `[batch_size, seq_len]`, needles at uniformly random depths."""
  return np.stack([passkey_example(rng, filler, seq_len, rng.uniform())[0]
                   for _ in range(batch_size)])


def passkey_accuracy(logits_fn, filler, lengths, depths, samples: int, seed: int = 0):
  """Fraction of sequences whose `DIGITS` key bytes are all predicted (greedy, given the prefix).

  Args:
    logits_fn: `tokens int32 [B, T] -> logits [B, T, vocab]`, causal.
    filler: uint8 text for the filler.
    lengths, depths: the grid of sequence lengths and needle depths.
    samples: sequences per grid point.

  Returns:
    `{(length, depth): accuracy}`.
  """
  results = {}
  for length in lengths:
    for depth in depths:
      rng = np.random.default_rng([seed, length, int(depth * 1000)])
      tokens = np.stack([passkey_example(rng, filler, length, depth)[0] for _ in range(samples)])
      predictions = np.asarray(logits_fn(tokens[:, :-1])).argmax(-1)[:, -DIGITS:]
      results[(length, depth)] = float(np.mean(np.all(predictions == tokens[:, -DIGITS:], 1)))
  return results


# Multi-query associative recall (Zoology's MQAR): key=value pairs, filler, then the same keys
# asked again in another order; a model that recalls predicts every value.
MQAR_KEY_LETTERS = b"abcdefghijklmnopqrstuvwxyz"
MQAR_VALUE_DIGITS = 2


def mqar_example(rng: np.random.Generator, filler: np.ndarray, seq_len: int, num_pairs: int):
  """One sequence of exactly `seq_len` bytes: ` ab=42 xy=07 ...`, filler, then ` xy=07 ab=42`.

  Keys are distinct two-letter strings, values two digits.

  Returns:
    `(tokens int32 [seq_len], answer_positions int [num_pairs * MQAR_VALUE_DIGITS])`: the
    positions of the value bytes of the queries (predicted from the token before each).
  """
  letters = np.frombuffer(MQAR_KEY_LETTERS, np.uint8)
  codes = rng.choice(len(letters) ** 2, num_pairs, replace=False)
  keys = [bytes([letters[c // len(letters)], letters[c % len(letters)]]) for c in codes]
  values = [bytes(b"0123456789"[d] for d in rng.integers(0, 10, MQAR_VALUE_DIGITS))
            for _ in range(num_pairs)]
  pairs = b"".join(b" " + k + b"=" + v for k, v in zip(keys, values))
  order = rng.permutation(num_pairs)
  queries = b"".join(b" " + keys[i] + b"=" + values[i] for i in order)
  filler_len = seq_len - len(pairs) - len(queries)
  if filler_len < 0:
    raise ValueError(f"seq_len ({seq_len}) is shorter than {num_pairs} pairs asked back "
                     f"({len(pairs) + len(queries)} bytes)")
  start = rng.integers(0, len(filler) - filler_len)
  tokens = np.concatenate([np.frombuffer(pairs, np.uint8), filler[start:start + filler_len],
                           np.frombuffer(queries, np.uint8)]).astype(np.int32)
  query_start = seq_len - len(queries)
  item = 4 + MQAR_VALUE_DIGITS  # " ab=" + value
  answers = np.array([query_start + q * item + 4 + d for q in range(num_pairs)
                      for d in range(MQAR_VALUE_DIGITS)])
  return tokens, answers


def mqar_batch(rng, filler, batch_size: int, seq_len: int, num_pairs: int):
  """int32 `[batch_size, seq_len]`."""
  return np.stack([mqar_example(rng, filler, seq_len, num_pairs)[0] for _ in range(batch_size)])


def mqar_accuracy(logits_fn, filler, seq_len: int, num_pairs: int, samples: int, seed: int = 0):
  """Fraction of queried values whose digits are all predicted (greedy, given the prefix)."""
  rng = np.random.default_rng([seed, seq_len, num_pairs])
  examples = [mqar_example(rng, filler, seq_len, num_pairs) for _ in range(samples)]
  tokens = np.stack([t for t, _ in examples])
  predictions = np.asarray(logits_fn(tokens[:, :-1])).argmax(-1)  # [B, T-1]: predicts t + 1
  correct = []
  for row, (_, answers) in enumerate(examples):
    hit = predictions[row, answers - 1] == tokens[row, answers]
    correct += list(hit.reshape(num_pairs, MQAR_VALUE_DIGITS).all(-1))
  return float(np.mean(correct))

"""Synthetic long-context tasks made in-process: passkey retrieval and multi-query associative
recall (MQAR).

- Passkey (the paper's needle test), over bytes: filler text with a needle "The pass key is
  73914. Remember it." at a chosen depth, ending in the question "What is the pass key? The pass
  key is 73914": a model that retrieves the needle predicts the key's last `digits` bytes
  (`DIGITS` = 5 by default; a longer key is meant to be more than a compressed block's summary
  carries: RESULTS.md says what the models learned to read).
- MQAR (Zoology's), over token ids of a vocabulary of a few thousand: key-value pairs spread
  through random filler, then keys of the pairs asked back (`mqar_example`).

Each task names its answers (`passkey_answer_targets`, `mqar_answer_targets`: indices into the
targets `tokens[1:]`), so training can put the loss on them. Everything is a pure function of
the random generator.
"""

from __future__ import annotations

import numpy as np

DIGITS = 5
NEEDLE = b" The pass key is {key}. Remember it. "
QUESTION = b" What is the pass key? The pass key is {key}"


def passkey_example(rng: np.random.Generator, filler: np.ndarray, seq_len: int, depth: float,
                    digits: int = DIGITS):
  """One sequence of exactly `seq_len` bytes.

  Args:
    rng: the random generator (key digits, filler window).
    filler: uint8 text to cut the filler from.
    seq_len: tokens in the sequence.
    depth: where the needle goes, 0 (start) to 1 (just before the question).
    digits: the key's length in decimal digits.

  Returns:
    `(tokens int32 [seq_len], key bytes)`; the key is the last `digits` tokens.
  """
  if digits < 1:
    raise ValueError(f"digits: the key needs at least one digit, got {digits}")
  key = bytes(b"0123456789"[d] for d in rng.integers(0, 10, digits))
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


def _filler_len(seq_len: int, digits: int) -> int:
  """Filler bytes in a `passkey_example` of `seq_len` bytes: all but the needle and question."""
  return seq_len - (len(NEEDLE) + len(QUESTION) - 2 * len(b"{key}") + 2 * digits)


def passkey_key_start(seq_len: int, depth: float, digits: int = DIGITS) -> int:
  """Where `passkey_example(.., seq_len, depth, digits)` puts the needle's first key digit."""
  return int(round(depth * _filler_len(seq_len, digits))) + NEEDLE.index(b"{key}")


def passkey_answer_targets(seq_len: int, digits: int = DIGITS) -> np.ndarray:
  """Indices into the targets `tokens[1:]` of a sequence of `seq_len` bytes that are answers:
  the key's digits in the question, its last `digits` bytes."""
  return np.arange(seq_len - 1 - digits, seq_len - 1)


def passkey_max_depth(seq_len: int, min_distance: int, digits: int = DIGITS) -> float:
  """The deepest needle whose key ends at least `min_distance` positions before the query that
  emits the first answer digit (input position `seq_len - 1 - digits` of a `seq_len`-byte
  sequence): with `min_distance >= w` no answer's sliding window (`t - w < s <= t`) sees a key
  digit. 1.0 for `min_distance <= 0`; ValueError if no depth is that far back."""
  if min_distance <= 0:
    return 1.0
  filler_len = _filler_len(seq_len, digits)
  # The key's last digit sits at cut + NEEDLE.index(key) + digits - 1.
  last_cut = seq_len - 2 * digits - min_distance - NEEDLE.index(b"{key}")
  if last_cut < 0 or filler_len <= 0:
    raise ValueError(f"min_distance: no needle in {seq_len} bytes ends {min_distance} positions "
                     f"before the question's answer")
  return min(1.0, last_cut / filler_len)


def passkey_batch(rng, filler, batch_size: int, seq_len: int, digits: int = DIGITS,
                  min_distance: int = 0, shifts=None):
  """int32 `[batch_size, seq_len]`, needles at uniformly random depths (with `min_distance`,
  only those at least that far before the answer: `passkey_max_depth`).

  `shifts` (ints `[batch_size]`, default all 0): row `i` is a sequence of `seq_len - shifts[i]`
  bytes followed by `shifts[i]` more filler bytes, so its question ends `shifts[i]` positions
  before the row's end (its answers: `passkey_answer_targets(seq_len - shifts[i])`). By
  causality the filler after the question changes nothing before it."""
  shifts = np.zeros(batch_size, int) if shifts is None else np.asarray(shifts)
  if shifts.shape != (batch_size,) or shifts.min(initial=0) < 0:
    raise ValueError(f"shifts must be {batch_size} non-negative ints, got shape {shifts.shape}")
  rows = []
  for shift in shifts:
    length = seq_len - shift
    max_depth = passkey_max_depth(length, min_distance, digits)
    row = passkey_example(rng, filler, length, max_depth * rng.uniform(), digits)[0]
    if shift:
      start = rng.integers(0, len(filler) - shift)
      row = np.concatenate([row, filler[start:start + shift].astype(np.int32)])
    rows.append(row)
  return np.stack(rows)


def passkey_accuracy(logits_fn, filler, lengths, depths, samples: int, seed: int = 0,
                     digits: int = DIGITS):
  """Fraction of sequences whose `digits` key bytes are all predicted (greedy, given the prefix).

  Args:
    logits_fn: `tokens int32 [B, T] -> logits [B, T, vocab]`, causal.
    filler: uint8 text for the filler.
    lengths, depths: the grid of sequence lengths and needle depths.
    samples: sequences per grid point.
    seed: the sequences' seed.
    digits: the key's length.

  Returns:
    `{(length, depth): accuracy}`.
  """
  results = {}
  for length in lengths:
    for depth in depths:
      rng = np.random.default_rng([seed, length, int(depth * 1000)])
      tokens = np.stack([passkey_example(rng, filler, length, depth, digits)[0]
                         for _ in range(samples)])
      predictions = np.asarray(logits_fn(tokens[:, :-1])).argmax(-1)[:, -digits:]
      results[(length, depth)] = float(np.mean(np.all(predictions == tokens[:, -digits:], 1)))
  return results


# Multi-query associative recall (Zoology's MQAR) over token ids: key-value pairs spread through
# filler, then keys of the pairs asked back; a model that recalls predicts each value after its
# key.

MQAR_PLACEMENTS = ("uniform", "start", "cluster")


def mqar_vocab(vocab_size: int, ids: int = 0):
  """Disjoint id ranges `(filler, keys, values)` of a vocabulary: half filler, a quarter each
  keys and values; `ids > 0` keeps only the first `ids` of the key and of the value range (an
  id-range curriculum's early stages; RESULTS.md, 2026-12-08: it did not help a CPU model)."""
  if vocab_size < 16:
    raise ValueError(f"vocab_size ({vocab_size}) must be at least 16 for MQAR's id ranges")
  half, quarter = vocab_size // 2, vocab_size // 4
  if not 0 <= ids <= quarter:
    raise ValueError(f"ids ({ids}) must be in [0, {quarter}], the key ids of vocab_size "
                     f"{vocab_size} (0: all)")
  if ids == 0:
    return (0, half), (half, half + quarter), (half + quarter, vocab_size)
  return (0, half), (half, half + ids), (half + quarter, half + quarter + ids)


def mqar_answer_targets(seq_len: int, num_pairs: int) -> np.ndarray:
  """Indices into the targets `tokens[1:]` of a sequence of `seq_len` tokens that are answers:
  the values of the queries, the last `2 * num_pairs` tokens being `k v k v ...`."""
  query_start = seq_len - 2 * num_pairs
  return query_start + 2 * np.arange(num_pairs)  # target i is token i + 1


def mqar_example(rng: np.random.Generator, seq_len: int, num_pairs: int, vocab_size: int,
                 placement: str = "uniform", ids: int = 0):
  """One sequence of `seq_len` token ids.

  `num_pairs` adjacent (key, value) tokens, keys distinct, sit in the first `seq_len - 2 *
  num_pairs` tokens among random filler ids: at random, non-overlapping places
  (`placement="uniform"`: every distance from the queries occurs), one after another at the
  start (`"start"`: the longest distances), or one after another at a random place
  (`"cluster"`: a compressed block of `l` tokens then summarises `l / 2` pairs at once, so
  recall leans on token-level attention to the cluster: the selected branch, or the window
  when the cluster is recent; a learned compression of 8 tokens still told 4 pairs apart in
  RESULTS.md's runs). The last `2 * num_pairs` tokens are `num_pairs` queries, each a key of a
  pair drawn at random with replacement (so no answer follows from the values asked before
  it), followed by its value. Keys and values come from `mqar_vocab(vocab_size, ids)`.

  Returns:
    `(tokens int32 [seq_len], pair_positions int [num_pairs])`: where each query's key sits in
    the context (its value is the token after it).
  """
  if placement not in MQAR_PLACEMENTS:
    raise ValueError(f"placement must be one of {MQAR_PLACEMENTS}, got {placement!r}")
  (f0, f1), (k0, k1), (v0, v1) = mqar_vocab(vocab_size, ids)
  if num_pairs > k1 - k0:
    raise ValueError(f"num_pairs ({num_pairs}) exceeds the {k1 - k0} key ids of vocab_size "
                     f"{vocab_size} (ids {ids})")
  context = seq_len - 2 * num_pairs
  if context < 2 * num_pairs:
    raise ValueError(f"seq_len ({seq_len}) is shorter than {num_pairs} pairs asked back "
                     f"({4 * num_pairs} tokens)")
  tokens = rng.integers(f0, f1, seq_len)
  keys = rng.choice(k1 - k0, num_pairs, replace=False) + k0
  values = rng.integers(v0, v1, num_pairs)
  if placement == "start":
    starts = 2 * np.arange(num_pairs)
  elif placement == "cluster":
    starts = rng.integers(0, context - 2 * num_pairs + 1) + 2 * np.arange(num_pairs)
  else:  # distinct places in the context with room for the value: choose the gaps between pairs
    free = context - 2 * num_pairs
    cuts = np.sort(rng.integers(0, free + 1, num_pairs))
    starts = cuts + 2 * np.arange(num_pairs)
  tokens[starts], tokens[starts + 1] = keys, values
  # Each query a pair drawn with replacement: were every key asked once, a model could answer
  # the last queries by elimination (the values not yet asked), a shortcut that reaches accuracy
  # ~(1/n + ... + 1/1)/n without any recall (0.52 at 4 pairs), where models stalled.
  order = rng.integers(0, num_pairs, num_pairs)
  tokens[context::2], tokens[context + 1::2] = keys[order], values[order]
  return tokens.astype(np.int32), starts[order]


def mqar_batch(rng, batch_size: int, seq_len: int, num_pairs: int, vocab_size: int,
               placement: str = "uniform", ids: int = 0):
  """int32 `[batch_size, seq_len]`."""
  return np.stack([mqar_example(rng, seq_len, num_pairs, vocab_size, placement, ids)[0]
                   for _ in range(batch_size)])


def mqar_accuracy(logits_fn, seq_len: int, num_pairs: int, vocab_size: int, samples: int,
                  placement: str = "uniform", seed: int = 0, ids: int = 0):
  """Fraction of queried values predicted (greedy, after their key), over `samples` sequences
  of `seq_len` tokens."""
  return mqar_accuracies(logits_fn, seq_len, num_pairs, vocab_size, samples, placement,
                         seed, ids)["mqar_accuracy"]


def mqar_accuracies(logits_fn, seq_len: int, num_pairs: int, vocab_size: int, samples: int,
                    placement: str = "uniform", seed: int = 0,
                    ids: int = 0) -> dict[str, float]:
  """`mqar_accuracy` (every query) and `mqar_first_accuracy` (only queries whose key was not
  asked before in the same sequence), from one evaluation of `samples` sequences.

  Queries are drawn with replacement, so a repeated query's answer also sits among the queries
  themselves, a few tokens back: a model that only copies it (a sliding window can) scores on
  the repeats, about (1 - 1/n)^n ~ 1/e of n queries, without recalling anything from the
  context. First-time queries can only be answered from the pairs in the context.
  """
  hits, pair_positions = _mqar_recall(logits_fn, seq_len, num_pairs, vocab_size, samples,
                                      placement, seed, ids)
  first = np.ones_like(hits)
  for i in range(1, num_pairs):  # a pair's position identifies its key
    first[:, i] = np.all(pair_positions[:, :i] != pair_positions[:, i:i + 1], axis=1)
  return dict(mqar_accuracy=float(np.mean(hits)),
              mqar_first_accuracy=float(np.mean(hits[first])))


def _mqar_recall(logits_fn, seq_len, num_pairs, vocab_size, samples, placement, seed, ids):
  """`(hits bool [samples, num_pairs], pair_positions [samples, num_pairs])` of greedy
  predictions on `samples` sequences drawn from `seed`."""
  rng = np.random.default_rng([seed, seq_len, num_pairs])
  examples = [mqar_example(rng, seq_len, num_pairs, vocab_size, placement, ids)
              for _ in range(samples)]
  tokens = np.stack([t for t, _ in examples])
  targets = mqar_answer_targets(seq_len, num_pairs)
  hits = np.asarray(logits_fn(tokens[:, :-1])).argmax(-1)[:, targets] == tokens[:, targets + 1]
  return hits, np.stack([p for _, p in examples])


def mqar_accuracy_by_depth(logits_fn, lengths, num_pairs: int, vocab_size: int, num_bins: int,
                           samples: int, placement: str = "uniform", seed: int = 0,
                           ids: int = 0):
  """Recall accuracy by context length and by the depth of the queried pair.

  A pair's depth is its key's position over the context length (0: the start, 1: just before
  the queries), binned into `num_bins` equal bins.

  Returns:
    `accuracy float [len(lengths), num_bins]`, NaN where no queried pair fell in a bin.
  """
  grid = np.full((len(lengths), num_bins), np.nan)
  for row, length in enumerate(lengths):
    hits, pair_positions = _mqar_recall(logits_fn, length, num_pairs, vocab_size, samples,
                                        placement, seed, ids)
    depth = pair_positions / (length - 2 * num_pairs)  # [samples, pairs]
    bins = np.minimum((depth * num_bins).astype(int), num_bins - 1)
    for b in range(num_bins):
      if np.any(bins == b):
        grid[row, b] = float(np.mean(hits[bins == b]))
  return grid

"""Training data made or found locally (no network): byte-level text from the Python standard
library's own source tree, which ships with every Python; passkey-retrieval sequences whose
filler is that text and multi-query associative recall sequences over token ids
(`experiments.tasks`); a user's own text files (a glob) or token files (`.npy`, or raw `.bin`
read as a memmap).

Batches are a pure function of (seed, split, step), so a resumed run sees exactly the batches an
uninterrupted one would. Packed documents (`ByteBatches` with `document_ids`): rows of the
concatenated files with each byte's file index, `[B, 2, seq_len + 1]` (bytes, document ids), so
that attention and the loss keep to each document. Each source has `loss_weights` (float32
`[seq_len]`, one a target position): 1 on the task's answers and `other_weight` elsewhere for
the tasks, all ones for plain language modelling; `weights(split, step)` gives them per row,
`[B, seq_len]`, which differ between rows where the answers move (passkey rows with `max_shift`).
"""

from __future__ import annotations

import glob
import os
import pathlib
import sysconfig

import grain
import numpy as np

from experiments import tasks

HELD_OUT_FRACTION = 0.05
PAD_BYTE = 0  # pads aligned documents (`aligned_documents`); no source file holds a NUL byte


def _read_files(paths, max_bytes: int) -> list[np.ndarray]:
  """The files' bytes (uint8), in order, until `max_bytes` in all (the last one cut)."""
  chunks, total = [], 0
  for path in paths:
    if total >= max_bytes:
      break
    data = pathlib.Path(path).read_bytes()[:max_bytes - total]
    if data:
      chunks.append(np.frombuffer(data, np.uint8))
      total += len(data)
  return chunks


def _joined(chunks: list[np.ndarray], documents: bool):
  """The bytes of `chunks` as one array, with each byte's chunk index when `documents`."""
  text = np.concatenate(chunks)
  if not documents:
    return text
  return text, np.repeat(np.arange(len(chunks), dtype=np.int32), [len(c) for c in chunks])


def stdlib_source_bytes(max_bytes: int, documents: bool = False):
  """Up to `max_bytes` of the standard library's `.py` files (sorted paths), as uint8; with
  `documents`, `(bytes, document_ids int32)`: each file a document."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  paths = [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]
  chunks = _read_files(paths, max_bytes)
  if not chunks:
    raise FileNotFoundError(f"no Python sources found under {root}")
  return _joined(chunks, documents)


def aligned_documents(text: np.ndarray, document_ids: np.ndarray, align: int):
  """Each document (a run of equal ids) padded at its end with PAD_BYTE to a multiple of `align`
  bytes, the padding keeping its document's id: `(text, document_ids, padding bool)`, every
  document starting on a multiple of `align`. Real bytes never attend to the padding after them
  (causal) and its targets get no loss (`ByteBatches.weights`), so the model sees each document
  as before; packed rows whose documents start on selection blocks take the packed kernels'
  whole-block route (`selected_attention.WHOLE_BLOCK_DOCUMENTS`)."""
  if align < 1:
    raise ValueError(f"align must be >= 1, got {align}")
  run_starts = np.concatenate([[0], np.flatnonzero(np.diff(document_ids)) + 1])
  lengths = np.diff(np.append(run_starts, len(text)))
  padded = -(-lengths // align) * align
  new_starts = np.cumsum(padded) - padded
  run = np.repeat(np.arange(len(lengths)), lengths)
  at = new_starts[run] + np.arange(len(text)) - run_starts[run]
  out = np.full(padded.sum(), PAD_BYTE, text.dtype)
  out[at] = text
  padding = np.ones(len(out), bool)
  padding[at] = False
  return out, np.repeat(document_ids[run_starts], padded), padding


def _paths(pattern: str) -> list[str]:
  paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
  if not paths:
    raise FileNotFoundError(f"data.path {pattern!r} matches no file")
  return paths


def text_file_bytes(pattern: str, max_bytes: int, documents: bool = False):
  """Up to `max_bytes` of the files matching the glob `pattern` (sorted), as uint8 bytes; with
  `documents`, `(bytes, document_ids int32)`: each file a document."""
  chunks = _read_files(_paths(pattern), max_bytes)
  if not chunks:
    raise ValueError(f"data.path {pattern!r} matches only empty files")
  return _joined(chunks, documents)


def token_file_ids(pattern: str, dtype: str, vocab_size: int) -> np.ndarray:
  """Token ids from `.npy` files (any integer dtype) or raw `.bin` files of `dtype`, in sorted
  path order. One file stays a memmap (nothing loaded up front); several are concatenated.

  Raises:
    ValueError: a non-integer `.npy`, an unknown extension, or ids outside `[0, vocab_size)`.
  """
  arrays = []
  for path in _paths(pattern):
    if path.endswith(".npy"):
      ids = np.load(path, mmap_mode="r")
    elif path.endswith(".bin"):
      ids = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    else:
      raise ValueError(f"token files must end in .npy or .bin, got {path}")
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"{path} holds {ids.dtype}, not integer token ids")
    arrays.append(ids.reshape(-1))
  ids = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
  if ids.min() < 0 or ids.max() >= vocab_size:
    raise ValueError(f"token ids in {pattern!r} span [{ids.min()}, {ids.max()}], outside the "
                     f"model's vocabulary [0, {vocab_size})")
  return ids


class Batches:
  """What every source shares: `batch_size`, `seq_len`, `loss_weights` and per-row weights."""

  batch_size: int
  seq_len: int
  loss_weights: np.ndarray

  def weights(self, split: str, step: int) -> np.ndarray:
    """float32 `[batch_size, seq_len]`: the loss weights of `batch(split, step)`'s targets."""
    del split, step  # the same for every row
    return np.broadcast_to(self.loss_weights, (self.batch_size, self.seq_len))


class ByteBatches(Batches):
  """Random windows of `seq_len + 1` bytes; the last `HELD_OUT_FRACTION` of the text is held out.

  With `document_ids` (int32, one per byte) the rows are packed documents: `[B, 2, seq_len + 1]`,
  the bytes and their document ids (a window crosses from one file into the next). With
  `padding` (bool, one per byte: `aligned_documents`'s) its targets weigh 0, and windows (and the
  held-out split) start on multiples of `align`, so that documents padded to `align` bytes start
  on them within every row too."""

  def __init__(self, text: np.ndarray, batch_size: int, seq_len: int, seed: int,
               document_ids: np.ndarray | None = None, padding: np.ndarray | None = None,
               align: int = 1):
    split = int(len(text) * (1 - HELD_OUT_FRACTION)) // align * align
    self.splits = {"train": text[:split], "held_out": text[split:]}
    self.document_ids = None if document_ids is None else {
        "train": document_ids[:split], "held_out": document_ids[split:]}
    self.padding = None if padding is None else {"train": padding[:split],
                                                 "held_out": padding[split:]}
    self.align = align
    for name, part in self.splits.items():
      if len(part) <= seq_len + 1:
        raise ValueError(f"the {name} text has {len(part)} bytes, fewer than seq_len + 1 = "
                         f"{seq_len + 1}; raise data.max_bytes")
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self.loss_weights = np.ones(seq_len, np.float32)

  def batch(self, split: str, step: int) -> np.ndarray:
    """int32 `[batch_size, seq_len + 1]` for `step` (deterministic)."""
    text = self.splits[split]
    starts = self._starts(split, step)
    tokens = np.stack([text[s:s + self.seq_len + 1] for s in starts]).astype(np.int32)
    if self.document_ids is None:
      return tokens
    ids = self.document_ids[split]
    return np.stack([tokens, np.stack([ids[s:s + self.seq_len + 1] for s in starts])], axis=1)

  def weights(self, split: str, step: int) -> np.ndarray:
    if self.padding is None:
      return super().weights(split, step)
    padding = self.padding[split]
    return np.stack([~padding[s + 1:s + self.seq_len + 1] for s in self._starts(split, step)]
                    ).astype(np.float32)

  def _starts(self, split: str, step: int) -> np.ndarray:
    """Each row's first byte in the split: multiples of `align` (any byte when 1)."""
    rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step])
    last = len(self.splits[split]) - self.seq_len - 2  # the last start that leaves a whole row
    return rng.integers(0, last // self.align + 1, self.batch_size) * self.align


def answer_weights(seq_len: int, answers: np.ndarray, other_weight: float) -> np.ndarray:
  """float32 `[seq_len]`: 1 at the `answers` target indices, `other_weight` elsewhere."""
  if not 0.0 <= other_weight <= 1.0:
    raise ValueError(f"other_weight must be in [0, 1], got {other_weight}")
  weights = np.full(seq_len, other_weight, np.float32)
  weights[answers] = 1.0
  return weights


class MQARBatches(Batches):
  """Multi-query associative recall sequences of `seq_len + 1` token ids (`tasks.mqar_example`:
  `num_pairs` key-value pairs placed by `placement`, asked back at the end; keys and values
  from the first `ids` ids of their ranges, 0: all); train and held-out rows come from different
  random streams."""

  def __init__(self, batch_size, seq_len, seed, *, num_pairs: int, vocab_size: int,
               placement: str = "uniform", other_weight: float = 0.0, ids: int = 0):
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self.num_pairs, self.vocab_size, self.placement = num_pairs, vocab_size, placement
    self.ids = ids
    tasks.mqar_example(np.random.default_rng(0), seq_len + 1, num_pairs, vocab_size, placement,
                       ids)
    self.loss_weights = answer_weights(
        seq_len, tasks.mqar_answer_targets(seq_len + 1, num_pairs), other_weight)

  def batch(self, split: str, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step])
    return tasks.mqar_batch(rng, self.batch_size, self.seq_len + 1, self.num_pairs,
                            self.vocab_size, self.placement, self.ids)


class PasskeyBatches(ByteBatches):
  """Passkey-retrieval sequences of `seq_len + 1` bytes (needles at random depths), with filler
  from the train or held-out text. `min_distance > 0` keeps the training needles at least that
  many positions before the answers (`tasks.passkey_max_depth`: beyond a window of that size);
  held-out batches keep every depth. `max_shift > 0` ends each row's question a uniformly random
  0..`max_shift` bytes before the row's end (filler after it; `tasks.passkey_batch`), in both
  splits, so the answers meet the compression and selection blocks at every offset rather than
  one; the rows' loss weights (`weights`) follow their answers."""

  def __init__(self, text, batch_size, seq_len, seed, *, other_weight: float = 1.0,
               digits: int = tasks.DIGITS, min_distance: int = 0, max_shift: int = 0):
    super().__init__(text, batch_size, seq_len, seed)
    if not 0 <= max_shift < seq_len:
      raise ValueError(f"max_shift must be in [0, seq_len = {seq_len}), got {max_shift}")
    self.digits, self.min_distance, self.max_shift = digits, min_distance, max_shift
    self.other_weight = other_weight
    # A needle and question that do not fit the shortest row, or a distance too far, fail here.
    tasks.passkey_max_depth(seq_len + 1 - max_shift, min_distance, digits)
    tasks.passkey_example(np.random.default_rng(0), self.splits["train"],
                          seq_len + 1 - max_shift, 0.0, digits)
    self.loss_weights = answer_weights(
        seq_len, tasks.passkey_answer_targets(seq_len + 1, digits), other_weight)

  def shifts(self, split: str, step: int) -> np.ndarray:
    """ints `[batch_size]`: how far each row's question ends before the row's end (a stream of
    its own, so `weights` need not make the rows)."""
    if not self.max_shift:
      return np.zeros(self.batch_size, int)
    rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step, 1])
    return rng.integers(0, self.max_shift + 1, self.batch_size)

  def batch(self, split: str, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step])
    return tasks.passkey_batch(rng, self.splits[split], self.batch_size, self.seq_len + 1,
                               self.digits, self.min_distance if split == "train" else 0,
                               shifts=self.shifts(split, step))

  def weights(self, split: str, step: int) -> np.ndarray:
    if not self.max_shift:
      return super().weights(split, step)
    return np.stack([answer_weights(self.seq_len, tasks.passkey_answer_targets(
        self.seq_len + 1 - shift, self.digits), self.other_weight)
                     for shift in self.shifts(split, step)])


def train_iterator(batches, steps: int) -> grain.DatasetIterator:
  """The training batches of steps 1..`steps`, `(tokens, weights)` (`batch`, `weights`), as a
  grain iterator.

  Its state (`get_state()`, the next step) is saved with every checkpoint and restored with
  `set_state`; since a batch is a pure function of its step, the restored iterator yields
  exactly the batches the uninterrupted run would.
  """
  steps_dataset = grain.MapDataset.range(1, steps + 1)
  return iter(steps_dataset.map(lambda step: (batches.batch("train", step),
                                              batches.weights("train", step)))
              .to_iter_dataset())

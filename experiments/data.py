"""Training data made or found locally (no network): byte-level text from the Python standard
library's own source tree, which ships with every Python; passkey-retrieval and multi-query
associative recall sequences whose filler is that text (`experiments.tasks`); a user's own text
files (a glob) or token files (`.npy`, or raw `.bin` read as a memmap).

Batches are a pure function of (seed, split, step), so a resumed run sees exactly the batches an
uninterrupted one would.
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


def stdlib_source_bytes(max_bytes: int) -> np.ndarray:
  """Up to `max_bytes` of the standard library's `.py` files (sorted paths), as uint8."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  chunks, total = [], 0
  for path in sorted(root.rglob("*.py")):
    if "site-packages" in path.parts or total >= max_bytes:
      continue
    data = path.read_bytes()[:max_bytes - total]
    chunks.append(np.frombuffer(data, np.uint8))
    total += len(data)
  if total == 0:
    raise FileNotFoundError(f"no Python sources found under {root}")
  return np.concatenate(chunks)


def _paths(pattern: str) -> list[str]:
  paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
  if not paths:
    raise FileNotFoundError(f"data.path {pattern!r} matches no file")
  return paths


def text_file_bytes(pattern: str, max_bytes: int) -> np.ndarray:
  """Up to `max_bytes` of the files matching the glob `pattern` (sorted), as uint8 bytes."""
  chunks, total = [], 0
  for path in _paths(pattern):
    if total >= max_bytes:
      break
    data = pathlib.Path(path).read_bytes()[:max_bytes - total]
    chunks.append(np.frombuffer(data, np.uint8))
    total += len(data)
  return np.concatenate(chunks)


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


class ByteBatches:
  """Random windows of `seq_len + 1` bytes; the last `HELD_OUT_FRACTION` of the text is held out."""

  def __init__(self, text: np.ndarray, batch_size: int, seq_len: int, seed: int):
    split = int(len(text) * (1 - HELD_OUT_FRACTION))
    self.splits = {"train": text[:split], "held_out": text[split:]}
    for name, part in self.splits.items():
      if len(part) <= seq_len + 1:
        raise ValueError(f"the {name} text has {len(part)} bytes, fewer than seq_len + 1 = "
                         f"{seq_len + 1}; raise data.max_bytes")
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

  def batch(self, split: str, step: int) -> np.ndarray:
    """int32 `[batch_size, seq_len + 1]` for `step` (deterministic)."""
    text = self.splits[split]
    rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step])
    starts = rng.integers(0, len(text) - self.seq_len - 1, self.batch_size)
    return np.stack([text[s:s + self.seq_len + 1] for s in starts]).astype(np.int32)


class MQARBatches(ByteBatches):
  """Multi-query associative recall sequences of `seq_len + 1` bytes (`num_pairs` key=value
  pairs asked back after filler from the train or held-out text)."""

  def __init__(self, text, batch_size, seq_len, seed, num_pairs: int):
    super().__init__(text, batch_size, seq_len, seed)
    self.num_pairs = num_pairs

  def batch(self, split: str, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step])
    return tasks.mqar_batch(rng, self.splits[split], self.batch_size, self.seq_len + 1,
                            self.num_pairs)


class PasskeyBatches(ByteBatches):
  """Passkey-retrieval sequences of `seq_len + 1` bytes (needles at random depths), with filler
  from the train or held-out text."""

  def batch(self, split: str, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step])
    return tasks.passkey_batch(rng, self.splits[split], self.batch_size, self.seq_len + 1)


def train_iterator(batches: ByteBatches, steps: int) -> grain.DatasetIterator:
  """The training batches of steps 1..`steps` as a grain iterator.

  Its state (`get_state()`, the next step) is saved with every checkpoint and restored with
  `set_state`; since a batch is a pure function of its step, the restored iterator yields
  exactly the batches the uninterrupted run would.
  """
  steps_dataset = grain.MapDataset.range(1, steps + 1)
  return iter(steps_dataset.map(lambda step: batches.batch("train", step)).to_iter_dataset())

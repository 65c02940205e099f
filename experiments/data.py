"""Training data made or found locally (no network): byte-level text from the Python standard
library's own source tree, which ships with every Python, and passkey-retrieval sequences whose
filler is that text (`experiments.tasks`).

Batches are a pure function of (seed, split, step), so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import pathlib
import sysconfig

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


class PasskeyBatches(ByteBatches):
  """Passkey-retrieval sequences of `seq_len + 1` bytes (needles at random depths), with filler
  from the train or held-out text."""

  def batch(self, split: str, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, step])
    return tasks.passkey_batch(rng, self.splits[split], self.batch_size, self.seq_len + 1)

"""`NSAConfig`: the hyper-parameters of Native Sparse Attention (SPEC.md, "Shapes and names")."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NSAConfig:
  """Block sizes and budgets of the three NSA branches (paper defaults).

  Attributes:
    cmp_block: `l`, tokens per compressed block.
    cmp_stride: `d`, stride between consecutive compressed blocks (`l % d == 0`).
    slc_block: `l'`, tokens per selection block (`l' % d == 0`).
    num_selected: `n`, selection blocks per query, forced blocks included.
    num_initial: blocks at the start of the sequence every query always selects.
    num_local: most recent blocks (the query's own first) every query always selects.
    window: `w`, tokens of the sliding window, the query itself included.

  Frozen and hashable, so it can be a static argument of `jax.jit`. Raises `ValueError` naming the
  offending field when the combination is invalid.
  """

  cmp_block: int = 32
  cmp_stride: int = 16
  slc_block: int = 64
  num_selected: int = 16
  num_initial: int = 1
  num_local: int = 2
  window: int = 512

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"NSAConfig.{field.name} must be an int, got {value!r}")
    for name in ("cmp_block", "cmp_stride", "slc_block", "num_selected", "window"):
      if getattr(self, name) <= 0:
        raise ValueError(f"NSAConfig.{name} must be positive, got {getattr(self, name)}")
    for name in ("num_initial", "num_local"):
      if getattr(self, name) < 0:
        raise ValueError(f"NSAConfig.{name} must be >= 0, got {getattr(self, name)}")
    if self.cmp_block % self.cmp_stride:
      raise ValueError(
          f"NSAConfig.cmp_block ({self.cmp_block}) must be a multiple of cmp_stride "
          f"({self.cmp_stride})")
    if self.slc_block % self.cmp_stride:
      raise ValueError(
          f"NSAConfig.slc_block ({self.slc_block}) must be a multiple of cmp_stride "
          f"({self.cmp_stride})")
    if self.num_initial + self.num_local > self.num_selected:
      raise ValueError(
          f"NSAConfig.num_initial + num_local ({self.num_initial} + {self.num_local}) must be "
          f"<= num_selected ({self.num_selected})")

  def num_cmp_blocks(self, seq_len: int) -> int:
    """`Tc`: compressed blocks in a sequence of `seq_len` tokens."""
    return num_cmp_blocks(seq_len, self.cmp_block, self.cmp_stride)

  def num_slc_blocks(self, seq_len: int) -> int:
    """`ceil(T / l')`: selection blocks in a sequence of `seq_len` tokens."""
    return -(-seq_len // self.slc_block)


def num_cmp_blocks(seq_len: int, block: int, stride: int) -> int:
  """`Tc = (T - l) // d + 1` when `T >= l`, else 0."""
  return (seq_len - block) // stride + 1 if seq_len >= block else 0

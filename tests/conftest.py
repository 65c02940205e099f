"""Skips the GPU-marked tests cleanly on machines without a CUDA GPU (CI)."""

import pytest

from tests.helpers import has_gpu


def pytest_collection_modifyitems(config, items):
  if has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)

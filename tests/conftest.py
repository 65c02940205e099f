"""Skips the GPU-marked tests cleanly on machines without a CUDA GPU (CI); seeds each test."""

import zlib

import pytest

from tests.helpers import has_gpu, reset_keys


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
  reset_keys(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(config, items):
  if has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)

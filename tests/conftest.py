"""Skips the GPU-marked tests cleanly on machines without a CUDA GPU (CI); seeds each test;
`no_races` fails a test whose TPU-interpreted kernels raced; `fresh_jit_caches` for tests that
set kernel constants."""

import zlib

import jax
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


@pytest.fixture
def fresh_jit_caches():
  """jit caches cleared before and after the test: the module-level jitted entry points
  (`pallas_gpu.nsa_attention`'s, `pallas_tpu`'s) read kernel constants when traced, so a test
  that sets them must not find a trace made under the defaults, nor leave one behind."""
  jax.clear_caches()
  yield
  jax.clear_caches()


@pytest.fixture
def no_races(monkeypatch):
  """Fails the test if the TPU interpreter's race detector flagged any kernel it ran.

  The interpreter keeps one race-detection state per kernel run (a private module of JAX, as in
  JAX's own interpreter tests); every state created during the test is recorded and checked.
  """
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # pylint: disable=g-import-not-at-top
  created = []
  original = interpret_pallas_call.RaceDetectionState

  class Recording(original):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      created.append(self)

  monkeypatch.setattr(interpret_pallas_call, "RaceDetectionState", Recording)
  yield
  assert not any(state.races_found for state in created), "the TPU interpreter found a race"

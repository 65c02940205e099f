"""Skips the GPU-marked tests cleanly on machines without a CUDA GPU (CI); seeds each test;
shares compiled programs between the tests of one run; `no_races` fails a test whose
TPU-interpreted kernels raced; `fresh_jit_caches` for tests that set kernel constants."""

import os
import shutil
import tempfile
import zlib

import jax
import pytest

from tests.helpers import has_gpu, reset_keys


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
  reset_keys(zlib.crc32(request.node.nodeid.encode()))


_CACHE = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
  """One persistent compilation cache for the run (its xdist workers inherit the variable): the
  many tests that train the same small models or run the same kernels then compile each program
  once (2026-12-08: `tests/test_train.py` 125 s -> 104 s on 2 cores). Keyed by the programs
  themselves, so a hit is the program the test would have compiled; removed at the end."""
  if hasattr(config, "workerinput") or os.environ.get(_CACHE):
    return  # an xdist worker (the controller made the cache), or the user's own cache
  config.nsa_compilation_cache = tempfile.mkdtemp(prefix="nsa-jax-jit-")
  settings = dict(jax_compilation_cache_dir=config.nsa_compilation_cache,
                  jax_persistent_cache_min_compile_time_secs=0.2,
                  jax_persistent_cache_min_entry_size_bytes=0)
  for name, value in settings.items():
    os.environ[name.upper()] = str(value)  # for the workers, which import jax after this
    jax.config.update(name, value)  # for this process, which already has


def pytest_unconfigure(config):
  if getattr(config, "nsa_compilation_cache", None):
    shutil.rmtree(config.nsa_compilation_cache, ignore_errors=True)


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

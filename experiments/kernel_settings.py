"""Module constants of the GPU kernels set from the command line, `module.NAME=VALUE,...`.

Used by `probes.tune_gpu` (a row per setting) and `bench_kernels --settings` (a kernel option
timed against the defaults without a second checkout: run the benchmark with and without it).
Modules: `compressed` (`pallas_kernels.gpu.compressed_attention`), `selected`
(`selected_attention`), `selected_mgpu` (`selected_attention_mgpu`), `top_n`. A value is read
as the type of the constant's default: int, str, or bool (`1` / `true` / `0` / `false`).
"""

from __future__ import annotations

import contextlib

import jax

from pallas_kernels.gpu import compressed_attention as compressed_kernel
from pallas_kernels.gpu import selected_attention as selected_kernel
from pallas_kernels.gpu import selected_attention_mgpu as selected_mgpu
from pallas_kernels.gpu import top_n

MODULES = {"compressed": compressed_kernel, "selected": selected_kernel,
           "selected_mgpu": selected_mgpu, "top_n": top_n}


def setting_value(default, text: str):
  """`text` as the type of the constant's `default`: int, str, or bool (`1` / `true` / `0` /
  `false`)."""
  if isinstance(default, bool):
    if text.lower() not in ("1", "true", "0", "false"):
      raise ValueError(f"a boolean setting takes 1, true, 0 or false, got {text!r}")
    return text.lower() in ("1", "true")
  return type(default)(text)


def parse(text: str):
  """`"module.NAME=VALUE,..."` -> `[(module, NAME, value)]`; a `ValueError` naming the item
  for anything else (no `=`, an unknown module, a name that is not one of its constants)."""
  settings = []
  for item in filter(None, text.split(",")):
    name, has_value, value = item.partition("=")
    module_name, _, attr = name.partition(".")
    module = MODULES.get(module_name)
    if not has_value or module is None or not attr.isupper() or not hasattr(module, attr):
      raise ValueError(f"setting {item!r}: want module.NAME=VALUE, module one of "
                       f"{sorted(MODULES)}, NAME one of its upper-case constants")
    settings.append((module, attr, setting_value(getattr(module, attr), value)))
  return settings


@contextlib.contextmanager
def applied(text: str):
  """Inside: the settings of `text` (`parse`) in place; the defaults back on the way out. jit
  caches are cleared both ways, so calls trace the kernels afresh."""
  settings = parse(text)
  saved = [(module, attr, getattr(module, attr)) for module, attr, _ in settings]
  jax.clear_caches()
  try:
    for module, attr, value in settings:
      setattr(module, attr, value)
    yield
  finally:
    for module, attr, value in saved:
      setattr(module, attr, value)
    jax.clear_caches()

"""A length curriculum from one command: the same model trained stage by stage at growing
sequence lengths, each stage started from the last one's parameters (`config.init_from`).

    python -m experiments.curriculum --config experiments/configs/passkey_gpu.py \
        --workdir out/passkey_nsa --stages 128:64:3000,1024:32:500,8192:16:2000 \
        [--config.<field>=<value> ...]

A stage `T:B:S` trains `S` steps at sequence length `T` with batch size `B` in
`<workdir>/t<T>` (`t<T>_2`, `t<T>_3`, ... for later stages at the same length; a workdir of
`experiments.train`: metrics, checkpoints, plots), evaluating every `min(config.eval_every, S)`
steps; its optimizer and learning-rate schedule start afresh.
`T:B:S:W` also sets the sliding window to `W` (`config.nsa.window`; the window has no
parameters, so it may change between stages: a window smaller than the early stages' contexts
keeps them from being solved through it, RESULTS.md "CPU: a window that sees the needle").
Any config field may follow as `field=value`, for that stage only (fields without parameters:
`2048:32:600:512:data.passkey_max_shift=63:nsa.num_selected=8`).
Rerunning the command resumes: finished stages have nothing left to do, a cut one continues
from its last checkpoint. Why: retrieval tasks at 8k tokens are not learned from scratch by
small models, but are when the same model first learns them at 64-1024 tokens (RESULTS.md).
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import jax
from absl import app
from absl import flags
from absl import logging

from experiments import train

_STAGES = flags.DEFINE_string(
    "stages", None, "Comma-separated stages seq_len:batch_size:steps[:window][:field=value...], "
    "e.g. 128:64:3000:64,1024:32:500,2048:32:600:512:data.passkey_max_shift=63")


class Stage(NamedTuple):
  """One stage: its length, batch size, steps, window (None: the config's) and config overrides
  (`(field, value text)` pairs, applied to this stage only)."""
  seq_len: int
  batch_size: int
  steps: int
  window: int | None = None
  overrides: tuple[tuple[str, str], ...] = ()


def parse_stages(text: str) -> list[Stage]:
  """`"128:64:3000:64,1024:32:500:data.other_weight=0.5"` -> `[Stage(128, 64, 3000, 64),
  Stage(1024, 32, 500, None, (("data.other_weight", "0.5"),))]`; ValueError naming the stage
  whose first three or four fields are not positive integers."""
  stages = []
  for stage in text.split(","):
    parts = stage.strip().split(":")
    numbers = [part for part in parts if "=" not in part]
    overrides = tuple(tuple(part.split("=", 1)) for part in parts if "=" in part)
    try:
      values = tuple(int(part) for part in numbers)
    except ValueError:
      values = ()
    if (len(values) not in (3, 4) or min(values) <= 0
        or parts[:len(values)] != numbers):  # the overrides come last
      raise ValueError(f"stages: each stage is seq_len:batch_size:steps[:window][:field=value...] "
                       f"with positive integers, got {stage!r} in {text!r}")
    window = values[3] if len(values) == 4 else None
    stages.append(Stage(*values[:3], window, overrides))
  return stages


def _set_field(config, field: str, text: str):
  """Sets the config field `field` ("a.b") to `text` read as the field's current type."""
  *path, name = field.split(".")
  parent = config
  try:
    for part in path:
      parent = parent[part]
    current = parent[name]
  except (KeyError, AttributeError, TypeError):
    raise ValueError(f"stages: no config field {field!r}") from None
  if isinstance(current, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"stages: {field} is a boolean, got {text!r}")
    value = text.lower() in ("true", "1")
  else:
    try:
      value = type(current)(text)
    except (TypeError, ValueError):
      raise ValueError(f"stages: {field} is {type(current).__name__}, got {text!r}") from None
  parent[name] = value


def stage_configs(config, stages: list[Stage], workdir):
  """`[(config, workdir)]` of each stage: `config` with the stage's seq_len, batch size, steps,
  window and overrides (if given), evaluations at most every `steps`, and `init_from` the
  previous stage's workdir (`t<T>`, or `t<T>_k` for the k-th stage at length `T`)."""
  workdir = pathlib.Path(workdir)
  result, previous = [], config.init_from
  for stage_spec in stages:
    stage = config.copy_and_resolve_references()
    stage.unlock()
    stage.update(dict(seq_len=stage_spec.seq_len, batch_size=stage_spec.batch_size,
                      steps=stage_spec.steps, eval_every=min(config.eval_every, stage_spec.steps),
                      init_from=previous))
    if stage_spec.window is not None:
      stage.nsa.window = stage_spec.window
    for field, text in stage_spec.overrides:
      _set_field(stage, field, text)
    repeat = sum(earlier.seq_len == stage.seq_len for earlier, _ in result)
    stage_dir = workdir / (f"t{stage.seq_len}" + (f"_{repeat + 1}" if repeat else ""))
    result.append((stage, stage_dir))
    previous = str(stage_dir)
  return result


def run(config, stages, workdir) -> list[list[dict]]:
  """Trains every stage in turn; returns each stage's metrics records written by this call."""
  records = []
  for stage, stage_dir in stage_configs(config, stages, workdir):
    source = f", from {stage.init_from}" if stage.init_from else ""
    print(f"stage: T = {stage.seq_len}, batch {stage.batch_size}, {stage.steps} steps, window "
          f"{stage.nsa.window} in {stage_dir}{source}", flush=True)
    records.append(train.run(stage, str(stage_dir)))
    if jax.process_index() == 0:
      print(train.summary(str(stage_dir)), flush=True)
  return records


def main(argv):
  del argv
  flag_values = flags.FLAGS
  if flag_values.workdir is None or _STAGES.value is None:
    raise app.UsageError("--workdir and --stages are required")
  try:
    stages = parse_stages(_STAGES.value)
    stage_configs(flag_values.config, stages, flag_values.workdir)  # bad overrides fail here
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  if flag_values.config.multihost:
    jax.distributed.initialize()  # every host runs this same command
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  run(flag_values.config, stages, flag_values.workdir)


if __name__ == "__main__":
  app.run(main)

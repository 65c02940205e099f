"""A length curriculum from one command: the same model trained stage by stage at growing
sequence lengths, each stage started from the last one's parameters (`config.init_from`).

    python -m experiments.curriculum --config experiments/configs/passkey_gpu.py \
        --workdir out/passkey_nsa --stages 128:64:3000,1024:32:500,8192:16:2000 \
        [--config.<field>=<value> ...]

A stage `T:B:S` trains `S` steps at sequence length `T` with batch size `B` in
`<workdir>/t<T>` (a workdir of `experiments.train`: metrics, checkpoints, plots), evaluating
every `min(config.eval_every, S)` steps; its optimizer and learning-rate schedule start afresh.
`T:B:S:W` also sets the sliding window to `W` (`config.nsa.window`; the window has no
parameters, so it may change between stages: a window smaller than the early stages' contexts
keeps them from being solved through it, RESULTS.md "CPU: a window that sees the needle").
Rerunning the command resumes: finished stages have nothing left to do, a cut one continues
from its last checkpoint. Why: retrieval tasks at 8k tokens are not learned from scratch by
small models, but are when the same model first learns them at 64-1024 tokens (RESULTS.md).
"""

from __future__ import annotations

import pathlib

import jax
from absl import app
from absl import flags
from absl import logging

from experiments import train

_STAGES = flags.DEFINE_string(
    "stages", None, "Comma-separated stages seq_len:batch_size:steps[:window], e.g. "
    "128:64:3000:64,1024:32:500")


def parse_stages(text: str) -> list[tuple[int, ...]]:
  """`"128:64:3000:64,1024:32:500"` -> `[(128, 64, 3000, 64), (1024, 32, 500)]` (a fourth
  field is the stage's window); ValueError naming the stage that is not three or four positive
  integers."""
  stages = []
  for stage in text.split(","):
    parts = stage.strip().split(":")
    try:
      values = tuple(int(part) for part in parts)
    except ValueError:
      values = ()
    if len(values) not in (3, 4) or min(values) <= 0:
      raise ValueError(f"stages: each stage is seq_len:batch_size:steps[:window] with positive "
                       f"integers, got {stage!r} in {text!r}")
    stages.append(values)
  return stages


def stage_configs(config, stages, workdir):
  """`[(config, workdir)]` of each stage: `config` with the stage's seq_len, batch size, steps
  and (if given) window, evaluations at most every `steps`, and `init_from` the previous stage's
  workdir."""
  workdir = pathlib.Path(workdir)
  result, previous = [], config.init_from
  for seq_len, batch_size, steps, *window in stages:
    stage = config.copy_and_resolve_references()
    stage.unlock()
    stage.update(dict(seq_len=seq_len, batch_size=batch_size, steps=steps,
                      eval_every=min(config.eval_every, steps), init_from=previous))
    if window:
      stage.nsa.window = window[0]
    stage_dir = workdir / f"t{seq_len}"
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
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  if flag_values.config.multihost:
    jax.distributed.initialize()  # every host runs this same command
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  run(flag_values.config, stages, flag_values.workdir)


if __name__ == "__main__":
  app.run(main)

"""Trains the NSA or dense decoder LM from a config file, with evaluation, checkpoints and resume.

    python -m experiments.train --config experiments/configs/demo.py --workdir out/demo \
        [--config.<field>=<value> ...]

Writes `workdir/metrics.jsonl` (one JSON object per log or eval step, with `step` and `loss` or
`held_out_loss`, plus `passkey_accuracy` / `mqar_accuracy` with `data.source = "passkey"` /
`"mqar"`, and per layer on those tasks `induction_attention` / `previous_token_attention`, for
NSA and its ablations also `gates_at_answers` / `compressed_target_attention`, with the selected
branch `selection_hits` / `selected_induction_attention`: `experiments/diagnostics.py`), the
same scalars as TensorBoard event files in `workdir/tensorboard`, `workdir/config.json` (what
`experiments.plot` rebuilds the model from) and Orbax checkpoints in `workdir/checkpoints` (the
newest `keep_checkpoints`). A progress bar shows the loss and tokens/s on a terminal. Rerunning
the same command resumes from the latest checkpoint (model, optimizer and the grain data
iterator's state); batches depend only on the step, so a resumed run reproduces the
uninterrupted one exactly. `config.init_from` names another run's workdir whose latest model
parameters start this one (a length curriculum; a run of another attention kind gives the
parameters both have). A non-finite loss stops the run with a message, keeping the last good
checkpoint.

Parallelism: `config.mesh` sizes a `(data, fsdp, tensor)` device mesh (-1 fills); parameters,
optimizer state and batches are sharded over it (`experiments/parallel.py`) and the attention
kernels run per shard (`nsa_jax.sharding`). On a TPU pod slice set `config.multihost = True` and
run the same command on every host: `jax.distributed.initialize()` connects them.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app
from absl import flags
from absl import logging
from flax import nnx
from ml_collections import config_flags
from tensorboardX import SummaryWriter
from tqdm import tqdm

from experiments import data as data_lib
from experiments import diagnostics
from experiments import parallel
from experiments import tasks
from nsa_jax import NSAConfig
from nsa_jax.transformer import DecoderLM, TransformerConfig

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")


class NonFiniteLossError(RuntimeError):
  pass


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config, rngs):
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, got "
                     f"{config.compute_dtype!r}")
  model_config = TransformerConfig(attention=config.attention, nsa=NSAConfig(**config.nsa),
                                   **config.model)
  # Parameters stay float32; activations and matmuls run in the compute dtype.
  return DecoderLM(model_config, dtype=COMPUTE_DTYPES[config.compute_dtype], rngs=rngs)


def build_optimizer(config):
  opt = config.optimizer
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, opt.peak_learning_rate, opt.warmup_steps, max(config.steps, opt.warmup_steps + 1))
  return optax.chain(optax.clip_by_global_norm(opt.clip_norm),
                     optax.adamw(schedule, weight_decay=opt.weight_decay)), schedule


DATA_SOURCES = ("stdlib", "passkey", "mqar", "text", "tokens")


def vocab_size(config) -> int:
  """The model's vocabulary: `config.model.vocab_size`, or `TransformerConfig`'s default."""
  return config.model.get("vocab_size", TransformerConfig.vocab_size)


def passkey_digits(config) -> int:
  """The passkey's length: `config.data.passkey_digits`, or `tasks.DIGITS` for configs
  written before the field existed."""
  return config.data.get("passkey_digits", tasks.DIGITS)


def build_data(config):
  """Batches of `config.data.source`: "stdlib" (bytes of the standard library's sources),
  "passkey" (needles in that text), "mqar" (associative recall over the model's `vocab_size`
  token ids), "text" (bytes of the files matching the glob `data.path`) or "tokens" (`.npy` /
  `.bin` token ids matching `data.path`). The tasks weight their loss by `data.other_weight`
  off the answers."""
  data = config.data
  if data.source not in DATA_SOURCES:
    raise ValueError(f"data.source must be one of {DATA_SOURCES}, got {data.source!r}")
  if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
    raise ValueError(f"grad_accum_steps ({config.grad_accum_steps}) must be >= 1 and divide "
                     f"batch_size ({config.batch_size})")
  if data.source in ("text", "tokens") and not data.path:
    raise ValueError(f"data.path (a glob) is required with data.source={data.source!r}")
  if data.pack_documents and data.source not in ("stdlib", "text"):
    raise ValueError(f"data.pack_documents packs the files of data.source 'stdlib' or 'text', "
                     f"got {data.source!r}")
  align = data.get("pack_align", 0)  # configs written before it have none
  if align < 0 or (align > 1 and not data.pack_documents):
    raise ValueError(f"data.pack_align ({align}) pads packed documents (data.pack_documents); "
                     f"it must be >= 0")
  args = (config.batch_size, config.seq_len, config.seed)
  if data.source == "tokens":
    return data_lib.ByteBatches(
        data_lib.token_file_ids(data.path, data.dtype,
                                vocab_size(config)),
        *args)
  if data.pack_documents:  # each file a document
    text, document_ids = (
        data_lib.text_file_bytes(data.path, data.max_bytes, documents=True)
        if data.source == "text" else data_lib.stdlib_source_bytes(data.max_bytes, documents=True))
    if align > 1:
      text, document_ids, padding = data_lib.aligned_documents(text, document_ids, align)
      return data_lib.ByteBatches(text, *args, document_ids=document_ids, padding=padding,
                                  align=align)
    return data_lib.ByteBatches(text, *args, document_ids=document_ids)
  if data.source == "text":
    return data_lib.ByteBatches(data_lib.text_file_bytes(data.path, data.max_bytes), *args)
  if data.source == "mqar":
    return data_lib.MQARBatches(
        *args, num_pairs=data.mqar_pairs, placement=data.mqar_placement,
        vocab_size=vocab_size(config), other_weight=data.other_weight,
        ids=data.get("mqar_ids", 0))
  text = data_lib.stdlib_source_bytes(data.max_bytes)
  if data.source == "passkey":
    return data_lib.PasskeyBatches(text, *args, other_weight=data.other_weight,
                                   digits=passkey_digits(config),
                                   min_distance=data.get("passkey_min_distance", 0),
                                   max_shift=data.get("passkey_max_shift", 0))
  return data_lib.ByteBatches(text, *args)


def loss_fn(model, tokens, weights):
  """Mean cross-entropy of `tokens [B, T + 1]`'s next tokens, weighted per target by `weights`
  (`[T]`, the same for every row, or `[B, T]`; 1 on a task's answers).

  Packed rows, `tokens [B, 2, T + 1]` (token ids, document ids): the model runs each document
  alone (`segment_ids`), and a document's first token, which the one before it cannot predict,
  carries no loss."""
  segment_ids = None
  if tokens.ndim == 3:
    tokens, segment_ids = tokens[:, 0], tokens[:, 1]
  if segment_ids is None:
    logits = model(tokens[:, :-1])
  else:
    logits = model(tokens[:, :-1], segment_ids[:, :-1])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])  # [B, T]
  weights = jnp.broadcast_to(weights, losses.shape)
  if segment_ids is not None:
    weights = weights * (segment_ids[:, 1:] == segment_ids[:, :-1])
  return jnp.sum(losses * weights) / jnp.sum(weights)


@nnx.jit(static_argnames="accum_steps")
def train_step(model, optimizer, tokens, weights, accum_steps=1):
  """One optimizer update on `tokens [B, T + 1]` (loss weights `[B, T]`, or `[T]` for every
  row), in `accum_steps` micro-batches of `B / accum` (their mean gradient is the whole batch's:
  same update, less activation memory)."""
  micro_batches = tokens.reshape(accum_steps, -1, *tokens.shape[1:])
  weights = jnp.broadcast_to(weights, (tokens.shape[0], weights.shape[-1]))
  micro_weights = weights.reshape(accum_steps, -1, weights.shape[-1])
  loss, grads = nnx.value_and_grad(loss_fn)(model, micro_batches[0], micro_weights[0])
  for micro, micro_weight in zip(micro_batches[1:], micro_weights[1:]):
    micro_loss, micro_grads = nnx.value_and_grad(loss_fn)(model, micro, micro_weight)
    loss, grads = loss + micro_loss, jax.tree.map(jnp.add, grads, micro_grads)
  grads = jax.tree.map(lambda g: g / accum_steps, grads)
  optimizer.update(model, grads)
  return loss / accum_steps


@nnx.jit
def eval_step(model, tokens, weights):
  return loss_fn(model, tokens, weights)


@nnx.jit
def eval_logits(model, tokens):
  return model(tokens)


def logits_fn(model):
  """`tokens int [B, T] (numpy or jax) -> logits [B, T, vocab]` of `model`, jitted: what the
  task metrics (`tasks.passkey_accuracy`, `tasks.mqar_accuracies`) call."""
  return lambda tokens: eval_logits(model, jnp.asarray(tokens))


PASSKEY_DEPTHS = (0.1, 0.5, 0.9)


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains from the latest checkpoint in `workdir` (or from scratch) to `config.steps`.

  Returns the metrics records written by this call.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  batches = build_data(config)
  mesh = parallel.mesh_from_config(config)
  parallel.check_divisible(config, mesh)
  with jax.set_mesh(mesh):
    return _train(config, workdir, batches, mesh)


def _train(config, workdir, batches, mesh):
  model = build_model(config, nnx.Rngs(config.seed))
  tx, schedule = build_optimizer(config)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for module in (model, optimizer):  # place the parameters and optimizer state on the mesh
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, parallel.state_shardings(state, mesh)))
  on_mesh = lambda batch: parallel.global_batch(batch, mesh)
  manager = ocp.CheckpointManager(
      (workdir / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints))
  train_batches = data_lib.train_iterator(batches, config.steps)  # grain: state checkpointed
  start = 0
  if manager.latest_step() is None and config.init_from:
    _warm_start(model, optimizer, config, config.init_from)
  if manager.latest_step() is not None:
    start = manager.latest_step()
    target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    restored = manager.restore(start, args=ocp.args.Composite(
        train_state=ocp.args.StandardRestore(target), data_iterator=ocp.args.JsonRestore()))
    nnx.update(model, restored.train_state["model"])
    nnx.update(optimizer, restored.train_state["optimizer"])
    train_batches.set_state(restored.data_iterator)
    print(f"resumed from step {start}", flush=True)

  records = []
  main_process = jax.process_index() == 0
  if main_process:
    (workdir / "config.json").write_text(config.to_json(indent=1))
  writer = SummaryWriter(str(workdir / "tensorboard")) if main_process else None
  progress = tqdm(total=config.steps, initial=start, unit="step", file=sys.stderr,
                  disable=not (main_process and sys.stderr.isatty()))
  with open(workdir / "metrics.jsonl", "a") as metrics:
    def log(record):
      records.append(record)
      if not main_process:
        return
      metrics.write(json.dumps(record) + "\n")
      metrics.flush()
      for name, value in record.items():
        if name != "step":
          for tag, scalar in _scalars(name, value):
            writer.add_scalar(tag, scalar, record["step"])
      writer.flush()
      progress.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in record.items()))

    tokens_per_step = config.batch_size * config.seq_len
    last_time = time.perf_counter()
    for step in range(start + 1, config.steps + 1):
      tokens, weights = next(train_batches)
      loss = float(train_step(model, optimizer, on_mesh(tokens), on_mesh(weights),
                              accum_steps=config.grad_accum_steps))
      if not np.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}; stopping with the last good checkpoint at step "
            f"{manager.latest_step()} in {workdir / 'checkpoints'}")
      if step % config.log_every == 0 or step == config.steps:
        now = time.perf_counter()
        steps_done = config.log_every if step % config.log_every == 0 else step % config.log_every
        tokens_per_s = steps_done * tokens_per_step / (now - last_time)
        log(dict(step=step, loss=loss, learning_rate=float(schedule(step)),
                 tokens_per_s=tokens_per_s))
        progress.set_postfix(loss=f"{loss:.3f}", tokens_per_s=f"{tokens_per_s:.3g}")
        last_time = now
      if step % config.eval_every == 0 or step == config.steps:
        held_out = np.mean([float(eval_step(model, on_mesh(batches.batch("held_out", i)),
                                            on_mesh(batches.weights("held_out", i))))
                            for i in range(config.eval_batches)])
        record = dict(step=step, held_out_loss=float(held_out))
        if config.data.source == "passkey":  # retrieval accuracy at the training length
          accuracy = tasks.passkey_accuracy(logits_fn(model),
                                            batches.splits["held_out"], [config.seq_len + 1],
                                            PASSKEY_DEPTHS, samples=config.eval_samples,
                                            seed=step, digits=batches.digits)
          record["passkey_accuracy"] = float(np.mean(list(accuracy.values())))
          probe = diagnostics.passkey_probe(batches.splits["held_out"], config.seq_len + 1,
                                            config.eval_samples, seed=step,
                                            digits=batches.digits)
        if config.data.source == "mqar":  # recall accuracy at the training length
          record.update(tasks.mqar_accuracies(
              logits_fn(model), config.seq_len + 1,
              batches.num_pairs, batches.vocab_size, samples=config.eval_samples,
              placement=batches.placement, seed=step, ids=batches.ids))
          probe = diagnostics.mqar_probe(config.seq_len + 1, batches.num_pairs,
                                         batches.vocab_size, batches.placement,
                                         config.eval_samples, seed=step, ids=batches.ids)
        if config.data.source in ("passkey", "mqar"):  # how the answers were (not) found
          record.update(diagnostics.token_attention(model, *probe))
          if config.attention != "dense":
            record.update(diagnostics.at_answers(model, *probe))
        log(record)
      if step % config.checkpoint_every == 0 or step == config.steps:
        manager.save(step, args=ocp.args.Composite(
            train_state=ocp.args.StandardSave({"model": nnx.state(model),
                                               "optimizer": nnx.state(optimizer)}),
            data_iterator=ocp.args.JsonSave(train_batches.get_state())))
      progress.update(1)
  progress.close()
  if writer is not None:
    writer.close()
  manager.wait_until_finished()
  manager.close()
  return records


def _scalars(name, value):
  """TensorBoard's `(tag, scalar)` pairs of a metric: itself, or one per entry of a (nested)
  list (`selection_hits/0`; `gates_at_answers/0/1`: layer 0, branch 1 of `nn.BRANCHES`)."""
  if not isinstance(value, (list, tuple)):
    return [(name, value)]
  return [pair for i, v in enumerate(value) for pair in _scalars(f"{name}/{i}", v)]


SCORES = ("held_out_loss", "mqar_accuracy", "mqar_first_accuracy", "passkey_accuracy")


def restore_model(model, optimizer, workdir) -> int:
  """Loads the model parameters of the latest checkpoint in `workdir`'s `checkpoints/` into
  `model` (`optimizer`, built for `model`, gives the checkpoint's structure; its state is not
  loaded). Returns the checkpoint's step; a `ValueError` if there is none."""
  source = (pathlib.Path(workdir) / "checkpoints").absolute()
  steps = ocp.utils.checkpoint_steps(source) if source.is_dir() else []
  if not steps:
    raise ValueError(f"workdir {str(workdir)!r} holds no checkpoint (looked in {source})")
  with ocp.CheckpointManager(source) as manager:
    target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    restored = manager.restore(max(steps), args=ocp.args.Composite(
        train_state=ocp.args.StandardRestore(target)))
  nnx.update(model, restored.train_state["model"])
  return max(steps)


def _warm_start(model, optimizer, config, init_from: str):
  """Loads the model parameters of the latest checkpoint in workdir `init_from` (a run of the
  same model, at any sequence length): a length curriculum's next stage. The optimizer state,
  the schedule and the data start afresh.

  A run of another attention kind (its `config.json` says which) gives the parameters both
  models have, by path and shape; the others keep their initialisation and are listed (e.g. a
  `window` run starts `nsa_no_selection` with fresh compression MLPs, a `dense` run starts NSA
  with fresh gates and compression MLPs)."""
  source_config = _saved_config(init_from)
  try:
    if source_config is None or source_config.attention == config.attention:
      step, fresh = restore_model(model, optimizer, init_from), []
    else:
      step, fresh = _restore_shared(model, source_config, init_from)
  except ValueError as error:
    raise ValueError(f"init_from={init_from!r}: {error}") from None
  print(f"initialised the model from {init_from} at step {step}", flush=True)
  if fresh:
    print(f"  not in its {source_config.attention} model, initialised afresh: "
          f"{', '.join(fresh)}", flush=True)


def _saved_config(workdir):
  """The config a run in `workdir` saved, or None."""
  path = pathlib.Path(workdir) / "config.json"
  return ml_collections.ConfigDict(json.loads(path.read_text())) if path.exists() else None


def _restore_shared(model, source_config, workdir):
  """Loads into `model` the parameters it shares (path and shape) with the model of
  `source_config`, whose run's checkpoints are in `workdir`: `(step, paths of the others)`."""
  source = build_model(source_config, nnx.Rngs(0))
  step = restore_model(source, nnx.Optimizer(source, build_optimizer(source_config)[0],
                                             wrt=nnx.Param), workdir)
  saved = dict(nnx.to_flat_state(nnx.state(source, nnx.Param)))
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  fresh = []
  for path, param in params:
    name = "/".join(map(str, path))
    if path not in saved:
      fresh.append(name)
      continue
    value, here = saved[path].get_value(), param.get_value()
    if value.shape != here.shape:
      raise ValueError(f"parameter {name} has shape {value.shape} in the checkpoint and "
                       f"{here.shape} in this model")
    param.set_value(jax.device_put(value.astype(here.dtype), here.sharding))
  nnx.update(model, nnx.from_flat_state(params))
  return step, fresh


def summary(workdir: str) -> str:
  """Where a finished run in `workdir` got to and where its outputs are (its last lines)."""
  workdir = pathlib.Path(workdir)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evaluations = [record for record in records if "held_out_loss" in record]
  lines = ["done."]
  if evaluations:
    last = evaluations[-1]
    scores = ", ".join(f"{name} {last[name]:.4g}" for name in SCORES if name in last)
    lines.append(f"  final evaluation (step {last['step']}): {scores}")
  lines += [
      f"  metrics:      {workdir / 'metrics.jsonl'} (one JSON record a line)",
      f"  checkpoints:  {workdir / 'checkpoints'} (rerunning the command resumes from the last)",
      f"  TensorBoard:  tensorboard --logdir {workdir / 'tensorboard'}",
      f"  plots:        python -m experiments.plot --workdir {workdir}",
  ]
  return "\n".join(lines)


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  if _CONFIG.value.multihost:
    jax.distributed.initialize()  # every host runs this same command
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  run(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(summary(_WORKDIR.value), flush=True)


if __name__ == "__main__":
  app.run(main)

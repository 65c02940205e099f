"""The training entry point: the demo config runs, resume is exact, config errors are clear."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import train
from experiments.configs import demo
from tests.helpers import tensorboard_scalars


def small_config(**overrides):
  config = demo.get_config()
  config.steps, config.log_every, config.eval_every, config.checkpoint_every = 6, 1, 3, 3
  config.batch_size, config.seq_len, config.eval_batches = 2, 64, 1
  config.data.max_bytes = 200_000
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_demo_config_trains_and_writes_metrics(tmp_path, attention):
  records = train.run(small_config(attention=attention), str(tmp_path))
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 6 and losses[-1] < losses[0]
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == records
  assert any("held_out_loss" in r for r in records)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]
  assert json.loads((tmp_path / "config.json").read_text())["attention"] == attention
  # The same scalars as TensorBoard events.
  logged = tensorboard_scalars(tmp_path / "tensorboard", "loss")
  assert logged == [(r["step"], pytest.approx(r["loss"])) for r in records if "loss" in r]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
  full = train.run(small_config(), str(tmp_path / "full"))
  first = train.run(small_config(steps=3), str(tmp_path / "resumed"))
  second = train.run(small_config(), str(tmp_path / "resumed"))  # resumes from step 3
  drop_speed = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_s"}
                                for r in records]
  assert drop_speed(first + second) == drop_speed(full)


def test_unknown_or_ill_typed_override_fails_before_running(tmp_path):
  for override, message in (("--config.stpes=3", "stpes"), ("--config.steps=many", "steps")):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config", demo.__file__,
         "--workdir", str(tmp_path), override], capture_output=True, text=True, timeout=120,
        cwd=pathlib.Path(__file__).parents[1])
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_config_errors_are_clear(tmp_path):
  with pytest.raises(ValueError, match="data.source must be one of"):
    train.run(small_config(data=dict(source="web", max_bytes=10)), str(tmp_path))
  with pytest.raises(ValueError, match="NSAConfig.slc_block"):
    train.run(small_config(nsa=dict(cmp_block=16, cmp_stride=8, slc_block=12, num_selected=4,
                                    num_initial=1, num_local=1, window=64)), str(tmp_path))


def test_gradient_accumulation_gives_the_same_updates(tmp_path):
  whole = train.run(small_config(batch_size=4), str(tmp_path / "whole"))
  accumulated = train.run(small_config(batch_size=4, grad_accum_steps=2), str(tmp_path / "acc"))
  losses = lambda records: [r["loss"] for r in records if "loss" in r]
  np.testing.assert_allclose(losses(accumulated), losses(whole), rtol=2e-5)
  with pytest.raises(ValueError, match=r"grad_accum_steps \(3\) must be >= 1 and divide"):
    train.run(small_config(batch_size=4, grad_accum_steps=3), str(tmp_path / "bad"))


def test_bfloat16_compute_trains(tmp_path):
  records = train.run(small_config(compute_dtype="bfloat16"), str(tmp_path))
  losses = [r["loss"] for r in records if "loss" in r]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  with pytest.raises(ValueError, match="compute_dtype must be one of"):
    train.run(small_config(compute_dtype="float8"), str(tmp_path / "bad"))


def test_passkey_source_trains_and_reports_retrieval_accuracy(tmp_path):
  config = small_config(seq_len=96)
  config.data.source = "passkey"
  records = train.run(config, str(tmp_path))
  accuracies = [r["passkey_accuracy"] for r in records if "passkey_accuracy" in r]
  assert len(accuracies) == 2 and all(0.0 <= a <= 1.0 for a in accuracies)
  assert np.isfinite([r["loss"] for r in records if "loss" in r]).all()

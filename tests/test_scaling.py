"""`experiments.scaling` on 2 CPU devices: every mesh it runs gives the one-device losses, and
its table says so; FSDP's gathers are found, the attention inputs' are not."""

import json

import pytest

from experiments import scaling

TINY = ["--set", "batch_size=8", "--set", "seq_len=64", "--set", "model.num_kv_heads=2",
        "--set", "eval_batches=1", "--set", "model.num_layers=1"]


def test_scaling_on_two_cpu_devices_matches_one_device(tmp_path, capsys):
  out = tmp_path / "scaling.json"
  scaling.main(["--config", "demo", "--devices", "2", "--attention", "nsa", "--steps", "2",
                "--warmup", "1", "--platform", "cpu", "--out", str(out), *TINY])
  result = json.loads(out.read_text())
  assert [r["mesh"] for r in result["rows"]] == ["1x1x1", "2x1x1", "1x2x1", "1x1x2"]
  assert [r["devices"] for r in result["runs"]] == [1, 2, 2, 2]
  # float32 on CPU: sharding changes only the summation order.
  assert all(r["max_loss_rel_diff"] <= 1e-4 and r["losses_equal"] for r in result["rows"])
  assert not any(r["attention_inputs_gathered"] for r in result["rows"])
  fsdp = result["runs"][2]
  assert 2 in scaling.gathered_ranks(fsdp["all_gathers"]), fsdp["all_gathers"]
  assert result["runs"][0]["all_gathers"] == []
  assert all(len(run["losses"]) == 2 for run in result["runs"])
  printed = capsys.readouterr().out
  assert printed.count("| nsa |") == 4 and "DIFFERS" not in printed


def test_scaling_meshes_and_config_overrides():
  assert scaling.meshes_for(1) == []
  assert scaling.meshes_for(4) == [(4, 1, 1), (1, 4, 1), (2, 1, 2)]
  assert scaling.meshes_for(3) == [(3, 1, 1), (1, 3, 1)]
  config = scaling.load_config("demo", "dense", 7, (1, 2, 1), ["model.num_kv_heads=2",
                                                               "compute_dtype=bfloat16",
                                                               "data.source='passkey'"])
  assert (config.attention, config.steps, config.mesh.fsdp) == ("dense", 7, 2)
  assert (config.model.num_kv_heads, config.compute_dtype) == (2, "bfloat16")
  assert config.data.source == "passkey"
  with pytest.raises(ValueError, match="no field 'model.heads'"):
    scaling.load_config("demo", "nsa", 7, (1, 1, 1), ["model.heads=2"])
  with pytest.raises(ValueError, match="field=value"):
    scaling.load_config("demo", "nsa", 7, (1, 1, 1), ["steps"])
  with pytest.raises(ValueError, match="--devices must be at least 1"):
    scaling.main(["--devices", "0"])

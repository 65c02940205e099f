"""The command line and JSON record shared by the floor probes (`score_floor`, `selected_floor`):
each times one kernel's launch with parts of its body swapped out, a row a variant."""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import jax


def parse_args(argv, variants):
  """`--seq_len`, `--repeats`, `--variants` (comma-separated names of `variants`, default all),
  `--interpret` (a CPU plumbing check) and `--out` (a JSON file)."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--seq_len", type=int, default=65536)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--variants", default=",".join(variants))
  parser.add_argument("--interpret", action="store_true", help="CPU plumbing check")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  unknown = sorted(set(args.variants.split(",")) - set(variants))
  if unknown:
    parser.error(f"--variants: unknown {unknown}; known: {sorted(variants)}")
  return args


def record(out, **fields):
  """`fields` with the date and the device, written as JSON to `out` (if given); returned."""
  result = dict(date=datetime.date.today().isoformat(), device=jax.devices()[0].device_kind,
                **fields)
  if out:
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
  return result

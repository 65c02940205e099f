"""Per-kernel device time from a `jax.profiler` trace: what each kernel of a jitted call costs.

Wall-clock timing of parts run alone overlaps and carries the timing loop's own cost; the
profiler's trace has each kernel's duration on the device. Used by `profile_decode --trace` and
`bench_kernels --trace`.

    times = kernel_times(lambda: jax.block_until_ready(f(x)))   # {kernel name: us per call}
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import tempfile
from typing import Callable

import jax


def kernel_times(run: Callable[[], object], calls: int = 1) -> dict[str, float]:
  """Device microseconds per kernel name for one `run()`, most expensive first.

  `run` does one blocking call (a closure that may carry state, e.g. a donated cache); it runs
  once to compile and warm up, then `calls` times under the profiler. Durations are summed per
  name and divided by `calls`. Events of GPU processes count when there are any (the host's own
  events are left out), else every complete event (CPU runs, for tests).
  """
  run()
  with tempfile.TemporaryDirectory() as logdir:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      for _ in range(calls):
        run()
    trace = next(pathlib.Path(logdir).rglob("perfetto_trace.json.gz"))
    events = json.load(gzip.open(trace))
  events = events["traceEvents"] if isinstance(events, dict) else events
  processes = {e["pid"]: e["args"].get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = {pid for pid, name in processes.items() if "GPU" in name.upper()}
  totals = collections.defaultdict(float)
  for event in events:
    if event.get("ph") == "X" and (not gpu or event.get("pid") in gpu):
      totals[event["name"]] += event.get("dur", 0.0)
  return dict(sorted(((name, total / calls) for name, total in totals.items()),
                     key=lambda item: -item[1]))

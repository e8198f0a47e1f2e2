"""How busy the rest of the machine was while a benchmark ran, and whether its ratio can be trusted.

A speed ratio between two runtimes means something only if both had the CPUs to themselves. Two signs say they
did not, and the rule (`judge`) refuses a ratio on either:

* other processes' CPU time: the machine's busy time in /proc/stat (steal included: other tenants of a VM) minus
  this process's own CPU time, as a fraction of all the machine's CPU time over the same interval. Measured
  before the run (a short probe while this process idles) and over the whole timed part.
* each side's CPU utilization per timed step: process CPU time / (wall time x threads the side computes on).
  A side whose threads were runnable but not running (another process had the cores) shows wall time that its
  CPU time does not account for.

The 1-, 5- and 15-minute load averages before and after are recorded too; they count this process's own threads,
so they describe the run without entering the rule. Linux only: elsewhere nothing is measured and `judge` says so.
"""

from __future__ import annotations

import dataclasses
import os
import time

# Fields of /proc/stat's first line, in order (proc(5)); guest time is already counted in user time.
_STAT_FIELDS = ('user', 'nice', 'system', 'idle', 'iowait', 'irq', 'softirq', 'steal')
_IDLE_FIELDS = ('idle', 'iowait')

# The rule's defaults (bench.py's --max_other_load and --min_cpu_utilization).
MAX_OTHER_LOAD = 0.10  # Other processes may use at most 10% of the machine's CPU time.
MIN_CPU_UTILIZATION = 0.5  # Each side must get at least half the CPU time its threads could use.


@dataclasses.dataclass(frozen=True)
class Sample:
  """The machine's and this process's CPU time at one moment."""

  wall: float  # time.monotonic(), seconds
  busy: float  # all CPUs' non-idle time since boot, seconds (steal included)
  steal: float  # of which stolen by the hypervisor
  total: float  # all CPUs' time since boot, seconds
  own: float  # this process's CPU time (all its threads), seconds
  loadavg: tuple[float, float, float]


def parse_proc_stat(text: str, ticks_per_second: float) -> tuple[float, float, float]:
  """(busy, steal, total) seconds of all CPUs from /proc/stat's `text`."""
  first = text.splitlines()[0].split()
  if first[0] != 'cpu':
    raise ValueError(f'/proc/stat should start with the "cpu" line, got {first[0]!r}.')
  values = dict(zip(_STAT_FIELDS, (int(v) / ticks_per_second for v in first[1:])))
  total = sum(values.values())
  idle = sum(values.get(name, 0.0) for name in _IDLE_FIELDS)
  return total - idle, values.get('steal', 0.0), total


def sample(path: str = '/proc/stat') -> Sample | None:
  """The current sample; None where /proc/stat cannot be read (not Linux)."""
  try:
    with open(path) as f:
      busy, steal, total = parse_proc_stat(f.read(), os.sysconf('SC_CLK_TCK'))
  except (OSError, ValueError):
    return None
  return Sample(time.monotonic(), busy, steal, total, time.process_time(), os.getloadavg())


def others(before: Sample | None, after: Sample | None) -> dict | None:
  """Other processes' share of the machine's CPU time between two samples, and the steal share alone."""
  if before is None or after is None or after.total <= before.total:
    return None
  total = after.total - before.total
  other = (after.busy - before.busy) - (after.own - before.own)
  return dict(other_cpu_fraction=round(max(other, 0.0) / total, 3),
              steal_fraction=round((after.steal - before.steal) / total, 3),
              seconds=round(after.wall - before.wall, 2))


def probe(seconds: float = 1.0) -> dict | None:
  """Other processes' load while this process sleeps for `seconds`."""
  before = sample()
  time.sleep(seconds)
  return others(before, sample())


def utilization(cpu_seconds: float, wall_seconds: float, threads: int) -> float:
  """CPU time per wall time per thread: near 1 when every thread computed throughout, lower when they waited."""
  return cpu_seconds / (wall_seconds * threads) if wall_seconds > 0 and threads > 0 else 0.0


def judge(before: dict | None, during: dict | None, utilizations: dict[str, float],
          max_other_load: float = MAX_OTHER_LOAD, min_cpu_utilization: float = MIN_CPU_UTILIZATION) -> list[str]:
  """The reasons the machine was contended; an empty list if it was not.

  `before` and `during` are `others()` results (before the run, over the timed steps); `utilizations` maps each
  timed side (e.g. 'jax train') to its median per-step `utilization`. Unmeasurable load counts as contention:
  a ratio is only printed when the machine was seen to be idle.
  """
  reasons = []
  for when, load in (('before the run', before), ('during the timed steps', during)):
    if load is None:
      reasons.append(f'the load of other processes {when} could not be measured (no /proc/stat)')
    elif load['other_cpu_fraction'] > max_other_load:
      reasons.append(f'other processes used {load["other_cpu_fraction"]:.0%} of the machine\'s CPU time {when} '
                     f'(limit {max_other_load:.0%}; steal {load["steal_fraction"]:.0%})')
  for side, value in utilizations.items():
    if value < min_cpu_utilization:
      reasons.append(f'{side}: CPU time per step was {value:.2f} of wall time x threads '
                     f'(limit {min_cpu_utilization:.2f}): its threads waited for the CPU')
  return reasons

"""The largest batch per device whose train step fits a target, per block form: a search over compiles."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ml_collections

from densenet_jax.compile_check import check, targets

# The block forms a search compares (densenet_jax/model/densenet.py; config fields of platform.Form).
FORMS = {
    'unrolled': {'memory_efficient': False, 'layers_per_scan': 0},
    'memory_efficient': {'memory_efficient': True, 'layers_per_scan': 0},
}


def with_batch(config: ml_collections.ConfigDict, batch_size: int, form: dict[str, Any]) -> ml_collections.ConfigDict:
  changed = config.copy_and_resolve_references()
  changed.batch_size = batch_size
  for field, value in form.items():
    changed[field] = value
  return changed


def largest_batch(peak: Callable[[int], float | None], start: int, step: int, limit: int) -> int:
  """The largest multiple of `step`, at most `limit`, whose `peak` (the step's peak memory as a fraction of the
  device's; None where the compiler refuses the step) is at most 1; 0 when not even `step` fits.

  Peak memory grows about linearly with the batch, so each try is where a line through the tries nearest the
  device's memory (through zero after one try) reaches it: mostly three or four compiles, `start`, one or two
  predictions and one step more. Where the line misleads (near the limit XLA rematerializes; a refusal gives no
  figure), the search doubles the largest fit, or bisects once a try has not fit and two tries in a row fell on
  one side. Assumes that what fits at n also fits below n."""
  top = limit // step * step
  fractions: dict[int, float | None] = {}
  n = min(max(step, start // step * step), top)
  streak, last_fit = 0, None  # tries in a row with the same outcome, and that outcome
  line_holds, foretold = True, None  # whether the line still leads the search; what it said of the next try
  while True:
    fractions[n] = peak(n)
    fit = fractions[n] is not None and fractions[n] <= 1
    streak, last_fit = (streak + 1 if fit == last_fit else 1), fit
    low = max((m for m, f in fractions.items() if f is not None and f <= 1), default=0)
    high = min((m for m in fractions if m > low), default=None)
    if low >= top or (high is not None and high - low <= step):
      return low
    # A line through two tries that foretold wrong, or that creeps up on a bracket, is left for bisection.
    line_holds = line_holds and foretold in (None, fit) and (not low or high is None or streak < 2)
    crossing = _where_the_line_reaches_one(fractions) if line_holds else None
    follow = crossing is not None and crossing >= low
    two_tries = sum(f is not None for f in fractions.values()) >= 2  # not a line through zero
    n = crossing if follow else 2 * low if high is None else (low + high) // 2
    if follow and two_tries and high is None:
      # Near the limit XLA rematerializes, and two tries can lie on an almost flat line: go at most 4x beyond the
      # largest fit, or twice as far as peak memory proportional to the batch would allow.
      n = min(n, max(4 * low, 2 * low / fractions[low]))
    n = min(max(int(n) // step * step, low + step), top if high is None else high - step)
    foretold = n <= crossing if follow and two_tries else None  # what the line says of n: fits or not


def _where_the_line_reaches_one(fractions: dict[int, float | None]) -> float | None:
  """The batch at which the line through the two tries nearest to fitting exactly (one on each side where there
  are both) reaches a fraction of 1; through zero where only one try has a figure."""
  known = sorted((n, f) for n, f in fractions.items() if f is not None)
  below, above = [p for p in known if p[1] <= 1], [p for p in known if p[1] > 1]
  pair = below[-1:] + above[:1] if below and above else below[-2:] or above[:2]
  if len(pair) == 1:
    pair.insert(0, (0, 0.0))
  if not pair or pair[1][1] <= pair[0][1]:
    return None
  (a, fa), (b, fb) = pair
  return a + (1 - fa) * (b - a) / (fb - fa)


def search(config: ml_collections.ConfigDict, target: targets.Target, forms=tuple(FORMS), *,
           resolution: int = 8, limit: int = 65536, on_try: Callable[[str, int, float | None], None] | None = None
           ) -> dict[str, dict]:
  """{form: {'batch_per_device', 'run'}}: the largest per-device batch (a multiple of `resolution` and of the
  config's BatchNorm group) whose train step compiles and fits the device's memory, for each form, searched from
  the config's batch. `on_try(form, batch, fraction)` hears of each compile (fraction None: XLA refused)."""
  devices = target.layout()['chips']
  step = math.lcm(resolution, config.get('batch_norm_group_size') or 1)
  start = max(step, config.batch_size // devices)
  found = {}
  for form in forms:
    runs = {}

    def peak(per_device: int, form=form, runs=runs) -> float | None:
      try:
        runs[per_device] = check.run_check(with_batch(config, per_device * devices, FORMS[form]), target,
                                           which=('train',))
        fraction = runs[per_device]['steps']['train']['memory']['fraction_of_hbm']
      except check.DoesNotFitError:
        fraction = None
      if on_try:
        on_try(form, per_device, fraction)
      return fraction

    batch = largest_batch(peak, start, step, limit)
    found[form] = {'batch_per_device': batch, 'run': runs.get(batch)}
  return found

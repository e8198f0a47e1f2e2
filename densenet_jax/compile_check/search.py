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


def largest_batch(fits: Callable[[int], dict | None], start: int, step: int, limit: int) -> tuple[int, dict | None]:
  """The largest multiple of `step` (at most `limit`) for which `fits` returns a result, and that result; (0,
  None) when not even `step` fits. Doubles from `start` until one does not fit, then bisects: about
  2 log2(largest / step) calls. Assumes what fits at n also fits below n."""
  n = max(step, start // step * step)
  result = fits(n)
  if result is None:
    high = n
    while result is None and n > step:
      high, n = n, max(step, n // 2 // step * step)
      result = fits(n)
    if result is None:
      return 0, None
  else:
    high = None
    while high is None:
      if n >= limit:
        return n, result
      larger = min(n * 2, limit // step * step)
      found = fits(larger)
      if found is None:
        high = larger
      else:
        n, result = larger, found
  low = n
  while high - low > step:
    middle = (low + high) // 2 // step * step
    found = fits(middle)
    low, high, result = (middle, high, found) if found is not None else (low, middle, result)
  return low, result


def search(config: ml_collections.ConfigDict, target: targets.Target, forms=tuple(FORMS), *,
           resolution: int = 8, limit: int = 65536, on_try: Callable[[str, int, bool], None] | None = None
           ) -> dict[str, dict]:
  """{form: {'batch_per_device', 'run'}}: the largest per-device batch (a multiple of `resolution` and of the
  config's BatchNorm group) whose train step compiles and fits the device's memory, for each form."""
  devices = target.layout()['chips']
  step = math.lcm(resolution, config.get('batch_norm_group_size') or 1)
  start = max(step, config.batch_size // devices)
  found = {}
  for form in forms:

    def fits(per_device: int, form=form) -> dict | None:
      try:
        run = check.run_check(with_batch(config, per_device * devices, FORMS[form]), target, which=('train',))
        ok = run['steps']['train']['memory']['fraction_of_hbm'] <= 1
      except check.DoesNotFitError:
        run, ok = None, False
      if on_try:
        on_try(form, per_device, ok)
      return run if ok else None

    batch, run = largest_batch(fits, start, step, limit)
    found[form] = {'batch_per_device': batch, 'run': run}
  return found

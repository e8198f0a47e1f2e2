"""Train and eval steps with freed host memory kept for reuse (densenet_jax/platform/host_memory.py) against glibc's defaults.

    python benchmarks/host_memory.py --model densenet121 --batch 8 --rounds 4 --steps 3

One process, taking turns: the process starts as the entry points do (freed memory kept, computations run on the
calling thread), and the two sides differ in what glibc does with freed blocks:

* `kept`: host_memory.KEEP_FREED: every block from the heap, and the heap never trimmed;
* `returned`: glibc's default mmap count and trim threshold again, and malloc_trim(0) before every step, which
  hands every free page back to the kernel, as glibc's defaults do with the blocks over their mmap threshold
  (up to 32 MiB) on every free; the step then faults them in again.

Each round runs one untimed step after the switch, then `--steps` timed ones. Reported per side: the median step,
and per step the CPU time, the kernel's share of it and the minor page faults. Linux with glibc only.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from densenet_jax import platform  # noqa: E402

platform.prepare_environment()  # Before JAX starts: freed memory kept, as in train.py.

from benchmarks import bench, common  # noqa: E402
from densenet_jax.platform import host_memory  # noqa: E402


def _usage() -> tuple[float, float, float, int]:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return time.perf_counter(), usage.ru_utime + usage.ru_stime, usage.ru_stime, usage.ru_minflt


def measure(step, side: str, libc) -> dict:
  """One step of `step` on `side`: seconds of wall, CPU and kernel time, and minor page faults."""
  if side == 'returned':
    libc.malloc_trim(0)
  before = _usage()
  step()
  after = _usage()
  wall, cpu, kernel, faults = (b - a for a, b in zip(before, after))
  return dict(wall=wall, cpu=cpu, kernel=kernel, faults=faults)


def switch(side: str) -> None:
  options = host_memory.KEEP_FREED if side == 'kept' else host_memory.GLIBC_DEFAULTS
  if not host_memory.set_malloc_options(options):
    raise SystemExit('glibc did not take the allocator options.')


def compare(steps: dict, rounds: int, steps_per_round: int, libc) -> dict:
  """Per step kind ('train', 'eval') and side: the medians of each quantity over the timed steps."""
  result = {}
  for kind, step in steps.items():
    samples = {'kept': [], 'returned': []}
    for _ in range(rounds):
      for side in samples:
        switch(side)
        measure(step, side, libc)  # Untimed: the first step after a switch refills or empties the heap.
        samples[side] += [measure(step, side, libc) for _ in range(steps_per_round)]
    result[kind] = {side: {key: round(statistics.median(s[key] for s in runs), 4) for key in runs[0]}
                    for side, runs in samples.items()}
    kept, returned = result[kind]['kept']['wall'], result[kind]['returned']['wall']
    result[kind]['speedup_kept'] = round(returned / kept, 3)
    switch('kept')
  return result


def run(args: argparse.Namespace) -> dict:
  if not host_memory.applies():
    raise SystemExit('Freed memory is not kept in this process (not glibc, not the CPU, or GLIBC_TUNABLES or '
                     'MALLOC_* set): nothing to compare.')
  libc = host_memory.glibc()
  model, size = common.create_model(args)
  runner = bench.JaxRunner(model, args.batch, size)
  runner.train(), runner.eval()  # Warm-up (and the eval compile).
  result = dict(model=args.model, batch=args.batch, image_size=size, **common.environment(),
                temp_bytes=runner.temp_bytes, rounds=args.rounds, steps=args.steps)
  result.update(compare({'train': runner.train, 'eval': runner.eval}, args.rounds, args.steps, libc))
  return result


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_model_arguments(parser, model='densenet121', batch=8)
  parser.add_argument('--rounds', type=int, default=4)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--json', default=None, help='write the result object to this file')
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  common.report(run(args), args.json)


if __name__ == '__main__':
  main()

"""Kills a tiny training run with SIGKILL at random moments and resumes it until it finishes; checks what is left.

  python -m benchmarks.kill_resume --kills 20 --epochs 20 --dir /tmp/kill_resume      # from the repository root

What it does: one uninterrupted run of a tiny config (digits, a one-layer-per-block DenseNet-BC) as the reference;
then the same config in another workdir, started again and again with `python train.py` and killed with `kill -9`
at a random moment of its start-up, of its training, or of a checkpoint write (in turn), until `--kills` kills
have landed (`kills` in the result is fewer if the run finished first: give more `--epochs`); then it runs to
the end. After each kill the complete checkpoints must match their checksums; at the end
metrics.jsonl must hold every logged step exactly once and in order, with the reference's values, the final
metrics and weights must equal the reference's bit for bit, and every checkpoint must hold finite values. Last, a
diverging run (learning rate 1e6) must stop with exit code 1 and leave only finite checkpoints. The numbers of the
last run are in docs/faults.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import time

import jax
import numpy as np

from densenet_jax.io import checkpoints, integrity
from densenet_jax.io import loading
from densenet_jax.io import workdir as workdir_lib
from densenet_jax.training import reporting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Digits, a one-layer-per-block DenseNet-BC, batch 128: 11 steps per epoch, every step logged (the tests' tiny run).
TINY_RUN = [
    '--config=configs/quickstart.py',
    '--config.architecture.depth=10',
    '--config.architecture.growth_rate=4',
    '--config.batch_size=128',
    '--config.log_every_steps=1',
    '--config.progress_bar=False',
]
# And a checkpoint at the end of each epoch.
TINY = [*TINY_RUN, '--config.checkpoint_every_epochs=1', '--config.eval_every_epochs=1',
        '--config.lr_boundaries_epochs=(2,)']
COMPARED = ('train_loss', 'train_accuracy', 'learning_rate', 'eval_loss', 'eval_accuracy', 'eval_top5_accuracy')
POLL_SECONDS = 0.005


@dataclasses.dataclass
class Tally:
  kills: int = 0
  kills_while_writing: int = 0  # that start's unfinished `<step>.orbax-checkpoint-tmp` existed at the kill
  kills_before_first_step: int = 0  # that start logged no training step
  kills_by_mode: dict = dataclasses.field(default_factory=dict)
  starts: int = 0
  unverified_checkpoints: int = 0  # complete, but killed before their checksums were written
  checkpoint_checks: int = 0


def command(workdir: str, epochs: int, cache: str, *extra: str) -> list[str]:
  return [sys.executable, 'train.py', f'--workdir={workdir}', *TINY, f'--config.num_epochs={epochs}',
          f'--config.compilation_cache_dir={cache}', *extra]


def start(args: list[str]) -> subprocess.Popen:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, expected_code: int = 0) -> str:
  output, _ = process.communicate(timeout=900)
  if process.returncode != expected_code:
    raise AssertionError(f'exit code {process.returncode}, expected {expected_code}:\n{output[-4000:]}')
  return output


def _unfinished(checkpoint_dir: str) -> set[tuple[str, int]]:
  """The unfinished checkpoint directories (name, inode): those of this start, and those a kill left behind."""
  found = set()
  for name in os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else ():
    if checkpoints.INCOMPLETE_MARKER in name:
      try:
        found.add((name, os.stat(os.path.join(checkpoint_dir, name)).st_ino))
      except FileNotFoundError:  # renamed or deleted meanwhile
        pass
  return found


def _metrics_lines(workdir: str) -> set[str]:
  path = os.path.join(workdir, workdir_lib.METRICS_FILE)
  if not os.path.exists(path):
    return set()
  with open(path) as f:
    return {line for line in f if '"train_loss"' in line}


def check_checkpoints(workdir: str, tally: Tally | None = None) -> list[int]:
  """The complete checkpoints' steps; raises unless each matches its checksums (those without are counted)."""
  directory = os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR)
  steps = checkpoints.complete_steps(directory)
  for step in steps:
    step_dir = os.path.join(directory, str(step))
    problem = integrity.problem(step_dir)
    if problem is not None:
      raise AssertionError(f'checkpoint {step_dir} is damaged: {problem}')
    if tally is not None:
      tally.checkpoint_checks += 1
      tally.unverified_checkpoints += not integrity.has_checksums(step_dir)
  return steps


def all_finite(workdir: str) -> bool:
  directory = os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR)
  for step in checkpoints.complete_steps(directory):
    variables = checkpoints.load_variables(os.path.join(directory, str(step)))
    if not all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(variables)):
      return False
  return True


def logged(workdir: str) -> dict[str, list]:
  """Per kind of record (train, eval): the steps in file order and the compared values."""
  records = reporting.read_metrics(workdir)
  result = {}
  for kind in ('train_loss', 'eval_loss'):
    kept = [r for r in records if kind in r]
    result[kind] = ([r['step'] for r in kept], [[r.get(k) for k in COMPARED] for r in kept])
  return result


MODES = ('start-up', 'training', 'checkpoint write')  # where kill number i lands: MODES[i % 3]


def _trained_past(workdir: str, step: int) -> bool:
  return any('train_loss' in r and r['step'] > step for r in reporting.read_metrics(workdir))


def _wait_for(process: subprocess.Popen, condition, timeout: float) -> bool:
  deadline = time.monotonic() + timeout
  while process.poll() is None and time.monotonic() < deadline:
    if condition():
      return True
    time.sleep(POLL_SECONDS)
  return False


def kill_and_resume(workdir: str, epochs: int, cache: str, kills: int, timing: dict, rng: random.Random,
                    tally: Tally, modes: tuple[str, ...] = MODES) -> str:
  """Starts the run until `kills` kills have landed, then lets it finish; returns the last start's output.

  Kill i lands in modes[i % len(modes)]: at a random moment of the start-up (before the reference run's first
  step), at a random moment of the first two epochs' time after this start's first step, or a few milliseconds
  after a checkpoint write begins (or, if the poll misses the write, right after the checkpoint appears).
  """
  checkpoint_dir = os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR)
  while tally.kills < kills:
    left_behind, logged_before = _unfinished(checkpoint_dir), _metrics_lines(workdir)
    writing = lambda: bool(_unfinished(checkpoint_dir) - left_behind)
    process = start(command(workdir, epochs, cache))
    tally.starts += 1
    mode = modes[tally.kills % len(modes)]
    if mode == 'start-up':
      _wait_for(process, lambda: False, rng.uniform(0.0, timing['start_up_seconds']))
    elif mode == 'training':
      if _wait_for(process, lambda: bool(_metrics_lines(workdir) - logged_before), 600):
        _wait_for(process, lambda: False, rng.uniform(0.0, 2 * timing['epoch_seconds']))
    else:
      known = set(checkpoints.complete_steps(checkpoint_dir))
      if _wait_for(process, lambda: writing() or set(checkpoints.complete_steps(checkpoint_dir)) - known, 600):
        time.sleep(rng.uniform(0.0, 0.02))
    if process.poll() is not None:  # finished before the kill
      output = process.communicate()[0]
      if process.returncode != 0:
        raise AssertionError(f'a resumed run failed:\n{output[-4000:]}')
      return output
    was_writing = writing()
    process.kill()
    process.communicate()
    tally.kills += 1
    tally.kills_while_writing += was_writing
    tally.kills_before_first_step += not _metrics_lines(workdir) - logged_before  # logged no new training step
    tally.kills_by_mode[mode] = tally.kills_by_mode.get(mode, 0) + 1
    check_checkpoints(workdir, tally)
  tally.starts += 1
  return finish(start(command(workdir, epochs, cache)))


def reference_run(workdir: str, epochs: int, cache: str) -> tuple[str, dict]:
  """The uninterrupted run's output, and how long its start-up and epochs took."""
  began = time.monotonic()
  process = start(command(workdir, epochs, cache))
  _wait_for(process, lambda: _trained_past(workdir, 0), 600)
  first_step = time.monotonic()
  output = finish(process)
  seconds = time.monotonic() - began
  timing = dict(start_up_seconds=first_step - began, epoch_seconds=(seconds - (first_step - began)) / epochs,
                uninterrupted_seconds=seconds)
  return output, {k: round(v, 2) for k, v in timing.items()}


def run(directory: str, kills: int, epochs: int, seed: int, *, warm_up: bool = True, diverge: bool = True,
        modes: tuple[str, ...] = MODES) -> dict:
  """The whole experiment in `directory` (emptied first); returns the measured numbers, raises if a check fails.

  Without `warm_up` the reference run fills the compilation cache (its start-up time then includes compiling);
  without `diverge` the diverging run is left out. `modes`: where the kills land, in turn (a subset of MODES).
  """
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  cache = os.path.join(directory, 'compilation_cache')
  rng = random.Random(seed)

  reference = os.path.join(directory, 'uninterrupted')
  if warm_up:  # fills the compilation cache, so that the reference's start-up is what a resume's is
    finish(start(command(os.path.join(directory, 'warm-up'), 3, cache)))
  reference_output, timing = reference_run(reference, epochs, cache)

  workdir, tally = os.path.join(directory, 'killed'), Tally()
  began = time.monotonic()
  output = kill_and_resume(workdir, epochs, cache, kills, timing, rng, tally, modes)
  killed_seconds = time.monotonic() - began

  expected, got = logged(reference), logged(workdir)
  for kind, (steps, values) in got.items():
    if steps != sorted(set(steps)):
      raise AssertionError(f'{kind} steps logged more than once or out of order: {steps}')
    if (steps, values) != expected[kind]:
      raise AssertionError(f'{kind} records differ from the uninterrupted run:\n{got[kind]}\n{expected[kind]}')
  final, reference_final = output.strip().splitlines()[-1], reference_output.strip().splitlines()[-1]
  if final != reference_final:
    raise AssertionError(f'final metrics {final!r} differ from the uninterrupted run {reference_final!r}')
  params = jax.tree.leaves(loading.load_variables(workdir))
  reference_params = jax.tree.leaves(loading.load_variables(reference))
  if not all(np.array_equal(a, b) for a, b in zip(params, reference_params)):
    raise AssertionError('the final weights differ from the uninterrupted run')
  final_steps = check_checkpoints(workdir)
  if not all_finite(workdir):
    raise AssertionError('a checkpoint holds a non-finite value')

  result = dict(
      **dataclasses.asdict(tally), kills_asked=kills, epochs=epochs, seed=seed,
      logged_train_steps=len(got['train_loss'][0]), logged_eval_steps=len(got['eval_loss'][0]),
      final_metrics=final, final_checkpoints=final_steps, **timing,
      killed_and_resumed_seconds=round(killed_seconds, 1), host_cpus=os.cpu_count(),
  )
  if not diverge:
    return result
  diverged = os.path.join(directory, 'diverged')
  diverged_output = finish(start(command(diverged, 4, cache, '--config.learning_rate=1e6',
                                         '--config.batch_size=1024', '--config.lr_boundaries_epochs=()')), 1)
  if 'Training stopped: ' not in diverged_output or 'Traceback' in diverged_output:
    raise AssertionError(f'the diverged run did not stop with one paragraph:\n{diverged_output[-3000:]}')
  diverged_steps = check_checkpoints(diverged)
  if not all_finite(diverged):
    raise AssertionError('a checkpoint of the diverged run holds a non-finite value')

  return dict(**result, diverged_checkpoints=diverged_steps, diverged_message=next(
      line for line in diverged_output.splitlines() if line.startswith('Training stopped')))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--epochs', type=int, default=20, help='11 steps each; the run must last for all the kills')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--dir', default='/tmp/kill_resume', help='emptied, then used for the workdirs')
  parser.add_argument('--json', default=None, help='also write the result to this file')
  args = parser.parse_args()
  result = run(args.dir, args.kills, args.epochs, args.seed)
  print(json.dumps(result, indent=2))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()

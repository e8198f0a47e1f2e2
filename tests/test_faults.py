"""What the user sees when things go wrong: bad configs, crashes while saving, full disks, preemption.

docs/faults.md lists every failure with what the program does and what the user does.
"""

import errno
import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from unittest import mock

import jax
import ml_collections
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from chosen import chosen_form
from densenet_jax import config as config_lib
from densenet_jax.io import checkpoints
from densenet_jax import model as model_lib
from densenet_jax.io import loading
from densenet_jax.io import workdir as workdir_lib
from densenet_jax.data import pipeline
from densenet_jax.training import optim, stopping
from densenet_jax.training import reporting
from densenet_jax import evaluation
from densenet_jax.training import loop as training
from tests.test_cli import CPP_LOG_LINE
from tests.test_train import tiny_config
from tests.test_train_processes import ROOT, run_train

BATCH_SIZE = 128
STEPS_PER_EPOCH = 1437 // BATCH_SIZE  # digits' training split


BAD_SETUPS = {  # what the message must name: (overrides, environment)
    'lr_boundaries_epochs': (['--config.lr_boundaries_epochs=(100,)'], {}),
    'batch_sise': (['--config.batch_sise=3'], {}),  # a typo, rejected while the flags are parsed
    'batch_size': (['--config.batch_size=63'], {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}),
    'tfds build cifar10': (['--config.dataset=cifar10', '--config.data_dir=/nonexistent/tfds',
                            '--config.lr_boundaries_epochs=()'], {}),  # data not prepared
}


def _image_folder_with_a_corrupt_file(root):
  for split in ('train', 'val'):
    for label in ('a', 'b'):
      os.makedirs(root / split / label)
      for i in range(4):
        image = np.full((36, 36, 3), 40 * i, np.uint8)
        with open(root / split / label / f'{i}.png', 'wb') as f:
          f.write(tf_encode_png(image))
  (root / 'train' / 'b' / '3.png').write_bytes(b'not an image')


def tf_encode_png(image):
  import tensorflow as tf

  return tf.io.encode_png(image).numpy()


def test_bad_configs_and_missing_data_exit_2_with_one_paragraph_and_no_traceback(tmp_path):
  _image_folder_with_a_corrupt_file(tmp_path / 'images')
  (tmp_path / 'syntax.py').write_text('def get_config(:\n')
  (tmp_path / 'wrong_type.py').write_text(
      'from configs import quickstart\ndef get_config():\n  c = quickstart.get_config()\n'
      '  c.batch_size = "abc"\n  return c\n')
  (tmp_path / 'truncated').mkdir()
  (tmp_path / 'truncated' / 'config.json').write_text('{"batch_size": 12')
  (tmp_path / 'a_file').write_text('')
  setups = {**BAD_SETUPS, **{  # the last --config and --workdir given win
      'No such file or directory': ([f'--config={tmp_path / "missing.py"}'], {}),
      'SyntaxError': ([f'--config={tmp_path / "syntax.py"}'], {}),
      "Unknown CIFAR model 'densenet999'": (['--config=configs/cifar10.py:densenet999'], {}),
      'cannot be casted': ([f'--config={tmp_path / "wrong_type.py"}'], {}),
      '--config.batch_size=abc': (['--config.batch_size=abc'], {}),
      'is not a valid config': ([f'--workdir={tmp_path / "truncated"}'], {}),
      'cannot be used: Not a directory': ([f'--workdir={tmp_path / "a_file" / "run"}'], {}),
      'cannot be used: File exists': ([f'--workdir={tmp_path / "a_file"}'], {}),
  }, 'cannot be used': ([
      '--config.dataset=image_folder', f'--config.data_dir={tmp_path / "images"}', '--config.image_size=32',
      '--config.eval_split=val', '--config.batch_size=8', '--config.augment=False'], {})}
  processes = {  # All at once: each spends its few seconds importing, then fails before compiling.
      name: subprocess.Popen(
          [sys.executable, 'train.py', '--config=configs/quickstart.py', f'--workdir={tmp_path / str(i)}',
           *flags],
          cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu', **env}, text=True,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
      for i, (name, (flags, env)) in enumerate(setups.items())
  }
  messages = {}
  for i, (name, process) in enumerate(processes.items()):
    stdout, messages[name] = process.communicate(timeout=300)
    assert process.returncode == 2, (name, messages[name][-3000:])
    assert name in messages[name], messages[name]
    assert 'Traceback' not in stdout + messages[name]
    assert not checkpoints.complete_steps(str(tmp_path / str(i) / 'checkpoints'))
  for name in ('lr_boundaries_epochs', 'batch_sise', 'batch_size', 'SyntaxError', 'is not a valid config'):
    assert messages[name].startswith('Config error:'), messages[name]
  for name, message in messages.items():  # one paragraph: the label and the name on one line
    if name != 'tfds build cifar10':
      assert any(line.startswith(('Config error: ', 'Error: ', 'Data error: ')) and name in line
                 for line in message.splitlines()), message
  assert 'Did you mean "batch_size"' in messages['batch_sise']


def _start(script, *flags):
  """`python SCRIPT FLAGS...` from the repository, as a user runs it (on the CPU); stdout and stderr apart."""
  return subprocess.Popen([sys.executable, script, *flags], cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _image_folder_with_an_empty_test_split(root):
  """Good images in train/; test/ has the same class folders, without images."""
  for label in ('a', 'b'):
    os.makedirs(root / 'train' / label)
    os.makedirs(root / 'test' / label)
    for i in range(4):
      (root / 'train' / label / f'{i}.png').write_bytes(tf_encode_png(np.full((36, 36, 3), 40 * i, np.uint8)))


def test_zero_growth_rate_non_finite_numbers_and_an_empty_eval_split_exit_2_with_one_paragraph(tmp_path):
  # Each once crashed inside JAX, started training, or printed a traceback.
  _image_folder_with_an_empty_test_split(tmp_path / 'images')
  image_folder = ['--config.dataset=image_folder', '--config.image_size=32',
                  f'--config.data_dir={tmp_path / "images"}', '--config.eval_split=test', '--config.batch_size=8',
                  '--config.augment=False']
  train = lambda name, *flags: ('train.py', [f'--workdir={tmp_path / name}', '--config=configs/quickstart.py', *flags])
  setups = {  # what stderr, a single line, starts with: (script, flags)
      'Config error: config.architecture.growth_rate must be a positive whole number': train(
          'growth', '--config.architecture.growth_rate=0'),
      'Config error: config.learning_rate=nan is not a finite number': train('nan', '--config.learning_rate=nan'),
      'Config error: config.lr_boundaries_epochs[1]=inf is not a finite number': train(
          'inf', '--config.lr_boundaries_epochs=(10,1e999)'),  # 1e999: how a tuple flag spells infinity
      f'Data error: Split folder {tmp_path / "images" / "test"} contains no images': train('empty', *image_folder),
      # evaluate.py lists the data before it reads the weights: any existing path will do.
      f'Data error: Split folder {tmp_path / "images" / "test"}': (
          'evaluate.py', [f'--checkpoint={tmp_path / "images"}', '--config=configs/quickstart.py', *image_folder]),
  }
  processes = {expected: _start(script, *flags) for expected, (script, flags) in setups.items()}  # all at once
  for expected, process in processes.items():
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, (expected, stderr[-3000:])
    assert stderr.startswith(expected) and len(stderr.strip().splitlines()) == 1, stderr[-3000:]
    assert 'Traceback' not in stdout + stderr
  for name in ('growth', 'nan', 'inf', 'empty'):
    assert not _complete_steps(tmp_path / name)


def test_an_unwritable_compilation_cache_dir_turns_the_cache_off_with_one_line_and_the_run_goes_on(tmp_path):
  (tmp_path / 'a_file').write_text('')
  cache = tmp_path / 'a_file' / 'cache'  # a path under a file: unwritable even for root, whom chmod does not stop
  output = run_train(tmp_path / 'run', '--config.num_epochs=1', '--config.lr_boundaries_epochs=()',
                     '--config.batch_size=1024', f'--config.compilation_cache_dir={cache}')  # exit 0, one step
  lines = output.strip().splitlines()
  assert 'The compilation cache is off' in lines[0] and str(cache) in lines[0], output[-3000:]
  assert sum(str(cache) in line for line in lines) == 1 and 'Traceback' not in output, output[-3000:]  # JAX's silent
  assert lines[-1].startswith('step=1 eval_accuracy='), output[-3000:]


def test_a_read_only_compilation_cache_dir_is_not_given_to_jax(tmp_path, caplog):
  denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))
  with mock.patch.object(jax.config, 'update') as update:
    with mock.patch('tempfile.mkstemp', side_effect=denied), caplog.at_level(logging.WARNING):
      evaluation.use_compilation_cache(str(tmp_path))  # root ignores chmod: simulate what a user gets
    assert not update.called
    assert 'The compilation cache is off' in caplog.text and os.strerror(errno.EACCES) in caplog.text
    evaluation.use_compilation_cache(str(tmp_path / 'cache'))  # writable: created and used
    update.assert_called_once_with('jax_compilation_cache_dir', str(tmp_path / 'cache'))
  assert os.listdir(tmp_path / 'cache') == []  # the file that tested it is gone


def _complete_steps(workdir):
  return checkpoints.complete_steps(str(workdir / 'checkpoints'))


def _initial_state(config):
  """The state train_and_evaluate starts `config` from, built without training."""
  model = model_lib.from_config(config, num_classes=10, input_channels=1, **chosen_form(config))
  schedule = optim.create_learning_rate_fn(config.learning_rate, config.lr_boundaries_epochs,
                                           config.lr_decay_factor, STEPS_PER_EPOCH)
  tx = optim.create_optimizer(schedule, momentum=config.momentum, nesterov=config.nesterov,
                              weight_decay=config.weight_decay)
  return jax.jit(lambda key: training.create_train_state(key, model, (8, 8, 1), tx))(jax.random.key(0))


def test_a_checkpoint_left_incomplete_by_a_crash_is_ignored_with_a_warning(tmp_path, caplog):
  config = tiny_config(num_epochs=2, lr_boundaries_epochs=(), batch_size=BATCH_SIZE)
  directory = tmp_path / 'checkpoints'
  last = 2 * STEPS_PER_EPOCH
  # A run that completed checkpoint 11 and was killed (kill -9) while writing checkpoint 22: orbax
  # leaves the temporary directory, half full.
  state = _initial_state(config)
  writer = checkpoints.Checkpointer(str(directory), keep=3, asynchronous=False)
  writer.save(STEPS_PER_EPOCH, state.replace(step=STEPS_PER_EPOCH))
  writer.save(last, state.replace(step=last))
  writer.close()
  incomplete = directory / f'{last}{checkpoints.INCOMPLETE_MARKER}'
  os.rename(directory / str(last), incomplete)
  for root, _, files in os.walk(incomplete):
    for name in files[::2]:
      os.remove(os.path.join(root, name))
  assert checkpoints.complete_steps(str(directory)) == [STEPS_PER_EPOCH]

  with caplog.at_level(logging.WARNING):
    final = training.train_and_evaluate(config, str(tmp_path))
  assert incomplete.name in caplog.text and str(directory) in caplog.text
  assert f'resuming from step {STEPS_PER_EPOCH}' in caplog.text
  assert final['step'] == last and np.isfinite(final['eval_loss'])
  assert not [name for name in os.listdir(directory) if checkpoints.INCOMPLETE_MARKER in name]  # tmp deleted
  assert _complete_steps(tmp_path) == [STEPS_PER_EPOCH, last]
  checkpointer = checkpoints.Checkpointer(str(directory), keep=3)
  assert int(checkpointer.restore_latest_intact(_initial_state(config)).step) == last  # fresh checksums match
  checkpointer.close()
  trained = [r['step'] for r in reporting.read_metrics(str(tmp_path)) if 'train_loss' in r]
  assert trained[0] > STEPS_PER_EPOCH and trained[-1] == last


def test_a_full_disk_stops_the_run_and_keeps_the_complete_checkpoints(tmp_path):
  # keep_checkpoints=1: the good checkpoint would be deleted if a failed save counted as done.
  config = tiny_config(num_epochs=2, lr_boundaries_epochs=(), keep_checkpoints=1, batch_size=BATCH_SIZE)
  bad = f'{2 * STEPS_PER_EPOCH}{checkpoints.INCOMPLETE_MARKER}'
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def full_disk(self, *args, **kwargs):
    if bad in str(self.get()):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
    return await finalize(self, *args, **kwargs)

  with mock.patch.object(atomicity.AtomicRenameTemporaryPath, 'finalize', full_disk):
    with pytest.raises(checkpoints.CheckpointWriteError) as error:
      training.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert 'disk is full' in message and str(tmp_path / 'checkpoints') in message
  assert f'checkpoint {2 * STEPS_PER_EPOCH}' in message and f'from step {STEPS_PER_EPOCH}' in message
  assert _complete_steps(tmp_path) == [STEPS_PER_EPOCH]
  checkpointer = checkpoints.Checkpointer(str(tmp_path / 'checkpoints'), keep=1)
  assert checkpointer.latest_step() == STEPS_PER_EPOCH
  checkpointer.close()
  params = loading.load_variables(str(tmp_path))['params']
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


def test_a_full_disk_while_logging_metrics_is_one_paragraph(tmp_path):
  config = tiny_config(num_epochs=1, lr_boundaries_epochs=(), batch_size=BATCH_SIZE, log_every_steps=1)
  write = reporting.MetricWriter.write

  def full_disk(self, step, epoch, metrics):
    if step == 5:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
    return write(self, step, epoch, metrics)

  with mock.patch.object(reporting.MetricWriter, 'write', full_disk):
    with pytest.raises(workdir_lib.DiskFullError) as error:
      training.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert f'The disk holding {tmp_path} is full' in message and 'metrics.jsonl' in message and '\n' not in message
  assert 'No checkpoint was complete yet' in message
  assert not (tmp_path / '.lock').exists()


def test_write_errors_of_tensorstore_are_recognized_and_orbax_copies_of_a_full_disk_are_not_printed():
  from densenet_jax import cli

  full = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to write 6511 bytes to '
                    "file 7: No space left on device [os_error_code='28']")
  assert checkpoints.write_failure(RuntimeError('wrapped')) is None
  wrapped = RuntimeError('a background save failed')
  wrapped.__cause__ = full
  assert checkpoints.write_failure(wrapped)[0] == errno.ENOSPC and checkpoints.is_disk_full(wrapped)
  assert not checkpoints.is_disk_full(ValueError("PERMISSION_DENIED: ... [os_error_code='13']"))

  def record(path, message, error=None):
    return logging.LogRecord('absl', logging.ERROR, path, 1, message, None,
                             (type(error), error, None) if error else None)

  orbax_file = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', '_src', 'futures', 'future.py')
  assert cli._reported_disk_full(record(orbax_file, f'_SignalingThread.run() raised an exception: {full}'))
  assert cli._reported_disk_full(record(orbax_file, 'Failed to run 3 Handler Commit operations', wrapped))
  assert not cli._reported_disk_full(record(orbax_file, 'Failed to run 3 Handler Commit operations',
                                            RuntimeError('another failure')))
  assert not cli._reported_disk_full(record('/somewhere/else.py', str(full)))

  # asyncio's own report of a write task whose error nobody retrieved (orbax leaves them when a save fails).
  def unretrieved_task_record(error):
    import asyncio
    import gc
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger('asyncio').addHandler(handler)
    try:
      async def write():
        raise error

      loop = asyncio.new_event_loop()
      task = loop.create_task(write())
      loop.run_until_complete(asyncio.sleep(0))
      loop.close()
      del task
      gc.collect()
    finally:
      logging.getLogger('asyncio').removeHandler(handler)
    assert [r.getMessage().splitlines()[0] for r in records] == ['Task exception was never retrieved']
    return records[0]

  assert cli._reported_disk_full(unretrieved_task_record(full))
  assert not cli._reported_disk_full(unretrieved_task_record(ValueError('another failure')))


def test_late_wake_ups_of_a_closed_event_loop_are_not_printed():
  import asyncio

  from densenet_jax import cli

  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(lambda: None)  # what tensorstore's threads do after a failed save
  except RuntimeError as error:
    late = error
  printed = []
  hook = cli.without_late_wake_ups(lambda *args: printed.append(args[1]))
  hook(RuntimeError, late, late.__traceback__.tb_next)  # from a native thread: no caller frame
  assert not printed
  hook(RuntimeError, late, late.__traceback__)  # raised by Python code: printed
  other = ValueError('something else')
  hook(ValueError, other, None)
  assert printed == [late, other]


def test_late_wake_ups_from_tensorstore_done_callbacks_are_not_printed(monkeypatch):
  import asyncio

  import tensorstore as ts

  from densenet_jax import cli

  printed = []
  monkeypatch.setattr(sys, 'unraisablehook', cli.unraisable_without_late_wake_ups(
      lambda unraisable: printed.append(unraisable.exc_value)))
  loop = asyncio.new_event_loop()
  loop.close()
  promise, future = ts.Promise.new()
  future.add_done_callback(loop.call_soon_threadsafe)  # a write's completion after a failed save closed the loop
  future.add_done_callback(lambda _: loop.call_soon_threadsafe(print))  # a Python caller: printed
  promise.set_result(0)  # tensorstore runs the callbacks; their errors go to sys.unraisablehook
  assert [str(error) for error in printed] == ['Event loop is closed']
  assert printed[0].__traceback__.tb_frame.f_code.co_name == '<lambda>'


@pytest.mark.parametrize('held_by', ['traceback', 'module'])
def test_a_reported_failure_is_the_last_thing_printed_even_with_writes_abandoned(held_by):
  # A save that fails part-way leaves orbax's other writes as coroutines never awaited, held by the failure's
  # traceback or by objects that live until the interpreter's exit, where each would print a RuntimeWarning after
  # the failure's paragraph.
  program = f"""
from densenet_jax import cli

async def write_fragment():
  pass

abandoned = []

def save():
  writes = [write_fragment(), write_fragment()]  # a failed save's other writes, never awaited
  if {held_by!r} == 'module':
    abandoned.extend(writes)
  raise FileNotFoundError('no checkpoint at /nowhere')

def job():
  try:
    save()
  except FileNotFoundError as error:
    raise FileNotFoundError(str(error)) from error  # as the library wraps a failed save

cli.run_reporting_failures(job)
"""
  done = subprocess.run([sys.executable, '-c', program], capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == ['Error: no checkpoint at /nowhere'], done.stderr


def test_only_coroutines_never_started_are_closed():
  import asyncio

  from densenet_jax import cli

  async def step(gate):
    await gate

  loop = asyncio.new_event_loop()
  try:
    gate = loop.create_future()
    started, abandoned = step(gate), step(gate)
    started.send(None)  # Suspended at its await: running work, left alone.
    cli.close_abandoned_coroutines()
    assert inspect.getcoroutinestate(abandoned) == inspect.CORO_CLOSED
    assert inspect.getcoroutinestate(started) == inspect.CORO_SUSPENDED
    started.close()
  finally:
    loop.close()


def test_sigint_saves_and_stops_like_sigterm(tmp_path, caplog):
  # tests/test_train_processes.py sends SIGTERM to train.py and checks the exact resume; here the
  # run sends itself a real SIGINT (Ctrl-C) after its third batch.
  create_train_iterator = pipeline.create_train_iterator

  def interrupted_after_three_batches(*args, **kwargs):
    for i, batch in enumerate(create_train_iterator(*args, **kwargs)):
      if i == 3:
        os.kill(os.getpid(), signal.SIGINT)
      yield batch

  config = tiny_config(num_epochs=1, lr_boundaries_epochs=(), batch_size=BATCH_SIZE)
  handler = signal.getsignal(signal.SIGINT)
  with mock.patch.object(pipeline, 'create_train_iterator', interrupted_after_three_batches), \
       caplog.at_level(logging.WARNING):
    final = training.train_and_evaluate(config, str(tmp_path))
  assert final == {'step': 4, 'preempted': 1.0}
  assert 'Received SIGINT' in caplog.text
  assert _complete_steps(tmp_path) == [4]
  assert signal.getsignal(signal.SIGINT) is handler  # given back after the run


def _all_checkpointed_values_finite(workdir):
  for step in _complete_steps(workdir):
    variables = checkpoints.load_variables(str(workdir / 'checkpoints' / str(step)))
    if not all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(variables)):
      return False
  return True


def test_a_diverging_run_never_checkpoints_a_non_finite_state(tmp_path):
  # One step per epoch, so every step is checkpointed unless the guard stops it; lr=1e6 overflows the weights.
  config = tiny_config(num_epochs=4, lr_boundaries_epochs=(), batch_size=1024, learning_rate=1e6,
                       eval_every_epochs=100)
  with pytest.raises(training.TrainingDiverged) as error:
    training.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  bad_step = int(message.split('at step ')[1].split()[0])
  saved = _complete_steps(tmp_path)
  assert all(step < bad_step for step in saved)
  assert _all_checkpointed_values_finite(tmp_path)
  if saved:
    assert f'step {saved[-1]}; no checkpoint was written after it' in message
  else:
    assert 'No checkpoint was written' in message


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """An uninterrupted two-epoch run (checkpoints at the end of each epoch); tests work on copies of it."""
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  config = tiny_config(num_epochs=2, lr_boundaries_epochs=(1,), batch_size=BATCH_SIZE, log_every_steps=3)
  final = training.train_and_evaluate(config, str(workdir))
  return config, workdir, final


def _copy(run, tmp_path):
  config, workdir, final = run
  shutil.copytree(workdir, tmp_path / 'run')
  return config, tmp_path / 'run', final


def _logged_steps(workdir, key):
  return [r['step'] for r in reporting.read_metrics(str(workdir)) if key in r]


def test_a_resumed_run_logs_each_step_once_and_in_order(finished_run, tmp_path):
  config, workdir, _ = _copy(finished_run, tmp_path)
  expected = reporting.read_metrics(str(workdir))
  # As if killed before the last checkpoint was complete, after logging the steps that followed the first one.
  shutil.rmtree(workdir / 'checkpoints' / str(2 * STEPS_PER_EPOCH))
  for sidecar in (workdir / 'checkpoints').glob(f'{2 * STEPS_PER_EPOCH}.*'):
    sidecar.unlink()
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 23, "epoch": 2.1, "train_lo')  # a line cut short by the kill
  training.train_and_evaluate(config, str(workdir))
  training.train_and_evaluate(config, str(workdir))  # a rerun of the finished run logs nothing new
  for key in ('train_loss', 'eval_loss'):
    steps = _logged_steps(workdir, key)
    assert steps == sorted(set(steps)) == [r['step'] for r in expected if key in r]
  resumed = reporting.read_metrics(str(workdir))
  assert [r['train_loss'] for r in resumed if 'train_loss' in r] == [
      r['train_loss'] for r in expected if 'train_loss' in r]


def test_a_run_killed_between_its_last_checkpoint_and_its_evaluation_ends_like_an_uninterrupted_one(
    finished_run, tmp_path):
  config, workdir, uninterrupted = _copy(finished_run, tmp_path)
  expected = reporting.read_metrics(str(workdir))
  assert training.train_and_evaluate(config, str(workdir)) == uninterrupted  # a rerun of the finished run
  assert reporting.read_metrics(str(workdir)) == expected
  # Killed after the last checkpoint was written, before its evaluation was logged: evaluated on resume.
  last_eval = max(i for i, r in enumerate(expected) if 'eval_loss' in r)
  with open(workdir / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in expected[:last_eval])
  assert training.train_and_evaluate(config, str(workdir)) == uninterrupted
  assert reporting.read_metrics(str(workdir)) == expected


def test_a_crash_in_evaluation_keeps_the_epoch_checkpointed(tmp_path):
  config = tiny_config(num_epochs=1, lr_boundaries_epochs=(), batch_size=BATCH_SIZE)

  def crash(self, state):
    raise RuntimeError('evaluation crashed')

  with mock.patch.object(evaluation.Evaluator, '__call__', crash):
    with pytest.raises(RuntimeError, match='evaluation crashed'):
      training.train_and_evaluate(config, str(tmp_path))
  assert _complete_steps(tmp_path) == [STEPS_PER_EPOCH]
  assert _all_checkpointed_values_finite(tmp_path)


def _largest_array_file(step_dir):
  files = [os.path.join(root, name) for root, _, names in os.walk(step_dir / 'default') for name in names
           if os.sep + 'd' + os.sep in os.path.join(root, name)]
  return max(files, key=os.path.getsize)


def _write_garbage(step_dir):
  with open(_largest_array_file(step_dir), 'r+b') as f:
    f.seek(os.path.getsize(f.name) // 2)
    f.write(np.random.default_rng(0).bytes(64))


def _flip_a_bit(step_dir):
  path = _largest_array_file(step_dir)
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0x10
  open(path, 'wb').write(bytes(data))


def _truncate(step_dir):
  path = _largest_array_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


FAULTS = {  # what each does to the newest checkpoint, and the reason its set-aside name gives
    'garbage': (_write_garbage, 'changed-files'),
    'flipped bit': (_flip_a_bit, 'changed-files'),
    'truncated file': (_truncate, 'changed-files'),
    'deleted _METADATA': (lambda d: os.remove(d / 'default' / '_METADATA'), 'missing-files'),
    'deleted default/': (lambda d: shutil.rmtree(d / 'default'), 'missing-files'),
    'empty step dir': (_empty, 'empty'),
}


@pytest.mark.parametrize('fault', FAULTS)
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_restored(tmp_path, caplog, fault):
  inject, reason = FAULTS[fault]
  state = _initial_state(tiny_config(batch_size=BATCH_SIZE))
  directory = tmp_path / 'checkpoints'
  writer = checkpoints.Checkpointer(str(directory), keep=3)
  writer.save(1, state.replace(step=1))
  writer.save(2, state.replace(step=2, params=jax.tree.map(lambda p: p + 1, state.params)))
  writer.close()
  assert sorted(os.listdir(directory)) == ['1', '1.sha256.json', '2', '2.sha256.json']
  inject(directory / '2')

  # Readers (evaluate.py, init_from) skip it without touching the workdir, or refuse it when named.
  first = loading.load_variables(str(tmp_path))['params']
  for got, want in zip(jax.tree.leaves(first), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(checkpoints.CheckpointCorruptError, match=str(directory / '2')):
    checkpoints.load_variables(str(directory / '2'))

  checkpointer = checkpoints.Checkpointer(str(directory), keep=3)
  with caplog.at_level(logging.WARNING):
    restored = checkpointer.restore_latest_intact(state)
  checkpointer.close()
  assert int(restored.step) == 1
  assert f'2.corrupt-{reason}' in os.listdir(directory) and '2' not in os.listdir(directory)
  assert str(directory / '2') in caplog.text and reason in caplog.text


def test_without_an_intact_checkpoint_the_run_stops_with_one_paragraph(tmp_path):
  state = _initial_state(tiny_config(batch_size=BATCH_SIZE))
  writer = checkpoints.Checkpointer(str(tmp_path / 'checkpoints'), keep=3, asynchronous=False)
  writer.save(1, state.replace(step=1))
  writer.close()
  _flip_a_bit(tmp_path / 'checkpoints' / '1')
  checkpointer = checkpoints.Checkpointer(str(tmp_path / 'checkpoints'), keep=3)
  with pytest.raises(checkpoints.CheckpointCorruptError, match='No intact checkpoint') as error:
    checkpointer.restore_latest_intact(state)
  checkpointer.close()
  assert '1.corrupt-changed-files' in str(error.value) and 'starts the run over' in str(error.value)
  assert os.path.isdir(tmp_path / 'checkpoints' / '1.corrupt-changed-files')  # set aside, not deleted


def test_a_run_resumes_from_the_newest_intact_checkpoint_and_ends_like_an_uninterrupted_one(
    finished_run, tmp_path, caplog):
  config, workdir, uninterrupted = _copy(finished_run, tmp_path)
  last = workdir / 'checkpoints' / str(2 * STEPS_PER_EPOCH)
  _write_garbage(last)
  with caplog.at_level(logging.WARNING):
    final = training.train_and_evaluate(config, str(workdir))
  assert str(last) in caplog.text and 'changed-files' in caplog.text
  assert final == uninterrupted
  assert _complete_steps(workdir) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  assert os.path.isdir(f'{last}.corrupt-changed-files')


def test_a_second_run_in_the_same_workdir_is_refused_naming_the_first(tmp_path):
  from densenet_jax import cli
  from densenet_jax.io import lock

  mine = lock.acquire(str(tmp_path))  # this process stands for the first run
  with pytest.raises(lock.WorkdirBusy, match=f'process {os.getpid()} on host') as error:
    training.train_and_evaluate(tiny_config(), str(tmp_path))
  assert str(tmp_path / '.lock') in str(error.value)
  # Not a mistake in the config: the same command succeeds once the other run has ended.
  assert not isinstance(error.value, config_lib.ConfigError)
  assert next(v for k, v in cli.FAILURES.items() if isinstance(error.value, k)) == ('Workdir in use', 2)
  assert not (tmp_path / 'checkpoints').exists()
  lock.release(str(tmp_path), mine)
  assert not (tmp_path / '.lock').exists()


def test_the_lock_of_a_killed_run_is_taken_over_and_released_at_the_end(tmp_path, caplog):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from densenet_jax.io import lock; '
       'lock.acquire(sys.argv[1]); print("locked", flush=True); time.sleep(600)', str(tmp_path)],
      cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert holder.stdout.readline().strip() == 'locked'
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert (tmp_path / '.lock').exists()
  config = tiny_config(num_epochs=1, lr_boundaries_epochs=(), batch_size=1024, eval_every_epochs=100)
  with caplog.at_level(logging.WARNING):
    final = training.train_and_evaluate(config, str(tmp_path))
  assert final['step'] == 1
  assert f'process {holder.pid} on host' in caplog.text and 'no longer running' in caplog.text
  assert not (tmp_path / '.lock').exists()


@pytest.mark.parametrize('signum, delay', [(signal.SIGTERM, 1.0), (signal.SIGINT, 4.0)])
def test_a_signal_during_start_up_exits_cleanly_with_one_line(tmp_path, signum, delay):
  import time

  process = subprocess.Popen(
      [sys.executable, 'train.py', '--config=configs/quickstart.py', f'--workdir={tmp_path}'],
      cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  time.sleep(delay)  # importing, parsing flags, setting up the data or compiling
  process.send_signal(signum)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output[-3000:]
  assert 'stopped before the first step; nothing to save' in output, output[-3000:]
  assert 'Traceback' not in output
  assert not _complete_steps(tmp_path) and not (tmp_path / '.lock').exists()


SWALLOWED_SIGNAL = """
import os, signal, time
from densenet_jax.training import stopping
stopping.install()

def discover_pjrt_plugins():  # as JAX's: every exception of a plugin's initialize() is logged and dropped
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
  except:  # noqa: E722
    pass

discover_pjrt_plugins()
time.sleep(2)  # the work after the plugins are loaded, where the signal is delivered again
print('went on')
"""


SIGNAL_IN_AN_ENDLESS_SWALLOWING_FUNCTION = """
import os, signal, time
from densenet_jax.training import stopping
stopping.PATIENCE_S = 0.5
stopping.install()

def discover_pjrt_plugins():  # a plugin that hangs while it loads
  os.kill(os.getpid(), signal.SIGTERM)
  while True:
    try:
      time.sleep(1)
    except:  # noqa: E722
      pass

discover_pjrt_plugins()
"""


SIGNAL_IN_A_GC_CALLBACK = """
import gc, os, signal, time
from densenet_jax.training import stopping
stopping.install()

def _xla_gc_callback(*args):  # as JAX's: Python reports an exception of a gc callback as ignored and goes on
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(5)

gc.callbacks.append(_xla_gc_callback)
gc.collect()
gc.callbacks.remove(_xla_gc_callback)
time.sleep(2)  # the work after the collection, where the signal is delivered again
print('went on')
"""


@pytest.mark.parametrize('script', [SWALLOWED_SIGNAL, SIGNAL_IN_A_GC_CALLBACK, SIGNAL_IN_AN_ENDLESS_SWALLOWING_FUNCTION],
                         ids=['plugin loading', 'gc callback', 'hanging plugin'])
def test_a_signal_where_jax_would_swallow_the_exit_still_ends_the_process(script):
  # A CUDA plugin spends seconds in JAX's plugin loading, whose bare except would drop the SystemExit; so does
  # Python for an exception of a garbage-collection callback (JAX has one).
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and stopping.MESSAGE in result.stderr, result.stderr
  assert 'went on' not in result.stdout


SIGNAL_IN_AN_IMPORT_UNDER_THE_LOCK = """
import os, sys, time
from densenet_jax.io import lock
from densenet_jax.training import stopping
stopping.install()
workdir, modules = sys.argv[1:]
sys.path.insert(0, modules)
with lock.held(workdir):
  import slow_to_import  # as orbax or tensorboardX, imported on first use while the lock is held
  time.sleep(2)
  print('went on')
"""


def test_a_signal_during_an_import_waits_for_it_and_releases_the_workdir_lock(tmp_path):
  modules = tmp_path / 'modules'
  modules.mkdir()
  (modules / 'slow_to_import.py').write_text(
      'import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(1)\n')
  result = subprocess.run([sys.executable, '-c', SIGNAL_IN_AN_IMPORT_UNDER_THE_LOCK, str(tmp_path), str(modules)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and stopping.MESSAGE in result.stderr, result.stderr
  assert 'Traceback' not in result.stderr and 'went on' not in result.stdout
  assert not (tmp_path / '.lock').exists()


def _architecture(**fields):
  """tiny_config's architecture with `fields` changed."""
  return ml_collections.ConfigDict({**tiny_config().architecture.to_dict(), **fields})


CONFIG_MISTAKES = {  # overrides of tiny_config -> what the message must say
    'negative lr_decay_factor': (dict(lr_decay_factor=-0.1), 'lr_decay_factor must be positive'),
    'negative weight_decay': (dict(weight_decay=-1e-4), 'weight_decay must be 0 or more'),
    'dropout 1': (dict(dropout_rate=1.0), 'dropout_rate must be in [0, 1)'),
    'negative dropout': (dict(dropout_rate=-0.1), 'dropout_rate must be in [0, 1)'),
    'float16': (dict(dtype='float16'), 'needs loss scaling'),
    'synthetic with augmentation': (dict(dataset='synthetic', augment=True), 'no data augmentation'),
    'image too small': (dict(model='densenet121', architecture=ml_collections.ConfigDict()),
                        'are 8x8, too small for config.model=\'densenet121\', which needs at least 32x32'),
    'growth rate 0': (dict(architecture=_architecture(growth_rate=0)), 'architecture.growth_rate must be a positive'),
    'negative growth rate': (dict(architecture=_architecture(growth_rate=-12)), 'growth_rate must be a positive'),
    'float growth rate': (dict(architecture=_architecture(growth_rate=12.0)), 'growth_rate must be a positive whole'),
    'depth 0': (dict(architecture=_architecture(depth=0)), 'architecture.depth must be a positive whole number'),
    'depth not 6n+4': (dict(architecture=_architecture(depth=11)), 'architecture.depth=11: Impossible depth 11'),
    'compression 0': (dict(architecture=_architecture(compression=0.0)), 'architecture.compression must be a number'),
    'compression 1.5': (dict(architecture=_architecture(compression=1.5)), 'compression must be a number in (0, 1]'),
    'bottleneck 1': (dict(architecture=_architecture(bottleneck=1)), 'architecture.bottleneck must be True'),
    'image_size 0': (dict(image_size=0), 'config.image_size must be a positive number'),
    'nan learning_rate': (dict(learning_rate=float('nan')), 'config.learning_rate=nan is not a finite number'),
    'inf learning_rate': (dict(learning_rate=float('inf')), 'config.learning_rate=inf is not a finite number'),
    '-inf weight_decay': (dict(weight_decay=float('-inf')), 'config.weight_decay=-inf is not a finite number'),
    'nan warmup_epochs': (dict(warmup_epochs=float('nan')), 'config.warmup_epochs=nan is not a finite'),
    'inf boundary': (dict(lr_boundaries_epochs=(1, float('inf'))), 'config.lr_boundaries_epochs[1]=inf is not'),
    'nan compression': (dict(architecture=_architecture(compression=float('nan'))),
                        'config.architecture.compression=nan is not a finite number'),
}


@pytest.mark.parametrize('mistake', CONFIG_MISTAKES)
def test_config_mistakes_stop_before_anything_runs(tmp_path, mistake):
  overrides, expected = CONFIG_MISTAKES[mistake]
  with pytest.raises(config_lib.ConfigError) as error:
    training.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert expected in str(error.value) and '\n' not in str(error.value)
  assert not (tmp_path / 'checkpoints').exists()


def test_a_missing_eval_split_of_an_image_folder_is_named_with_the_splits_it_has(tmp_path):
  _image_folder_with_a_corrupt_file(tmp_path / 'images')
  config = tiny_config(dataset='image_folder', batch_size=8, eval_split='validation')
  config.data_dir, config.image_size = str(tmp_path / 'images'), 32
  with pytest.raises((config_lib.ConfigError, FileNotFoundError)) as error:
    training.train_and_evaluate(config, str(tmp_path / 'run'))
  assert "'validation'" in str(error.value) and "val" in str(error.value).split("'validation'")[1]


def test_a_read_only_workdir_is_one_config_error(tmp_path):
  denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / 'run'))
  with mock.patch('os.makedirs', side_effect=denied):  # root ignores chmod: simulate what a user gets
    with pytest.raises(config_lib.ConfigError, match='cannot be used: Permission denied'):
      training.train_and_evaluate(tiny_config(), str(tmp_path / 'run'))


def test_a_resume_may_change_cosmetic_fields_and_a_refusal_lists_every_changed_field(tmp_path):
  workdir_lib.record_config(tiny_config(), str(tmp_path))
  workdir_lib.record_config(tiny_config(checkpoint_every_epochs=5, eval_every_epochs=2, log_every_steps=1,
                                        keep_checkpoints=9, progress_bar=True), str(tmp_path))
  changed = dict(batch_size=64, seed=3, learning_rate=0.5, momentum=0.8, num_epochs=3, weight_decay=0.0,
                 dropout_rate=0.1, nesterov=False, augment=True, lr_decay_factor=0.2)
  with pytest.raises(config_lib.ConfigError) as error:
    workdir_lib.record_config(tiny_config(**changed), str(tmp_path))
  for field in changed:
    assert f'{field}:' in str(error.value)


def test_evaluating_weights_of_another_architecture_or_an_empty_workdir_is_one_paragraph(finished_run, tmp_path):
  import json

  config, workdir, _ = _copy(finished_run, tmp_path)
  recorded = json.loads((workdir / 'config.json').read_text())
  recorded['architecture']['growth_rate'] = 8  # as if the weights came from another run
  (workdir / 'config.json').write_text(json.dumps(recorded))
  with pytest.raises(model_lib.WeightMismatchError, match='do not fit the architecture recorded') as error:
    evaluation.evaluate_checkpoint(str(workdir))
  assert str(workdir / 'config.json') in str(error.value) and '\n' not in str(error.value)

  empty = tmp_path / 'empty'
  empty.mkdir()
  workdir_lib.record_config(config, str(empty))  # a run that stopped before its first checkpoint
  with pytest.raises(FileNotFoundError, match='workdir without any complete checkpoint'):
    evaluation.evaluate_checkpoint(str(empty))
  with pytest.raises(FileNotFoundError, match='No checkpoint at'):
    evaluation.evaluate_checkpoint(str(tmp_path / 'nowhere'))


def test_fine_tuning_from_another_architecture_is_one_paragraph(finished_run, tmp_path):
  _, workdir, _ = _copy(finished_run, tmp_path)
  config = tiny_config(init_from=str(workdir))
  config.architecture.depth = 16
  with pytest.raises(model_lib.WeightMismatchError, match='do not fit the model'):
    training.train_and_evaluate(config, str(tmp_path / 'fine_tuned'))


def test_predict_names_unreadable_files_in_our_words_without_tensorflows_suffix(finished_run, tmp_path):
  _, workdir, _ = finished_run
  empty, junk = tmp_path / 'empty.png', tmp_path / 'junk.jpg'
  empty.write_bytes(b'')
  junk.write_bytes(b'not an image')
  process = _start('predict.py', f'--checkpoint={workdir}', str(empty), str(junk))
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 2, stderr[-3000:]
  assert 'Traceback' not in stdout + stderr
  # Log records (loading the weights; TensorFlow's C++ lines) aside, stderr is our paragraph, first line to last.
  ours = [line for line in stderr.splitlines() if line.strip() and not CPP_LOG_LINE.search(line)]
  assert [line.split(': ')[0] for line in ours] == [f'Cannot read {empty}', f'Cannot read {junk}', 'Data error'], stderr
  assert all(line.endswith('.') for line in ours), stderr  # TensorFlow's "... name:" cut off


def test_converted_weights_do_not_share_memory_with_the_torch_tensors():
  torch = pytest.importorskip('torch')
  from densenet_jax.weights import convert

  net = model_lib.create_model('densenet121', num_classes=3)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda leaf: rng.normal(size=leaf.shape).astype(np.float32),
                           model_lib.abstract_variables(net))
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in convert.to_torch_state_dict(variables).items()}
  converted = convert.from_torch_state_dict(tensors, net)
  before = jax.tree.map(np.copy, converted)
  for tensor in tensors.values():
    tensor.add_(1.0)  # e.g. the torch model trains on after the conversion
  for got, want in zip(jax.tree.leaves(converted), jax.tree.leaves(before)):
    np.testing.assert_array_equal(got, want)


def test_a_truncated_keras_file_is_reported_as_unreadable_not_missing(tmp_path):
  import zipfile

  from densenet_jax.weights import readers

  path = tmp_path / 'densenet121.keras'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('config.json', '{}' * 1000)
    archive.writestr('model.weights.h5', np.random.default_rng(0).bytes(4096))
  os.truncate(path, os.path.getsize(path) // 2)
  with pytest.raises(readers.WeightFileError) as error:
    readers.read_keras_file(path)
  assert 'truncated' in str(error.value) and 'not found' not in str(error.value).lower()

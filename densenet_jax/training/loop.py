"""The training loop around the pure steps (steps.py), jit-compiled over a data-parallel mesh.

`train_and_evaluate(config, workdir)` trains any setup of configs/ on whatever devices JAX sees (one CPU,
GPUs, a TPU pod), resumes exactly from WORKDIR, and writes metrics, TensorBoard events, checkpoints and
error curves there. It evaluates with densenet_jax.evaluation's Evaluator, which evaluate.py uses on saved weights.
"""

from __future__ import annotations

import functools
import signal

import jax
import ml_collections
import numpy as np
from absl import logging

from densenet_jax import config as config_lib
from densenet_jax import evaluation
from densenet_jax import model as model_lib
from densenet_jax import platform
from densenet_jax.data import pipeline
from densenet_jax.io import checkpoints, cloud, loading, lock
from densenet_jax.io import workdir as workdir_lib
from densenet_jax.training import optim, parallel, reporting, stopping
from densenet_jax.training.steps import TrainingDiverged, TrainState, create_train_state, train_step


class _StopSignal:
  """Remembers SIGTERM/SIGINT so the loop can checkpoint and exit at a step boundary."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    # With several processes JAX's preemption service handles SIGTERM and agrees on a step.
    for sig in (signal.SIGTERM, signal.SIGINT):
      if jax.process_count() == 1:
        self._previous[sig] = stopping.after_training(sig, signal.signal(sig, self._handle))
      elif sig == signal.SIGINT:  # Ctrl-C: no longer "before the first step"
        signal.signal(sig, stopping.after_training(sig, signal.getsignal(sig)))
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:  # A second signal: the user insists.
      raise KeyboardInterrupt
    self.received = signum
    logging.warning('Received %s: saving a checkpoint and stopping.', signal.Signals(signum).name)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains and evaluates `config` in `workdir`; returns the final metrics.

  Raises lock.WorkdirBusy if another process trains in `workdir`, workdir.DiskFullError or
  checkpoints.CheckpointWriteError if its disk fills up.
  """
  config_lib.validate(config)
  cloud.check_buckets(('--workdir', workdir), ('config.data_dir', config.data_dir),
                      ('config.init_from', config.init_from))
  workdir = workdir_lib.prepare(workdir)
  with lock.held(workdir, enabled=jax.process_index() == 0):
    try:
      return _train_and_evaluate(config, workdir)
    except Exception as error:  # pylint: disable=broad-except
      # Any write may meet a full disk (metrics, events, checksums, curves); checkpoints report it themselves.
      full = None if isinstance(error, checkpoints.CheckpointWriteError) else workdir_lib.disk_full_error(
          error, workdir)
      if full is None:
        raise
      raise full from error


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  evaluation.use_compilation_cache(config.compilation_cache_dir)
  backend = jax.default_backend()
  config = loading.with_form(config, backend, loading.recorded_config(workdir))
  workdir_lib.record_config(config, workdir, writer=jax.process_index() == 0)

  mesh = parallel.create_mesh()
  info = pipeline.get_dataset_info(config.dataset, **evaluation.dataset_kwargs(config))
  config_lib.validate_against_data(config, info, jax.device_count())
  pipeline.check_image_files(config.dataset, ('train', config.eval_split), data_dir=config.data_dir,
                             progress=config.progress_bar and jax.process_index() == 0)
  steps_per_epoch = info.num_train_examples // config.batch_size
  total_steps = steps_per_epoch * config.num_epochs

  # config.json records the form too; the console keeps to the run's own lines.
  logging.debug('Computing on %s with %s.', backend,
                ', '.join(f'{field}={config[field]!r}' for field in platform.FORM_FIELDS))
  model = model_lib.from_config(config, num_classes=info.num_classes, input_channels=info.image_shape[-1])
  config_lib.validate_input_size(info, model.min_input_size, config.model)
  learning_rate_fn, tx = optim.from_config(config, steps_per_epoch)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
  replicated = parallel.replicated(mesh)
  # One sharding for every leaf; traced once, not once more by jax.eval_shape for a per-leaf tree.
  create_state = jax.jit(functools.partial(create_train_state, model=model, image_shape=info.image_shape, tx=tx),
                         out_shardings=replicated)
  state = create_state.lower(init_rng).compile(compiler_options=platform.run_once_options(backend))(init_rng)
  state_sharding = jax.tree.map(lambda _: replicated, state)

  checkpointer = checkpoints.Checkpointer(
      f'{workdir}/{workdir_lib.CHECKPOINTS_DIR}', keep=config.keep_checkpoints
  )
  best_checkpointer = None
  if config.keep_best_checkpoint:
    best_checkpointer = checkpoints.Checkpointer(
        f'{workdir}/{workdir_lib.BEST_DIR}', keep=1, asynchronous=False
    )
  restored = checkpointer.restore_latest_intact(state)
  if restored is not None:
    state = restored
    logging.info('Resumed from %s at step %d.', checkpointer.directory, int(state.step))
  elif config.init_from:
    state = _init_from(state, config.init_from, model, init_rng, state_sharding)
  start_step = int(jax.device_get(state.step))
  last_saved = checkpointer.latest_step()

  compiled_train_step = jax.jit(
      functools.partial(
          train_step,
          learning_rate_fn=learning_rate_fn,
          accumulation_steps=config.gradient_accumulation_steps,
      ),
      in_shardings=(state_sharding, parallel.batch_sharded(mesh), replicated),
      out_shardings=(state_sharding, replicated),
      donate_argnums=(0,),
  )
  evaluate = evaluation.Evaluator(config, mesh, state_sharding, config.eval_split, ten_crop=False)
  train_batches = pipeline.create_train_iterator(
      config.dataset,
      global_batch_size=config.batch_size,
      seed=config.seed,
      augment=config.augment,
      start_step=start_step,
      **evaluation.iterator_kwargs(config),
  )

  if jax.process_index() == 0:
    reporting.cut_metrics_back(workdir, start_step)
  writer = reporting.MetricWriter(workdir)
  progress = reporting.Progress(total_steps, start_step, enabled=config.progress_bar)
  throughput = reporting.Throughput()
  pending: list[dict[str, jax.Array]] = []
  best_accuracy = -1.0
  final: dict[str, float] = {}
  try:  # The writer is closed on every exit: its background thread must not outlive the run.
    if restored is not None and _evaluation_due(start_step, steps_per_epoch, total_steps, config.eval_every_epochs):
      # The checkpoint is written before its evaluation, so a run killed in between resumes here without it; a
      # finished run's rerun returns its final metrics too. Every process evaluates (a collective computation).
      final = evaluation.prefixed_metrics(evaluate(state), 'eval', info.num_classes)
      if jax.process_index() == 0 and not reporting.has_record(workdir, start_step, 'eval_loss'):
        writer.write(start_step, start_step // steps_per_epoch, final)
    try:
      with _StopSignal() as stop:
        for step in range(start_step + 1, total_steps + 1):
          batch = parallel.global_batch(next(train_batches), mesh)
          state, metrics = compiled_train_step(state, batch, dropout_rng)
          pending.append(metrics)
          epoch, epoch_end = step // steps_per_epoch, step % steps_per_epoch == 0
          preempted = stop.received is not None or (
              jax.process_count() > 1 and checkpointer.reached_preemption(step)
          )
          save = preempted or step == total_steps or (
              epoch_end and epoch % config.checkpoint_every_epochs == 0
          )

          # Metrics are fetched and checked before anything is evaluated or saved: a non-finite state is never
          # checkpointed.
          if save or epoch_end or step % config.log_every_steps == 0:
            summary = _summarize_train_metrics(pending, step, steps_per_epoch, last_saved)
            summary['images_per_second'] = throughput.images_per_second(len(pending) * config.batch_size)
            pending = []
            writer.write(step, step / steps_per_epoch, summary)
            progress.update(step, summary)

          # Saved before the evaluation: a crash while evaluating must not lose the epoch.
          if save:
            checkpointer.save(step, state)
            last_saved = step
          if preempted:
            logging.warning('Stopped at step %d; run the same command again to resume.', step)
            return {'step': step, 'preempted': 1.0}
          if _evaluation_due(step, steps_per_epoch, total_steps, config.eval_every_epochs):
            final = evaluation.prefixed_metrics(evaluate(state), 'eval', info.num_classes)
            writer.write(step, epoch, final)
            progress.write(f'epoch {epoch}: ' + ', '.join(f'{k}={v:.4f}' for k, v in final.items()))
            if best_checkpointer and final['eval_accuracy'] > best_accuracy:
              best_accuracy = final['eval_accuracy']
              best_checkpointer.save(step, state)
    finally:
      progress.close()
      try:
        checkpointer.wait()  # Raises CheckpointWriteError if the last write failed.
      finally:
        checkpointer.close()

    if config.ten_crop_eval:
      ten_crop = evaluation.Evaluator(config, mesh, state_sharding, config.eval_split, ten_crop=True)(state)
      final.update(evaluation.prefixed_metrics(ten_crop, 'eval_ten_crop', info.num_classes))
    if best_checkpointer is not None:
      best_state = best_checkpointer.restore(state)
      test = evaluation.Evaluator(config, mesh, state_sharding, 'test', ten_crop=False)(best_state)
      final.update({'best_step': float(best_checkpointer.latest_step()),
                    **evaluation.prefixed_metrics(test, 'test', info.num_classes)})
      best_checkpointer.close()
    summary = {k: v for k, v in final.items() if not k.startswith('eval_')}
    if summary:
      writer.write(total_steps, config.num_epochs, summary)
    if jax.process_index() == 0:
      reporting.plot_error_curves(workdir)
  finally:
    writer.close()
  return {'step': total_steps, **final}


def _evaluation_due(step: int, steps_per_epoch: int, total_steps: int, eval_every_epochs: int) -> bool:
  epoch, epoch_end = divmod(step, steps_per_epoch)
  return step > 0 and epoch_end == 0 and (epoch % eval_every_epochs == 0 or step == total_steps)


def _summarize_train_metrics(pending, step: int, steps_per_epoch: int, last_saved: int | None) -> dict[str, float]:
  """Means of the pending steps' metrics; raises TrainingDiverged if one of them left a non-finite state."""
  fetched = jax.device_get(pending)
  if not all(bool(m['finite']) for m in fetched):
    first_bad = step - len(fetched) + 1 + [bool(m['finite']) for m in fetched].index(False)
    kept = (f'The last checkpoint is the one of step {last_saved}; no checkpoint was written after it.'
            if last_saved is not None else 'No checkpoint was written.')
    raise TrainingDiverged(
        f'The loss or the trained weights became NaN or infinite at step {first_bad} (epoch '
        f'{first_bad / steps_per_epoch:.2f}). {kept} Lower the learning rate or check the data, then resume '
        'from the last checkpoint.'
    )
  keys = ('train_loss', 'train_accuracy')
  summary = {k: float(np.mean([m[k] for m in fetched])) for k in keys}
  summary['learning_rate'] = float(fetched[-1]['learning_rate'])
  return summary


def _init_from(state: TrainState, path: str, model, rng: jax.Array, state_sharding) -> TrainState:
  """Starts from another checkpoint's weights; a classifier of another shape is re-initialized."""
  variables = model_lib.replace_head(loading.load_variables(path), model, rng)

  def place(state, params, batch_stats):
    return state.replace(params=params, batch_stats=batch_stats, opt_state=state.tx.init(params))

  logging.info('Initialized the model from %s.', path)
  return jax.jit(place, out_shardings=state_sharding)(state, variables['params'], variables['batch_stats'])

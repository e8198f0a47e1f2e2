"""Evaluation over one split: of a model's state during training, and of saved weights (evaluate.py).

    metrics = evaluate_checkpoint('workdirs/quickstart')   # a workdir, a checkpoints/<step> dir or converted weights

The training loop evaluates its state each epoch with the same Evaluator, so saved weights evaluated here get the
numbers their run logged; evaluating them needs nothing of the loop (no optimizer, checkpoint manager or lock).
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from densenet_jax import config as config_lib
from densenet_jax.data import pipeline
from densenet_jax.io import cloud, loading, storage
from densenet_jax.training import parallel, reporting
from densenet_jax.training.steps import TrainState, eval_step


def dataset_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Where `config`'s data is and at what size: the training loop reads its data with the same arguments."""
  return dict(data_dir=config.data_dir, image_size=config.image_size)


def iterator_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """dataset_kwargs, and whether a missing dataset may be downloaded: for the input iterators."""
  return dict(**dataset_kwargs(config), download=config.download)


class Evaluator:
  """Compiled evaluation over one split: every example exactly once, on every process alike."""

  def __init__(self, config, mesh, state_sharding, split: str, ten_crop: bool):
    self.config, self.mesh, self.split, self.ten_crop = config, mesh, split, ten_crop
    self._step = jax.jit(
        functools.partial(eval_step, ten_crop=ten_crop),
        in_shardings=(state_sharding, parallel.batch_sharded(mesh)),
        out_shardings=parallel.replicated(mesh),
    )

  def __call__(self, state: TrainState) -> dict[str, float]:
    batches = pipeline.create_eval_iterator(
        self.config.dataset,
        self.split,
        global_batch_size=self.config.batch_size,
        ten_crop=self.ten_crop,
        **iterator_kwargs(self.config),
    )
    totals = None
    for batch in batches:
      sums = self._step(state, parallel.global_batch(batch, self.mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return reporting.mean_metrics(jax.device_get(totals))


def prefixed_metrics(metrics: Mapping[str, float], prefix: str, num_classes: int) -> dict[str, float]:
  """The names metrics are logged and returned under ('eval_accuracy', ...); top-5 accuracy only where it can be
  below 100% (more than 5 classes)."""
  return {
      f'{prefix}_{k}': v for k, v in metrics.items() if k != 'top5_accuracy' or num_classes > 5
  }


def use_compilation_cache(directory: str) -> None:
  """Keeps compiled steps in `directory` for later runs ('' keeps none); JAX reads it at its first compile.

  XLA needs 30-90 s on a CPU for a DenseNet train step (docs/performance.md); an executable from the cache
  loads in a few seconds. The key covers the program, the compiler options and the devices, so runs of
  different models or on different machines can share one directory.

  A local directory that cannot be written (a path under a file, read-only, no permission) turns the cache off
  with one warning line that says why: the run does not need the cache, and JAX would print a Python warning with
  its own source line at the first compile.
  """
  if not directory:
    return
  path = os.path.expanduser(directory)
  problem = None if storage.is_cloud(path) else _write_problem(path)
  if problem is not None:
    logging.warning('The compilation cache is off: config.compilation_cache_dir=%s cannot be written (%s); '
                    'compiled steps are not kept for later runs. Give a writable directory, or '
                    '--config.compilation_cache_dir= to keep none.', directory, problem)
    return
  jax.config.update('jax_compilation_cache_dir', path)


def _write_problem(directory: str) -> str | None:
  """Why no file can be created in the local `directory` (created if missing), or None if one can."""
  try:
    os.makedirs(directory, exist_ok=True)
    descriptor, probe = tempfile.mkstemp(prefix='.write-check-', dir=directory)
    os.close(descriptor)
    os.remove(probe)
  except OSError as error:
    return error.strerror or str(error)
  return None


def evaluate_checkpoint(
    checkpoint: str, config: ml_collections.ConfigDict | None = None, *, split: str | None = None,
    ten_crop: bool = False,
) -> dict[str, float]:
  """Evaluates saved weights (a workdir, one of its checkpoints, or converted weights) on a split.

  The model is the one the weights record (loading.load_model); `config` gives the data, batch size and compute
  dtype, by default the workdir's own config.json (loading.run_config).
  """
  cloud.check_buckets(('--checkpoint', checkpoint))
  if not storage.exists(checkpoint):
    raise FileNotFoundError(f'No checkpoint at {checkpoint}: give a training workdir, one of its '
                            'checkpoints/<step> directories, or converted weights.')
  config = loading.run_config(checkpoint) if config is None else config
  config_lib.validate(config)
  cloud.check_buckets(('config.data_dir', config.data_dir))
  use_compilation_cache(config.compilation_cache_dir)
  mesh = parallel.create_mesh()
  info = pipeline.get_dataset_info(config.dataset, **dataset_kwargs(config))
  config_lib.validate_against_data(config, info, jax.device_count())
  split = split or config.eval_split
  if split not in info.eval_splits and split != 'train':
    raise config_lib.ConfigError(f'{info.name} has no split {split!r}; it has {", ".join(info.eval_splits)}.')
  model, variables = loading.load_model(checkpoint, dtype=jnp.dtype(config.dtype), kernels=config.kernels)
  if model.num_classes != info.num_classes:
    raise config_lib.ConfigError(
        f'The weights at {checkpoint} have {model.num_classes} classes, {info.name} has {info.num_classes}: '
        'evaluate them on the dataset they were trained for.')
  state = TrainState.create(
      apply_fn=model.apply, params=variables['params'], batch_stats=variables.get('batch_stats', {}),
      tx=optax.identity(),
  )
  state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), state)
  state = jax.device_put(state, state_sharding)
  metrics = Evaluator(config, mesh, state_sharding, split, ten_crop=ten_crop)(state)
  prefix = 'eval_ten_crop' if ten_crop else 'eval'
  return prefixed_metrics(metrics, prefix, info.num_classes)

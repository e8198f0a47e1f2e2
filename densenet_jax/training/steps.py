"""The pure training and evaluation steps, and the state they carry (no TensorFlow, no I/O).

loop.py compiles them over a device mesh and loops; benchmarks/ time them as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from densenet_jax import model as model_lib

Batch = Mapping[str, jax.Array]


class TrainingDiverged(RuntimeError):
  """The loss or the trained state became NaN or infinite; the message names the step and what to do."""


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_train_state(
    rng: jax.Array, model: model_lib.DenseNet, image_shape: tuple[int, ...], tx: optax.GradientTransformation
) -> TrainState:
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))
  return TrainState.create(
      apply_fn=model.apply, params=variables['params'], batch_stats=variables['batch_stats'], tx=tx
  )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where the label is among the k largest logits."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def all_finite(*trees: Any) -> jax.Array:
  """A scalar bool: whether every floating-point value of `trees` is finite.

  One reduction over all values at once: a reduction per leaf would make XLA compile a kernel per leaf shape,
  which for a deep DenseNet's hundreds of parameter shapes costs more compile time than the model's own layers.
  x * 0 is 0 for every finite x and NaN for NaN and infinities, so the sum is finite exactly when every value is;
  XLA:CPU vectorizes that sum, and not a logical all() over the concatenation (4x slower).
  """
  leaves = [x for x in jax.tree.leaves(trees) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  if not leaves:
    return jnp.bool_(True)
  values = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
  return jnp.isfinite(jnp.sum(values * 0))


# ----------------------------------------------------------------------------------------------
# Pure steps.


def train_step(
    state: TrainState,
    batch: Batch,
    dropout_rng: jax.Array,
    *,
    learning_rate_fn: optax.Schedule,
    accumulation_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the global batch; returns the new state and batch-mean metrics.

  With accumulation_steps = A > 1 the batch is processed as A sequential micro-batches (gradients
  averaged, BatchNorm statistics per micro-batch), to reach the paper's batch size on small devices.
  """
  rng = jax.random.fold_in(dropout_rng, state.step)

  def loss_fn(params, batch_stats, images, labels, rng):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': batch_stats},
        images,
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': rng},
    )
    loss = cross_entropy(logits, labels).mean()
    return loss, (logits, updates['batch_stats'])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  images, labels = batch['image'], batch['label']

  if accumulation_steps == 1:
    (loss, (logits, batch_stats)), grads = grad_fn(state.params, state.batch_stats, images, labels, rng)
    correct = top_k_correct(logits, labels, 1).mean()
  else:
    # Micro-batch j takes examples j, j + A, j + 2A, ...: every micro-batch is spread over all
    # devices, since each device holds a contiguous slice of the global batch.
    def split(x):
      x = x.reshape(x.shape[0] // accumulation_steps, accumulation_steps, *x.shape[1:])
      return jnp.swapaxes(x, 0, 1)

    def micro_step(carry, micro):
      grads_sum, loss_sum, correct_sum, batch_stats = carry
      micro_images, micro_labels, index = micro
      (loss, (logits, batch_stats)), grads = grad_fn(
          state.params, batch_stats, micro_images, micro_labels, jax.random.fold_in(rng, index)
      )
      correct = top_k_correct(logits, micro_labels, 1).mean()
      grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
      return (grads_sum, loss_sum + loss, correct_sum + correct, batch_stats), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, 0.0, 0.0, state.batch_stats)
    (grads, loss, correct, batch_stats), _ = jax.lax.scan(
        micro_step, init, (split(images), split(labels), jnp.arange(accumulation_steps))
    )
    grads = jax.tree.map(lambda g: g / accumulation_steps, grads)
    loss, correct = loss / accumulation_steps, correct / accumulation_steps

  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = {
      'train_loss': loss,
      'train_accuracy': correct,
      'learning_rate': learning_rate_fn(state.step),
      # Over the updated state as well: a finite loss can come with an overflowing update, and the state, not
      # the loss, is what a checkpoint keeps.
      'finite': all_finite(loss, new_state.params, new_state.batch_stats),
  }
  return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, ten_crop: bool = False) -> dict[str, jax.Array]:
  """Sums over the real (mask = 1) examples of a batch: loss, top-1 and top-5 correct, count.

  With ten_crop, `image` is (batch, 10, H, W, C) and the logits of the ten crops are summed.
  """
  images, labels = batch['image'], batch['label']
  mask = batch['mask'].astype(jnp.float32)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  if ten_crop:
    crops = images.shape[1]
    logits = state.apply_fn(variables, images.reshape(-1, *images.shape[2:]), train=False)
    logits = logits.reshape(images.shape[0], crops, -1).sum(axis=1)
    loss = cross_entropy(logits / crops, labels)
  else:
    logits = state.apply_fn(variables, images, train=False)
    loss = cross_entropy(logits, labels)
  return {
      'loss': jnp.sum(loss * mask),
      'accuracy': jnp.sum(top_k_correct(logits, labels, 1) * mask),
      'top5_accuracy': jnp.sum(top_k_correct(logits, labels, 5) * mask),
      'count': jnp.sum(mask),
  }

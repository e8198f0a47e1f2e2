"""Activation memory of a compiled training step, as XLA's buffer assignment reports it.

`memory_efficient=True` saves memory on XLA:CPU only with `platform.xla_flags.KEEP_REMAT_ON_CPU` in XLA_FLAGS
when JAX starts (`platform.remat_is_effective`); the entry points, the benchmarks and the notebooks set it
(`platform.prepare_environment()`).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

def train_step_temp_bytes(
    model: nn.Module, batch_size: int, input_shape: Sequence[int], num_classes: int | None = None, *,
    device: jax.Device | None = None,
) -> int:
  """Temporary memory in bytes of one compiled forward + backward pass (loss and gradients).

  This is the activation memory of training: parameters, gradients and optimizer state are
  arguments/outputs and are not counted. Nothing is executed; the step is only compiled, for `device`
  (default: JAX's default device; a compile-only device of densenet_jax.compile_check.targets works too).
  """
  num_classes = num_classes or model.num_classes
  sharding = None if device is None else jax.sharding.SingleDeviceSharding(device)
  images = jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32, sharding=sharding)
  labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)
  variables = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding),
                           jax.eval_shape(model.init, jax.random.key(0), images))

  def loss_and_grads(variables, images, labels):
    def loss_fn(params):
      logits, updates = model.apply(
          {**variables, 'params': params}, images, train=True, mutable=['batch_stats']
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates

    return jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])

  compiled = jax.jit(loss_and_grads).lower(variables, images, labels).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)

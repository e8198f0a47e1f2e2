"""Faster forms of densenet.py's DenseNet: the same function with the same variables, written for a compiler.

A `DenseNet` names its form with four attributes; the defaults are densenet.py's own layers:

* `kernels` (kernels.py): 'xla', XLA's own operations, or 'cpu', convolutions and max pooling in the forms XLA:CPU
  compiles faster code for, with hand-written gradients;
* `layers_per_scan` (scanned_block.py): 0, every dense layer written out, or n, each dense block computed n layers
  at a time under `jax.lax.scan` with a hand-written backward pass (needs `memory_efficient`);
* `dropout_masks` (kernels.DROPOUT_MASKS): 'jax' or 'elementwise', the same bits drawn by one fused kernel;
* `memory_efficient`, which densenet.py computes with `nn.remat` and these forms with `jax.checkpoint`.

Any form but the default takes its dense blocks and transitions from blocks.py, which also computes each feature
map's batch moments once for every layer that reads it. tests/test_forms.py checks every form against
densenet.py: logits, gradients and running statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from densenet_jax.model.forms import blocks, kernels

FORM_ATTRIBUTES = ('kernels', 'memory_efficient', 'layers_per_scan', 'dropout_masks')


def check(model: Any) -> None:
  """Refuses form attributes that name no form, with what to pass instead."""
  unset = [name for name in FORM_ATTRIBUTES if getattr(model, name) is None]
  if unset:
    raise ValueError(
        f'DenseNet takes explicit values for {", ".join(unset)}, got None: the model reads nothing of the machine. '
        'Pass them, e.g. **densenet_jax.platform.choose(config, backend).model_options(), or leave the defaults '
        "(kernels='xla', memory_efficient=False, layers_per_scan=0, dropout_masks='jax').")
  if model.layers_per_scan < 0 or (model.layers_per_scan > 0 and not model.memory_efficient):
    raise ValueError(
        f'layers_per_scan={model.layers_per_scan}: use 0 (every dense layer written out) or a positive number of '
        'layers per scan together with memory_efficient=True (a scanned block keeps only what memory_efficient '
        "keeps: it has no variant that stores every layer's input).")
  if model.kernels not in kernels.KERNELS:
    raise ValueError(f'kernels={model.kernels!r}: use one of {", ".join(kernels.KERNELS)}.')
  if model.dropout_masks not in kernels.DROPOUT_MASKS:
    raise ValueError(f'dropout_masks={model.dropout_masks!r}: use one of {", ".join(kernels.DROPOUT_MASKS)}.')


def is_default(model: Any) -> bool:
  """Whether `model` computes with densenet.py's own layers (memory_efficient either way)."""
  check(model)
  return model.kernels == 'xla' and model.layers_per_scan == 0 and model.dropout_masks == 'jax'


def parts(model: Any) -> tuple[Callable, Callable, Callable]:
  """(dense block, transition, stem max pooling) of `model`'s form, for any form but the default."""
  form = dict(kernels=model.kernels, dropout_masks=model.dropout_masks)
  block = functools.partial(blocks.DenseBlock, memory_efficient=model.memory_efficient,
                            layers_per_scan=model.layers_per_scan, **form)
  return block, functools.partial(blocks.Transition, **form), kernels.resolve(model.kernels).stem_pool

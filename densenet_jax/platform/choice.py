"""How a run computes on its machine: chosen once, above the model, from the config and the backend.

Every form computes the same function with the same variables (tests/test_kernels.py, tests/test_scanned_block.py);
they differ in speed, memory and compile time, and each default below rests on a measurement on that backend
(docs/performance.md). A CPU measurement never sets a GPU or TPU default: GPUs and TPUs get XLA's own operations
and dense layers written out until a measurement there says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from densenet_jax.platform import cpu_family, xla_flags

@dataclasses.dataclass(frozen=True)
class Form:
  """Concrete values for the model's form attributes (densenet_jax/model/densenet.py documents each)."""

  kernels: str  # 'xla' or 'cpu': how convolutions and max pooling are written for the compiler
  memory_efficient: bool  # recompute each dense layer's normalized input in the backward pass
  layers_per_scan: int  # 0: every dense layer written out; n > 0: n layers at a time under jax.lax.scan
  dropout_masks: str  # 'jax' or 'elementwise': the same bits, drawn by JAX's own code or one fused kernel

  def model_options(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# The config fields (and DenseNet attributes, model.FORM_FIELDS) that say how the model computes, not what.
FORM_FIELDS = tuple(field.name for field in dataclasses.fields(Form))


def default_form(backend: str, family: str | None = None) -> Form:
  """The form measured fastest on `backend` ('cpu', 'gpu', 'tpu', ...); on the CPU per CPU family (default: this
  host's, read from /proc/cpuinfo)."""
  if backend != 'cpu':
    return Form(kernels='xla', memory_efficient=False, layers_per_scan=0, dropout_masks='jax')
  measured = cpu_family.defaults(family or cpu_family.host())
  # JAX draws random bits on the CPU in a loop of passes, compiled again at every dropout site; the elementwise
  # form of the same bits runs and compiles many times faster there (docs/performance.md, "Dropout").
  return Form(kernels=measured.kernels, memory_efficient=measured.memory_efficient,
              layers_per_scan=measured.layers_per_scan, dropout_masks='elementwise')


def choose(config: Any, backend: str, family: str | None = None) -> Form:
  """The form a run computes with: every form field `config` sets (not None) wins, the rest is the backend's
  default (`default_form`).

  A scanned block exists only in the memory-efficient form, so layers_per_scan=n > 0 implies memory_efficient,
  memory_efficient=False implies layers written out, and memory_efficient=True alone keeps the default's scan only
  where the default is itself memory-efficient.
  """
  given = {field: config.get(field) for field in FORM_FIELDS}
  default = default_form(backend, family)
  memory_efficient, layers_per_scan = given['memory_efficient'], given['layers_per_scan']
  if layers_per_scan is None:
    if memory_efficient is None:
      memory_efficient, layers_per_scan = default.memory_efficient, default.layers_per_scan
    else:
      layers_per_scan = default.layers_per_scan if memory_efficient and default.memory_efficient else 0
  elif memory_efficient is None:
    memory_efficient = layers_per_scan > 0 or default.memory_efficient
  return Form(kernels=given['kernels'] or default.kernels, memory_efficient=memory_efficient,
              layers_per_scan=layers_per_scan, dropout_masks=given['dropout_masks'] or default.dropout_masks)


def remat_is_effective(backend: str, environ: Mapping[str, str] = os.environ) -> bool:
  """Whether `memory_efficient=True` saves memory on `backend`: GPUs and TPUs keep rematerialization; XLA:CPU
  only with xla_flags.KEEP_REMAT_ON_CPU in XLA_FLAGS when JAX started (`prepare_environment` sets it)."""
  return backend != 'cpu' or xla_flags.KEEP_REMAT_ON_CPU in environ.get('XLA_FLAGS', '')


# Compile options for programs that run once, such as initializing a model's variables. At its default LLVM
# optimization level XLA:CPU spends seconds on each parameter shape's random-number kernels; level 1 compiles them
# many times faster, and is the lowest that gives the same values on AMD's AVX2 CPUs, within 2 ulp on AVX-512 ones
# (docs/performance.md, "Compile time of the initialization"). Other backends were not measured: their defaults.
_RUN_ONCE_OPTIONS = {'cpu': {'xla_backend_optimization_level': 1}}


def run_once_options(backend: str) -> dict[str, Any] | None:
  """XLA compiler options for a program that runs once on `backend` (None: XLA's defaults)."""
  options = _RUN_ONCE_OPTIONS.get(backend)
  return dict(options) if options else None

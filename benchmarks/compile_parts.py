"""Where the compile time of a train step goes: the step in parts, and the kernels each part compiles.

    python benchmarks/compile_parts.py --model densenet_bc_l190_k40 --batch 64

Compiles (never runs) four programs for one model and batch, each in its own jit:

* `forward`: the training-mode loss, with BatchNorm's batch statistics and running averages;
* `gradients`: the loss and its gradients (forward and backward pass);
* `train_step`: densenet_jax.steps.train_step, i.e. the gradients plus the SGD update;
* `sgd_update`: the SGD update alone, on the model's parameters;
* `sgd_update_one_shape`: the same update on as many parameters, all of the model's most common shape.

For each: seconds of tracing, lowering and XLA compilation, jaxpr equations, and the fused kernels of the
optimized HLO that XLA generates code for (library calls such as YNNPACK's matmuls excluded), in total and
distinct (the same fused computation on the same shapes, names aside). XLA:CPU generates code once per
distinct kernel, so the distinct count is what compile time follows (docs/performance.md). XLA shares no
kernels between programs, so the parts compile as if each were alone.

Needs only jax, flax and optax. XLA flags are train.py's (densenet_jax/platform/xla_flags.py) plus XLA_FLAGS.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from densenet_jax import platform  # noqa: E402

platform.prepare_environment()  # Before JAX starts, as in train.py.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common  # noqa: E402
from densenet_jax import model as model_lib  # noqa: E402
from densenet_jax.training import steps

PARTS = ('forward', 'gradients', 'train_step', 'sgd_update', 'sgd_update_one_shape')

_COMPUTATION_HEADER = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$')
_FUSION_CALL = re.compile(r' fusion\(.*kind=(k\w+), calls=%?([\w.\-]+)')
_NAME = re.compile(r'%[\w.\-]+')
_METADATA = re.compile(r', metadata=\{[^}]*\}')


def kernel_counts(hlo_text: str) -> tuple[int, int]:
  """(kernels, distinct kernels) among the fusions of an optimized HLO module, library calls excluded."""
  bodies, name, lines = {}, None, []
  for line in hlo_text.splitlines():
    header = _COMPUTATION_HEADER.match(line)
    if header:
      name, lines = header.group(1), []
    elif line == '}' and name:
      bodies[name], name = lines, None
    elif name:
      lines.append(_METADATA.sub('', _NAME.sub('%', line)))
  called = [callee for kind, callee in _FUSION_CALL.findall(hlo_text) if kind != 'kCustom']
  return len(called), len({'\n'.join(bodies[callee]) for callee in called})


def _programs(model: model_lib.DenseNet, batch: int, size: int) -> dict[str, tuple[Callable, tuple]]:
  """Each part as a function and the abstract arguments it is compiled for."""
  learning_rate_fn, tx = common.paper_optimizer()
  state = jax.eval_shape(functools.partial(
      steps.create_train_state, model=model, image_shape=(size, size, model.input_channels), tx=tx
  ), jax.random.key(0))
  images = jax.ShapeDtypeStruct((batch, size, size, model.input_channels), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  batch_arrays = {'image': images, 'label': labels}

  def loss(params, batch_stats, images, labels):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats'])
    return steps.cross_entropy(logits, labels).mean(), updates['batch_stats']

  def sgd_update(state, grads):
    return state.apply_gradients(grads=grads)

  shapes = [p.shape for p in jax.tree.leaves(state.params)]
  most_common = max(set(shapes), key=shapes.count)
  one_shape = jax.tree.map(lambda p: jax.ShapeDtypeStruct(most_common, p.dtype), state.params)
  one_shape_state = jax.eval_shape(functools.partial(steps.TrainState.create, apply_fn=model.apply, tx=tx),
                                   params=one_shape, batch_stats={})
  variables = (state.params, state.batch_stats, images, labels)
  return {
      'forward': (loss, variables),
      'gradients': (jax.value_and_grad(loss, has_aux=True), variables),
      'train_step': (functools.partial(steps.train_step, learning_rate_fn=learning_rate_fn),
                     (state, batch_arrays, jax.random.key(1))),
      'sgd_update': (sgd_update, (state, state.params)),
      'sgd_update_one_shape': (sgd_update, (one_shape_state, one_shape)),
  }


def measure(fn: Callable, args: tuple) -> dict:
  start = time.perf_counter()
  traced = jax.jit(fn).trace(*args)
  traced_at = time.perf_counter()
  lowered = traced.lower()
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  kernels, distinct = kernel_counts(compiled.as_text())
  return dict(
      trace_seconds=round(traced_at - start, 2), lower_seconds=round(lowered_at - traced_at, 2),
      xla_seconds=round(compiled_at - lowered_at, 2), total_seconds=round(compiled_at - start, 2),
      jaxpr_equations=len(traced.jaxpr.eqns), kernels=kernels, distinct_kernels=distinct,
  )


def run(args: argparse.Namespace) -> dict:
  model, size = common.create_model(args, memory_efficient=args.memory_efficient, layers_per_scan=args.layers_per_scan)
  programs = _programs(model, args.batch, size)
  params = jax.tree.leaves(programs['sgd_update'][1][1])
  result = dict(
      model=args.model, batch=args.batch, image_size=size, memory_efficient=model.memory_efficient,
      layers_per_scan=model.layers_per_scan, kernels=model.kernels,
      **common.environment(), parameters=len(params), distinct_parameter_shapes=len({p.shape for p in params}),
      parts={},
  )
  for part in args.parts:
    result['parts'][part] = measure(*programs[part])
    print(part, json.dumps(result['parts'][part]), flush=True)
  return result


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common.add_model_arguments(parser)
  common.add_block_form_arguments(parser)
  parser.add_argument('--parts', nargs='+', choices=PARTS, default=list(PARTS))
  parser.add_argument('--json', default=None, help='write the result object to this file')
  args = parser.parse_args(argv)
  if args.batch < 1:
    parser.error('--batch must be at least 1.')
  common.check_block_form_arguments(parser, args)
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  common.report(run(args), args.json)


if __name__ == '__main__':
  main()

"""Training/eval speed, compile time and memory of one DenseNet, optionally side by side with PyTorch.

    python benchmarks/bench.py --model densenet_bc_l100_k12 --batch 64 --reference torch
    python benchmarks/bench.py --model densenet121 --batch 256 --dtype bfloat16 --reference torch --json out.json

Needs only jax, flax and optax (and torch for --reference torch): no TensorFlow. XLA flags are train.py's
(densenet_jax/xla_flags.py) plus whatever XLA_FLAGS holds. The train step is the
library's own (densenet_jax.steps.train_step: forward, backward, SGD update, BatchNorm statistics),
compiled once; images/s is the median over timed steps after warm-up. With --reference torch the same
architecture and batch run in PyTorch in the same process (torchvision's DenseNets for the ImageNet
models when torchvision is installed, benchmarks.torch_reference otherwise; channels_last and bfloat16
autocast on GPU); with --memory_efficient --reference plain the reference is the same model without
memory_efficient; with --layers_per_scan N --reference unrolled it is the same model with its dense layers
written out; with --reference xla_options it is the same step compiled with the XLA options given
in --xla_options (e.g. XLA:CPU's own choice of convolution kernels, see docs/performance.md). The two
alternate in rounds, so that both see the same machine state.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from densenet_jax import cli  # noqa: E402

cli.prepare_environment()  # Before JAX starts: train.py's XLA flags (remat kept on CPU).

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from densenet_jax import model as model_lib  # noqa: E402
from densenet_jax import summary  # noqa: E402
from densenet_jax.training import steps  # noqa: E402

class JaxRunner:
  """The library's compiled train and eval steps on one synthetic batch."""

  def __init__(self, model: model_lib.DenseNet, batch: int, size: int, xla_options: Mapping | None = None):
    self.batch = batch
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, size, size, model.input_channels)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32)
    self.batch_arrays = {'image': images, 'label': labels, 'mask': jnp.ones((batch,), bool)}
    learning_rate_fn, tx = common.paper_optimizer()
    self.state = jax.jit(functools.partial(
        steps.create_train_state, model=model, image_shape=(size, size, model.input_channels), tx=tx
    ))(jax.random.key(0))
    self.rng = jax.random.key(1)
    train_step = jax.jit(functools.partial(steps.train_step, learning_rate_fn=learning_rate_fn), donate_argnums=0)
    start = time.perf_counter()
    lowered = train_step.lower(self.state, self.batch_arrays, self.rng)  # Tracing (Python) and lowering.
    lowered_at = time.perf_counter()
    self.train_compiled = lowered.compile(compiler_options=xla_options)  # XLA.
    self.compile_seconds = time.perf_counter() - start
    self.xla_compile_seconds = time.perf_counter() - lowered_at
    self.temp_bytes = int(self.train_compiled.memory_analysis().temp_size_in_bytes)
    self.eval_compiled = None  # Compiled when first needed.
    self.description = f'densenet_jax, memory_efficient={model.memory_efficient}, kernels={model.kernels or "default"}'
    if model.layers_per_scan:
      self.description += f', layers_per_scan={model.layers_per_scan}'
    if xla_options:
      self.description += f', XLA options {json.dumps(xla_options)}'

  def facts(self) -> dict:
    return dict(compile_seconds=round(self.compile_seconds, 2),
                xla_compile_seconds=round(self.xla_compile_seconds, 2), temp_bytes=self.temp_bytes)

  def train(self) -> None:
    self.state, metrics = self.train_compiled(self.state, self.batch_arrays, self.rng)
    jax.block_until_ready(metrics)

  def eval(self) -> None:
    if self.eval_compiled is None:
      self.eval_compiled = jax.jit(steps.eval_step).lower(self.state, self.batch_arrays).compile()
    jax.block_until_ready(self.eval_compiled(self.state, self.batch_arrays))


class TorchRunner:
  """The same architecture, batch and optimizer in PyTorch."""

  def __init__(self, name: str, model: model_lib.DenseNet, batch: int, size: int, compile_model: bool):
    import torch  # noqa: PLC0415 (optional dependency)

    from benchmarks import torch_reference  # noqa: PLC0415

    self.torch = torch
    self.gpu = torch.cuda.is_available()
    device = 'cuda' if self.gpu else 'cpu'
    try:
      import torchvision  # noqa: PLC0415
      net = getattr(torchvision.models, name)(num_classes=model.num_classes) if model.stem == 'imagenet' else None
      self.source = f'torchvision {torchvision.__version__}' if net is not None else 'benchmarks.torch_reference'
    except ImportError:
      net = None
      self.source = 'benchmarks.torch_reference'
    net = net or torch_reference.build_torch_densenet(model)
    net = net.to(device).train()
    if self.gpu:
      net = net.to(memory_format=torch.channels_last)
    self.optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    self.net = torch.compile(net) if compile_model else net
    self.images = torch.randn(batch, model.input_channels, size, size, device=device)
    if self.gpu:
      self.images = self.images.contiguous(memory_format=torch.channels_last)
    self.labels = torch.randint(0, model.num_classes, (batch,), device=device)
    self.bfloat16 = model.dtype == jnp.bfloat16
    self.description = f'PyTorch {torch.__version__} ({self.source})' + (', torch.compile' if compile_model else '')

  def facts(self) -> dict:
    facts = dict(torch_threads=self.torch.get_num_threads())
    if self.gpu:
      facts['peak_bytes'] = self.torch.cuda.max_memory_allocated()
    return facts

  def _autocast(self):
    device = 'cuda' if self.gpu else 'cpu'
    return self.torch.autocast(device, dtype=self.torch.bfloat16, enabled=self.bfloat16)

  def _sync(self) -> None:
    if self.gpu:
      self.torch.cuda.synchronize()

  def train(self) -> None:
    self.optimizer.zero_grad(set_to_none=True)
    with self._autocast():
      loss = self.torch.nn.functional.cross_entropy(self.net(self.images), self.labels)
    loss.backward()
    self.optimizer.step()
    self._sync()

  def eval(self) -> None:
    self.net.eval()
    with self.torch.no_grad(), self._autocast():
      self.net(self.images)
    self.net.train()
    self._sync()


def run(args: argparse.Namespace) -> dict:
  imagenet = model_lib.create_model(args.model, num_classes=1).stem == 'imagenet'
  model = model_lib.create_model(
      args.model, num_classes=args.num_classes or (1000 if imagenet else 10),
      dtype=jnp.dtype(args.dtype), memory_efficient=args.memory_efficient, layers_per_scan=args.layers_per_scan,
      kernels=args.kernels,
  )
  size = args.image_size or summary.default_input_shape(model)[0]
  device = jax.devices()[0]
  result = dict(model=args.model, batch=args.batch, image_size=size, dtype=args.dtype,
                memory_efficient=args.memory_efficient, layers_per_scan=args.layers_per_scan, **common.environment())
  runner = JaxRunner(model, args.batch, size)
  result.update(runner.facts())
  if args.compile_only:
    return result
  reference = None
  if args.reference in ('torch', 'torch_memory_efficient'):
    # PyTorch at its best by default: no checkpointing unless that reference is asked for by name.
    torch_model = model.clone(memory_efficient=args.reference == 'torch_memory_efficient')
    reference = TorchRunner(args.model, torch_model, args.batch, size, args.torch_compile)
  elif args.reference == 'kernels':  # The same model with another kernel set (densenet_jax/model/kernels.py).
    reference = JaxRunner(model.clone(kernels=args.reference_kernels), args.batch, size)
  elif args.reference == 'plain':  # The cost of memory_efficient=True: the same model without it.
    reference = JaxRunner(model.clone(memory_efficient=False), args.batch, size)
  elif args.reference == 'unrolled':  # What scanning the dense layers costs and saves.
    reference = JaxRunner(model.clone(layers_per_scan=0), args.batch, size)
  elif args.reference == 'xla_options':  # The same step, compiled with other XLA options.
    try:
      reference = JaxRunner(model, args.batch, size, args.xla_options)
    except jax.errors.JaxRuntimeError as e:  # An option this jaxlib does not know, or a bad value.
      raise SystemExit(f'--xla_options {json.dumps(args.xla_options)}: {e}') from None
  for _ in range(args.warmup):  # Warm-up: first-run allocations, autotuning, torch.compile.
    runner.train()
    if reference:
      reference.train()
  contenders = {'jax': runner.train, **({'reference': reference.train} if reference else {})}
  times = common.take_turns(contenders, args.rounds, args.steps)
  jax_times, reference_times = times['jax'], times.get('reference')
  result['step_seconds'] = round(statistics.median(jax_times), 4)
  result['images_per_second'] = round(args.batch / statistics.median(jax_times), 2)
  if not args.skip_eval:
    runner.eval()
    result['eval_images_per_second'] = round(args.batch / statistics.median(common.timed(runner.eval, args.steps)), 2)
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    result['peak_bytes'] = stats.get('peak_bytes_in_use')
  if reference:
    reference_rate = args.batch / statistics.median(reference_times)
    result['reference'] = dict(
        implementation=reference.description,
        images_per_second=round(reference_rate, 2),
        step_seconds=round(statistics.median(reference_times), 4),
    )
    if not args.skip_eval:
      reference.eval()
      result['reference']['eval_images_per_second'] = round(
          args.batch / statistics.median(common.timed(reference.eval, args.steps)), 2)
    result['reference'].update(reference.facts())
    result['speedup_vs_reference'] = round(result['images_per_second'] / reference_rate, 3)
  return result


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='densenet_bc_l100_k12', choices=sorted(model_lib.MODELS))
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--image_size', type=int, default=None, help='default: 224 for ImageNet models, else 32')
  parser.add_argument('--num_classes', type=int, default=None, help='default: 1000 for ImageNet models, else 10')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--memory_efficient', action='store_true')
  parser.add_argument('--layers_per_scan', type=int, default=0,
                      help='compute dense blocks this many layers at a time (needs --memory_efficient)')
  parser.add_argument('--steps', type=int, default=3, help='timed steps per round')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--skip_eval', action='store_true')
  parser.add_argument('--compile_only', action='store_true', help='report compile time and memory, run nothing')
  parser.add_argument('--kernels', choices=['xla', 'cpu'], default=None,
                      help="the model's kernel set (default: the backend's, densenet_jax/model/kernels.py)")
  parser.add_argument('--reference', default=None,
                      choices=['torch', 'torch_memory_efficient', 'plain', 'unrolled', 'kernels', 'xla_options'],
                      help='torch: PyTorch without checkpointing; torch_memory_efficient: PyTorch checkpointing '
                           'each dense layer; plain: the same model without memory_efficient (needs '
                           '--memory_efficient); unrolled: the same model with layers_per_scan=0 (needs '
                           '--layers_per_scan); kernels: the same model with --reference_kernels; xla_options: '
                           'the same step compiled with --xla_options')
  parser.add_argument('--reference_kernels', choices=['xla', 'cpu'], default='xla')
  parser.add_argument('--xla_options', default=None,
                      help='JSON object of XLA compile options for --reference xla_options, e.g. '
                           f"'{json.dumps(common.YNNPACK_CONVOLUTIONS)}' (XLA:CPU's default kernels)")
  parser.add_argument('--torch_compile', action='store_true')
  parser.add_argument('--json', default=None, help='write the result object to this file')
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 1 or args.rounds < 1:
    parser.error('--batch, --steps and --rounds must be at least 1.')
  if args.reference == 'plain' and not args.memory_efficient:
    parser.error('--reference plain measures the cost of --memory_efficient: add --memory_efficient.')
  if args.layers_per_scan < 0 or (args.layers_per_scan and not args.memory_efficient):
    parser.error('--layers_per_scan N (N >= 1) computes the memory-efficient model: add --memory_efficient.')
  if args.reference == 'unrolled' and not args.layers_per_scan:
    parser.error('--reference unrolled measures the effect of --layers_per_scan: add --layers_per_scan N.')
  if (args.reference == 'xla_options') != (args.xla_options is not None):
    parser.error('--reference xla_options and --xla_options JSON go together.')
  if args.xla_options is not None:
    try:
      args.xla_options = json.loads(args.xla_options)
    except json.JSONDecodeError:
      args.xla_options = None
    if not isinstance(args.xla_options, dict):
      parser.error(f"--xla_options must be a JSON object, e.g. '{json.dumps(common.YNNPACK_CONVOLUTIONS)}'.")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  result = run(args)
  common.report(result, args.json)
  if 'speedup_vs_reference' in result:
    print(f'{args.model} batch {args.batch} {args.dtype}: {result["images_per_second"]} img/s vs '
          f'{result["reference"]["images_per_second"]} img/s, ratio {result["speedup_vs_reference"]}x')


if __name__ == '__main__':
  main()

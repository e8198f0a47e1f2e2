"""Training/eval speed, compile time and memory of one DenseNet, optionally side by side with PyTorch.

    python benchmarks/bench.py --model densenet_bc_l100_k12 --batch 64 --reference torch --strict
    python benchmarks/bench.py --model densenet121 --batch 256 --dtype bfloat16 --reference torch --json out.json

Needs only jax, flax and optax (and torch for --reference torch): no TensorFlow. XLA flags are train.py's
(densenet_jax/platform/xla_flags.py) plus whatever XLA_FLAGS holds. The train step is the
library's own (densenet_jax.steps.train_step: forward, backward, SGD update, BatchNorm statistics),
compiled once; images/s is the median over timed steps after warm-up.

--reference torch is PyTorch at its best on this machine, in the same process: the same architecture and
batch (torchvision's DenseNets for the ImageNet models when torchvision is installed,
benchmarks.torch_reference otherwise), never checkpointed; on CPU with the thread count (1..N) and then the
memory format (contiguous or channels_last) that measured fastest, the sweep reported; on GPU channels_last and
bfloat16 autocast. --reference torch_memory_efficient is the checkpointed PyTorch model, a second reference by
name only. With --memory_efficient --reference plain the reference is the same model without
memory_efficient; with --layers_per_scan N --reference unrolled it is the same model with its dense layers
written out; with --reference xla_options it is the same step compiled with the XLA options given in
--xla_options (e.g. XLA:CPU's own choice of convolution kernels, see docs/performance.md).

The two sides alternate in rounds, train steps and then eval steps, so that both see the same machine state.
A ratio is printed only when the machine was not contended (benchmarks/machine_load.py: other processes' CPU
time before and during the run, each side's CPU time per step against wall time x threads); otherwise the
reasons are, and --strict makes that exit status 3.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from densenet_jax import platform  # noqa: E402

platform.prepare_environment()  # Before JAX starts: train.py's XLA flags (remat kept on CPU).

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common, machine_load  # noqa: E402
from densenet_jax import model as model_lib  # noqa: E402
from densenet_jax.model.forms import kernels as kernel_sets  # noqa: E402
from densenet_jax.training import steps  # noqa: E402

CONTENDED_EXIT_STATUS = 3  # --strict: the machine was contended, so the run measured nothing trustworthy.


class JaxRunner:
  """The library's compiled train and eval steps on one synthetic batch."""

  def __init__(self, model: model_lib.DenseNet, batch: int, size: int, xla_options: Mapping | None = None):
    self.batch = batch
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, size, size, model.input_channels)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32)
    self.batch_arrays = {'image': images, 'label': labels, 'mask': jnp.ones((batch,), bool)}
    learning_rate_fn, tx = common.paper_optimizer()
    create_state = jax.jit(functools.partial(
        steps.create_train_state, model=model, image_shape=(size, size, model.input_channels), tx=tx))
    options = platform.run_once_options(jax.default_backend())
    self.state = create_state.lower(jax.random.key(0)).compile(compiler_options=options)(jax.random.key(0))
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
    self.description = f'densenet_jax, memory_efficient={model.memory_efficient}, kernels={model.kernels}'
    if model.layers_per_scan:
      self.description += f', layers_per_scan={model.layers_per_scan}'
    if xla_options:
      self.description += f', XLA options {json.dumps(xla_options)}'

  def threads_used(self) -> int:
    return common.cpu_count()  # XLA:CPU's thread pool has one thread per usable CPU.

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


def build_torch_net(name: str, model: model_lib.DenseNet):
  """The PyTorch twin of `model` and where it comes from: torchvision's DenseNet for the ImageNet models when
  torchvision is installed, benchmarks.torch_reference otherwise. Checkpointing only if model.memory_efficient."""
  from benchmarks import torch_reference  # noqa: PLC0415 (needs torch)

  try:
    import torchvision  # noqa: PLC0415
  except ImportError:
    torchvision = None
  if torchvision is not None and model.stem == 'imagenet':
    net = getattr(torchvision.models, name)(num_classes=model.num_classes, memory_efficient=model.memory_efficient)
    return net, f'torchvision {torchvision.__version__}'
  return torch_reference.build_torch_densenet(model), 'benchmarks.torch_reference'


def sweep_thread_counts(requested: tuple[int, ...] | None, cpus: int) -> tuple[int, ...]:
  """The thread counts PyTorch is timed with: the requested ones, or every count from 1 to the usable CPUs."""
  return tuple(requested) if requested else tuple(range(1, cpus + 1))


class TorchRunner:
  """The same architecture, batch and optimizer in PyTorch, at its best on this machine.

  On CPU the constructor first measures the train step with 1..N threads (N: the CPUs this process may use, or
  `thread_counts`), then both memory formats at the fastest thread count, and keeps the fastest of all; on GPU
  it uses channels_last. The candidates take turns in rounds, each preceded by one untimed step (a change of
  threads or format costs its first step). With `compile_model` the chosen eager setup is then torch.compile'd.
  """

  def __init__(self, name: str, model: model_lib.DenseNet, batch: int, size: int, compile_model: bool,
               sweep_rounds: int = 2, sweep_steps: int = 2, thread_counts: tuple[int, ...] | None = None):
    import torch  # noqa: PLC0415 (optional dependency)

    self.torch = torch
    self.gpu = torch.cuda.is_available()
    device = 'cuda' if self.gpu else 'cpu'
    net, self.source = build_torch_net(name, model)
    self.eager = net.to(device).train()
    self.images = torch.randn(batch, model.input_channels, size, size, device=device)
    self.labels = torch.randint(0, model.num_classes, (batch,), device=device)
    self.bfloat16 = model.dtype == jnp.bfloat16
    self.net = self.eager
    self.sweep = None
    if self.gpu:
      self._configure(torch.get_num_threads(), 'channels_last')
    else:
      self.sweep = self._choose_threads_and_format(sweep_thread_counts(thread_counts, common.cpu_count()),
                                                   sweep_rounds, sweep_steps)
    self.optimizer = self._optimizer()  # Fresh momentum buffers, in the chosen memory format.
    self.net = torch.compile(self.eager) if compile_model else self.eager
    self.description = (f'PyTorch {torch.__version__} ({self.source}), {self.threads} threads, {self.memory_format}'
                        + (', torch.compile' if compile_model else ''))

  def _optimizer(self):
    return self.torch.optim.SGD(self.eager.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

  def _configure(self, threads: int, memory_format: str) -> None:
    torch = self.torch
    layout = torch.channels_last if memory_format == 'channels_last' else torch.contiguous_format
    torch.set_num_threads(threads)
    self.eager.to(memory_format=layout)
    self.images = self.images.contiguous(memory_format=layout)
    self.threads, self.memory_format = threads, memory_format

  def _median_step(self, candidates: list[tuple[int, str]], rounds: int, steps: int) -> dict[tuple[int, str], float]:
    times = {candidate: [] for candidate in candidates}
    for _ in range(rounds):
      for candidate in candidates:
        self._configure(*candidate)
        self.train()  # Untimed: the first step after a change of threads or format pays for the change.
        times[candidate] += common.timed(self.train, steps)
    return {candidate: statistics.median(seconds) for candidate, seconds in times.items()}

  def _choose_threads_and_format(self, thread_counts, rounds: int, steps: int) -> dict:
    self.optimizer = self._optimizer()
    by_threads = self._median_step([(threads, 'contiguous') for threads in thread_counts], rounds, steps)
    threads = min(by_threads, key=by_threads.get)[0]
    by_format = self._median_step([(threads, 'contiguous'), (threads, 'channels_last')], rounds, steps)
    self._configure(*min(by_format, key=by_format.get))
    return dict(rounds=rounds, steps=steps,
                step_seconds_by_threads={str(t): round(s, 4) for (t, _), s in by_threads.items()},
                step_seconds_by_memory_format={f: round(s, 4) for (_, f), s in by_format.items()},
                threads=self.threads, memory_format=self.memory_format)

  def facts(self) -> dict:
    facts = dict(torch_threads=self.threads, memory_format=self.memory_format, checkpointing=self.checkpointing())
    if self.sweep:
      facts['sweep'] = self.sweep
    if self.gpu:
      facts['peak_bytes'] = self.torch.cuda.max_memory_allocated()
    return facts

  def checkpointing(self) -> bool:
    """Whether the built network recomputes parts of its forward pass in the backward pass."""
    return any(getattr(module, 'memory_efficient', False) for module in self.eager.modules())

  def threads_used(self) -> int:
    return self.threads

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


def _median(timings: list[common.Timing]) -> float:
  return statistics.median(timing.wall for timing in timings)


def _utilization(timings: list[common.Timing], threads: int) -> float:
  return round(statistics.median(machine_load.utilization(t.cpu, t.wall, threads) for t in timings), 3)


def check_reference_form(reference: str | None, form: model_lib.DenseNet) -> None:
  """Refuses a JAX reference that would be the measured model itself."""
  if reference == 'plain' and not form.memory_efficient:
    raise SystemExit('--reference plain measures the cost of the memory-efficient form, which this model does not '
                     'compute: add --memory_efficient.')
  if reference == 'unrolled' and not form.layers_per_scan:
    raise SystemExit('--reference unrolled measures the effect of scanned dense blocks, which this model does not '
                     'compute: add --layers_per_scan N.')


def run(args: argparse.Namespace) -> dict:
  loadavg_before = os.getloadavg()
  load_before = machine_load.probe(args.load_probe_seconds)  # Before this process starts any work.
  model, size = common.create_model(
      args, dtype=jnp.dtype(args.dtype), memory_efficient=args.memory_efficient, layers_per_scan=args.layers_per_scan,
      kernels=args.kernels, dropout_rate=args.dropout_rate,
  )
  device = jax.devices()[0]
  check_reference_form(args.reference, model)
  result = dict(model=args.model, batch=args.batch, image_size=size, dtype=args.dtype, dropout_rate=args.dropout_rate,
                memory_efficient=model.memory_efficient, layers_per_scan=model.layers_per_scan,
                kernels=model.kernels, **common.environment())
  runner = JaxRunner(model, args.batch, size)
  result.update(runner.facts())
  if args.compile_only:
    return result
  reference = None
  if args.reference in ('torch', 'torch_memory_efficient'):
    # PyTorch at its best by default: no checkpointing unless that reference is asked for by name.
    torch_model = model.clone(memory_efficient=args.reference == 'torch_memory_efficient')
    reference = TorchRunner(args.model, torch_model, args.batch, size, args.torch_compile,
                            sweep_rounds=args.sweep_rounds, sweep_steps=args.sweep_steps,
                            thread_counts=args.torch_threads)
  elif args.reference == 'kernels':  # The same model with another kernel set (densenet_jax/model/forms/kernels.py).
    reference = JaxRunner(model.clone(kernels=args.reference_kernels), args.batch, size)
  elif args.reference == 'plain':  # What the memory-efficient form costs: the unrolled model that keeps everything.
    reference = JaxRunner(model.clone(memory_efficient=False, layers_per_scan=0), args.batch, size)
  elif args.reference == 'unrolled':  # What scanning the dense layers costs and saves.
    reference = JaxRunner(model.clone(memory_efficient=True, layers_per_scan=0), args.batch, size)
  elif args.reference == 'xla_options':  # The same step, compiled with other XLA options.
    try:
      reference = JaxRunner(model, args.batch, size, args.xla_options)
    except jax.errors.JaxRuntimeError as e:  # An option this jaxlib does not know, or a bad value.
      raise SystemExit(f'--xla_options {json.dumps(args.xla_options)}: {e}') from None
  sides = {'jax': runner, **({'reference': reference} if reference else {})}
  for _ in range(args.warmup):  # Warm-up: first-run allocations, autotuning, torch.compile, the eval compile.
    for side in sides.values():
      side.train()
      if not args.skip_eval:
        side.eval()
  during_start = machine_load.sample()
  train = common.alternate({name: side.train for name, side in sides.items()}, args.rounds, args.steps)
  evals = {} if args.skip_eval else common.alternate({name: side.eval for name, side in sides.items()},
                                                     args.rounds, args.steps)
  load_during = machine_load.others(during_start, machine_load.sample())
  result['step_seconds'] = round(_median(train['jax']), 4)
  result['step_cpu_seconds'] = round(statistics.median(t.cpu for t in train['jax']), 4)
  result['images_per_second'] = round(args.batch / _median(train['jax']), 2)
  if evals:
    result['eval_images_per_second'] = round(args.batch / _median(evals['jax']), 2)
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    result['peak_bytes'] = stats.get('peak_bytes_in_use')
  utilizations = {}
  for name, side in sides.items():
    threads = side.threads_used()
    for phase, timings in (('train', train), ('eval', evals)):
      if name in timings:
        utilizations[f'{name}_{phase}'] = _utilization(timings[name], threads)
  if reference:
    result['reference'] = dict(
        implementation=reference.description,
        images_per_second=round(args.batch / _median(train['reference']), 2),
        step_seconds=round(_median(train['reference']), 4),
        step_cpu_seconds=round(statistics.median(t.cpu for t in train['reference']), 4),
    )
    if evals:
      result['reference']['eval_images_per_second'] = round(args.batch / _median(evals['reference']), 2)
    result['reference'].update(reference.facts())
  # CPU time per step says something about contention only where the steps compute on the CPU.
  on_cpu = device.platform == 'cpu' and not getattr(reference, 'gpu', False)
  reasons = machine_load.judge(load_before, load_during, utilizations if on_cpu else {},
                               args.max_other_load, args.min_cpu_utilization)
  result['machine'] = dict(loadavg_before=[round(v, 2) for v in loadavg_before],
                           loadavg_after=[round(v, 2) for v in os.getloadavg()],
                           others_before=load_before, others_during=load_during)
  result['cpu_utilization'] = utilizations
  result['contention'] = dict(contended=bool(reasons), reasons=reasons, max_other_load=args.max_other_load,
                              min_cpu_utilization=args.min_cpu_utilization if on_cpu else None)
  if reference and not reasons:  # A ratio only from an uncontended machine (docs/performance.md).
    result['speedup_vs_reference'] = round(result['images_per_second'] / result['reference']['images_per_second'], 3)
    if evals:
      result['eval_speedup_vs_reference'] = round(
          result['eval_images_per_second'] / result['reference']['eval_images_per_second'], 3)
  return result


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_model_arguments(parser)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--dropout_rate', type=float, default=0.0,
                      help="the paper's 0.2 for the datasets without augmentation (C10, C100, SVHN); both sides")
  common.add_block_form_arguments(parser)
  parser.add_argument('--steps', type=int, default=3, help='timed steps per round')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--skip_eval', action='store_true')
  parser.add_argument('--compile_only', action='store_true', help='report compile time and memory, run nothing')
  parser.add_argument('--kernels', choices=sorted(kernel_sets.KERNELS), default=None,
                      help="the model's kernel set (default: the backend's, densenet_jax/platform)")
  parser.add_argument('--reference', default=None,
                      choices=['torch', 'torch_memory_efficient', 'plain', 'unrolled', 'kernels', 'xla_options'],
                      help='torch: PyTorch without checkpointing; torch_memory_efficient: PyTorch checkpointing '
                           'each dense layer; plain: the same model without memory_efficient (needs '
                           '--memory_efficient); unrolled: the same model with layers_per_scan=0 (needs '
                           '--layers_per_scan); kernels: the same model with --reference_kernels; xla_options: '
                           'the same step compiled with --xla_options')
  parser.add_argument('--reference_kernels', choices=sorted(kernel_sets.KERNELS), default='xla')
  parser.add_argument('--xla_options', default=None,
                      help='JSON object of XLA compile options for --reference xla_options, e.g. '
                           f"'{json.dumps(common.YNNPACK_CONVOLUTIONS)}' (XLA:CPU's default kernels)")
  parser.add_argument('--torch_compile', action='store_true')
  parser.add_argument('--torch_threads', default=None,
                      help='comma-separated thread counts for PyTorch to try on CPU (default: 1..the usable CPUs)')
  parser.add_argument('--sweep_rounds', type=int, default=2, help="rounds of PyTorch's thread and format sweep")
  parser.add_argument('--sweep_steps', type=int, default=2, help='timed steps per candidate and sweep round')
  parser.add_argument('--max_other_load', type=float, default=machine_load.MAX_OTHER_LOAD,
                      help="other processes' largest share of the machine's CPU time that still allows a ratio")
  parser.add_argument('--min_cpu_utilization', type=float, default=machine_load.MIN_CPU_UTILIZATION,
                      help='the smallest CPU time / (wall time x threads) per step that still allows a ratio')
  parser.add_argument('--load_probe_seconds', type=float, default=1.0,
                      help="how long to watch other processes' load before the run")
  parser.add_argument('--strict', action='store_true',
                      help=f'exit with status {CONTENDED_EXIT_STATUS} when the machine was contended')
  parser.add_argument('--json', default=None, help='write the result object to this file')
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 1 or args.rounds < 1 or args.sweep_rounds < 1 or args.sweep_steps < 1:
    parser.error('--batch, --steps, --rounds, --sweep_rounds and --sweep_steps must be at least 1.')
  if args.load_probe_seconds <= 0:
    parser.error('--load_probe_seconds must be positive: a ratio needs the machine seen idle before the run.')
  if args.torch_threads is not None:
    try:
      args.torch_threads = tuple(int(t) for t in args.torch_threads.split(','))
    except ValueError:
      args.torch_threads = ()
    if not args.torch_threads or min(args.torch_threads) < 1:
      parser.error('--torch_threads takes thread counts >= 1, separated by commas, e.g. 1,2.')
  common.check_block_form_arguments(parser, args)
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


def summary_line(result: dict) -> str:
  """The comparison in one line; with a contended machine, the reasons instead of a ratio."""
  line = f'{result["model"]} batch {result["batch"]} {result["dtype"]}: train {result["images_per_second"]} img/s'
  reference = result.get('reference')
  if reference:
    line += f' vs {reference["images_per_second"]} img/s'
  if 'eval_images_per_second' in result:
    line += f', eval {result["eval_images_per_second"]}'
    if reference:
      line += f' vs {reference["eval_images_per_second"]} img/s'
  if result['contention']['contended']:
    reasons = '; '.join(result['contention']['reasons'])
    return f'{line}\nCONTENDED MACHINE, NO RATIO: {reasons}. Rerun on an idle machine.'
  if 'speedup_vs_reference' in result:
    line += f'; ratio train {result["speedup_vs_reference"]}x'
    if 'eval_speedup_vs_reference' in result:
      line += f', eval {result["eval_speedup_vs_reference"]}x'
  return line


def exit_status(result: dict, strict: bool) -> int:
  return CONTENDED_EXIT_STATUS if strict and result.get('contention', {}).get('contended') else 0


def main(argv=None) -> int:
  args = parse_args(argv)
  result = run(args)
  common.report(result, args.json)
  if 'contention' in result:  # Not with --compile_only: nothing was timed.
    print(summary_line(result), file=sys.stderr if result['contention']['contended'] else sys.stdout)
  return exit_status(result, args.strict)


if __name__ == '__main__':
  sys.exit(main())

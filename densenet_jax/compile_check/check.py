"""Compiles a config's train and eval steps for a TPU slice or NVIDIA GPUs with compile-only devices, and reads
the result.

The steps are compiled as loop.py compiles them: the model of `model.from_config` in the form densenet_jax.platform
chooses for the target's backend (in a deviceless session jax.default_backend() is 'cpu', whose form it must not
take), the optimizer of `optim.from_config`, the state replicated and the batch sharded over a 1-D 'data' mesh of
every device of every host, the state donated. Multi-host programs compile from this one process.

FLOPs and bytes: XLA:TPU's cost_analysis() gives both per device. XLA:GPU gives neither: FLOPs then come from the
convolutions and dots of the program before optimization (cuDNN calls hide them afterwards), and bytes from the
operands and results of every kernel of the optimized program (hlo.py). Both are models, not measurements.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from densenet_jax import config as config_lib
from densenet_jax import model as model_lib
from densenet_jax import platform
from densenet_jax.data import pipeline
from densenet_jax.compile_check import hlo, specs, targets
from densenet_jax.training import optim, parallel, steps

MIB, GIB = 2.0**20, 2.0**30


FIXES = ('Lower --config.batch_size, raise --config.gradient_accumulation_steps, set '
         '--config.memory_efficient=True, or use more devices (--max_batch finds the largest batch that fits).')


# The check never runs what it compiles. On GPUs, LLVM's and ptxas's optimizations take a third of a compile and
# change no figure it reports: memory is planned, and kernels, FLOPs and bytes are read, before code generation.
GPU_CODEGEN_UNOPTIMIZED = {'xla_backend_optimization_level': 0, 'xla_gpu_disable_gpuasm_optimizations': True}


class DoesNotFitError(RuntimeError):
  """A compiled step needs more memory than the device has."""


def compile_steps(config: ml_collections.ConfigDict, target: targets.Target,
                  which=('train', 'eval')) -> tuple[dict, dict]:
  """({step name: (compiled, HLO before optimization)}, facts about the run) for `config` on `target`."""
  devices = target.devices
  config_lib.validate(config)
  info = pipeline.get_dataset_info(config.dataset, data_dir=config.data_dir, image_size=config.image_size)
  config_lib.validate_against_data(config, info, len(devices))
  form = platform.choose(config, target.spec.platform)
  model = model_lib.from_config(config, num_classes=info.num_classes, input_channels=info.image_shape[-1],
                                **form.model_options())
  learning_rate_fn, tx = optim.from_config(config, info.num_train_examples // config.batch_size)

  mesh = parallel.create_mesh(devices)
  replicated, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  key = jax.eval_shape(lambda: jax.random.key(0))
  state = jax.eval_shape(
      functools.partial(steps.create_train_state, model=model, image_shape=info.image_shape, tx=tx), key)
  state_sharding = jax.tree.map(lambda _: replicated, state)

  def abstract(tree, sharding):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)

  batch = {'image': jax.ShapeDtypeStruct((config.batch_size, *info.image_shape), jnp.float32),
           'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)}
  jitted = {
      'train': (jax.jit(
          functools.partial(steps.train_step, learning_rate_fn=learning_rate_fn,
                            accumulation_steps=config.gradient_accumulation_steps),
          in_shardings=(state_sharding, sharded, replicated), out_shardings=(state_sharding, replicated),
          donate_argnums=(0,)), (abstract(state, replicated), abstract(batch, sharded), abstract(key, replicated))),
      'eval': (jax.jit(
          steps.eval_step, in_shardings=(state_sharding, sharded), out_shardings=replicated),
          (abstract(state, replicated),
           abstract({**batch, 'mask': jax.ShapeDtypeStruct((config.batch_size,), jnp.bool_)}, sharded))),
  }
  compiled, seconds = {}, {}
  for name in which:
    function, args = jitted[name]
    start = time.perf_counter()
    lowered = function.lower(*args)
    middle = time.perf_counter()
    try:
      executable = lowered.compile(GPU_CODEGEN_UNOPTIMIZED if target.spec.platform == 'gpu' else None)
    except jax.errors.JaxRuntimeError as error:
      # XLA:TPU fits temporaries to the chip's HBM (rematerializing) and refuses a program that cannot fit.
      if 'RESOURCE_EXHAUSTED' not in str(error):
        raise
      layout, unit = target.layout(), target.unit
      raise DoesNotFitError(
          f'The {name} step does not fit: {str(error).splitlines()[0]} ({layout["chips"]} {unit}s on '
          f'{layout["hosts"]} hosts, batch {config.batch_size / layout["chips"]:g} per {unit}). {FIXES}') from None
    seconds[name] = {'lower_s': middle - start, 'compile_s': time.perf_counter() - middle}
    # The program before optimization, for backends whose cost_analysis() is empty (XLA:GPU).
    compiled[name] = (executable, lowered.as_text(dialect='hlo') if target.spec.platform == 'gpu' else None)
  params = jax.tree.leaves(state.params)
  facts = {'model': model_lib.describe(model), 'image_shape': list(info.image_shape),
           'params': int(sum(np.prod(p.shape) for p in params)), 'batch_size': config.batch_size,
           'dtype': config.dtype, 'form': form.model_options(), 'seconds': seconds}
  return compiled, facts


def collective_latency(collectives: dict[str, dict], dims: tuple[int, ...]) -> dict[str, float]:
  """The all-reduces of a step and a model of their latency: one after another (each BatchNorm's moments are
  needed before its layer goes on), each taking specs.all_reduce_hops(...) interconnect hops."""
  by_group = collectives.get('all-reduce', {}).get('executions_by_group_size', {})
  hops = sum(count * specs.all_reduce_hops(group, dims) for group, count in by_group.items())
  return {'all_reduces_per_step': float(sum(by_group.values())), 'hops_per_step': float(hops),
          'latency_s': hops * specs.ICI_HOP_LATENCY_S}


def analyze(compiled, chip: specs.DeviceSpec, layout: dict[str, int], batch_size: int,
            dims: tuple[int, ...] = (), unoptimized_hlo: str | None = None) -> dict[str, Any]:
  """Memory, cost, roofline, kernels and collectives of one compiled step, per chip or GPU (the module is per
  device). `unoptimized_hlo`, the whole program before partitioning, gives the FLOPs where cost_analysis() does
  not."""
  ma = compiled.memory_analysis()
  memory = {k.removesuffix('_size_in_bytes'): int(getattr(ma, k))
            for k in ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
                      'temp_size_in_bytes', 'generated_code_size_in_bytes')}
  per_chip = layout['devices'] / layout['chips']
  # Arguments and outputs that are not donated, temporaries, and the program itself all sit in HBM.
  memory['peak_per_chip'] = per_chip * (memory['argument'] + memory['output'] - memory['alias'] + memory['temp']
                                        + memory['generated_code'])
  memory['fraction_of_hbm'] = memory['peak_per_chip'] / chip.hbm_bytes
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  stats = hlo.analyze(compiled.as_text())
  if cost:
    # cost_analysis() counts each loop body once; add the convolution/dot FLOPs of the remaining trips, and an
    # estimate of their bytes.
    flops = per_chip * (float(cost.get('flops', 0.0)) + stats.matmul_flops - stats.matmul_flops_once)
    moved = per_chip * (float(cost.get('bytes accessed', 0.0)) + stats.loop_extra_bytes)
    traffic = "XLA's cost model"
  else:
    whole = hlo.analyze(unoptimized_hlo) if unoptimized_hlo else None
    flops = whole.matmul_flops / layout['chips'] if whole else float('nan')
    moved = per_chip * stats.kernel_bytes
    traffic = "operand and result bytes of the optimized program's kernels"
  compute_s, memory_s = flops / chip.peak_bf16_flops, moved / chip.hbm_bandwidth
  images_per_chip = batch_size / layout['chips']
  latency = collective_latency(stats.collectives, dims)
  return {
      'memory': memory,
      'flops_per_chip': flops, 'bytes_per_chip': moved,
      'xla_flops_per_device': float(cost.get('flops', 0.0)),
      'xla_bytes_per_device': float(cost.get('bytes accessed', 0.0)),
      'traffic_model': traffic,
      'loops': stats.loops, 'unknown_trip_counts': stats.unknown_trip_counts,
      'kernels': stats.kernels,
      'roofline': {'compute_s': compute_s, 'hbm_s': memory_s,
                   'bound': 'compute' if compute_s >= memory_s else 'memory bandwidth',
                   'images_per_second_per_chip': images_per_chip / max(compute_s, memory_s, 1e-30),
                   'collective_latency_s': latency['latency_s'],
                   'images_per_second_per_chip_with_latency':
                       images_per_chip / (max(compute_s, memory_s) + latency['latency_s'] or 1e-30)},
      'collectives': stats.collectives,
      'all_reduces': latency,
  }


def format_report(run: dict[str, Any]) -> str:
  chip, layout, unit = run['chip'], run['layout'], run['unit']
  lines = [
      f"{run['target']}: {layout['chips']} {unit}s ({chip['device_kind']}), {layout['devices']} devices, "
      f"{layout['hosts']} hosts" + (f", {layout['slices']} slices" if layout['slices'] > 1 else ''),
      f"{run['model']}, {run['params']:,} params, {run['dtype']}, image {tuple(run['image_shape'])}, "
      f"batch {run['batch_size']} = {run['batch_size'] / layout['chips']:g} per {unit}",
      'form: ' + ', '.join(f'{k}={v}' for k, v in run['form'].items()),
      f"{unit}: {chip['peak_bf16_flops'] / 1e12:g} TFLOP/s bf16, {chip['hbm_bandwidth'] / 1e9:g} GB/s, "
      f"{chip['hbm_bytes'] / GIB:.1f} GiB ({chip['source']})",
  ]
  for name, step in run['steps'].items():
    m, r, t = step['memory'], step['roofline'], run['seconds'][name]
    lines += [
        f"{name} step (lower {t['lower_s']:.1f} s, compile {t['compile_s']:.1f} s on this machine):",
        f"  memory per device: temp {m['temp'] / MIB:.1f} MiB, arguments {m['argument'] / MIB:.1f} MiB, "
        f"outputs {m['output'] / MIB:.1f} MiB (donated {m['alias'] / MIB:.1f} MiB), "
        f"code {m['generated_code'] / MIB:.1f} MiB",
        f"  peak per {unit} {m['peak_per_chip'] / GIB:.3f} GiB = {100 * m['fraction_of_hbm']:.1f}% of its memory",
        f"  per {unit} per step: {step['flops_per_chip']:.4g} FLOPs, {step['bytes_per_chip']:.4g} bytes "
        f"= {step['bytes_per_chip'] / (run['batch_size'] / layout['chips']) / 1e6:.3g} MB per image "
        f"({step['traffic_model']}; loops counted per trip)"
        + (f"; {step['unknown_trip_counts']} loops of unknown trip count counted once"
           if step['unknown_trip_counts'] else ''),
        f"  roofline: compute {r['compute_s'] * 1e3:.4g} ms, memory {r['hbm_s'] * 1e3:.4g} ms -> {r['bound']}-bound, "
        f"<= {r['images_per_second_per_chip']:,.0f} img/s per {unit} (collectives not included)",
        '  kernels per step: ' + ', '.join(f'{n:.0f} {kind}' for kind, n in step['kernels'].items()),
    ]
    for op, c in sorted(step['collectives'].items()):
      lines.append(f"  {op}: {c['ops']} ops, {c['executions']:.0f} per step, {c['bytes'] / MIB:.2f} MiB per device, "
                   f"groups of {c['group_sizes']}")
    if step['all_reduces']['all_reduces_per_step'] and run['torus']:
      a = step['all_reduces']
      lines.append(
          f"  all-reduces in sequence: {a['all_reduces_per_step']:.0f} per step, {a['hops_per_step']:.0f} interconnect "
          f"hops; at {specs.ICI_HOP_LATENCY_S * 1e6:g} us per hop (a model: {specs.ICI_HOP_LATENCY_SOURCE}) about "
          f"{a['latency_s'] * 1e3:.3g} ms of latency -> <= {r['images_per_second_per_chip_with_latency']:,.0f} img/s "
          f'per {unit} with it')
    if not step['collectives']:
      lines.append('  no cross-device collectives')
  return '\n'.join(lines)


def run_check(config: ml_collections.ConfigDict, target: targets.Target, *, which=('train', 'eval')) -> dict[str, Any]:
  """Compiles and analyzes every step of `which` for `target`; raises DoesNotFitError when XLA refuses one."""
  layout = target.layout()
  compiled, facts = compile_steps(config, target, which)
  return {'target': target.name, 'platform': target.spec.platform, 'unit': target.unit, 'layout': layout,
          'torus': list(target.torus), **facts,
          'steps': {name: analyze(executable, target.spec, layout, config.batch_size, target.torus, unoptimized)
                    for name, (executable, unoptimized) in compiled.items()},
          'chip': dataclasses.asdict(target.spec)}


def check_fits(run: dict[str, Any]) -> None:
  over = {name: s['memory'] for name, s in run['steps'].items() if s['memory']['fraction_of_hbm'] > 1}
  if over:
    name, m = next(iter(over.items()))
    chip, unit = run['chip'], run['unit']
    raise DoesNotFitError(
        f"The {name} step needs {m['peak_per_chip'] / GIB:.2f} GiB per {unit}, more than the "
        f"{chip['hbm_bytes'] / GIB:.1f} GiB of a {chip['name']} {unit}, at batch "
        f"{run['batch_size'] / run['layout']['chips']:g} per {unit}. {FIXES}")

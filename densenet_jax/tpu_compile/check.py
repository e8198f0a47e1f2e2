"""Compiles a config's train and eval steps for a TPU topology with compile-only devices, and reads the result.

The steps are compiled as loop.py compiles them: the model of `model.from_config` in the form densenet_jax.platform
chooses for the TPU (in a deviceless session jax.default_backend() is 'cpu', whose form it must not take), the
optimizer of `optim.from_config`, the state replicated and the batch sharded over a 1-D 'data' mesh of every device
of every host, the state donated. libtpu compiles multi-host and multislice programs from this one process.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
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
from densenet_jax.tpu_compile import hlo, specs
from densenet_jax.training import optim, parallel, steps

MIB, GIB = 2.0**20, 2.0**30


FIXES = ('Lower --config.batch_size, raise --config.gradient_accumulation_steps, set '
         '--config.memory_efficient=True, or use more chips.')


class DoesNotFitError(RuntimeError):
  """A compiled step needs more memory than the chip's HBM."""


class LibtpuMissingError(RuntimeError):
  """libtpu, the TPU compiler, is not installed."""


def libtpu_available() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def topology_devices(topology: str, *, num_slices: int = 1, chips_per_host_bounds: tuple[int, ...] | None = None):
  """Compile-only devices of a topology such as 'v5p:4x4x4' or 'v5e:2x2', one per chip."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  if not libtpu_available():
    raise LibtpuMissingError('The TPU compiler (libtpu) is not installed: pip install -r requirements-tpu.txt '
                             '(jax[tpu] of the pinned jax version). No TPU is needed.')
  chip = specs.by_generation(topology.split(':')[0].split('=')[0])
  kwargs: dict[str, Any] = {}
  if chip.megacore:  # libtpu's v4 default is one device per TensorCore; production runs one per chip
    kwargs['chip_config_name'] = 'megacore'
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  if chips_per_host_bounds:
    kwargs['chips_per_host_bounds'] = list(chips_per_host_bounds)
  return chip, topologies.get_topology_desc(topology_name=topology, platform='tpu', **kwargs).devices


def describe_devices(devices) -> dict[str, int]:
  chips = {(getattr(d, 'slice_index', 0) or 0, tuple(d.coords)) for d in devices}
  hosts = {(getattr(d, 'slice_index', 0) or 0, d.process_index) for d in devices}
  slices = {getattr(d, 'slice_index', 0) or 0 for d in devices}
  return {'devices': len(devices), 'chips': len(chips), 'hosts': len(hosts), 'slices': len(slices)}


def compile_steps(config: ml_collections.ConfigDict, devices, which=('train', 'eval')) -> tuple[dict, dict]:
  """({step name: compiled}, facts about the run) for `config` on `devices`."""
  config_lib.validate(config)
  info = pipeline.get_dataset_info(config.dataset, data_dir=config.data_dir, image_size=config.image_size)
  config_lib.validate_against_data(config, info, len(devices))
  form = platform.choose(config, 'tpu')
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
      compiled[name] = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
      # XLA:TPU fits temporaries to the chip's HBM (rematerializing) and refuses a program that cannot fit.
      if 'RESOURCE_EXHAUSTED' not in str(error):
        raise
      layout = describe_devices(devices)
      raise DoesNotFitError(
          f'The {name} step does not fit: {str(error).splitlines()[0]} ({layout["chips"]} chips on '
          f'{layout["hosts"]} hosts, batch {config.batch_size / layout["chips"]:g} per chip). {FIXES}') from None
    seconds[name] = {'lower_s': middle - start, 'compile_s': time.perf_counter() - middle}
  params = jax.tree.leaves(state.params)
  facts = {'model': model_lib.describe(model), 'image_shape': list(info.image_shape),
           'params': int(sum(np.prod(p.shape) for p in params)), 'batch_size': config.batch_size,
           'dtype': config.dtype, 'seconds': seconds}
  return compiled, facts


def collective_latency(collectives: dict[str, dict], dims: tuple[int, ...]) -> dict[str, float]:
  """The all-reduces of a step and a model of their latency: one after another (each BatchNorm's moments are
  needed before its layer goes on), each taking specs.all_reduce_hops(...) interconnect hops."""
  by_group = collectives.get('all-reduce', {}).get('executions_by_group_size', {})
  hops = sum(count * specs.all_reduce_hops(group, dims) for group, count in by_group.items())
  return {'all_reduces_per_step': float(sum(by_group.values())), 'hops_per_step': float(hops),
          'latency_s': hops * specs.ICI_HOP_LATENCY_S}


def analyze(compiled, chip: specs.ChipSpec, layout: dict[str, int], batch_size: int,
            dims: tuple[int, ...] = ()) -> dict[str, Any]:
  """Memory, cost, roofline and collectives of one compiled step, per chip (the module is per device)."""
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
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  stats = hlo.analyze(compiled.as_text())
  # cost_analysis() counts each loop body once; add the convolution/dot FLOPs of the remaining trips, and an
  # estimate of their bytes.
  flops = per_chip * (float(cost.get('flops', 0.0)) + stats.matmul_flops - stats.matmul_flops_once)
  moved = per_chip * (float(cost.get('bytes accessed', 0.0)) + stats.loop_extra_bytes)
  compute_s, memory_s = flops / chip.peak_bf16_flops, moved / chip.hbm_bandwidth
  images_per_chip = batch_size / layout['chips']
  latency = collective_latency(stats.collectives, dims)
  return {
      'memory': memory,
      'flops_per_chip': flops, 'bytes_per_chip': moved,
      'xla_flops_per_device': float(cost.get('flops', 0.0)),
      'xla_bytes_per_device': float(cost.get('bytes accessed', 0.0)),
      'loops': stats.loops, 'unknown_trip_counts': stats.unknown_trip_counts,
      'roofline': {'compute_s': compute_s, 'hbm_s': memory_s,
                   'bound': 'compute' if compute_s >= memory_s else 'HBM bandwidth',
                   'images_per_second_per_chip': images_per_chip / max(compute_s, memory_s, 1e-30),
                   'collective_latency_s': latency['latency_s'],
                   'images_per_second_per_chip_with_latency':
                       images_per_chip / (max(compute_s, memory_s) + latency['latency_s'] or 1e-30)},
      'collectives': stats.collectives,
      'all_reduces': latency,
  }


def format_report(run: dict[str, Any]) -> str:
  chip = specs.by_generation(run['generation'])
  layout = run['layout']
  lines = [
      f"{run['topology']}: {layout['chips']} chips ({chip.device_kind}), {layout['devices']} devices, "
      f"{layout['hosts']} hosts" + (f", {layout['slices']} slices" if layout['slices'] > 1 else ''),
      f"{run['model']}, {run['params']:,} params, {run['dtype']}, image {tuple(run['image_shape'])}, "
      f"batch {run['batch_size']} = {run['batch_size'] / layout['chips']:g} per chip",
      f"chip: {chip.peak_bf16_flops / 1e12:g} TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:g} GB/s HBM, "
      f"{chip.hbm_bytes / GIB:.1f} GiB HBM ({chip.source})",
  ]
  for name, step in run['steps'].items():
    m, r, t = step['memory'], step['roofline'], run['seconds'][name]
    lines += [
        f"{name} step (lower {t['lower_s']:.1f} s, compile {t['compile_s']:.1f} s on this machine):",
        f"  memory per device: temp {m['temp'] / MIB:.1f} MiB, arguments {m['argument'] / MIB:.1f} MiB, "
        f"outputs {m['output'] / MIB:.1f} MiB (donated {m['alias'] / MIB:.1f} MiB), code {m['generated_code'] / MIB:.1f} MiB",
        f"  peak per chip {m['peak_per_chip'] / GIB:.3f} GiB = {100 * m['fraction_of_hbm']:.1f}% of HBM",
        f"  per chip per step: {step['flops_per_chip']:.4g} FLOPs, {step['bytes_per_chip']:.4g} bytes "
        f"(XLA's cost model; loop bodies counted per trip, bytes of extra trips estimated)"
        + (f"; {step['unknown_trip_counts']} loops of unknown trip count counted once" if step['unknown_trip_counts'] else ''),
        f"  roofline: compute {r['compute_s'] * 1e3:.4g} ms, HBM {r['hbm_s'] * 1e3:.4g} ms -> {r['bound']}-bound, "
        f"<= {r['images_per_second_per_chip']:,.0f} img/s per chip (collectives not included)",
    ]
    for op, c in sorted(step['collectives'].items()):
      lines.append(f"  {op}: {c['ops']} ops, {c['executions']:.0f} per step, {c['bytes'] / MIB:.2f} MiB per device, "
                   f"groups of {c['group_sizes']}")
    if step['all_reduces']['all_reduces_per_step']:
      a = step['all_reduces']
      lines.append(
          f"  all-reduces in sequence: {a['all_reduces_per_step']:.0f} per step, {a['hops_per_step']:.0f} interconnect "
          f"hops; at {specs.ICI_HOP_LATENCY_S * 1e6:g} us per hop (a model: {specs.ICI_HOP_LATENCY_SOURCE}) about "
          f"{a['latency_s'] * 1e3:.3g} ms of latency -> <= {r['images_per_second_per_chip_with_latency']:,.0f} img/s "
          'per chip with it')
    if not step['collectives']:
      lines.append('  no cross-device collectives')
  return '\n'.join(lines)


def run_check(config: ml_collections.ConfigDict, topology: str, *, which=('train', 'eval'), num_slices: int = 1,
              chips_per_host_bounds=None) -> dict[str, Any]:
  """Compiles and analyzes; raises DoesNotFitError (after analyzing every step) when a step exceeds HBM."""
  chip, devices = topology_devices(topology, num_slices=num_slices, chips_per_host_bounds=chips_per_host_bounds)
  layout = describe_devices(devices)
  compiled, facts = compile_steps(config, devices, which)
  run = {'topology': topology, 'generation': chip.generation, 'layout': layout, **facts,
         'steps': {name: analyze(c, chip, layout, config.batch_size, specs.torus_dims(topology))
                   for name, c in compiled.items()},
         'chip': dataclasses.asdict(chip)}
  return run


def check_fits(run: dict[str, Any]) -> None:
  over = {name: s['memory'] for name, s in run['steps'].items() if s['memory']['fraction_of_hbm'] > 1}
  if over:
    name, m = next(iter(over.items()))
    chip = run['chip']
    raise DoesNotFitError(
        f"The {name} step needs {m['peak_per_chip'] / GIB:.2f} GiB per chip, more than the "
        f"{chip['hbm_bytes'] / GIB:.1f} GiB of HBM of a {chip['generation']} chip, at batch "
        f"{run['batch_size'] / run['layout']['chips']:g} per chip. {FIXES}")

"""The machine a check compiles for: compile-only devices of a TPU slice or of NVIDIA GPUs, made on this machine.

A TPU slice is named as libtpu names it ('v5p:4x4x4'); GPUs as `NAME[:GPUS]` or `NAME:HOSTSxGPUS` ('h100',
'h100:8', 'a100-80gb:2x8'). libtpu (requirements-tpu.txt) and the CUDA plugin (requirements-gpu.txt) compile without
the hardware; JAX itself runs on the CPU (compile_check.set_environment).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from densenet_jax.compile_check import specs


class CompilerMissingError(RuntimeError):
  """The compiler of the target's platform is not installed."""


INSTALL = {'tpu': 'The TPU compiler (libtpu) is not installed: pip install -r requirements-tpu.txt',
           'gpu': "JAX's CUDA plugin is not installed: pip install -r requirements-gpu.txt"}


def compiler_installed(platform: str) -> bool:
  if platform == 'tpu':
    return importlib.util.find_spec('libtpu') is not None
  return any(importlib.util.find_spec(f'jax_plugins.xla_{cuda}') is not None for cuda in ('cuda13', 'cuda12'))


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # as given: 'v5p:4x4x4', 'h100:8'
  spec: specs.DeviceSpec
  devices: tuple[Any, ...]
  torus: tuple[int, ...]  # a TPU slice's chip grid (its collectives' hop counts); () for GPUs

  @property
  def unit(self) -> str:
    """What one memory and one roofline belong to: a TPU chip or a GPU."""
    return 'chip' if self.spec.platform == 'tpu' else 'GPU'

  def layout(self) -> dict[str, int]:
    devices = self.devices
    chips = {(getattr(d, 'slice_index', 0) or 0, tuple(getattr(d, 'coords', (d.id,)))) for d in devices}
    hosts = {(getattr(d, 'slice_index', 0) or 0, d.process_index) for d in devices}
    slices = {getattr(d, 'slice_index', 0) or 0 for d in devices}
    return {'devices': len(devices), 'chips': len(chips), 'hosts': len(hosts), 'slices': len(slices)}


def _require(platform: str) -> None:
  if not compiler_installed(platform):
    raise CompilerMissingError(f'{INSTALL[platform]} (no accelerator is needed).')


def tpu(topology: str, *, num_slices: int = 1, chips_per_host_bounds: tuple[int, ...] | None = None) -> Target:
  """Compile-only devices of a TPU topology such as 'v5p:4x4x4' or 'v5e:2x2', one per chip."""
  spec = specs.tpu(topology.split(':')[0].split('=')[0])
  dims = specs.torus_dims(topology)
  _require('tpu')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  kwargs: dict[str, Any] = {}
  if spec.megacore:  # libtpu's v4 default is one device per TensorCore; production runs one per chip
    kwargs['chip_config_name'] = 'megacore'
  if num_slices > 1:
    kwargs['num_slices'] = num_slices
  if chips_per_host_bounds:
    kwargs['chips_per_host_bounds'] = list(chips_per_host_bounds)
  devices = topologies.get_topology_desc(topology_name=topology, platform='tpu', **kwargs).devices
  return Target(topology, spec, tuple(devices), dims)


def parse_gpus(name: str) -> tuple[specs.DeviceSpec, int, int]:
  """'h100' -> (H100, 1 host, 1 GPU); 'h100:8' -> (H100, 1, 8); 'h100:2x8' -> (H100, 2, 8)."""
  model, _, count = name.partition(':')
  spec = specs.gpu(model)
  try:
    hosts, per_host = (int(n) for n in count.split('x')) if 'x' in count else (1, int(count or 1))
  except ValueError:
    raise ValueError(f'Cannot read --gpu={name}: expected NAME, NAME:GPUS or NAME:HOSTSxGPUS '
                     '(h100, h100:8, h100:2x8).') from None
  if hosts < 1 or per_host < 1:
    raise ValueError(f'--gpu={name}: hosts and GPUs per host must be at least 1.')
  return spec, hosts, per_host


def gpus(name: str) -> Target:
  """Compile-only NVIDIA GPUs: `hosts` processes of `per_host` GPUs each, as XLA:GPU sees them."""
  spec, hosts, per_host = parse_gpus(name)
  _require('gpu')
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  # The CUDA plugin's topology string: slices x hosts x GPUs per host.
  devices = topologies.get_topology_desc(platform='cuda', target_config=spec.target_config(),
                                         topology=f'1x{hosts}x{per_host}').devices
  return Target(name, spec, tuple(devices), ())

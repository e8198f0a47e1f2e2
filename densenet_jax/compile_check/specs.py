"""Published figures of the accelerators the compile check targets: the one table its fit and roofline read.

TPUs, per chip, from the Google Cloud TPU system-architecture pages (read in 2026). Revisions of these pages use
different units; the values here are the ones in bytes/s and bytes that agree across revisions:
* v5e: "16 GB" HBM, "819 GBps" (one revision: 800 GiBps);
* v5p: "95 GiB", "2765 GBps" (the current page: 2575 GiBps, the same figure);
* v6e: "32 GB", "1640 GBps" (one revision: 1600 GBps).
The HBM a program may use is lower (the runtime reserves some); a real chip reports it as
`device.memory_stats()['bytes_limit']`, compile-only devices cannot.

NVIDIA GPUs, per GPU. XLA:GPU compiles for a GPU described by a target config (gpu_targets/*.txtpb: streaming
multiprocessors, shared memory, L2, clock, memory, compute capability). Those of the H100, H200, B200 and A100 carry
the values of OpenXLA's own device descriptions (github.com/openxla/xla, xla/backends/gpu/target_config/specs/:
h100_sxm, h200, b200, a100_sxm_40, a100_sxm_80); the L4's and RTX 4090's are written from NVIDIA's Ada Lovelace
architecture whitepaper (compute capability 8.9, 100 KB shared memory and 1,536 threads per SM) and the cards'
datasheets (SMs, L2, boost clock, bandwidth), with the memory that the driver reports (nvidia-smi: 23,034 and
24,564 MiB of the nominal 24 GB). Peak FLOP/s: dense bf16 tensor-core throughput with fp32 accumulation from each
datasheet (without the 2x of structured sparsity).
"""

from __future__ import annotations

import dataclasses
import importlib.resources


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  name: str              # the target's name: 'v5p' in 'v5p:4x4x4', 'h100' in --gpu=h100
  platform: str          # 'tpu' or 'gpu'
  device_kind: str       # jax Device.device_kind of its compile-only devices
  peak_bf16_flops: float  # FLOP/s per device
  hbm_bytes: float       # memory per device
  hbm_bandwidth: float   # bytes/s per device
  source: str
  megacore: bool = False  # TPU: two TensorCores run as one JAX device (libtpu needs chip_config_name='megacore')

  def target_config(self) -> str:
    """A GPU's target config: the GpuTargetConfigProto text XLA:GPU compiles for."""
    return importlib.resources.files(__package__).joinpath('gpu_targets', f'{self.name}.txtpb').read_text()


_NVIDIA = 'https://www.nvidia.com/en-us/data-center/'
TPUS = (
    DeviceSpec('v4', 'tpu', 'TPU v4', 275e12, 32 * 2**30, 1200e9, 'https://cloud.google.com/tpu/docs/v4', True),
    DeviceSpec('v5e', 'tpu', 'TPU v5 lite', 197e12, 16e9, 819e9, 'https://cloud.google.com/tpu/docs/v5e'),
    DeviceSpec('v5p', 'tpu', 'TPU v5', 459e12, 95 * 2**30, 2765e9, 'https://cloud.google.com/tpu/docs/v5p', True),
    DeviceSpec('v6e', 'tpu', 'TPU v6 lite', 918e12, 32e9, 1640e9, 'https://cloud.google.com/tpu/docs/v6e'),
)
GPUS = (
    DeviceSpec('h100', 'gpu', 'NVIDIA H100 80GB HBM3', 989.4e12, 84942979072, 3.35232e12, _NVIDIA + 'h100/'),
    DeviceSpec('h200', 'gpu', 'NVIDIA H200 141GB HBM3e', 989.4e12, 151397597184, 4.8e12, _NVIDIA + 'h200/'),
    DeviceSpec('b200', 'gpu', 'NVIDIA B200', 2.25e15, 191514411008, 7.67232e12, _NVIDIA + 'dgx-b200/'),
    DeviceSpec('a100-40gb', 'gpu', 'NVIDIA A100-SXM4-40GB', 312e12, 42331013120, 1.5552e12, _NVIDIA + 'a100/'),
    DeviceSpec('a100-80gb', 'gpu', 'NVIDIA A100-SXM4-80GB', 312e12, 85100068864, 2.03904e12, _NVIDIA + 'a100/'),
    DeviceSpec('l4', 'gpu', 'NVIDIA L4', 121e12, 23034 * 2**20, 300e9, _NVIDIA + 'l4/'),
    DeviceSpec('rtx4090', 'gpu', 'NVIDIA GeForce RTX 4090', 165.2e12, 24564 * 2**20, 1008e9,
               'https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf'),
)

# Latency of one hop of the inter-chip interconnect between neighbouring chips: 1 us, the link latency that the
# ASTRA-sim project validated against TPU v3 measurements "as per TPU research team"
# (https://astra-sim.github.io/astra-sim-docs/validation/hardware/tpu-validation.html). A model, not a measurement.
ICI_HOP_LATENCY_S = 1e-6
ICI_HOP_LATENCY_SOURCE = 'https://astra-sim.github.io/astra-sim-docs/validation/hardware/tpu-validation.html'

# libtpu's names for the same generations.
ALIASES = {'v5': 'v5p'}


def tpu(generation: str) -> DeviceSpec:
  generation = ALIASES.get(generation.lower(), generation.lower())
  for chip in TPUS:
    if chip.name == generation:
      return chip
  raise ValueError(f'Unknown TPU generation {generation!r}; known: {", ".join(c.name for c in TPUS)} '
                   "(topology names look like 'v5p:4x4x4' or 'v5e:2x2').")


def gpu(name: str) -> DeviceSpec:
  for spec in GPUS:
    if spec.name == name.lower():
      return spec
  raise ValueError(f'Unknown GPU {name!r}; known: {", ".join(g.name for g in GPUS)}.')


def torus_dims(topology: str) -> tuple[int, ...]:
  """The chip grid of a topology name: 'v5p:4x4x4' -> (4, 4, 4)."""
  shape = topology.split(':', 1)[-1]
  try:
    return tuple(int(d) for d in shape.split('x'))
  except ValueError:
    raise ValueError(f'Cannot read the chip grid of topology {topology!r} (expected e.g. v5p:4x4x4).') from None


def all_reduce_hops(group_size: int, dims: tuple[int, ...]) -> int:
  """Neighbour-to-neighbour steps of one all-reduce over `group_size` chips of a torus of `dims`, as a
  reduce-scatter then an all-gather along each dimension of the box the group covers: 2 x sum(extent - 1). A group
  of consecutive devices fills the dimensions in order, as the devices' ids do (16 chips of a 4x4x4 slice: a 4x4x1
  plane). Its latency dominates for the small all-reduces of BatchNorm statistics."""
  hops, left = 0, group_size
  for d in dims:
    extent = min(d, left)
    hops += 2 * (extent - 1)
    left = -(-left // extent)
  return hops

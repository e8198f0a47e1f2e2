"""Per-chip specs of Cloud TPU generations: the one table the compile check's fit and roofline read.

From the Google Cloud TPU system-architecture pages (sources below, read in 2026). Revisions of these pages use
different units; the values here are the ones in bytes/s and bytes that agree across revisions:
* v5e: "16 GB" HBM, "819 GBps" (one revision: 800 GiBps);
* v5p: "95 GiB", "2765 GBps" (the current page: 2575 GiBps, the same figure);
* v6e: "32 GB", "1640 GBps" (one revision: 1600 GBps).
The HBM a program may use is lower (the runtime reserves some); a real chip reports it as
`device.memory_stats()['bytes_limit']`, compile-only devices cannot.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  generation: str        # the topology prefix: 'v5p' in 'v5p:4x4x4'
  device_kind: str       # jax Device.device_kind of its compile-only devices
  peak_bf16_flops: float  # FLOP/s per chip
  hbm_bytes: float       # per chip
  hbm_bandwidth: float   # bytes/s per chip
  megacore: bool         # two TensorCores run as one JAX device (libtpu needs chip_config_name='megacore')
  source: str


CHIPS = (
    ChipSpec('v4', 'TPU v4', 275e12, 32 * 2**30, 1200e9, True, 'https://cloud.google.com/tpu/docs/v4'),
    ChipSpec('v5e', 'TPU v5 lite', 197e12, 16e9, 819e9, False, 'https://cloud.google.com/tpu/docs/v5e'),
    ChipSpec('v5p', 'TPU v5', 459e12, 95 * 2**30, 2765e9, True, 'https://cloud.google.com/tpu/docs/v5p'),
    ChipSpec('v6e', 'TPU v6 lite', 918e12, 32e9, 1640e9, False, 'https://cloud.google.com/tpu/docs/v6e'),
)
# Latency of one hop of the inter-chip interconnect between neighbouring chips: 1 us, the link latency that the
# ASTRA-sim project validated against TPU v3 measurements "as per TPU research team"
# (https://astra-sim.github.io/astra-sim-docs/validation/hardware/tpu-validation.html). A model, not a measurement.
ICI_HOP_LATENCY_S = 1e-6
ICI_HOP_LATENCY_SOURCE = 'https://astra-sim.github.io/astra-sim-docs/validation/hardware/tpu-validation.html'

# libtpu's names for the same generations.
ALIASES = {'v5': 'v5p'}


def by_generation(generation: str) -> ChipSpec:
  generation = ALIASES.get(generation.lower(), generation.lower())
  for chip in CHIPS:
    if chip.generation == generation:
      return chip
  raise ValueError(f'Unknown TPU generation {generation!r}; known: {", ".join(c.generation for c in CHIPS)} '
                   "(topology names look like 'v5p:4x4x4' or 'v5e:2x2').")


def by_device_kind(kind: str) -> ChipSpec | None:
  return next((chip for chip in CHIPS if chip.device_kind == kind), None)


def torus_dims(topology: str) -> tuple[int, ...]:
  """The chip grid of a topology name: 'v5p:4x4x4' -> (4, 4, 4)."""
  shape = topology.split(':', 1)[-1]
  try:
    return tuple(int(d) for d in shape.split('x'))
  except ValueError:
    raise ValueError(f'Cannot read the chip grid of topology {topology!r} (expected e.g. v5p:4x4x4).') from None


def all_reduce_hops(group_size: int, dims: tuple[int, ...]) -> int:
  """Neighbour-to-neighbour steps of one all-reduce over `group_size` chips of a torus of `dims`, as a
  reduce-scatter then an all-gather along each dimension: 2 x sum(d - 1) for the whole slice, at most 2 x (g - 1)
  for a group of g chips. Its latency dominates for the small all-reduces of BatchNorm statistics."""
  return min(2 * (group_size - 1), 2 * sum(d - 1 for d in dims))

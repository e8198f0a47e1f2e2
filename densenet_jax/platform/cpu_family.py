"""The CPU family this process runs on, and the CPU-specific defaults measured on each family.

XLA:CPU's speed on DenseNet depends on which kernel library wins on the host's vector units: a choice that
made AMD's AVX2 cores 1.3x faster made Intel's AVX-512 cores slower (docs/performance.md, "Per CPU family").
So every CPU-specific default (the model's form that choice.py fills in, the convolution flag of xla_flags.py)
is looked up here by family, and a family without a measurement gets XLA's own choices and the plain block form. The family comes from /proc/cpuinfo's vendor and
instruction-set flags; reading it is the only I/O, and `from_cpuinfo` is pure so that tests can hand it any
machine's text.

This module imports neither JAX nor TensorFlow: xla_flags.py uses it before JAX starts.
"""

from __future__ import annotations

import dataclasses
import functools

INTEL_AVX512 = 'intel_avx512'
INTEL_AVX2 = 'intel_avx2'
AMD_AVX512 = 'amd_avx512'
AMD_AVX2 = 'amd_avx2'
ARM = 'arm'
OTHER = 'other'  # Older x86 vector units, other vendors, or no /proc/cpuinfo (macOS, Windows).
FAMILIES = (INTEL_AVX512, INTEL_AVX2, AMD_AVX512, AMD_AVX2, ARM, OTHER)

_VENDORS = {'GenuineIntel': 'intel', 'AuthenticAMD': 'amd'}


def _field(line: str) -> tuple[str, str]:
  key, _, value = line.partition(':')
  return key.strip(), value.strip()


def from_cpuinfo(text: str) -> str:
  """The family of the CPU that /proc/cpuinfo's `text` describes (its first processor decides)."""
  fields = {}
  for line in text.splitlines():
    if not line.strip():
      if fields:
        break  # The end of the first processor's paragraph.
      continue
    key, value = _field(line)
    fields.setdefault(key, value)
  if 'CPU implementer' in fields or 'asimd' in fields.get('Features', '').split():
    return ARM
  vendor = _VENDORS.get(fields.get('vendor_id', ''))
  flags = set(fields.get('flags', '').split())
  if vendor is None or 'avx2' not in flags:
    return OTHER
  # avx512f alone is enough: it is what the kernel libraries dispatch their AVX-512 paths on.
  return f'{vendor}_avx512' if 'avx512f' in flags else f'{vendor}_avx2'


@functools.cache
def host(path: str = '/proc/cpuinfo') -> str:
  """The family of this machine's CPU; OTHER when `path` cannot be read."""
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      return from_cpuinfo(f.read())
  except OSError:
    return OTHER


@dataclasses.dataclass(frozen=True)
class CpuDefaults:
  """What the library does by default on one CPU family, and the measurement it rests on."""

  kernels: str  # The model's kernel set (densenet_jax/model/forms/kernels.py): 'cpu' or 'xla'.
  convolutions_on_eigen: bool  # xla_flags.CPU_CONVOLUTIONS_ON_EIGEN, on the jaxlib releases it was measured on.
  evidence: str
  # How dense blocks are computed when a config leaves it open (choice.Form): recompute each layer's
  # normalized input in the backward pass, and compute blocks this many layers at a time (0: unrolled).
  memory_efficient: bool = False
  layers_per_scan: int = 0


# Only measured families appear; numbers and commands are in docs/performance.md ("Per CPU family").
MEASURED = {
    AMD_AVX2: CpuDefaults(
        kernels='cpu', convolutions_on_eigen=True, memory_efficient=True, layers_per_scan=4,
        evidence='2-core AMD EPYC VM, jax 0.12: the CPU kernel set over XLA kernels, Eigen convolutions over '
                 'YNNPACK ones, memory-efficient blocks scanned 4 layers at a time over every other form measured '
                 '(docs/performance.md, "Per CPU family")'),
    AMD_AVX512: CpuDefaults(
        kernels='cpu', convolutions_on_eigen=False, memory_efficient=True, layers_per_scan=4,
        evidence='2-core AMD EPYC VM (Zen 5, AVX-512), jax 0.12: the CPU kernel set over XLA kernels, '
                 'memory-efficient blocks scanned 4 layers at a time over the plain form; Eigen convolutions '
                 'no win (docs/performance.md, "Per CPU family")'),
    INTEL_AVX512: CpuDefaults(
        kernels='xla', convolutions_on_eigen=False,
        evidence='Intel AVX-512, jaxlib 0.10.2 only: Eigen convolutions 0.973x (BC-100) and 0.886x (DenseNet-121); '
                 'the CPU kernel set not measured'),
}
# Every other family: XLA's own kernels and flags until a measurement says otherwise.
UNMEASURED = CpuDefaults(kernels='xla', convolutions_on_eigen=False, evidence='not measured')


def defaults(family: str) -> CpuDefaults:
  """The CPU-specific defaults for `family` (one of FAMILIES)."""
  if family not in FAMILIES:
    raise ValueError(f'Unknown CPU family {family!r}; one of {", ".join(FAMILIES)}.')
  return MEASURED.get(family, UNMEASURED)

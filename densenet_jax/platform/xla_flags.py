"""The XLA flags DenseNet wants, and the one place that sets them.

XLA reads the XLA_FLAGS environment variable once, when JAX starts its first backend (at the first
computation, not at `import jax`). The entry points (train.py, benchmarks/, the notebooks, the tests)
call `set_defaults()` before that, through `platform.prepare_environment`, where JAX computes on the
CPU. A flag the user already set in XLA_FLAGS wins over a default of the same name (e.g. their own
--xla_disable_hlo_passes=... list, which then needs cse_barrier_expander for the remat below).

* `KEEP_REMAT_ON_CPU`: `memory_efficient=True` relies on rematerialization (`jax.checkpoint`) and its
  optimization barriers, which keep XLA from merging the backward pass's recomputation into the forward
  pass. XLA:CPU removes them in its `cse_barrier_expander` pass, so on CPU the option saves nothing unless
  that pass is off. Without remat there are no barriers: harmless. XLA:GPU and XLA:TPU need that pass to
  lower the barriers they have honoured ("Unsupported instruction opcode: opt-barrier"), which is why
  `platform.prepare_environment` sets these flags only where JAX computes on the CPU.
* `CPU_CONVOLUTIONS_ON_EIGEN`: XLA:CPU hands convolutions, matmuls and reductions to YNNPACK by default.
  For DenseNet's 3x3 convolutions (forward and both gradients) YNNPACK is 2-3x slower than XLA's Eigen
  kernels, so this keeps matmuls and reductions on YNNPACK and gives convolutions back to Eigen: train
  steps 1.3x (DenseNet-BC L=100) and 1.5x (DenseNet-121) faster on AMD's AVX2 cores with jaxlib 0.10.2 and
  1.06x and 1.08x with jaxlib 0.12.0.1, but 0.97x and 0.89x on Intel's AVX-512 ones with jaxlib 0.10.2
  (docs/performance.md). So it is set only on the CPU families where it won
  (densenet_jax/platform/cpu_family.py), and, because the flag is experimental and an unknown flag in XLA_FLAGS
  aborts the process, only for the jaxlib releases it was measured on (`CPU_CONVOLUTIONS_ON_EIGEN_JAXLIB`).
  Other backends ignore it.

Other XLA:CPU flags that promise speed (oneDNN kernels, XNNPACK graph fusion, optimization presets)
were measured and gave DenseNet nothing worth a default; see docs/performance.md. This module imports
neither JAX nor TensorFlow (cpu_family.py neither), so it can run before either starts.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping, Sequence

from densenet_jax.platform import cpu_family

KEEP_REMAT_ON_CPU = '--xla_disable_hlo_passes=cse_barrier_expander'
YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
# What XLA:CPU hands to YNNPACK by default (jaxlib 0.10.2).
YNN_FUSION_TYPES_XLA_DEFAULT = tuple(
    f'LIBRARY_FUSION_TYPE_{kind}' for kind in ('INDIVIDUAL_CONVOLUTION', 'INDIVIDUAL_DOT', 'REDUCE'))
CPU_CONVOLUTIONS_ON_EIGEN = f'--{YNN_FUSION_TYPE}=' + ','.join(
    kind for kind in YNN_FUSION_TYPES_XLA_DEFAULT if not kind.endswith('CONVOLUTION'))
CPU_CONVOLUTIONS_ON_EIGEN_JAXLIB = frozenset({'0.10.2', '0.12.0.1'})


def _name(flag: str) -> str:
  return flag.split('=', 1)[0]


def with_defaults(xla_flags: str, defaults: Sequence[str]) -> str:
  """`xla_flags` followed by every default whose flag name `xla_flags` does not set already."""
  present = {_name(flag) for flag in xla_flags.split()}
  return ' '.join([*xla_flags.split(), *(flag for flag in defaults if _name(flag) not in present)])


def _installed_jaxlib() -> str | None:
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return None


def default_flags(jaxlib_version: str | None, family: str | None = None) -> tuple[str, ...]:
  """The flags the entry points set for this jaxlib release on this CPU family (default: the host's)."""
  eigen = cpu_family.defaults(family or cpu_family.host()).convolutions_on_eigen
  if eigen and jaxlib_version in CPU_CONVOLUTIONS_ON_EIGEN_JAXLIB:
    return (KEEP_REMAT_ON_CPU, CPU_CONVOLUTIONS_ON_EIGEN)
  return (KEEP_REMAT_ON_CPU,)


def set_defaults(environ: MutableMapping[str, str] = os.environ, jaxlib_version: str | None = None,
                 family: str | None = None) -> str:
  """Adds `default_flags` to XLA_FLAGS in `environ` (the user's own settings win) and returns it.

  `jaxlib_version` defaults to the installed jaxlib's, `family` to the host's CPU family.
  """
  defaults = default_flags(jaxlib_version or _installed_jaxlib(), family)
  environ['XLA_FLAGS'] = with_defaults(environ.get('XLA_FLAGS', ''), defaults)
  return environ['XLA_FLAGS']

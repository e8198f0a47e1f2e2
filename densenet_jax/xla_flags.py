"""The XLA flags DenseNet wants, and the one place that sets them.

XLA reads the XLA_FLAGS environment variable once, when JAX starts its first backend (at the first
computation, not at `import jax`). The entry points (train.py, benchmarks/, the notebooks, the tests)
call `set_defaults()` before that. A flag the user already set in XLA_FLAGS wins over a default of the
same name (e.g. their own --xla_disable_hlo_passes=... list, which then needs cse_barrier_expander for
the remat below).

* `KEEP_REMAT_ON_CPU`: `memory_efficient=True` relies on rematerialization (`jax.checkpoint`) and its
  optimization barriers, which keep XLA from merging the backward pass's recomputation into the forward
  pass. XLA:GPU and XLA:TPU keep them; XLA:CPU removes them in its `cse_barrier_expander` pass, so on
  CPU the option saves nothing unless that pass is off. Without remat there are no barriers: harmless.

XLA:CPU flags that promise speed (oneDNN or XNNPACK kernels, optimization presets) were measured and
gave DenseNet nothing worth a default; see docs/performance.md. This module imports neither JAX nor
TensorFlow, so it can run before either starts.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence

KEEP_REMAT_ON_CPU = '--xla_disable_hlo_passes=cse_barrier_expander'
DEFAULT_FLAGS = (KEEP_REMAT_ON_CPU,)


def _name(flag: str) -> str:
  return flag.split('=', 1)[0]


def with_defaults(xla_flags: str, defaults: Sequence[str]) -> str:
  """`xla_flags` followed by every default whose flag name `xla_flags` does not set already."""
  present = {_name(flag) for flag in xla_flags.split()}
  return ' '.join([*xla_flags.split(), *(flag for flag in defaults if _name(flag) not in present)])


def set_defaults(environ: MutableMapping[str, str] = os.environ) -> str:
  """Adds `DEFAULT_FLAGS` to XLA_FLAGS in `environ` (the user's own settings win) and returns it."""
  environ['XLA_FLAGS'] = with_defaults(environ.get('XLA_FLAGS', ''), DEFAULT_FLAGS)
  return environ['XLA_FLAGS']

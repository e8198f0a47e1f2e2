"""What the entry points choose on this machine, for tests that build their model directly."""

import jax

from densenet_jax import platform


def chosen_form(config) -> dict:
  """The form attributes train.py's model gets for `config` here (densenet_jax.platform.choose)."""
  return platform.choose(config, jax.default_backend()).model_options()

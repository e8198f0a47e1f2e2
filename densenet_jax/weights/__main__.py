"""python -m densenet_jax.weights {convert,inspect}: the densenet-convert command (densenet_jax/commands/convert.py)."""

from __future__ import annotations

from collections.abc import Sequence

from densenet_jax import launch


def main(argv: Sequence[str] | None = None) -> None:
  """The converter on `argv` (default: the command line's arguments), started like densenet-convert."""
  launch.convert(argv)


if __name__ == '__main__':
  main()

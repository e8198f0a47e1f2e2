"""Dropout's keep masks: `jax.random.bernoulli`, the same masks as one elementwise kernel, and masks packed.

JAX draws random bits with the Threefry-2x32 hash (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011): 20 rounds of add, rotate and xor of a 64-bit counter under a 64-bit key. On the CPU, JAX lowers those
rounds as a loop of five iterations, and XLA:CPU runs each iteration as its own pass over the whole array, and
compiles each call's loop again: dropout then costs a large part of a CIFAR train step, and seconds of compile per
dropout site (docs/performance.md, "Dropout"). `threefry_keep_mask` writes the same rounds out, so that XLA fuses
them into one kernel with the mask's consumer; it reproduces JAX's counters and its bits-to-float conversion, so
its masks are `jax.random.bernoulli`'s bit for bit (tests/test_dropout_masks.py). A model names the one it uses
(`dropout_masks`, kernels.DROPOUT_MASKS); densenet_jax/platform chooses per backend. `pack` and `unpack` store a mask in a bit per value, so that a mask
is drawn once per step and a backward pass reads it instead of drawing it again (dense_layer.keep_mask).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's rotation constants, alternating per 4 rounds.
_KEY_SCHEDULE_PARITY = 0x1BD11BDA  # Threefry's constant for the third word of the key schedule.
_FLOAT32_ONE = 0x3F800000  # The bits of 1.0f: bits >> 9 | _FLOAT32_ONE is a float in [1, 2).


def jax_keep_mask(key: Array, keep_probability: float, shape: Sequence[int]) -> Array:
  """True with probability `keep_probability`: JAX's own `jax.random.bernoulli` at float32."""
  return jax.random.bernoulli(key, np.float32(keep_probability), tuple(shape))


def _rotate_left(x: Array, bits: int) -> Array:
  return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def _threefry2x32(key: tuple[Array, Array], counter: tuple[Array, Array]) -> tuple[Array, Array]:
  """The Threefry-2x32 hash of the counter words under the key words, its 20 rounds written out."""
  schedule = (key[0], key[1], key[0] ^ key[1] ^ np.uint32(_KEY_SCHEDULE_PARITY))
  x0, x1 = counter[0] + schedule[0], counter[1] + schedule[1]
  for injection in range(1, 6):  # Five groups of four rounds, each followed by a key injection.
    for rotation in _ROTATIONS[(injection - 1) % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, rotation) ^ x0
    x0 = x0 + schedule[injection % 3]
    x1 = x1 + schedule[(injection + 1) % 3] + np.uint32(injection)
  return x0, x1


def threefry_keep_mask(key: Array, keep_probability: float, shape: Sequence[int]) -> Array:
  """`jax_keep_mask(key, keep_probability, shape)`, bit for bit, computed as elementwise code XLA can fuse.

  Reproduces JAX's default bits: a Threefry-2x32 key, counters partitionable (`jax_threefry_partitionable`,
  JAX's default), fewer than 2**32 values. Any other key or setting gets `jax_keep_mask` itself.
  """
  shape = tuple(shape)
  size = math.prod(shape)
  key_words = _threefry_key_words(key)
  if key_words is None or not jax.config.jax_threefry_partitionable or size >= 2**32:
    return jax_keep_mask(key, keep_probability, shape)
  # JAX's counter for each value is its row-major index as a 64-bit integer: (high word, low word).
  index = jax.lax.iota(np.uint32, size).reshape(shape)
  word0, word1 = _threefry2x32((key_words[0], key_words[1]), (jnp.zeros_like(index), index))
  bits = word0 ^ word1
  # jax.random.uniform's conversion: 23 random mantissa bits under the exponent of 1.0, minus 1.
  uniform = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(_FLOAT32_ONE), np.float32) - 1.0
  return uniform < np.float32(keep_probability)


def _threefry_key_words(key: Array) -> Array | None:
  """The two uint32 words of one Threefry-2x32 key (typed, or raw uint32[2] under JAX's default implementation);
  None for any other key."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    is_threefry = key.shape == () and str(jax.random.key_impl(key)) == 'threefry2x32'
    return jax.random.key_data(key) if is_threefry else None
  is_threefry = key.shape == (2,) and key.dtype == np.uint32 and jax.config.jax_default_prng_impl == 'threefry2x32'
  return key if is_threefry else None


def pack(mask: Array) -> Array:
  """A boolean mask as uint8 bytes of eight values each (row-major, the last byte zero-padded): what a backward
  pass keeps of a mask instead of drawing it again."""
  bits = mask.reshape(-1).astype(np.uint8)
  bits = jax.lax.pad(bits, np.uint8(0), [(0, -bits.size % 8, 0)]).reshape(-1, 8)
  return jnp.sum(bits << np.arange(8, dtype=np.uint8), axis=-1, dtype=np.uint8)


def unpack(packed: Array, shape: Sequence[int]) -> Array:
  """The boolean mask of `shape` that `pack` made `packed` from."""
  bits = (packed[:, None] >> np.arange(8, dtype=np.uint8)) & np.uint8(1)
  return jax.lax.slice_in_dim(bits.reshape(-1), 0, math.prod(shape)).reshape(tuple(shape)).astype(bool)

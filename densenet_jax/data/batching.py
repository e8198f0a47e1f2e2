"""Who reads what: each process's share of a global batch, the random keys of order and augmentation, and
tf.data -> numpy batches. Shared by every dataset family.
"""

import dataclasses
import itertools
from typing import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf

from densenet_jax.data import BadImageError

# Independent random streams derived from the user's seed.
ORDER_STREAM = 1
AUGMENT_STREAM = 2
INT64_MAX = np.iinfo(np.int64).max


# ----------------------------------------------------------------------------------------------------------------
# Who reads what


def check_batch_size(global_batch_size: int, device_count: int) -> None:
  """Raises a ValueError unless the global batch splits evenly over `device_count` devices."""
  if global_batch_size < 1:
    raise ValueError(f'global_batch_size must be positive, got {global_batch_size}.')
  if global_batch_size % device_count:
    lower = global_batch_size // device_count * device_count
    suggestions = ' or '.join(str(b) for b in (lower, lower + device_count) if b > 0)
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by the {device_count} devices: every device '
        f'must get the same number of examples. Use a multiple of {device_count} (e.g. {suggestions}).'
    )


@dataclasses.dataclass(frozen=True)
class Layout:
  """This process's place in the global batch."""

  index: int
  count: int
  global_batch: int

  @property
  def local_batch(self) -> int:
    return self.global_batch // self.count

  def global_positions(self, batch, j):
    """Positions (in the epoch / split order) of elements `j` of this process's share of global batch `batch`."""
    return batch * self.global_batch + self.index * self.local_batch + j


def layout(global_batch_size, process_index, process_count, device_count) -> Layout:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  check_batch_size(global_batch_size, jax.device_count() if device_count is None else device_count)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f'Need 0 <= process_index < process_count, got {index} and {count}.')
  if global_batch_size % count:
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by process_count={count}: each process loads '
        'the same number of examples per batch.'
    )
  return Layout(index, count, global_batch_size)


def steps_per_epoch(num_examples: int, global_batch_size: int, what: str) -> int:
  if num_examples < global_batch_size:
    raise ValueError(f'{what} has {num_examples} examples, fewer than global_batch_size={global_batch_size}.')
  return num_examples // global_batch_size


def seed_key(seed: int, stream: int) -> tf.Tensor:
  return tf.constant([seed, stream], tf.int64)


def epoch_index(order_key, epoch, position, num_examples):
  """Example index at `position` of epoch `epoch`'s permutation of [0, num_examples)."""
  return tf.random.experimental.index_shuffle(
      position, tf.random.experimental.stateless_fold_in(order_key, epoch), tf.constant(num_examples - 1, tf.int64)
  )


def example_key(augment_key, step, position_in_batch):
  return tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(augment_key, step), position_in_batch
  )


def numpy_batches(ds: tf.data.Dataset, keep_alive=(), locate_bad_files: Callable | None = None) -> Iterator:
  """Yields `ds` as numpy; a decoding failure becomes a ValueError naming the files (bad files are fatal)."""
  # `keep_alive` stays referenced by this generator's frame: the variables the dataset's functions read must
  # outlive it.
  batches = ds.as_numpy_iterator()
  for n in itertools.count():
    try:
      batch = next(batches)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      bad = locate_bad_files(n) if locate_bad_files else []
      if not bad:
        raise
      listing = '\n'.join(f'  {path}: {error}' for path, error in bad)
      raise BadImageError(
          f'Could not decode {len(bad)} image file(s):\n{listing}\nBad files are fatal (skipping them would change '
          'the batches and the evaluation set): delete or re-encode them.'
      ) from e
    yield batch



def padded_eval_example(image, label, valid):
  return {'image': tf.where(valid, image, tf.zeros_like(image)), 'label': tf.where(valid, label, 0), 'mask': valid}

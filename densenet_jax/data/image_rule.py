"""What makes an image file bad: one rule, used by the scan before training and by the decode during it.

A file is bad if
  1. its encoded stream ends before the end marker of its format: JPEG without the EOI marker after its last
     scan, PNG without its IEND chunk, GIF without its trailer byte; or
  2. TensorFlow cannot decode it whole (the decode the evaluation pipeline uses): an unknown format, a damaged
     header, a BMP whose size disagrees with its header, a corrupt compressed stream.
Bytes after the end marker are allowed (cameras and editors append them); markers are found by walking the
format's segments or chunks, so an end marker inside embedded data (an EXIF thumbnail) does not count.

Why both: TensorFlow's decoders disagree about truncation. Decoding a whole truncated JPEG fails, but the fused
decode-and-crop of the training augmentation returns the window with the missing rows filled in, and a GIF
without its trailer decodes. The end-marker test catches all of these, in every decode path.
"""

from __future__ import annotations

import re

import tensorflow as tf

from densenet_jax.data import preprocessing as pp

# After a JPEG scan's entropy-coded data, the next marker: 0xFF followed by a byte that is not a stuffed zero,
# a restart marker (those sit inside a scan) or another 0xFF (fill).
_MARKER_AFTER_SCAN = re.compile(rb'\xff[^\x00\xd0-\xd7\xff]')
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
TRUNCATED = 'truncated'


def _jpeg_problem(data: bytes) -> str | None:
  pos, size = 2, len(data)  # after SOI
  while pos + 1 < size:
    if data[pos] != 0xFF:
      return f'not a JPEG segment at byte {pos}'
    marker = data[pos + 1]
    if marker == 0xFF:  # fill byte before a marker
      pos += 1
    elif marker == 0xD9:  # EOI
      return None
    elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
      pos += 2
    else:
      if pos + 4 > size:
        break
      length = int.from_bytes(data[pos + 2:pos + 4], 'big')
      if length < 2:
        return f'bad JPEG segment length at byte {pos}'
      pos += 2 + length
      if marker == 0xDA:  # SOS: the entropy-coded data runs to the next marker
        found = _MARKER_AFTER_SCAN.search(data, pos)
        if found is None:
          break
        pos = found.start()
  return f'{TRUNCATED}: the JPEG data ends before its end marker (EOI)'


def _png_problem(data: bytes) -> str | None:
  pos, size = len(_PNG_SIGNATURE), len(data)
  while pos + 8 <= size:
    end = pos + 12 + int.from_bytes(data[pos:pos + 4], 'big')  # length, type, data, CRC
    if data[pos + 4:pos + 8] == b'IEND' and end <= size:
      return None
    pos = end
  return f'{TRUNCATED}: the PNG data ends before its IEND chunk'


def _skip_sub_blocks(data: bytes, pos: int) -> int:
  while pos < len(data) and data[pos]:
    pos += 1 + data[pos]
  return pos + 1


def _gif_problem(data: bytes) -> str | None:
  size = len(data)
  if size < 13:
    return f'{TRUNCATED}: the GIF data ends in its header'
  pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)  # header, screen descriptor, color table
  while pos < size:
    block = data[pos]
    if block == 0x3B:  # trailer
      return None
    if block == 0x21:  # extension: label, then sub-blocks
      pos = _skip_sub_blocks(data, pos + 2)
    elif block == 0x2C:  # image: descriptor, local color table, LZW code size, sub-blocks
      if pos + 10 > size:
        break
      flags = data[pos + 9]
      pos = _skip_sub_blocks(data, pos + 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1)
    else:
      return f'not a GIF block at byte {pos}'
  return f'{TRUNCATED}: the GIF data ends before its trailer'


def stream_problem(data: bytes) -> str | None:
  """Part 1 of the rule: why the encoded stream is incomplete, or None (also for formats without an end marker,
  which part 2 judges)."""
  if data[:3] == b'\xff\xd8\xff':
    return _jpeg_problem(data)
  if data[:8] == _PNG_SIGNATURE:
    return _png_problem(data)
  if data[:4] == b'GIF8':
    return _gif_problem(data)
  return None


@tf.function(input_signature=[tf.TensorSpec([], tf.string)])
def _decode(data):
  return tf.shape(pp.decode_image(data))


def _one_line(error: tf.errors.OpError) -> str:
  """The decoder's own words, without the graph's trace ('Detected at node ...', '[[{{node ...}}]]')."""
  lines = [line.strip() for line in error.message.splitlines()]
  kept = [line for line in lines if line and not line.startswith(('Graph execution error', 'Detected at node',
                                                                     'File "', '[['))]
  return re.sub(r'\s*\[(Op|\[).*$', '', kept[-1] if kept else lines[0])[:200]


def problem(data: bytes) -> str | None:
  """Why these encoded bytes are a bad image file (both parts of the rule), or None if they are good."""
  reason = stream_problem(data)
  if reason is not None:
    return reason
  try:
    _decode(tf.constant(data))
  except tf.errors.OpError as error:
    return f'cannot be decoded: {_one_line(error)}'
  return None


def file_problem(path: str) -> str | None:
  """problem() of the file at `path` (local or gs://); a file that cannot be read is bad too."""
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      data = f.read()
  except (OSError, tf.errors.OpError) as error:
    return f'cannot be read: {getattr(error, "message", None) or error}'
  return problem(data)


def bad_files(paths) -> list[tuple[str, str]]:
  """(path, reason) for each bad file among `paths` (each judged once), in order."""
  found = ((path, file_problem(path)) for path in dict.fromkeys(paths))
  return [(path, reason) for path, reason in found if reason is not None]


def checked(data: tf.Tensor) -> tf.Tensor:
  """`data`, in a tf.data pipeline, after part 1 of the rule: an incomplete stream fails the pipeline with
  InvalidArgumentError (part 2 is the decode that follows), so training refuses what the scan refuses."""
  complete = tf.numpy_function(lambda d: stream_problem(bytes(d)) is None, [data], tf.bool, stateful=False)
  with tf.control_dependencies([tf.debugging.Assert(complete, ['image file truncated before its end marker'])]):
    return tf.identity(data)

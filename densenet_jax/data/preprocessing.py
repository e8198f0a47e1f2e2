"""TensorFlow image ops of the input pipelines: normalization and the paper's augmentations.

Everything random here is *stateless*: each function takes an explicit `key` (an int64 tensor of shape [2])
or explicit uniform draws, so that the same (seed, step, example) always produces the same augmented image,
whatever the number of parallel calls, hosts or restarts.
"""

import tensorflow as tf

# CIFAR (0-255 scale). "+" augmentation: pad 4 after normalization, random crop, flip.
CIFAR10_MEAN = (125.3, 123.0, 113.9)
CIFAR10_STD = (63.0, 62.1, 66.7)
CIFAR100_MEAN = (129.3, 124.1, 112.4)
CIFAR100_STD = (68.2, 65.4, 70.4)
CIFAR_PAD = 4
# SVHN: pixels / 255, nothing else.
SVHN_MEAN = (0.0, 0.0, 0.0)
SVHN_STD = (255.0, 255.0, 255.0)
# scikit-learn digits: raw values are 0..16. Normalized as (x / 16 - mean) / std with the mean and std of x / 16
# over the 1,437 training images (tested). Augmentation: translation by up to 1 pixel, never flips.
DIGITS_MAX_VALUE = 16.0
DIGITS_MEAN = 0.3059
DIGITS_STD = 0.3766
DIGITS_PAD = 1

# ImageNet, as in fb.resnet.torch (datasets/imagenet.lua, datasets/transforms.lua). Colors on the [0, 1] scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_IMAGE_SIZE = 224
IMAGENET_EVAL_RESIZE = 256  # shorter side before the center crop; scaled with image_size (256 / 224)
IMAGENET_CROP_AREA_RANGE = (0.08, 1.0)
IMAGENET_CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
IMAGENET_CROP_ATTEMPTS = 10
IMAGENET_COLOR_JITTER = 0.4  # brightness, contrast and saturation, applied in a random order
IMAGENET_LIGHTING_STD = 0.1
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
GRAYSCALE_WEIGHTS = (0.299, 0.587, 0.114)  # fb.resnet.torch's grayscale for contrast and saturation
RESIZE_METHOD = 'bicubic'  # fb.resnet.torch's image.scale default; no antialiasing, no clipping
JPEG_DCT_METHOD = 'INTEGER_ACCURATE'  # libjpeg's default accurate integer IDCT (TF's default is the fast one)
NUM_EVAL_CROPS = 10


def eval_resize_size(image_size: int) -> int:
  """Shorter side before the center crop: 256 for 224, scaled proportionally for other sizes."""
  return int(round(image_size * IMAGENET_EVAL_RESIZE / IMAGENET_IMAGE_SIZE))


def normalize(images: tf.Tensor, mean, std) -> tf.Tensor:
  """(images - mean) / std per channel, in float32; works on any leading shape."""
  inverse_std = [1.0 / s for s in std]
  return (tf.cast(images, tf.float32) - tf.constant(mean, tf.float32)) * tf.constant(inverse_std, tf.float32)


def random_pad_crop_flip(images: tf.Tensor, uniforms: tf.Tensor, *, pad: int, flip: bool, mean, std) -> tf.Tensor:
  """Batched "+" augmentation: normalize, zero-pad by `pad`, random crop back to the input size, optional flip.

  Computed as one gather from the uint8 images and a mask that zeroes the padded border (zero is the channel
  mean after normalization), which is twice as fast as padding and cropping float images.

  Args:
    images: [B, H, W, C] uint8.
    uniforms: [B, 3] draws in [0, 1): crop row offset, crop column offset, flip.
    pad: padding on each side; the crop offset is uniform over the 2 * pad + 1 positions.
    flip: whether to flip horizontally with probability 1/2.
    mean, std: normalization, per channel.
  """
  batch, height, width, channels = images.shape
  offsets = tf.minimum(tf.cast(tf.floor(uniforms[:, :2] * (2 * pad + 1)), tf.int32), 2 * pad) - pad
  rows = offsets[:, :1] + tf.range(height)[None, :]  # source row of each output row, [B, H]
  cols = tf.range(width)[None, :]
  if flip:
    cols = tf.where(uniforms[:, 2:3] < 0.5, width - 1 - cols, cols)
  cols = offsets[:, 1:2] + cols
  inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
  source = tf.clip_by_value(rows, 0, height - 1)[:, :, None] * width + tf.clip_by_value(cols, 0, width - 1)[:, None]
  pixels = tf.gather(
      tf.reshape(images, [batch, height * width, channels]), tf.reshape(source, [batch, -1]), batch_dims=1
  )
  pixels = tf.reshape(pixels, [batch, height, width, channels])
  return normalize(pixels, mean, std) * tf.cast(inside, tf.float32)[..., None]


def sample_crop_window(key: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """fb.resnet.torch RandomSizedCrop window: [y, x, h, w] (int32) inside an image of the given size.

  Up to 10 attempts: area uniform in 8%-100% of the image, aspect ratio uniform in [3/4, 4/3], width and
  height swapped with probability 1/2; the first attempt that fits is placed uniformly at random. If none
  fits, the central square of side min(height, width) (fb.resnet.torch: Scale(224) then CenterCrop(224)).
  """
  keys = tf.random.experimental.stateless_split(key, 4)
  n = IMAGENET_CROP_ATTEMPTS
  area = tf.cast(height * width, tf.float32)
  target_area = area * tf.random.stateless_uniform([n], keys[0], *IMAGENET_CROP_AREA_RANGE)
  aspect = tf.random.stateless_uniform([n], keys[1], *IMAGENET_CROP_ASPECT_RANGE)
  w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  swap = tf.random.stateless_uniform([n], keys[2]) < 0.5
  h, w = tf.where(swap, w, h), tf.where(swap, h, w)
  fits = (h <= height) & (w <= width) & (h >= 1) & (w >= 1)
  first = tf.minimum(tf.reduce_min(tf.where(fits, tf.range(n), n)), n - 1)
  found = tf.reduce_any(fits)
  side = tf.minimum(height, width)
  crop_h = tf.where(found, h[first], side)
  crop_w = tf.where(found, w[first], side)
  u = tf.random.stateless_uniform([2], keys[3])
  y = tf.where(found, tf.cast(u[0] * tf.cast(height - crop_h + 1, tf.float32), tf.int32), (height - side + 1) // 2)
  x = tf.where(found, tf.cast(u[1] * tf.cast(width - crop_w + 1, tf.float32), tf.int32), (width - side + 1) // 2)
  y = tf.minimum(y, height - crop_h)
  x = tf.minimum(x, width - crop_w)
  return tf.stack([y, x, crop_h, crop_w])


def decode_image(data: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG (any channel count) bytes to uint8 [H, W, 3]."""
  return tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=3, dct_method=JPEG_DCT_METHOD),
      lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
  )


def decode_random_crop(data: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  """Decodes only the random-sized crop window of a JPEG (fused); other formats are decoded then cropped."""

  def jpeg():
    shape = tf.image.extract_jpeg_shape(data)
    window = sample_crop_window(key, shape[0], shape[1])
    return tf.image.decode_and_crop_jpeg(data, window, channels=3, dct_method=JPEG_DCT_METHOD)

  def other():
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    shape = tf.shape(image)
    y, x, h, w = tf.unstack(sample_crop_window(key, shape[0], shape[1]))
    return image[y:y + h, x:x + w]

  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def color_draws(key: tf.Tensor):
  """The random draws of color_augment_and_normalize: jitter alphas, jitter order, lighting alphas."""
  keys = tf.random.experimental.stateless_split(key, 3)
  jitter = tf.random.stateless_uniform([3], keys[0], 1.0 - IMAGENET_COLOR_JITTER, 1.0 + IMAGENET_COLOR_JITTER)
  order = tf.random.experimental.stateless_shuffle(tf.range(3), keys[1])
  lighting = tf.random.stateless_normal([3], keys[2], stddev=IMAGENET_LIGHTING_STD)
  return jitter, order, lighting


def color_augment_and_normalize(image: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
  """fb.resnet.torch ColorJitter(0.4, 0.4, 0.4) -> Lighting(0.1) -> ColorNormalize, as one affine color map.

  image: [H, W, 3] float on the 0-255 scale. ColorJitter applies brightness, contrast and saturation in a random
  order, each as blend(img, other, alpha) = alpha * img + (1 - alpha) * other with alpha ~ U[0.6, 1.4] and other
  = 0 (brightness), the mean of the grayscale image (contrast) or the grayscale image (saturation); Lighting adds
  eigvec @ (alpha * eigval) with alpha ~ N(0, 0.1) to every pixel; no clipping. All of these are affine maps of
  the pixel colors (contrast through the image's mean color), so their composition x -> A x + c is computed on
  3x3 matrices and applied in one pass.
  """
  jitter, order, lighting = color_draws(key)
  gray = tf.constant([GRAYSCALE_WEIGHTS], tf.float32)  # [1, 3]
  eye, ones = tf.eye(3), tf.ones([3, 1])
  matrix, offset = eye / 255.0, tf.zeros([3])  # the current image is matrix @ x + offset, on [0, 1]
  mean_color = tf.reduce_mean(image, axis=[0, 1])
  for position in range(3):
    transform = order[position]  # 0: brightness, 1: contrast, 2: saturation
    alpha = tf.gather(jitter, transform)
    current_mean = tf.linalg.matvec(matrix, mean_color) + offset
    step = tf.where(transform == 2, alpha * eye + (1.0 - alpha) * ones @ gray, alpha * eye)
    shift = tf.where(transform == 1, (1.0 - alpha) * tf.reduce_sum(gray[0] * current_mean), 0.0)
    matrix, offset = step @ matrix, tf.linalg.matvec(step, offset) + shift
  eigvec = tf.constant(IMAGENET_PCA_EIGVEC, tf.float32)
  offset += tf.linalg.matvec(eigvec, lighting * tf.constant(IMAGENET_PCA_EIGVAL, tf.float32))
  inverse_std = 1.0 / tf.constant(IMAGENET_STD, tf.float32)
  matrix = matrix * inverse_std[:, None]
  offset = (offset - tf.constant(IMAGENET_MEAN, tf.float32)) * inverse_std
  return tf.tensordot(image, matrix, axes=[[2], [1]]) + offset


def _resize(image: tf.Tensor, size) -> tf.Tensor:
  return tf.image.resize(image, size, method=RESIZE_METHOD, antialias=False)


def imagenet_train_image(data: tf.Tensor, key: tf.Tensor, image_size: int) -> tf.Tensor:
  """Encoded image -> random-sized crop, color jitter, lighting, normalization, flip: [S, S, 3] float32."""
  keys = tf.random.experimental.stateless_split(key, 3)
  image = _resize(decode_random_crop(data, keys[0]), [image_size, image_size])
  image = color_augment_and_normalize(image, keys[1])
  do_flip = tf.random.stateless_uniform([], keys[2]) < 0.5
  image = tf.cond(do_flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
  image.set_shape([image_size, image_size, 3])
  return image


def _normalize_01(image):
  """Normalization of a 0-255 image with the ImageNet mean / std given on the [0, 1] scale."""
  return normalize(image, [255.0 * m for m in IMAGENET_MEAN], [255.0 * s for s in IMAGENET_STD])


def _resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = size / tf.reduce_min(shape)
  new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  return _resize(image, new_shape)


def _crop(image, y, x, size):
  return image[y:y + size, x:x + size]


def imagenet_eval_image(data: tf.Tensor, image_size: int, ten_crop: bool = False) -> tf.Tensor:
  """Resize the shorter side to 256 (for 224), center crop: [S, S, 3]; or the 10 crops: [10, S, S, 3].

  The 10 crops follow fb.resnet.torch TenCrop: center, top-left, top-right, bottom-left, bottom-right, then
  the same five of the horizontally flipped image.
  """
  image = _resize_shorter_side(decode_image(data), eval_resize_size(image_size))
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  cy, cx = (height - image_size + 1) // 2, (width - image_size + 1) // 2
  if not ten_crop:
    image = _normalize_01(_crop(image, cy, cx, image_size))
    image.set_shape([image_size, image_size, 3])
    return image
  image = _normalize_01(image)
  crops = []
  for img in (image, tf.reverse(image, axis=[1])):
    bottom, right = height - image_size, width - image_size
    for y, x in ((cy, cx), (0, 0), (0, right), (bottom, 0), (bottom, right)):
      crops.append(_crop(img, y, x, image_size))
  crops = tf.stack(crops)
  crops.set_shape([NUM_EVAL_CROPS, image_size, image_size, 3])
  return crops

"""ImageNet batches read by index from a tfds data source, pure in (seed, step).

ImageNet does not fit in memory, so unlike `jaxnas.data.pipeline` the
images stay in tfds' array_record files (`tfds.data_source`, random access)
and each step reads and augments only its own examples:

* training batch at step t: examples `perm[i*B:(i+1)*B]` of epoch
  e = t // steps_per_epoch, where `perm` is a permutation of the split
  seeded by (seed, e); each host reads only its contiguous part of the
  global batch, so a pod decodes every image once. Augmentation as the
  reference's `train_imagenet.py`: RandomResizedCrop(224) (scale 0.08-1,
  ratio 3/4-4/3 drawn log-uniformly, 10 tries then a centre crop at the
  nearest allowed ratio: today's torchvision; the 2018 release the
  reference ran drew the ratio uniformly and fell back to a square crop),
  horizontal flip, ColorJitter
  (brightness, contrast, saturation 0.4, hue 0.2, in random order), each
  drawn from a generator seeded by (seed, step, example position).
* evaluation: Resize(256) of the shorter side, CenterCrop(224), in order,
  padded with label -1 to whole batches.

Images are normalised with ImageNet's mean and std. A resumed run reads the
same batches as an uninterrupted one, on any number of hosts.
"""

from concurrent import futures
from typing import Iterator, Optional, Sequence

import numpy as np
from PIL import Image
from PIL import ImageEnhance

MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def random_resized_crop(image: np.ndarray, size: int,
                        rng: np.random.Generator,
                        scale=(0.08, 1.), ratio=(3 / 4, 4 / 3)) -> Image.Image:
  """torchvision's RandomResizedCrop on an HxWx3 uint8 array (bilinear)."""
  h, w = image.shape[:2]
  area = h * w
  log_ratio = np.log(ratio)
  box = None
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    cw = int(round(np.sqrt(target * aspect)))
    ch = int(round(np.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      box = (left, top, left + cw, top + ch)
      break
  if box is None:  # centre crop at the nearest allowed ratio
    in_ratio = w / h
    if in_ratio < ratio[0]:
      cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
      ch, cw = h, int(round(h * ratio[1]))
    else:
      cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    box = (left, top, left + cw, top + ch)
  return Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box)


def color_jitter(img: Image.Image, rng: np.random.Generator,
                 brightness=0.4, contrast=0.4, saturation=0.4,
                 hue=0.2) -> Image.Image:
  """torchvision's ColorJitter on a PIL image: the four adjustments in a
  random order, factors uniform in [1 - x, 1 + x] (hue: shift in [-x, x]);
  an adjustment whose x is 0 is skipped, as ColorJitter leaves it out."""
  for which in rng.permutation(4):
    if not (brightness, contrast, saturation, hue)[which]:
      continue
    if which == 0:
      img = ImageEnhance.Brightness(img).enhance(
          rng.uniform(1 - brightness, 1 + brightness))
    elif which == 1:
      img = ImageEnhance.Contrast(img).enhance(
          rng.uniform(1 - contrast, 1 + contrast))
    elif which == 2:
      img = ImageEnhance.Color(img).enhance(
          rng.uniform(1 - saturation, 1 + saturation))
    else:
      shift = rng.uniform(-hue, hue)
      h, s, v = img.convert('HSV').split()
      h = np.asarray(h, np.uint8) + np.uint8(int(round(shift * 255)) % 256)
      img = Image.merge('HSV', (Image.fromarray(h, 'L'), s, v)).convert('RGB')
  return img


def center_crop(image: np.ndarray, resize: int = 256,
                crop: int = 224) -> np.ndarray:
  """Resize(resize) of the shorter side, then CenterCrop(crop)."""
  h, w = image.shape[:2]
  if h <= w:
    nh, nw = resize, int(resize * w / h)
  else:
    nw, nh = resize, int(resize * h / w)
  img = Image.fromarray(image).resize((nw, nh), Image.BILINEAR)
  top = int(round((nh - crop) / 2.))
  left = int(round((nw - crop) / 2.))
  return np.asarray(img.crop((left, top, left + crop, top + crop)))


def _rgb(image: np.ndarray) -> np.ndarray:
  if image.ndim == 2 or image.shape[-1] == 1:
    image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, -1)
  return image


class ImageNetBatches:
  """This host's part of each training batch, as a function of step.

  Args:
    source: a random-access split (`tfds.data_source(...)`, or any sequence
      of {'image': HxWx3 uint8, 'label': int}).
    batch_size: global batch size (a multiple of `process_count`).
    seed: data seed.
    image_size: crop size (224).
    jitter: apply ColorJitter (the reference does).
    process_index, process_count: this host and the number of hosts.
    workers: threads decoding and augmenting.
  """
  host_local = True  # batches hold this host's rows only

  def __init__(self, source, *, batch_size: int, seed: int,
               image_size: int = 224, jitter: bool = True,
               process_index: int = 0, process_count: int = 1,
               workers: int = 16, mean: Sequence[float] = MEAN,
               std: Sequence[float] = STD):
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f'batch_size {batch_size} must be a positive multiple '
                       f'of the {process_count} processes')
    if len(source) < batch_size:
      raise ValueError(f'{len(source)} examples, fewer than one batch of '
                       f'{batch_size}')
    self.source, self.batch_size, self.seed = source, batch_size, seed
    self.image_size, self.jitter = image_size, jitter
    self.rank, self.hosts = process_index, process_count
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    self.steps_per_epoch = len(source) // batch_size
    self._pool = futures.ThreadPoolExecutor(workers)
    self._perm = (None, None)  # (epoch, permutation)

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm[0] != epoch:
      self._perm = (epoch, np.random.default_rng(
          [self.seed, 0, epoch]).permutation(len(self.source)))
    return self._perm[1]

  def _example(self, index: int, step: int, position: int):
    ex = self.source[int(index)]
    rng = np.random.default_rng([self.seed, 2, step, position])
    img = random_resized_crop(_rgb(np.asarray(ex['image'])),
                              self.image_size, rng)
    if rng.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if self.jitter:
      img = color_jitter(img, rng)
    x = (np.asarray(img, np.float32) - self.mean) / self.std
    return x, int(ex['label'])

  def indices(self, step: int) -> np.ndarray:
    """Split indices of this host's rows of the global batch at `step`."""
    epoch, i = divmod(step, self.steps_per_epoch)
    rows = self._permutation(epoch)[i * self.batch_size:
                                    (i + 1) * self.batch_size]
    per_host = self.batch_size // self.hosts
    return rows[self.rank * per_host:(self.rank + 1) * per_host]

  def batch(self, step: int) -> dict:
    idx = self.indices(step)
    offset = self.rank * len(idx)
    out = list(self._pool.map(
        lambda a: self._example(a[1], step, offset + a[0]), enumerate(idx)))
    return {'image': np.stack([x for x, _ in out]),
            'label': np.asarray([y for _, y in out], np.int32)}


def eval_batches(source, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1, max_examples: Optional[int] = None,
                 workers: int = 16, mean: Sequence[float] = MEAN,
                 std: Sequence[float] = STD) -> Iterator[dict]:
  """This host's rows of fixed-shape evaluation batches over `source`
  (Resize 256, CenterCrop 224); padding rows have label -1."""
  n = len(source) if max_examples is None else min(max_examples, len(source))
  per_host = batch_size // process_count
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  def load(i):
    ex = source[int(i)]
    x = center_crop(_rgb(np.asarray(ex['image'])))
    return (x.astype(np.float32) - mean) / std, int(ex['label'])

  with futures.ThreadPoolExecutor(workers) as pool:
    for start in range(0, n, batch_size):
      rows = np.arange(start + process_index * per_host,
                       start + (process_index + 1) * per_host)
      real = rows[rows < n]
      out = list(pool.map(load, real))
      images = np.zeros((per_host, 224, 224, 3), np.float32)
      labels = -np.ones(per_host, np.int32)
      if out:
        images[:len(out)] = np.stack([x for x, _ in out])
        labels[:len(out)] = [y for _, y in out]
      yield {'image': images, 'label': labels}


def sources(data_dir: Optional[str] = None, name: str = 'imagenet2012'):
  """(train, validation) random-access splits of tfds' `name`, prepared as
  array_record under `data_dir` (FileNotFoundError says how otherwise)."""
  from jaxnas.data import sources as sources_lib  # pylint: disable=g-import-not-at-top
  return (sources_lib.tfds_source(name, 'train', data_dir),
          sources_lib.tfds_source(name, 'validation', data_dir))

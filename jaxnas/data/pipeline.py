"""Search batches from in-memory arrays, reproducible from (seed, step) alone.

The reference (quark0/darts `train_search.py`) feeds the weight step from a
shuffled pass over one half of the training split and draws each architecture
batch from a fresh shuffled iterator over the other half, with the training
augmentation (random crop, horizontal flip) on both. Here:

* weights batch at step t: epoch `t // steps_per_epoch` of a permutation seeded
  by (seed, epoch), batch `t % steps_per_epoch` of it (the last partial batch
  is dropped, as static shapes need);
* architecture batch at step t: `batch_size` distinct examples drawn with a
  generator seeded by (seed, t), i.e. a fresh random batch every step;
* augmentation seeded by (seed, t) as well.

So a batch is a pure function of (seed, step): a resumed search sees exactly
the batches an uninterrupted one would, with no iterator state to save.
Images are kept as uint8 or float arrays in their raw range and normalised per
channel after augmentation (padding pixels are zero before normalisation, as
torchvision's RandomCrop pads the raw image).

Several hosts: every host builds the same global batch from (seed, step) and
keeps its own contiguous part with `host_slice(batch, jax.process_index(),
jax.process_count())`; `jaxnas.parallel.DataParallel.put_batch` then
splits that part over the host's local devices. No host holds iterator state, so resuming on
any number of hosts replays exactly the batches of an uninterrupted run.
"""

import dataclasses
from typing import Iterator, Optional, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  """Images [N, H, W, C] (raw range) and integer labels [N]."""
  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.ndim != 4:
      raise ValueError(f'images must be [N, H, W, C], got {self.images.shape}')
    if len(self.images) != len(self.labels):
      raise ValueError(f'{len(self.images)} images but {len(self.labels)} '
                       'labels')

  def __len__(self):
    return len(self.labels)

  def take(self, indices) -> 'Split':
    return Split(self.images[indices], self.labels[indices])


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A dataset's splits and the per-channel normalisation of its images."""
  name: str
  train: Split
  test: Optional[Split]
  num_classes: int
  mean: Sequence[float]  # per channel, in the images' raw range
  std: Sequence[float]


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training augmentation: random crop after zero padding, random h-flip,
  and Cutout (`cutout` > 0: one `cutout` x `cutout` square per image, set to
  zero after normalisation, its centre uniform over the image and the
  square clipped at the borders, as the reference's `utils.Cutout`)."""
  crop_padding: int = 4
  flip: bool = True
  cutout: int = 0


def split(data: Split, portion: float = 0.5):
  """The first `portion` of `data` and the rest (the reference's order)."""
  if not 0 < portion < 1:
    raise ValueError(f'portion must be in (0, 1), got {portion}')
  n = int(np.floor(portion * len(data)))
  if n == 0 or n == len(data):
    raise ValueError(f'portion {portion} of {len(data)} examples leaves an '
                     'empty half')
  return data.take(np.arange(n)), data.take(np.arange(n, len(data)))


def normalise(images: np.ndarray, mean, std) -> np.ndarray:
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (images.astype(np.float32) - mean) / std


def augment_batch(images: np.ndarray, rng: np.random.Generator,
                  aug: Augment) -> np.ndarray:
  """Random crop (zero padding `aug.crop_padding`) and horizontal flip."""
  n, h, w, _ = images.shape
  p = aug.crop_padding
  if p:
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    dy = rng.integers(0, 2 * p + 1, n)
    dx = rng.integers(0, 2 * p + 1, n)
    rows = dy[:, None] + np.arange(h)[None]
    cols = dx[:, None] + np.arange(w)[None]
    images = padded[np.arange(n)[:, None, None], rows[:, :, None],
                    cols[:, None, :]]
  if aug.flip:
    flip = rng.random(n) < 0.5
    images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  return images


def cutout_mask(n: int, height: int, width: int, length: int,
                rng: np.random.Generator) -> np.ndarray:
  """[n, height, width] booleans, False on each image's cutout square."""
  cy = rng.integers(0, height, n)
  cx = rng.integers(0, width, n)
  y0 = np.clip(cy - length // 2, 0, height)[:, None, None]
  y1 = np.clip(cy + length // 2, 0, height)[:, None, None]
  x0 = np.clip(cx - length // 2, 0, width)[:, None, None]
  x1 = np.clip(cx + length // 2, 0, width)[:, None, None]
  ys = np.arange(height)[None, :, None]
  xs = np.arange(width)[None, None, :]
  return ~((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))


def _finish(data: Split, idx: np.ndarray, *, seed: int, stream: int,
            step: int, augment: Optional[Augment], mean, std) -> dict:
  """Gathers rows `idx`, augments with a generator seeded by (seed, stream,
  step), normalises, applies Cutout."""
  images = data.images[idx]
  rng = np.random.default_rng([seed, stream, step])
  if augment is not None:
    images = augment_batch(images, rng, augment)
  images = normalise(images, mean, std)
  if augment is not None and augment.cutout:
    n, h, w, _ = images.shape
    images = images * cutout_mask(n, h, w, augment.cutout, rng)[..., None]
  return {'image': images, 'label': data.labels[idx].astype(np.int32)}


class TrainBatches:
  """Training batches as a function of step: epoch `step // steps_per_epoch`
  is a permutation of `data` seeded by (seed, epoch), cut into
  `steps_per_epoch` full batches (the last partial batch is dropped);
  augmentation is seeded by (seed, step). Resuming at any step replays the
  batches of an uninterrupted run. (The reference's DataLoader keeps the
  last partial batch: 521 steps of 96 per CIFAR-10 epoch where this takes
  520 and leaves out 80 examples, different ones each epoch.)
  """

  def __init__(self, data: Split, *, batch_size: int, seed: int,
               augment: Optional[Augment], mean, std, stream: int = 2):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if len(data) < batch_size:
      raise ValueError(f'the split has {len(data)} examples, fewer than one '
                       f'batch of {batch_size}')
    self.data, self.batch_size, self.seed = data, batch_size, seed
    self.augment, self.mean, self.std = augment, mean, std
    self.stream = stream
    self.steps_per_epoch = len(data) // batch_size

  def batch(self, step: int) -> dict:
    epoch, i = divmod(step, self.steps_per_epoch)
    perm = np.random.default_rng([self.seed, 0, epoch]).permutation(
        len(self.data))
    idx = np.sort(perm[i * self.batch_size:(i + 1) * self.batch_size])
    return _finish(self.data, idx, seed=self.seed, stream=self.stream,
                   step=step, augment=self.augment, mean=self.mean,
                   std=self.std)


class SearchBatches:
  """Weights / architecture batches of a bilevel search as functions of step.

  Batches are global and a pure function of (seed, step); with several hosts
  each host computes the global batch and keeps its part with `host_slice`
  (see the module docstring), which keeps resume exact.

  Args:
    weights_split: examples for the weight step.
    arch_split: examples for the architecture step.
    batch_size: global batch size of both.
    seed: data seed.
    augment: training augmentation, or None.
    mean, std: per-channel normalisation.
  """

  def __init__(self, weights_split: Split, arch_split: Split, *,
               batch_size: int, seed: int, augment: Optional[Augment],
               mean, std):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    for name, s in (('weights', weights_split), ('architecture', arch_split)):
      if len(s) < batch_size:
        raise ValueError(f'the {name} split has {len(s)} examples, fewer '
                         f'than one batch of {batch_size}')
    self.weights_split, self.arch_split = weights_split, arch_split
    self.batch_size, self.seed, self.augment = batch_size, seed, augment
    self.mean, self.std = mean, std
    self._weights = TrainBatches(weights_split, batch_size=batch_size,
                                 seed=seed, augment=augment, mean=mean,
                                 std=std)
    self.steps_per_epoch = self._weights.steps_per_epoch

  def weights_batch(self, step: int) -> dict:
    return self._weights.batch(step)

  def arch_batch(self, step: int) -> dict:
    rng = np.random.default_rng([self.seed, 1, step])
    idx = np.sort(rng.choice(len(self.arch_split), self.batch_size,
                             replace=False))
    return _finish(self.arch_split, idx, seed=self.seed, stream=3, step=step,
                   augment=self.augment, mean=self.mean, std=self.std)

  def batch(self, step: int) -> dict:
    """`{'train': weights batch, 'val': architecture batch}` of `step`."""
    return {'train': self.weights_batch(step), 'val': self.arch_batch(step)}


def _leading_dims(tree):
  return {np.shape(x)[0] if np.ndim(x) else None
          for x in jax.tree_util.tree_leaves(tree)}


def host_slice(batch_tree, process_index: int, process_count: int):
  """This host's contiguous part of a global batch.

  Args:
    batch_tree: a pytree of arrays whose leading dimension is the global batch
      size B (the same for every leaf).
    process_index: this host's index, in [0, process_count).
    process_count: the number of hosts; must divide B.

  Returns:
    The tree with every leaf sliced to rows
    [process_index * B / process_count, (process_index + 1) * B /
    process_count).
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, '
                     f'process_count={process_count})')
  sizes = _leading_dims(batch_tree)
  if len(sizes) != 1 or None in sizes:
    raise ValueError('every leaf of the batch needs the same leading (batch) '
                     f'dimension; got {sorted(sizes, key=str)}')
  (size,) = sizes
  if size % process_count:
    raise ValueError(f'global batch size {size} is not divisible by '
                     f'process_count={process_count}')
  per_host = size // process_count
  start = process_index * per_host
  return jax.tree_util.tree_map(lambda x: x[start:start + per_host],
                                batch_tree)


def eval_batches(data: Split, batch_size: int, mean, std) -> Iterator[dict]:
  """Fixed-shape batches over all of `data`; padding rows have label -1."""
  for start in range(0, len(data), batch_size):
    images = data.images[start:start + batch_size]
    labels = data.labels[start:start + batch_size].astype(np.int32)
    pad = batch_size - len(labels)
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:],
                                                images.dtype)])
      labels = np.concatenate([labels, -np.ones(pad, np.int32)])
    yield {'image': normalise(images, mean, std), 'label': labels}

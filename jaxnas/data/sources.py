"""Named datasets loaded into memory: scikit-learn's digits and tfds datasets.

* 'digits': the 1,797 8x8 handwritten digits that scikit-learn ships (real
  data, nothing downloaded). A fixed shuffle (seed 0) keeps 1,500 for training
  and 297 for test.
* any other name: a tfds dataset read through `tfds.data_source` (array_record
  files, no TensorFlow needed) from `data_dir`, never downloaded: prepare it
  with `tfds build NAME` first. 'train' and 'test' splits are read.
"""

import functools
from typing import Optional

import numpy as np

from jaxnas.data.pipeline import Dataset
from jaxnas.data.pipeline import Split

# The reference's CIFAR statistics (quark0/darts `cnn/utils.py`), in [0, 255].
CIFAR10_MEAN = (0.49139968 * 255, 0.48215827 * 255, 0.44653124 * 255)
CIFAR10_STD = (0.24703233 * 255, 0.24348505 * 255, 0.26158768 * 255)
CIFAR100_MEAN = (0.5071 * 255, 0.4865 * 255, 0.4409 * 255)
CIFAR100_STD = (0.2673 * 255, 0.2564 * 255, 0.2762 * 255)

DIGITS_TEST_SIZE = 297


def _digits(data_dir: Optional[str] = None) -> Dataset:
  del data_dir
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None]  # values 0..16
  labels = digits.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(labels))
  train, test = perm[:-DIGITS_TEST_SIZE], perm[-DIGITS_TEST_SIZE:]
  mean = float(images[train].mean())
  std = float(images[train].std())
  return Dataset('digits', Split(images[train], labels[train]),
                 Split(images[test], labels[test]), 10, (mean,), (std,))


def _read_tfds_split(name: str, split: str, data_dir: Optional[str]) -> Split:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir,
                              download=False)
  except Exception as e:  # tfds raises several types for a missing dataset
    raise FileNotFoundError(
        f'tfds dataset {name!r} split {split!r} is not prepared under '
        f'data_dir={data_dir!r} ({type(e).__name__}: {e}). Nothing is '
        f'downloaded at run time: prepare it once with `tfds build {name}` '
        'on a machine with internet access and pass --config.data_dir.'
    ) from e
  images = np.empty((len(source),) + tuple(
      source.dataset_info.features['image'].shape), np.uint8)
  labels = np.empty((len(source),), np.int32)
  for i in range(len(source)):
    ex = source[i]
    images[i], labels[i] = ex['image'], ex['label']
  return Split(images, labels)


def _tfds(name: str, mean, std, data_dir: Optional[str] = None) -> Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  train = _read_tfds_split(name, 'train', data_dir)
  test = _read_tfds_split(name, 'test', data_dir)
  info = tfds.builder(name, data_dir=data_dir).info
  return Dataset(name, train, test, info.features['label'].num_classes, mean,
                 std)


SOURCES = {
    'digits': _digits,
    'cifar10': functools.partial(_tfds, 'cifar10', CIFAR10_MEAN, CIFAR10_STD),
    'cifar100': functools.partial(_tfds, 'cifar100', CIFAR100_MEAN,
                                  CIFAR100_STD),
}


def load(name: str, data_dir: Optional[str] = None) -> Dataset:
  """Loads dataset `name` (one of `SOURCES`) into memory."""
  if name not in SOURCES:
    raise ValueError(f'unknown dataset {name!r}; known: {sorted(SOURCES)}')
  return SOURCES[name](data_dir=data_dir)

"""Named datasets loaded into memory: digits, tfds datasets, image folders.

* 'digits': the 1,797 8x8 handwritten digits that scikit-learn ships (real
  data, nothing downloaded). A fixed shuffle (seed 0) keeps 1,500 for training
  and 297 for test.
* 'cifar10', 'cifar100': tfds datasets read through `tfds.data_source`
  (array_record files, no TensorFlow needed) from `data_dir`, never
  downloaded: prepare them with `tfds build NAME --file_format=array_record`
  first. 'train' and 'test' splits are read; the normalisation is the
  reference's CIFAR statistics.
* 'imagenet2012': recognised so that a missing dataset gets the manual-download
  instructions, but not loaded: its images have varying sizes and 1.28M of
  them do not fit in memory, while this module keeps whole splits as arrays of
  one image size (32x32-class datasets). Resize ImageNet to one small size
  yourself (e.g. 32x32 or 64x64 JPEGs) and load it with the 'folder:' form.
* 'folder:/path/to/root': an image folder (see `image_folder`), e.g. the
  unpacked CIFAR-10 JPEG tarball:

      root/train/<class>/*.{jpg,jpeg,png}
      root/test/<class>/*.{jpg,jpeg,png}      (optional)
"""

import concurrent.futures
import functools
import hashlib
import os
import tempfile
from typing import List, Optional, Sequence, Tuple
import warnings

import numpy as np

from jaxnas.data.pipeline import Dataset
from jaxnas.data.pipeline import Split

# The reference's CIFAR statistics (quark0/darts `cnn/utils.py`), in [0, 255].
CIFAR10_MEAN = (0.49139968 * 255, 0.48215827 * 255, 0.44653124 * 255)
CIFAR10_STD = (0.24703233 * 255, 0.24348505 * 255, 0.26158768 * 255)
CIFAR100_MEAN = (0.5071 * 255, 0.4865 * 255, 0.4409 * 255)
CIFAR100_STD = (0.2673 * 255, 0.2564 * 255, 0.2762 * 255)

DIGITS_TEST_SIZE = 297

FOLDER_PREFIX = 'folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
# Where decoded image folders are cached; 'off' (or '') disables the cache.
CACHE_ENV = 'JAXNAS_DATA_CACHE'
DEFAULT_CACHE_DIR = os.path.join('~', '.cache', 'jaxnas', 'data')
_CACHE_FORMAT = 1  # bump when the cached arrays change meaning

_FOLDER_LAYOUT = (
    'Expected layout: ROOT/train/<class>/*.jpg|*.jpeg|*.png, one subfolder '
    'per class (class names = sorted subfolder names), and optionally '
    'ROOT/test/<class>/... with the same class subfolders.')


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


# ----------------------------------------------------------------------------
# tfds


def tfds_source(name: str, split: str, data_dir: Optional[str]):
  """`tfds.data_source(name, split)`, or an error that says how to prepare."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # tfds raises several types for a missing dataset
    if name == 'imagenet2012':
      how = (
          'ImageNet cannot be downloaded by tfds: place the ImageNet tars '
          '(ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar) in the tfds '
          'manual dir (by default DATA_DIR/downloads/manual) and run '
          '`tfds build imagenet2012 --manual_dir=<folder with the tars> '
          '--data_dir=DATA_DIR --file_format=array_record`, then pass '
          'data_dir=DATA_DIR (--config.data_dir).')
    else:
      how = (
          f'Nothing is downloaded at run time: prepare it once with `tfds '
          f'build {name} --file_format=array_record` (data_source reads '
          'array_record, not the default tfrecord) on a machine with '
          'internet access and pass --config.data_dir.')
    raise FileNotFoundError(
        f'tfds dataset {name!r} split {split!r} is not prepared (as '
        f'array_record) under data_dir={data_dir!r} ({type(e).__name__}: '
        f'{e}). {how}') from e


def _read_tfds_split(name: str, split: str, data_dir: Optional[str]) -> Split:
  source = tfds_source(name, split, data_dir)
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


def _imagenet2012(data_dir: Optional[str] = None) -> Dataset:
  tfds_source('imagenet2012', 'train', data_dir)  # says how to prepare it
  raise NotImplementedError(
      'imagenet2012 is prepared, but in-memory loading is for datasets of '
      'one small image size (32x32-class datasets such as CIFAR): ImageNet '
      'images vary in size and 1.28M of them do not fit in memory. Resize '
      'them to one small size (e.g. 32x32 or 64x64) into ROOT/train/<class>/ '
      "and ROOT/test/<class>/ and load 'folder:ROOT'.")


# ----------------------------------------------------------------------------
# Image folders


def _list_class_files(split_dir: str) -> List[Tuple[str, List[str]]]:
  """[(class, sorted image file names)] for the class subfolders, sorted."""
  out = []
  for cls in sorted(os.listdir(split_dir)):
    d = os.path.join(split_dir, cls)
    if cls.startswith('.') or not os.path.isdir(d):
      continue
    files = sorted(f for f in os.listdir(d)
                   if not f.startswith('.')
                   and f.lower().endswith(IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(d, f)))
    out.append((cls, files))
  return out


def _read_image(path: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    im.load()
    # convert('RGB') copies even RGB images: skip it for them (~25% faster).
    return np.asarray(im if im.mode == 'RGB' else im.convert('RGB'), np.uint8)


def _decode(paths: Sequence[str], workers: int) -> np.ndarray:
  """Decodes `paths` (in order) into one uint8 array [N, H, W, 3]."""
  first = _read_image(paths[0])
  images = np.empty((len(paths),) + first.shape, np.uint8)
  images[0] = first

  def fill(start_stop):
    start, stop = start_stop
    for i in range(start, stop):
      img = _read_image(paths[i])
      if img.shape != first.shape:
        raise ValueError(
            f'images in an image folder must all have one size: {paths[0]} '
            f'is {first.shape[1]}x{first.shape[0]} (WxH) but {paths[i]} is '
            f'{img.shape[1]}x{img.shape[0]}. Resize the images to one size '
            'first (e.g. with PIL `Image.resize`).')
      images[i] = img

  chunk = 2048
  ranges = [(s, min(s + chunk, len(paths)))
            for s in range(1, len(paths), chunk)]
  if workers <= 1 or len(ranges) <= 1:
    for r in ranges:
      fill(r)
  else:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for f in [pool.submit(fill, r) for r in ranges]:
        f.result()  # re-raises a size mismatch
  return images


def _channel_stats(images: np.ndarray):
  """Per-channel mean and (population) std of uint8 images, in [0, 255]."""
  c = images.shape[-1]
  total = np.zeros(c, np.float64)
  squares = np.zeros(c, np.float64)
  for start in range(0, len(images), 4096):
    x = images[start:start + 4096].reshape(-1, c).astype(np.float64)
    total += x.sum(0)
    squares += np.square(x).sum(0)
  n = images.size // c
  mean = total / n
  std = np.sqrt(np.maximum(squares / n - mean ** 2, 0.))
  return mean, std


def _cache_dir(cache_dir: Optional[str]) -> Optional[str]:
  if cache_dir is None:
    cache_dir = os.environ.get(CACHE_ENV, DEFAULT_CACHE_DIR)
  if cache_dir.strip().lower() in ('', 'off', 'none', '0'):
    return None
  return os.path.abspath(os.path.expanduser(cache_dir))


def _cache_key(root: str, listing) -> str:
  h = hashlib.sha256(f'{_CACHE_FORMAT}\0{root}\0'.encode())
  for split_name, classes in listing:
    for cls, files in classes:
      for f in files:
        st = os.stat(os.path.join(root, split_name, cls, f))
        h.update(f'{split_name}/{cls}/{f}\0{st.st_mtime_ns}\0{st.st_size}\n'
                 .encode())
  return h.hexdigest()


def image_folder(root: str, *, cache_dir: Optional[str] = None,
                 workers: Optional[int] = None) -> Dataset:
  """Loads an image folder into memory as uint8 arrays [N, H, W, 3].

  Layout: `root/train/<class>/*.{jpg,jpeg,png}` and, optionally,
  `root/test/<class>/...` with the same class subfolders. Classes are the
  sorted subfolder names of `train` (label = position). Training examples
  come in one fixed shuffled order (a permutation seeded with
  `FOLDER_ORDER_SEED` of the class-then-file-name listing), so that the first
  and second part of the split both hold every class; test examples are in
  listing order. Every image is converted to RGB with PIL; all must
  have one size. The normalisation is the per-channel mean and std of the
  train images in [0, 255].

  The decoded arrays are cached as one `.npz` in `cache_dir` (default: the
  JAXNAS_DATA_CACHE environment variable, else ~/.cache/jaxnas/data; 'off'
  disables it), never in `root`, which may be read-only. The cache key is
  `root`'s absolute path and the name, mtime and size of every image, so
  changed, added or removed files give a fresh decode (stale cache files are
  not deleted).

  Args:
    root: the folder holding `train/` (and `test/`).
    cache_dir: where to cache the decoded arrays (see above).
    workers: decoding threads; default min(8, half the CPU count), >= 1.

  Returns:
    The Dataset, named 'folder:<absolute root>'.

  Raises:
    FileNotFoundError: `root` or `root/train` is missing or holds no images.
    ValueError: the test classes differ from the train classes, or the
      images do not all have one size.
  """
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f'image folder {root!r} does not exist. {_FOLDER_LAYOUT}')
  train_dir = os.path.join(root, 'train')
  if not os.path.isdir(train_dir):
    raise FileNotFoundError(
        f'image folder {root!r}: no train folder {train_dir!r}. '
        f'{_FOLDER_LAYOUT}')
  train_files = _list_class_files(train_dir)
  if not train_files:
    raise FileNotFoundError(
        f'image folder {root!r}: {train_dir!r} has no class subfolders. '
        f'{_FOLDER_LAYOUT}')
  empty = [cls for cls, files in train_files if not files]
  if empty:
    raise FileNotFoundError(
        f'image folder {root!r}: train class folder(s) {empty} hold no '
        f'{"/".join(IMAGE_EXTENSIONS)} images. {_FOLDER_LAYOUT}')
  classes = [cls for cls, _ in train_files]
  listing = [('train', train_files)]
  test_dir = os.path.join(root, 'test')
  if os.path.isdir(test_dir):
    test_files = _list_class_files(test_dir)
    test_classes = [cls for cls, _ in test_files]
    if test_classes != classes:
      raise ValueError(
          f'image folder {root!r}: the test classes must be the train '
          f'classes; missing from test: '
          f'{sorted(set(classes) - set(test_classes))}, only in test: '
          f'{sorted(set(test_classes) - set(classes))}. {_FOLDER_LAYOUT}')
    if sum(len(f) for _, f in test_files):
      listing.append(('test', test_files))

  cache = _cache_dir(cache_dir)
  cache_path = None
  if cache is not None:
    key = _cache_key(root, listing)
    base = ''.join(ch if ch.isalnum() or ch in '-_' else '_'
                   for ch in os.path.basename(root) or 'root')
    cache_path = os.path.join(cache, f'folder_{base}_{key[:24]}.npz')
    arrays = _load_cache(cache_path, classes)
    if arrays is not None:
      return _folder_dataset(root, classes, arrays)

  # Small images decode mostly under the GIL: on 2 shared cores threads
  # measured no faster than one loop (10.4-10.5 s for CIFAR-10's 60k JPEGs).
  workers = workers or max(1, min(8, (os.cpu_count() or 1) // 2))
  arrays = {}
  for split_name, class_files in listing:
    paths, labels = [], []
    for label, (cls, files) in enumerate(class_files):
      paths += [os.path.join(root, split_name, cls, f) for f in files]
      labels += [label] * len(files)
    arrays[f'{split_name}_images'] = _decode(paths, workers)
    arrays[f'{split_name}_labels'] = np.asarray(labels, np.int32)
  if ('test_images' in arrays and arrays['test_images'].shape[1:]
      != arrays['train_images'].shape[1:]):
    raise ValueError(
        f'image folder {root!r}: test images are '
        f'{arrays["test_images"].shape[1:3]} but train images are '
        f'{arrays["train_images"].shape[1:3]} (HxW); resize them to one size.')
  arrays['mean'], arrays['std'] = _channel_stats(arrays['train_images'])
  arrays['classes'] = np.asarray(classes, dtype=str)
  if cache_path is not None:
    _save_cache(cache_path, arrays)
  return _folder_dataset(root, classes, arrays)


# Seed of the fixed order in which a folder's training images are served.
FOLDER_ORDER_SEED = 0


def _folder_dataset(root, classes, arrays) -> Dataset:
  test = None
  if 'test_images' in arrays:
    test = Split(arrays['test_images'], arrays['test_labels'])
  # Files are listed class by class; a search splits the training set into
  # its first and second part, which would then hold different classes. Serve
  # them in one fixed shuffled order instead (as CIFAR's own files are).
  order = np.random.default_rng(FOLDER_ORDER_SEED).permutation(
      len(arrays['train_labels']))
  train = Split(arrays['train_images'][order], arrays['train_labels'][order])
  return Dataset(FOLDER_PREFIX + root, train, test,
                 len(classes), tuple(float(m) for m in arrays['mean']),
                 tuple(float(s) for s in arrays['std']))


def _load_cache(path: str, classes) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    if list(arrays['classes']) != list(classes):
      raise ValueError('cached classes differ')
    return arrays
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(f'ignoring unreadable image-folder cache {path} '
                  f'({type(e).__name__}: {e}); decoding the images again')
    return None


def _save_cache(path: str, arrays: dict) -> None:
  """Writes the cache atomically; a cache that cannot be written is skipped."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.npz.tmp', dir=os.path.dirname(path))
    try:
      with os.fdopen(fd, 'wb') as f:
        np.savez(f, **arrays)
      os.replace(tmp, path)
    except BaseException:
      os.unlink(tmp)
      raise
  except OSError as e:
    warnings.warn(f'could not write the image-folder cache {path} ({e}); '
                  f'set {CACHE_ENV} to a writable folder or to "off"')


# ----------------------------------------------------------------------------

SOURCES = {
    'digits': _digits,
    'cifar10': functools.partial(_tfds, 'cifar10', CIFAR10_MEAN, CIFAR10_STD),
    'cifar100': functools.partial(_tfds, 'cifar100', CIFAR100_MEAN,
                                  CIFAR100_STD),
    'imagenet2012': _imagenet2012,
}


def load(name: str, data_dir: Optional[str] = None) -> Dataset:
  """Loads dataset `name` into memory.

  Args:
    name: one of `SOURCES` ('digits', 'cifar10', 'cifar100',
      'imagenet2012'), or 'folder:/path/to/root' for an image folder (see
      `image_folder`).
    data_dir: the tfds data dir of tfds datasets; unused otherwise.

  Returns:
    The Dataset.
  """
  if name.startswith(FOLDER_PREFIX):
    root = name[len(FOLDER_PREFIX):]
    if not root:
      raise ValueError("'folder:' needs a path, e.g. 'folder:/data/cifar10'")
    return image_folder(root)
  if name not in SOURCES:
    raise ValueError(
        f'unknown dataset {name!r}; known: {sorted(SOURCES)}, or '
        "'folder:/path/to/root' for an image folder laid out as "
        'root/train/<class>/*.jpg (and optionally root/test/<class>/*.jpg)')
  return SOURCES[name](data_dir=data_dir)

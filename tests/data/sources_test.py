"""Image folders, tfds names, and per-host / per-device batch slicing."""

import os
import shutil
import tempfile
import time
from unittest import mock

from absl.testing import absltest
import chex
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from jaxnas import data
from jaxnas.data import sources
from tests import fixtures

CLASSES = ('cat', 'ant', 'bee')  # sorted: ant, bee, cat


def _colour(cls_index, i):
  return (40 * cls_index + 10, 7 * i, 200 - 30 * cls_index)


def _make_folder(parent, sizes=None, test=True, size=(6, 5)):
  """A folder of 3 classes; train class c has 2 + c images, mixed formats."""
  root = tempfile.mkdtemp(dir=parent)
  for split_name in ('train', 'test') if test else ('train',):
    for c, cls in enumerate(sorted(CLASSES)):
      d = os.path.join(root, split_name, cls)
      os.makedirs(d)
      for i in range(2 + c if split_name == 'train' else 1):
        w, h = (sizes or {}).get((split_name, cls, i), size)
        # solid colours survive JPEG almost exactly; PNG exactly
        img = Image.new('RGB', (w, h), _colour(c, i))
        ext = ('png', 'jpg', 'jpeg')[i % 3]
        img.save(os.path.join(d, f'img{i:02d}.{ext}'))
      # ignored: not an image, hidden file
      with open(os.path.join(d, 'notes.txt'), 'w') as f:
        f.write('x')
  return root


def _assert_splits_equal(a, b):
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)


class ImageFolderTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.tmp, True)
    self.cache = os.path.join(self.tmp, 'cache')
    os.makedirs(self.cache)
    self.enter_context(mock.patch.dict(
        os.environ, {sources.CACHE_ENV: self.cache}))

  def test_shapes_labels_order_and_mean(self):
    root = _make_folder(self.tmp)
    ds = data.load('folder:' + root)
    self.assertEqual(ds.name, 'folder:' + os.path.abspath(root))
    self.assertEqual(ds.num_classes, 3)
    chex.assert_shape(ds.train.images, (2 + 3 + 4, 5, 6, 3))
    chex.assert_shape(ds.test.images, (3, 5, 6, 3))
    self.assertEqual(ds.train.images.dtype, np.uint8)
    self.assertEqual(ds.train.labels.dtype, np.int32)
    # Listing: sorted classes (ant, bee, cat), then sorted file names; the
    # training set is served in one fixed permutation of it.
    listing = [(c, i) for c in range(3) for i in range(2 + c)]
    order = np.random.default_rng(sources.FOLDER_ORDER_SEED).permutation(9)
    self.assertNotEqual(list(order), list(range(9)))
    self.assertEqual(list(ds.train.labels), [listing[k][0] for k in order])
    self.assertEqual(list(ds.test.labels), [0, 1, 2])
    expected = np.array([_colour(*listing[k]) for k in order], np.float64)
    pixels = ds.train.images[:, 2, 3].astype(np.float64)
    np.testing.assert_allclose(pixels, expected, atol=3)  # JPEG error
    # the PNGs (img00) are exact
    first_png = list(order).index(0)
    np.testing.assert_array_equal(ds.train.images[first_png, 0, 0],
                                  _colour(0, 0))
    mean = ds.train.images.reshape(-1, 3).astype(np.float64).mean(0)
    std = ds.train.images.reshape(-1, 3).astype(np.float64).std(0)
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(ds.std, std, rtol=1e-6)
    np.testing.assert_allclose(ds.mean, expected.mean(0), atol=3)

  def test_cache_is_used_and_keyed_by_the_files(self):
    root = _make_folder(self.tmp)
    first = data.image_folder(root)
    cached = os.listdir(self.cache)
    self.assertLen(cached, 1)
    self.assertTrue(cached[0].endswith('.npz'))
    self.assertEmpty([f for f in os.listdir(root) if f.endswith('.npz')])
    with mock.patch.object(sources, '_decode',
                           side_effect=AssertionError('decoded again')):
      again = data.image_folder(root)
    _assert_splits_equal(first.train, again.train)
    _assert_splits_equal(first.test, again.test)
    self.assertEqual(first.mean, again.mean)
    # a changed file gives a fresh decode and a second cache file
    p = os.path.join(root, 'train', 'ant', 'img00.png')
    Image.new('RGB', (6, 5), (255, 255, 255)).save(p)
    os.utime(p, ns=(1, 1))
    changed = data.image_folder(root)
    at = list(np.random.default_rng(sources.FOLDER_ORDER_SEED).permutation(
        len(changed.train))).index(0)  # where listing entry 0 is served
    np.testing.assert_array_equal(changed.train.images[at, 0, 0], [255] * 3)
    self.assertLen(os.listdir(self.cache), 2)

  def test_cache_off_and_read_only_cache_dir(self):
    root = _make_folder(self.tmp, test=False)
    ds = data.image_folder(root, cache_dir='off')
    self.assertIsNone(ds.test)
    self.assertEmpty(os.listdir(self.cache))
    with mock.patch('os.makedirs', side_effect=PermissionError('ro')):
      with self.assertWarnsRegex(UserWarning, 'could not write'):
        ds2 = data.image_folder(root, cache_dir=self.cache + '/sub')
    _assert_splits_equal(ds.train, ds2.train)

  def test_mismatched_sizes(self):
    root = _make_folder(self.tmp, sizes={('train', 'bee', 1): (7, 5)})
    with self.assertRaisesRegex(ValueError, 'one size.*[Rr]esize'):
      data.image_folder(root)

  def test_test_classes_must_match(self):
    root = _make_folder(self.tmp)
    os.makedirs(os.path.join(root, 'test', 'dog'))
    with self.assertRaisesRegex(ValueError, r"only in test: \['dog'\]"):
      data.image_folder(root)
    shutil.rmtree(os.path.join(root, 'test', 'dog'))
    shutil.rmtree(os.path.join(root, 'test', 'ant'))
    with self.assertRaisesRegex(ValueError, r"missing from test: \['ant'\]"):
      data.image_folder(root)

  def test_missing_or_empty_folder(self):
    missing = os.path.join(self.tmp, 'nope')
    with self.assertRaisesRegex(FileNotFoundError, 'does not exist.*'
                                r'ROOT/train/<class>/\*\.jpg'):
      data.load('folder:' + missing)
    root = tempfile.mkdtemp(dir=self.tmp)
    with self.assertRaisesRegex(FileNotFoundError, 'no train folder'):
      data.image_folder(root)
    os.makedirs(os.path.join(root, 'train'))
    with self.assertRaisesRegex(FileNotFoundError, 'no class subfolders'):
      data.image_folder(root)
    os.makedirs(os.path.join(root, 'train', 'cat'))
    with self.assertRaisesRegex(FileNotFoundError, r"\['cat'\] hold no"):
      data.image_folder(root)
    with self.assertRaisesRegex(ValueError, 'needs a path'):
      data.load('folder:')


class TfdsNamesTest(absltest.TestCase):

  def test_unknown_name_lists_known_and_folder_form(self):
    with self.assertRaisesRegex(ValueError,
                                "unknown dataset.*'cifar10'.*'imagenet2012'"
                                ".*'folder:/path/to/root'"):
      data.load('cifar-10')

  def test_missing_imagenet_says_how_to_build_it(self):
    with self.assertRaisesRegex(
        FileNotFoundError, 'ImageNet tars.*manual dir.*'
        '`tfds build imagenet2012 --manual_dir='):
      with tempfile.TemporaryDirectory() as d:
        data.load('imagenet2012', data_dir=d)

  def test_prepared_imagenet_is_not_loaded_into_memory(self):
    with tfds.testing.mock_data(num_examples=2):
      with self.assertRaisesRegex(NotImplementedError, '32x32.*folder:'):
        data.load('imagenet2012')


class RealCifar10FolderTest(absltest.TestCase):

  @pytest.mark.slow
  def test_real_cifar10_jpeg_folder(self):
    root = fixtures.cifar10_folder()
    if root is None:
      self.skipTest(f'real CIFAR-10 tarball absent: {fixtures.CIFAR10_TARBALL}'
                    ' (see ../shared/data/README.md)')
    cache = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, cache, True)
    start = time.perf_counter()
    ds = data.image_folder(root, cache_dir=cache)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    cached = data.image_folder(root, cache_dir=cache)
    cached_s = time.perf_counter() - start
    print(f'CIFAR-10 folder: extract {fixtures.cifar10_extract_seconds}s, '
          f'load {load_s:.1f}s, cached load {cached_s:.1f}s')
    self.assertEqual((len(ds.train), len(ds.test)), (50000, 10000))
    self.assertEqual(ds.num_classes, 10)
    chex.assert_shape(ds.train.images, (50000, 32, 32, 3))
    chex.assert_shape(ds.test.images, (10000, 32, 32, 3))
    np.testing.assert_array_equal(np.bincount(ds.train.labels), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [1000] * 10)
    # The search's two halves both hold every class, in about equal parts.
    for half in data.split(ds.train, 0.5):
      self.assertBetween(np.bincount(half.labels, minlength=10).min(), 2300,
                         2700)
    np.testing.assert_allclose(
        ds.mean, np.array([0.4913, 0.4821, 0.4465]) * 255, atol=1.0)
    np.testing.assert_allclose(
        ds.std, np.array([0.2452, 0.2428, 0.2606]) * 255, atol=1.0)
    _assert_splits_equal(ds.train, cached.train)
    self.assertLess(load_s, 60)


class HostSliceTest(absltest.TestCase):

  def _batch(self, n=8):
    return {'train': {'image': np.arange(n * 2).reshape(n, 2),
                      'label': np.arange(n)},
            'val': {'image': np.arange(n * 2).reshape(n, 2) + 100,
                    'label': np.arange(n) + 100}}

  def test_hosts_get_contiguous_parts_that_cover_the_batch(self):
    batch = self._batch()
    parts = [data.host_slice(batch, i, 4) for i in range(4)]
    self.assertEqual(list(parts[1]['train']['label']), [2, 3])
    self.assertEqual(list(parts[3]['val']['label']), [106, 107])
    chex.assert_shape(parts[0]['train']['image'], (2, 2))
    np.testing.assert_array_equal(
        np.concatenate([p['train']['image'] for p in parts]),
        batch['train']['image'])
    chex.assert_trees_all_equal(data.host_slice(batch, 0, 1), batch)

  def test_host_slice_errors(self):
    with self.assertRaisesRegex(ValueError, 'not divisible'):
      data.host_slice(self._batch(6), 0, 4)
    with self.assertRaisesRegex(ValueError, 'not in'):
      data.host_slice(self._batch(), 4, 4)
    with self.assertRaisesRegex(ValueError, 'same leading'):
      data.host_slice({'a': np.zeros(4), 'b': np.zeros(6)}, 0, 2)

  def test_slices_of_search_batches_are_exact_on_resume(self):
    images = np.arange(40 * 4 * 4, dtype=np.float32).reshape(40, 4, 4, 1)
    a, b = data.split(data.Split(images, np.arange(40) % 10), 0.5)
    make = lambda: data.SearchBatches(a, b, batch_size=4, seed=1,
                                      augment=data.Augment(1, True),
                                      mean=(0.,), std=(1.,))
    whole = make().batch(5)
    resumed = [data.host_slice(make().batch(5), i, 2) for i in range(2)]
    for key in ('train', 'val'):
      np.testing.assert_array_equal(
          np.concatenate([r[key]['image'] for r in resumed]),
          whole[key]['image'])


if __name__ == '__main__':
  absltest.main()

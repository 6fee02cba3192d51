"""Search batches: disjoint halves, pure in (seed, step), augmentation, tfds."""

import tempfile

from absl.testing import absltest
import chex
import numpy as np
import tensorflow_datasets as tfds

from jaxnas import data


def _split(n=40, h=6):
  images = np.arange(n * h * h, dtype=np.float32).reshape(n, h, h, 1)
  return data.Split(images, np.arange(n, dtype=np.int32) % 10)


class PipelineTest(absltest.TestCase):

  def test_halves_are_disjoint_and_in_order(self):
    a, b = data.split(_split(), 0.5)
    self.assertEqual(list(a.labels[:3]), [0, 1, 2])
    self.assertEqual(len(a) + len(b), 40)
    self.assertFalse(set(map(bytes, a.images)) & set(map(bytes, b.images)))
    with self.assertRaises(ValueError):
      data.split(_split(), 1.0)

  def test_batches_are_pure_functions_of_seed_and_step(self):
    a, b = data.split(_split(), 0.5)
    kw = dict(batch_size=4, augment=data.Augment(1, True), mean=(8.,),
              std=(4.,))
    one = data.SearchBatches(a, b, seed=3, **kw)
    two = data.SearchBatches(a, b, seed=3, **kw)
    for step in (7, 0, 12):  # any order
      chex.assert_trees_all_equal(one.batch(step), two.batch(step))
    self.assertFalse(np.array_equal(one.batch(1)['train']['image'],
                                    one.batch(2)['train']['image']))
    other = data.SearchBatches(a, b, seed=4, **kw)
    self.assertFalse(np.array_equal(one.batch(0)['val']['label'],
                                    other.batch(0)['val']['label']))
    batch = one.batch(0)
    chex.assert_shape(batch['train']['image'], (4, 6, 6, 1))
    chex.assert_type(batch['train']['label'], np.int32)

  def test_an_epoch_visits_each_weight_example_once(self):
    a, b = data.split(_split(), 0.5)
    batches = data.SearchBatches(a, b, batch_size=5, seed=0, augment=None,
                                 mean=(0.,), std=(1.,))
    self.assertEqual(batches.steps_per_epoch, 4)
    seen = np.concatenate([batches.weights_batch(s)['image'].reshape(5, -1)
                           for s in range(4)])
    self.assertLen({r.tobytes() for r in seen}, 20)

  def test_crop_pads_with_zeros_and_flip(self):
    img = np.ones((1, 4, 4, 1), np.float32)
    rng = np.random.default_rng(0)
    crops = [data.pipeline.augment_batch(img, rng, data.Augment(2, False))
             for _ in range(20)]
    self.assertTrue(any(c.min() == 0 for c in crops))
    self.assertTrue(all(c.shape == img.shape for c in crops))
    ramp = np.arange(4, dtype=np.float32).reshape(1, 1, 4, 1) * np.ones(
        (1, 4, 4, 1))
    flips = [data.pipeline.augment_batch(ramp, rng, data.Augment(0, True))
             for _ in range(20)]
    self.assertTrue(any(np.array_equal(f, ramp[:, :, ::-1]) for f in flips))

  def test_cutout_masks_one_clipped_square(self):
    rng = np.random.default_rng(0)
    masks = data.cutout_mask(2000, 32, 32, 16, rng)
    interior = 0
    for m in masks:
      ys, xs = np.nonzero(~m)
      y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
      # The zeros fill one axis-aligned rectangle exactly.
      self.assertEqual(len(ys), (y1 - y0) * (x1 - x0))
      self.assertTrue(np.all(~m[y0:y1, x0:x1]))
      # A side is 16 unless the square was clipped at that border.
      for lo, hi in ((y0, y1), (x0, x1)):
        self.assertLessEqual(hi - lo, 16)
        if hi - lo < 16:
          self.assertTrue(lo == 0 or hi == 32, (lo, hi))
      interior += (y1 - y0, x1 - x0) == (16, 16)
    # Centres uniform over 32x32: the square fits when 8 <= cy, cx <= 24
    # (17 of 32 values each): (17/32)^2 = 0.28 of the images.
    self.assertBetween(interior / 2000, 0.24, 0.32)

  def test_train_batches_cut_out_after_normalising(self):
    split = _split(40, 8)
    kw = dict(batch_size=8, seed=3, mean=(0.5,), std=(50.,))  # no 0 left
    plain = data.TrainBatches(split, augment=data.Augment(1, True), **kw)
    cut = data.TrainBatches(split, augment=data.Augment(1, True, cutout=4),
                            **kw)
    self.assertEqual(plain.steps_per_epoch, 5)
    for step in (0, 7):
      a, b = plain.batch(step), cut.batch(step)
      np.testing.assert_array_equal(a['label'], b['label'])
      hole = b['image'] != a['image']
      # Only zeros differ, and every image has a hole of at most 4x4.
      np.testing.assert_array_equal(b['image'][hole], 0.)
      counts = (b['image'] == 0).reshape(8, -1).sum(1)
      self.assertTrue(np.all((counts >= 1) & (counts <= 16)), counts)
    # An epoch visits every example once.
    seen = np.concatenate([plain.batch(s)['label'] for s in range(5)])
    np.testing.assert_array_equal(np.bincount(seen, minlength=10),
                                  np.full(10, 4))

  def test_eval_batches_pad_with_negative_labels(self):
    batches = list(data.eval_batches(_split(10), 4, (0.,), (1.,)))
    self.assertLen(batches, 3)
    self.assertEqual(list(batches[-1]['label']), [8, 9, -1, -1])

  def test_digits(self):
    ds = data.load('digits')
    self.assertEqual((len(ds.train), len(ds.test)), (1500, 297))
    chex.assert_shape(ds.train.images, (1500, 8, 8, 1))
    self.assertEqual(ds.num_classes, 10)

  def test_unknown_dataset(self):
    with self.assertRaisesRegex(ValueError, 'unknown dataset'):
      data.load('mnist-but-misspelt')

  def test_cifar10_through_tfds(self):
    with tfds.testing.mock_data(num_examples=12):
      ds = data.load('cifar10')
    chex.assert_shape(ds.train.images, (12, 32, 32, 3))
    self.assertEqual(ds.num_classes, 10)
    self.assertEqual(ds.train.images.dtype, np.uint8)

  def test_missing_tfds_dataset_is_a_clear_error(self):
    with self.assertRaisesRegex(FileNotFoundError, 'tfds build cifar10'):
      data.load('cifar10', data_dir=tempfile.mkdtemp())


if __name__ == '__main__':
  absltest.main()

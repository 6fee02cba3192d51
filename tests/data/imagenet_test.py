"""ImageNet batches by index: pure in (seed, step), per host, augmentation."""

from absl.testing import absltest
import chex
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from jaxnas.data import imagenet


def _source(n=20):
  rng = np.random.default_rng(0)
  sizes = [(30 + 7 * i % 50, 40 + 11 * i % 60) for i in range(n)]
  return [{'image': rng.integers(0, 256, s + (3,), dtype=np.uint8),
           'label': i} for i, s in enumerate(sizes)]


class ImageNetBatchesTest(absltest.TestCase):

  def test_pure_in_step_and_split_over_hosts(self):
    src = _source()
    kw = dict(batch_size=4, seed=1, image_size=32, workers=2)
    one = imagenet.ImageNetBatches(src, **kw)
    self.assertEqual(one.steps_per_epoch, 5)
    a = one.batch(3)
    chex.assert_shape(a['image'], (4, 32, 32, 3))
    np.testing.assert_array_equal(a['image'],
                                  imagenet.ImageNetBatches(src, **kw).batch(3)
                                  ['image'])
    # Two hosts read the two halves of the same global batch.
    halves = [imagenet.ImageNetBatches(src, process_index=r, process_count=2,
                                       **kw).batch(3) for r in (0, 1)]
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([h[key] for h in halves]), a[key])
    # An epoch visits every example once; the next epoch reshuffles.
    epoch0 = np.concatenate([one.indices(s) for s in range(5)])
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(20))
    self.assertFalse(np.array_equal(
        epoch0, np.concatenate([one.indices(s) for s in range(5, 10)])))
    np.testing.assert_array_equal(a['label'], one.indices(3))

  def test_normalised_with_imagenet_statistics(self):
    src = [{'image': np.full((40, 50, 3), 128, np.uint8), 'label': 0}] * 4
    b = imagenet.ImageNetBatches(src, batch_size=4, seed=0, image_size=16,
                                 jitter=False, workers=1).batch(0)
    expected = (128 - np.asarray(imagenet.MEAN)) / np.asarray(imagenet.STD)
    np.testing.assert_allclose(b['image'], np.broadcast_to(
        expected, b['image'].shape).astype(np.float32), rtol=1e-5)

  def test_crops(self):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    for _ in range(20):
      self.assertEqual(imagenet.random_resized_crop(img, 24, rng).size,
                       (24, 24))
    # A 1x200 strip cannot hold any crop of ratio 3/4..4/3 and area >= 8%:
    # the fallback centre crop at ratio 4/3 is the 1x1 middle pixel.
    strip = np.zeros((1, 200, 3), np.uint8)
    strip[0, 96:103] = 255  # around the fallback box, column (200 - 1) // 2
    out = np.asarray(imagenet.random_resized_crop(strip, 4, rng))
    self.assertTrue(np.all(out == 255))
    strip[:] = 0
    strip[0, 99] = 255     # the box's own pixel: the output is symmetric
    out = np.asarray(imagenet.random_resized_crop(strip, 4, rng))
    np.testing.assert_array_equal(out, out[:, ::-1])
    self.assertGreater(out.min(), 0)
    # Resize(256) of the shorter side then CenterCrop(224).
    grad = np.tile(np.arange(512, dtype=np.float64)[None, :, None] / 2,
                   (256, 1, 3)).astype(np.uint8)
    crop = imagenet.center_crop(grad)
    chex.assert_shape(crop, (224, 224, 3))
    self.assertEqual(int(crop[0, 112, 0]), 128)  # column 144 + 112 = 256

  def test_color_jitter_hue_wraps_and_identity_factors(self):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    same = imagenet.color_jitter(img, np.random.default_rng(1), 0., 0., 0.,
                                 0.)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(img))
    out = imagenet.color_jitter(img, np.random.default_rng(2), 0., 0., 0.,
                                0.5)
    # Replay the draws: a permutation, then the hue shift alone.
    replay = np.random.default_rng(2)
    replay.permutation(4)
    shift = np.uint8(int(round(replay.uniform(-.5, .5) * 255)) % 256)
    h, s, v = img.convert('HSV').split()
    h = Image.fromarray(np.asarray(h, np.uint8) + shift, 'L')  # wraps at 256
    expected = Image.merge('HSV', (h, s, v)).convert('RGB')
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    self.assertFalse(np.array_equal(np.asarray(out), np.asarray(img)))

  def test_eval_batches_pad_and_split_over_hosts(self):
    src = _source(10)
    whole = list(imagenet.eval_batches(src, 4, workers=1))
    self.assertLen(whole, 3)
    np.testing.assert_array_equal(whole[-1]['label'], [8, 9, -1, -1])
    parts = [list(imagenet.eval_batches(src, 4, process_index=r,
                                        process_count=2, workers=1))
             for r in (0, 1)]
    for b, p0, p1 in zip(whole, *parts):
      np.testing.assert_array_equal(
          np.concatenate([p0['label'], p1['label']]), b['label'])

  def test_tfds_sources_under_mock_data(self):
    with tfds.testing.mock_data(num_examples=6):
      train, val = imagenet.sources()
      self.assertLen(train, 6)
      b = imagenet.ImageNetBatches(train, batch_size=2, seed=0,
                                   image_size=32, workers=2).batch(1)
      chex.assert_shape(b['image'], (2, 32, 32, 3))
      self.assertTrue(np.all((b['label'] >= 0) & (b['label'] < 1000)))
      first = next(imagenet.eval_batches(val, 4, workers=2))
      chex.assert_shape(first['image'], (4, 224, 224, 3))


if __name__ == '__main__':
  absltest.main()

"""Pictures: genotype cells, architecture-weight heatmaps and trajectories."""

import os
import shutil
import tempfile

from absl.testing import absltest
import numpy as np
from PIL import Image

from jaxnas.spaces import genotype as genotype_lib
from jaxnas.spaces import viz
from tests.spaces.genotype_test import DARTS_V2
from tests.spaces.genotype_test import PRIMS as PRIMITIVES


def _softmax_weights(rng, edges=14, ops=8):
  out = {}
  for cell in ('normal', 'reduce'):
    a = rng.normal(size=(edges, ops))
    e = np.exp(a - a.max(-1, keepdims=True))
    out[cell] = e / e.sum(-1, keepdims=True)
  return out


class VizTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.dir, True)

  def assert_not_blank(self, path):
    self.assertGreater(os.path.getsize(path), 0)
    with Image.open(path) as im:
      pixels = np.asarray(im.convert('RGB'), np.float64)
    self.assertGreater(min(pixels.shape[:2]), 100)
    self.assertGreater(len(np.unique(pixels.reshape(-1, 3), axis=0)), 10)
    self.assertGreater(pixels.std(), 10.)
    return pixels

  def test_edge_labels(self):
    labels = viz.default_edge_labels(14)
    self.assertEqual(labels[:3], ['0\u21922', '1\u21922', '0\u21923'])
    self.assertEqual(labels[-1], '4\u21925')
    self.assertEqual(viz.default_edge_labels(9)[-1], '3\u21924')
    self.assertEqual(viz.default_edge_labels(4), ['edge 0', 'edge 1',
                                                  'edge 2', 'edge 3'])

  def test_heatmap(self):
    weights = _softmax_weights(np.random.default_rng(0))
    path = viz.plot_alpha_heatmap(weights, None, PRIMITIVES,
                                  os.path.join(self.dir, 'heat.png'))
    pixels = self.assert_not_blank(path)
    # viridis' dark end is present (the cells with small weights)
    self.assertTrue(np.any(np.all(np.abs(pixels - [68, 1, 84]) < 30, -1)))
    labels = {'normal': [f'n{e}' for e in range(14)]}  # reduce: defaults
    self.assert_not_blank(viz.plot_alpha_heatmap(
        weights, labels, PRIMITIVES, os.path.join(self.dir, 'heat2.png')))
    with self.assertRaisesRegex(ValueError, 'edge labels'):
      viz.plot_alpha_heatmap(weights, {'normal': ['a']}, PRIMITIVES,
                             os.path.join(self.dir, 'bad.png'))
    with self.assertRaisesRegex(ValueError, r'\[edges, 7 ops\]'):
      viz.plot_alpha_heatmap(weights, None, PRIMITIVES[:7],
                             os.path.join(self.dir, 'bad.png'))

  def test_trajectories(self):
    rng = np.random.default_rng(1)
    history = [_softmax_weights(rng) for _ in range(6)]
    path = viz.plot_alpha_trajectories(
        history, PRIMITIVES, os.path.join(self.dir, 'traj.png'))
    pixels = self.assert_not_blank(path)
    # every op's line colour appears (sep_conv_3x3 red, dil_conv_3x3 green)
    for colour in ('#d62728', '#2ca02c', '#9467bd'):
      rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
      self.assertTrue(np.any(np.all(np.abs(pixels - rgb) < 8, -1)), colour)
    one_epoch = viz.plot_alpha_trajectories(
        history[:1], PRIMITIVES, os.path.join(self.dir, 'one.png'))
    self.assert_not_blank(one_epoch)
    with self.assertRaisesRegex(ValueError, 'empty'):
      viz.plot_alpha_trajectories([], PRIMITIVES, 'x.png')

  def test_mixture_entropy_exact_values_and_plot(self):
    self.assertAlmostEqual(viz.mixture_entropy(np.full((14, 8), 1 / 8)),
                           np.log(8), places=12)
    self.assertEqual(viz.mixture_entropy(np.eye(4)), 0.)
    half = np.array([[0.5, 0.5, 0.], [1., 0., 0.]])  # log 2 and 0: mean
    self.assertAlmostEqual(viz.mixture_entropy(half), np.log(2) / 2,
                           places=12)
    rng = np.random.default_rng(2)
    history = [_softmax_weights(rng) for _ in range(4)]
    self.assert_not_blank(viz.plot_entropy(
        history, os.path.join(self.dir, 'entropy.png')))
    with self.assertRaisesRegex(ValueError, 'empty'):
      viz.plot_entropy([], 'x.png')

  def test_group_means_exact_values_and_plot(self):
    w = np.array([[1., 2., 3., 4.], [5., 6., 7., 8.]])
    conv = np.array([True, False, False, True])
    self.assertEqual(viz.group_means(w, conv), (1 + 4 + 5 + 8) / 4)
    self.assertEqual(viz.group_means(w, ~conv), (2 + 3 + 6 + 7) / 4)
    rng = np.random.default_rng(3)
    history = [_softmax_weights(rng) for _ in range(3)]
    groups = {'parametric': np.arange(8) >= 4, 'free': np.arange(8) < 4}
    self.assert_not_blank(viz.plot_group_means(
        history, groups, os.path.join(self.dir, 'groups.png')))
    with self.assertRaisesRegex(ValueError, 'no ops'):
      viz.plot_group_means(history, {'x': np.zeros(8, bool)}, 'x.png')

  def test_switches_picture(self):
    rng = np.random.default_rng(4)
    history = [{t: rng.random((14, 8)) < 0.5 for t in ('normal', 'reduce')}
               for _ in range(3)]
    self.assert_not_blank(viz.plot_switches(
        history, PRIMITIVES, os.path.join(self.dir, 'switches.png')))
    with self.assertRaisesRegex(ValueError, 'columns'):
      viz.plot_switches(history, PRIMITIVES[:5], 'x.png')

  def test_genotype_pictures_are_not_blank(self):
    g = genotype_lib.Genotype.from_string(DARTS_V2)
    for path in viz.plot_genotype(g, os.path.join(self.dir, 'g_')):
      self.assert_not_blank(path)


if __name__ == '__main__':
  absltest.main()

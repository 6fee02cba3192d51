"""experiments.compare: several workdirs' curves in one picture."""

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np
from PIL import Image

from experiments import compare
from jaxnas import ops


def _workdir(root, name, epochs, rng, raw=True):
  wd = os.path.join(root, name)
  os.makedirs(os.path.join(wd, 'alphas'))
  with open(os.path.join(wd, 'config.json'), 'w') as f:
    json.dump({'primitives': list(ops.DARTS_PRIMITIVES)}, f)
  for e in range(epochs):
    arrays = {}
    for t in ('normal', 'reduce'):
      a = rng.normal(size=(14, 8))
      w = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
      arrays[f'weights_{t}'] = w
      if raw:
        arrays[f'alpha_{t}'] = a
    np.savez(os.path.join(wd, 'alphas', f'epoch_{e:03d}.npz'), **arrays)
  return wd


class CompareTest(absltest.TestCase):

  def test_pictures_over_the_common_epochs(self):
    root = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    runs = {'darts': _workdir(root, 'a', 3, rng),
            'dropnas': _workdir(root, 'b', 2, rng)}
    weights, alphas, prims = compare.load_run(runs['darts'])
    self.assertLen(weights, 3)
    self.assertLen(alphas, 3)
    self.assertEqual(prims, ops.DARTS_PRIMITIVES)
    out = os.path.join(root, 'out')
    paths = compare.compare(runs, out)
    self.assertEqual([os.path.basename(p) for p in paths],
                     ['entropy.png', 'group_alphas.png'])
    for p in paths:
      with Image.open(p) as im:
        self.assertGreater(np.asarray(im.convert('L'), np.float32).std(), 5.)
    # A run without raw alphas (GAEA's simplex is its weights) gets only
    # the entropy picture; an empty workdir is an error.
    runs['gaea'] = _workdir(root, 'c', 2, rng, raw=False)
    self.assertEqual([os.path.basename(p) for p in compare.compare(
        runs, os.path.join(root, 'out2'))], ['entropy.png'])
    with self.assertRaisesRegex(FileNotFoundError, 'no alphas'):
      compare.load_run(root)


if __name__ == '__main__':
  absltest.main()

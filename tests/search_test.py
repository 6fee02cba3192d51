"""The search entry point end to end on a tiny config."""

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from experiments import search
from experiments.configs import darts as darts_config
from jaxnas.spaces import genotype as genotype_lib


class SearchTest(absltest.TestCase):

  def test_tiny_search_writes_a_valid_genotype(self):
    config = darts_config.get_config('tiny')
    config.epochs = 1
    config.max_steps_per_epoch = 3
    workdir = tempfile.mkdtemp()
    state, genotype = search.search(config, workdir)
    with open(os.path.join(workdir, 'genotype.json')) as f:
      loaded = genotype_lib.Genotype.from_json(f.read())
    self.assertEqual(loaded, genotype)
    self.assertLen(loaded.normal, 8)
    self.assertLen(loaded.reduce, 8)
    self.assertEqual(int(state.step), 3)
    for name in ('normal.png', 'reduce.png', 'genotype.txt', 'alphas.npz'):
      self.assertTrue(os.path.exists(os.path.join(workdir, name)), name)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      record = json.loads(f.readline())
    self.assertTrue(np.isfinite(record['train_loss']))
    self.assertBetween(record['valid_acc'], 0., 1.)
    alphas = np.load(os.path.join(workdir, 'alphas.npz'))
    np.testing.assert_allclose(alphas['weights_normal'].sum(-1), 1.,
                               rtol=1e-5)

  def test_unknown_variant(self):
    with self.assertRaisesRegex(ValueError, 'unknown variant'):
      darts_config.get_config('imagenet-9000')


if __name__ == '__main__':
  absltest.main()

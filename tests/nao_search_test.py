"""experiments.nao: the whole NAO-V2 loop on digits, and its resume."""

import json
import os
import shutil
import tempfile

from absl.testing import absltest
import numpy as np

from experiments import nao as nao_search
from experiments.configs import nao as nao_config
from jaxnas.spaces import nao


def _config(**overrides):
  """The smallest loop: 2 reduction cells of one node, 2 phases of 3 steps,
  6 seeds + 3 new, a 3-epoch EPD, re-ranking the top 1 for 2 steps."""
  c = nao_config.get_config('tiny')
  with c.unlocked():
    c.update(dict(layers=0, nodes=1, channels=4, batch_size=16,
                  max_steps_per_epoch=3, phases=2, seed_archs=6, new_archs=3,
                  top_archs=3, epd_epochs=3, epd_batch_size=8,
                  eval_batch_size=20, pool_block=2, rerank_top=1,
                  rerank_max_steps_per_epoch=2, checkpoint_every_steps=2,
                  num_devices=2, progress=False, tensorboard=False),
             **overrides)
  return c


def _read(path):
  with open(path) as f:
    return f.read()


class NaoSearchTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.workdir, ignore_errors=True)

  def test_whole_loop_then_redo_of_a_lost_round(self):
    config = _config()
    final = nao_search.search(config, self.workdir)
    rounds = os.path.join(self.workdir, 'rounds')
    r0 = json.loads(_read(os.path.join(rounds, '0.json')))
    r1 = json.loads(_read(os.path.join(rounds, '1.json')))
    # Phase 0 scores its 6 seeds, sorted best first.
    self.assertLen(r0['pool'], 6)
    self.assertEqual(r0['acc'], sorted(r0['acc'], reverse=True))
    # The EPD's 3 new architectures are valid and not in the pool.
    self.assertLen(r0['new'], 3)
    enc = nao.encoding(1)
    for a in r0['new']:
      self.assertTrue(enc.valid(nao.to_tokens(a, 1)))
      self.assertNotIn(' '.join(map(str, a)), r0['pool'])
    self.assertIn('epd_loss', r0)
    # Phase 1 re-scores the accumulated pool; the last phase generates none.
    self.assertCountEqual(r1['pool'], r0['pool'] + [
        ' '.join(map(str, a)) for a in r0['new']])
    self.assertEqual(r1['new'], [])
    # Final outputs: the sorted pool, the re-ranked top 1, the best.
    self.assertEqual([p['arch'] for p in final['pool']], r1['pool'])
    self.assertLen(final['rerank'], 1)
    self.assertEqual(final['best'], r1['pool'][0])
    self.assertEqual(_read(os.path.join(self.workdir, 'best_arch.txt')),
                     final['best'] + '\n')
    self.assertEqual(_read(os.path.join(self.workdir, 'arch_pool.final')),
                     final['best'] + '\n')
    records = [json.loads(line) for line in _read(os.path.join(
        self.workdir, 'metrics.jsonl')).splitlines()]
    phases = [r for r in records if 'pool_size' in r]
    self.assertEqual([r['pool_size'] for r in phases], [6, 9])
    self.assertTrue(all(np.isfinite(r['train_loss'])
                        for r in records if 'train_loss' in r))

    # A run that stopped after its last step but before the last round was
    # written: rerunning redoes that round from the checkpoint, the same.
    os.remove(os.path.join(rounds, '1.json'))
    os.remove(os.path.join(self.workdir, 'final.json'))
    again = nao_search.search(config, self.workdir)
    untimed = lambda r: {k: v for k, v in r.items() if k != 'score_seconds'}
    self.assertEqual(
        untimed(json.loads(_read(os.path.join(rounds, '1.json')))),
        untimed(r1))
    self.assertEqual(again, final)
    self.assertEqual([untimed(json.loads(line)) for line in _read(
        os.path.join(self.workdir, 'metrics.jsonl')).splitlines()],
                     [untimed(r) for r in records])

  def test_bad_config_fails_before_building(self):
    with self.assertRaisesRegex(nao_search.ConfigError, 'channels must be'):
      nao_search.search(_config(channels=5), self.workdir)
    self.assertEqual(os.listdir(self.workdir), [])


if __name__ == '__main__':
  absltest.main()

"""The NAS-Bench-201 table on the real data, and its errors on made-up files.

The real table lies in ../shared/data/nb201 (see its README); the tests that
need it skip where it is absent.
"""

import importlib.util
import os
import shutil
import tempfile
import time

from absl.testing import absltest
import numpy as np

from jaxnas.benchmarks import nb201 as bench
from jaxnas.spaces import nb201
from tests import fixtures

NB201_CSV = os.path.join(fixtures.SHARED_DATA, 'nb201', bench.CSV_NAME)
BEST_C100 = ('|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+'
             '|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|')
ALL_SKIP = nb201.Arch(('skip_connect',) * 6)
ALL_NONE = nb201.Arch(('none',) * 6)


class RealTableTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if not os.path.exists(NB201_CSV):
      raise absltest.SkipTest(f'{NB201_CSV} is absent: no NAS-Bench-201 table '
                              'to test against (see ../shared/data/README.md)')
    start = time.perf_counter()
    cls.table = bench.Table.load(NB201_CSV)
    cls.load_seconds = time.perf_counter() - start

  def test_loads_quickly_whole(self):
    self.assertLess(self.load_seconds, 5.)
    self.assertLen(self.table, 15_625)
    self.assertIn('cifar10_test', self.table.metrics)
    self.assertLen(self.table.metrics, 12)
    # A folder holding the CSV works too.
    self.assertLen(bench.Table.load(os.path.dirname(NB201_CSV)), 15_625)

  def test_codec_round_trips_every_arch(self):
    with open(NB201_CSV) as f:
      next(f)
      rows = [line.split(',')[:2] for line in f]
    for index, text in rows:
      arch = nb201.Arch.from_string(text)
      self.assertEqual(arch.to_string(), text)
      self.assertEqual(self.table.index(arch), int(index))
      self.assertEqual(self.table.arch(int(index)), arch)
    # The table holds exactly the 5^6 cells of the space.
    self.assertEqual({self.table.arch(i) for i in range(len(self.table))},
                     set(nb201.all_archs()))

  def test_known_rows(self):
    t = self.table
    self.assertEqual(t.index(BEST_C100), 9930)
    self.assertEqual(t.index(nb201.Arch.from_string(BEST_C100)), 9930)
    index, arch, acc = t.best('cifar10_test')
    self.assertEqual((index, acc), (6111, 94.3733))
    self.assertEqual(arch, t.arch(6111))
    self.assertEqual(t.index(ALL_SKIP), 1835)
    self.assertAlmostEqual(t.accuracy(ALL_SKIP, 'cifar10'), 54.30, places=2)
    self.assertEqual(t.index(ALL_NONE), 1651)
    row = t.lookup(ALL_NONE)
    self.assertEqual((row['cifar10_test'], row['cifar100_test'],
                      row['imagenet16_test']), (10.0, 1.0, 0.8333))
    self.assertEqual(set(row), set(t.metrics))
    self.assertEqual(t.best('cifar100'), (9930, t.arch(9930), 73.5133))
    self.assertEqual(t.best('ImageNet16-120')[::2], (857, 47.3111))

  def test_rank_and_regret(self):
    t = self.table
    # cifar10_test: 6111 and 13714 tie at 94.3733 (both rank 1); 9930 has
    # 94.3633, third.
    self.assertEqual(t.lookup(13714)['cifar10_test'], 94.3733)
    self.assertEqual((t.rank(6111), t.rank(13714)), (1, 1))
    self.assertEqual((t.regret(6111), t.regret(13714)), (0., 0.))
    self.assertEqual(t.rank(BEST_C100, 'cifar10_test'), 3)
    self.assertAlmostEqual(t.regret(BEST_C100, 'cifar10'), 0.01, places=9)
    self.assertEqual(t.rank(BEST_C100, 'cifar100'), 1)
    self.assertEqual(t.regret(BEST_C100, 'cifar100_test'), 0.)
    # 341 cells score the minimum 10.0 on cifar10_test and share the rank
    # after the 15,625 - 341 better ones.
    worst = t.values('cifar10') == 10.0
    self.assertEqual(int(worst.sum()), 341)
    self.assertEqual(t.rank(ALL_NONE), 15_625 - 341 + 1)
    self.assertAlmostEqual(t.regret(ALL_NONE), 84.3733, places=9)
    report = t.report(BEST_C100)
    self.assertEqual(report['index'], 9930)
    self.assertEqual(report['cifar100_test'],
                     {'accuracy': 73.5133, 'rank': 1, 'regret': 0.})

  def test_aliases(self):
    t = self.table
    for alias, column in (('cifar10', 'cifar10_test'),
                          ('CIFAR100', 'cifar100_test'),
                          ('imagenet16-120', 'imagenet16_test'),
                          ('cifar10-valid', 'cifar10_valid'),
                          ('cifar100_valid', 'cifar100_valid')):
      self.assertEqual(t.metric(alias), column)
    with self.assertRaisesRegex(ValueError, 'unknown metric'):
      t.rank(BEST_C100, 'svhn')

  def test_random_stats(self):
    t = self.table
    v = t.values('cifar10_test')
    stats = t.random_stats('cifar10')
    self.assertEqual(stats['n'], 15_625)
    self.assertAlmostEqual(stats['mean'], float(np.mean(v)))
    self.assertAlmostEqual(stats['std'], float(np.std(v)))
    self.assertTrue(80. < stats['mean'] < 90.)
    some = t.random_stats('cifar10', n=100, seed=3)
    self.assertEqual(some, t.random_stats('cifar10', n=100, seed=3))
    self.assertNotEqual(some, t.random_stats('cifar10', n=100, seed=4))
    self.assertEqual(some['n'], 100)
    with self.assertRaisesRegex(ValueError, 'n must be'):
      t.random_stats('cifar10', n=20_000)

  def test_lookup_errors(self):
    t = self.table
    with self.assertRaisesRegex(ValueError, 'nodes'):
      t.index('|none~0|+|none~0|none~1|')
    with self.assertRaises(IndexError):
      t.arch(15_625)
    with self.assertRaises(ValueError):
      t.lookup(3.5)
    self.assertIn(BEST_C100, t)
    self.assertNotIn('not an arch', t)
    with self.assertRaisesRegex(ValueError, 'read-only'):
      t.values()[0] = 1.


class MadeUpTableTest(absltest.TestCase):

  def _write(self, text):
    folder = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, folder)
    path = os.path.join(folder, 'table.csv')
    with open(path, 'w') as f:
      f.write(text)
    return path

  def test_missing_file(self):
    missing = os.path.join(tempfile.gettempdir(), 'no_such_dir', 'x.csv')
    with self.assertRaisesRegex(FileNotFoundError, 'no_such_dir'):
      bench.Table.load(missing)

  def test_small_table(self):
    a, b = ALL_SKIP.to_string(), ALL_NONE.to_string()
    t = bench.Table.load(self._write(
        f'index,arch,cifar10_test\n1,{a},50.5\n0,{b},10.0\n'))
    self.assertEqual((len(t), t.index(ALL_NONE), t.index(a)), (2, 0, 1))
    self.assertEqual(t.best('cifar10'), (1, ALL_SKIP, 50.5))
    self.assertEqual(t.rank(ALL_NONE), 2)
    with self.assertRaises(KeyError):
      t.index(BEST_C100)

  def test_malformed_files(self):
    a, b = ALL_SKIP.to_string(), ALL_NONE.to_string()
    for text, message in (
        ('idx,arch,x\n0,{a},1\n', 'header'),
        ('index,arch,x\n0,{a},1,2\n', 'fields'),
        ('index,arch,x\n0,{a},high\n', 'non-numeric'),
        ('index,arch,x\n0,{a},1\n2,{b},1\n', 'index column'),
        ('index,arch,x\n0,{a},1\n1,{a},1\n', 'appears at indices'),
        ('index,arch,x\n0,|none~0|,1\n', 'nodes'),
    ):
      with self.subTest(message):
        with self.assertRaisesRegex(ValueError, message):
          bench.Table.load(self._write(text.format(a=a, b=b)))

  def test_from_nats_bench_needs_the_package(self):
    if importlib.util.find_spec('nats_bench') is not None:
      self.skipTest('nats_bench is installed')
    with self.assertRaisesRegex(ImportError, 'pip install nats_bench'):
      bench.Table.from_nats_bench(None)


if __name__ == '__main__':
  absltest.main()

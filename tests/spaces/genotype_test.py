"""Genotype derivation on hand-built weights, printed form, JSON, picture."""

import os
import tempfile

from absl.testing import absltest
import numpy as np

from jaxnas.spaces import genotype as genotype_lib
from jaxnas.spaces import viz

PRIMS = genotype_lib.ops.DARTS_PRIMITIVES
IDX = {n: i for i, n in enumerate(PRIMS)}

DARTS_V2 = (
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
    "('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), "
    "('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
    "normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
    "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), "
    "('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
    "('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])")


def _weights(entries):
  """(14, 8) weights of 0.01 with {(edge, op): value} set."""
  w = np.full((14, 8), 0.01)
  for (e, op), v in entries.items():
    w[e, IDX[op]] = v
  return w


class DeriveTest(absltest.TestCase):

  def test_hand_built(self):
    normal = _weights({
        # node 0 (edges 0, 1): 'none' strongest on edge 0 is ignored.
        (0, 'none'): 0.9, (0, 'sep_conv_3x3'): 0.05,
        (1, 'max_pool_3x3'): 0.2,
        # node 1 (edges 2-4): top-2 by strongest non-none op: edges 4 and 2.
        (2, 'dil_conv_5x5'): 0.3, (3, 'skip_connect'): 0.1,
        (4, 'sep_conv_5x5'): 0.6,
        # node 2 (edges 5-8): a tie between edges 6 and 8 keeps input 1 first;
        # on edge 6 the op tie keeps the earlier op (avg_pool before skip).
        (6, 'avg_pool_3x3'): 0.4, (6, 'skip_connect'): 0.4,
        (8, 'dil_conv_3x3'): 0.4, (5, 'sep_conv_3x3'): 0.39,
        # node 3 (edges 9-13): inputs 4 and 0.
        (13, 'sep_conv_3x3'): 0.8, (9, 'dil_conv_3x3'): 0.7,
        (12, 'none'): 0.99,
    })
    reduce = _weights({(e, 'max_pool_3x3'): 0.5 + 0.01 * e for e in range(14)})
    g = genotype_lib.derive({'normal': normal, 'reduce': reduce})
    self.assertEqual(g.normal, [
        ('max_pool_3x3', 1), ('sep_conv_3x3', 0),
        ('sep_conv_5x5', 2), ('dil_conv_5x5', 0),
        ('avg_pool_3x3', 1), ('dil_conv_3x3', 3),
        ('sep_conv_3x3', 4), ('dil_conv_3x3', 0)])
    # Reduce: weights grow with edge id, so each node keeps its last two.
    self.assertEqual([j for _, j in g.reduce], [1, 0, 2, 1, 3, 2, 4, 3])
    self.assertEqual(g.normal_concat, [2, 3, 4, 5])

  def test_all_none_strongest_still_picks_real_ops(self):
    w = _weights({(e, 'none'): 0.99 for e in range(14)})
    g = genotype_lib.derive({'normal': w, 'reduce': w})
    self.assertNotIn('none', [op for op, _ in g.normal + g.reduce])
    # Equal scores everywhere: inputs 0 and 1, first non-none op.
    self.assertEqual(g.normal[:2], [('max_pool_3x3', 0), ('max_pool_3x3', 1)])

  def test_per_edge_ops(self):
    names = [('skip_connect', 'sep_conv_3x3')] * 14
    w = np.tile([0.3, 0.7], (14, 1))
    g = genotype_lib.derive({'normal': w, 'reduce': w},
                            {'normal': names, 'reduce': names})
    self.assertEqual({op for op, _ in g.normal}, {'sep_conv_3x3'})

  def test_shape_errors(self):
    with self.assertRaisesRegex(ValueError, 'edges'):
      genotype_lib.derive({'normal': np.ones((13, 8)),
                           'reduce': np.ones((14, 8))})


class FormatTest(absltest.TestCase):

  def test_printed_form_round_trip(self):
    g = genotype_lib.Genotype.from_string(DARTS_V2)
    self.assertEqual(str(g), DARTS_V2)
    self.assertEqual(genotype_lib.Genotype.from_json(g.to_json()), g)

  def test_reference_range_concat(self):
    g = genotype_lib.Genotype.from_string(
        DARTS_V2.replace('normal_concat=[2, 3, 4, 5]',
                         'normal_concat=range(2, 6)'))
    self.assertEqual(g.normal_concat, [2, 3, 4, 5])

  def test_invalid(self):
    with self.assertRaisesRegex(ValueError, 'unknown op'):
      genotype_lib.Genotype.from_string(DARTS_V2.replace('dil_conv_3x3',
                                                         'dil_conv_9x9'))
    with self.assertRaisesRegex(ValueError, 'cannot read input'):
      genotype_lib.Genotype.from_string(DARTS_V2.replace(
          "('sep_conv_3x3', 1), ('sep_conv_3x3', 0)",
          "('sep_conv_3x3', 1), ('sep_conv_3x3', 3)", 1))
    with self.assertRaisesRegex(ValueError, 'not a genotype JSON'):
      genotype_lib.Genotype.from_json('{broken')

  def test_picture(self):
    g = genotype_lib.Genotype.from_string(DARTS_V2)
    with tempfile.TemporaryDirectory() as d:
      paths = viz.plot_genotype(g, os.path.join(d, ''))
      for p in paths:
        with open(p, 'rb') as f:
          self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')


if __name__ == '__main__':
  absltest.main()

"""P-DARTS: dropout schedule, skip dropout, pruning, skip cap, the step."""

import functools

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import ops
from jaxnas.methods import pdarts
from jaxnas.spaces import darts as darts_space
from jaxnas.spaces import nb201
from tests.methods import helpers

PRIMS = ops.DARTS_PRIMITIVES
B, H = 8, 8
_batch = functools.partial(helpers.random_batch, n=B, size=H)


def _reference_rate(epoch, r, epochs=25, no_arch=10):
  """train_search.py, written out as the reference does per epoch."""
  if epoch < no_arch:
    return r * (epochs - epoch - 1) / epochs
  return r * np.exp(-(epoch - no_arch) * 0.2)


class DropoutTest(absltest.TestCase):

  def test_rate_equals_the_reference_for_every_epoch(self):
    for r in pdarts.DROPOUT_CIFAR10:
      got = jax.jit(jax.vmap(functools.partial(pdarts.dropout_rate,
                                               initial=r)))(jnp.arange(25))
      want = [_reference_rate(e, r) for e in range(25)]
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    # The jump back to r when the architecture starts learning.
    self.assertAlmostEqual(float(pdarts.dropout_rate(9, 0.4)), 0.4 * 15 / 25,
                           places=6)
    self.assertAlmostEqual(float(pdarts.dropout_rate(10, 0.4)), 0.4,
                           places=6)

  def test_skip_dropout_per_edge_inverted_and_only_skip(self):
    # Two edges leaving one source, skip-connect only, all weights 1.
    group = darts_space.SourceGroup(
        channels=4, stride=1, edges=((0, 0), (1, 0)),
        edge_ops=(('skip_connect',), ('skip_connect',)))
    x = jnp.ones((1, 16, 8, 8, 4))
    w = jnp.ones((2, 1))
    variables = group.init(jax.random.key(0), x, w, train=True)

    def run(rate, train=True):
      return group.apply(variables, x, w, train, jnp.float32(rate),
                         rngs={'dropout': jax.random.key(1)})
    np.testing.assert_array_equal(run(0.), jnp.ones((2, 16, 8, 8, 4)))
    np.testing.assert_array_equal(run(0.5, train=False), 1.)
    y = np.asarray(run(0.25))
    np.testing.assert_allclose(np.unique(y), [0., 1 / 0.75], rtol=1e-6)
    dropped = (y == 0).mean()
    self.assertBetween(dropped, 0.22, 0.28)
    self.assertFalse(np.array_equal(y[0], y[1]))   # a mask per edge


def _switches(rows):
  """[E, 8] switches with `rows[e]` the op names on."""
  return np.array([[p in r for p in PRIMS] for r in rows])


class PruneTest(absltest.TestCase):

  def test_keeps_the_top_ops_and_forces_none_out_last(self):
    sw = np.ones((3, 8), bool)
    probs = np.array([[.30, .01, .02, .20, .15, .12, .10, .10],
                      [.05, .40, .03, .02, .20, .10, .15, .05],
                      [.125] * 8])
    new = pdarts.prune(probs, sw, 3, PRIMS, drop_none=False)
    self.assertEqual(pdarts.edge_ops(new, PRIMS), (
        ('none', 'skip_connect', 'sep_conv_3x3', 'sep_conv_5x5',
         'dil_conv_5x5'),  # ties at .10: the first (dil_conv_3x3) goes
        ('max_pool_3x3', 'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3',
         'dil_conv_5x5'),
        ('skip_connect', 'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3',
         'dil_conv_5x5')))   # all equal: the first three go
    # Last stage: 'none' goes first although it is the strongest.
    sw3 = _switches([('none', 'skip_connect', 'sep_conv_3x3'),
                     ('max_pool_3x3', 'skip_connect', 'sep_conv_3x3')])
    probs3 = np.array([[.5, .2, .3], [.2, .5, .3]])
    last = pdarts.prune(probs3, sw3, 2, PRIMS, drop_none=True)
    self.assertEqual(pdarts.edge_ops(last, PRIMS),
                     (('sep_conv_3x3',), ('skip_connect',)))
    with self.assertRaisesRegex(ValueError, 'weights for'):
      pdarts.prune(probs3[:, :2], sw3, 1, PRIMS, drop_none=False)


class SkipCapTest(absltest.TestCase):
  """Hand-built last-stage weights: every edge offers (max_pool, skip,
  sep_conv_3x3), columns in that order."""

  def setUp(self):
    super().setUp()
    ops3 = ('max_pool_3x3', 'skip_connect', 'sep_conv_3x3')
    self.last = _switches([ops3] * 14)
    # Kept edges (node 0: 0, 1; node 1: 2, 3; node 2: 5, 6; node 3: 9, 10)
    # prefer skip (0.6 + e/100, conv 0.38 - e/100); the others are weak
    # (0.1, a pool) except edge 4, a conv at 0.331: weaker than edge 2's
    # conv (0.36), stronger than edge 3's (0.30), so it takes node 1's
    # second place once edge 3 loses its skip.
    p = np.tile([.10, .05, .05], (14, 1))
    for e in (0, 1, 2, 3, 5, 6, 9, 10):
      p[e] = [.02, .6 + e / 100, .38 - e / 100]
    p[3] = [.07, .63, .30]
    p[4] = [.10, .329, .331]
    probs = {'normal': p, 'reduce': p.copy()}
    final = {t: pdarts.prune(probs[t], self.last, 2, PRIMS, drop_none=True)
             for t in probs}
    self.genotype, self.capped = pdarts.derive_final(
        probs, {'normal': self.last, 'reduce': self.last}, final, PRIMS)

  def test_unrestricted_genotype(self):
    skip = 'skip_connect'
    want = [(skip, 0), (skip, 1), (skip, 0), (skip, 1), (skip, 0), (skip, 1),
            (skip, 0), (skip, 1)]
    self.assertEqual(self.genotype.normal, want)
    self.assertEqual(self.genotype.reduce, want)
    self.assertEqual(self.capped[8], self.genotype)
    self.assertEqual(self.genotype.normal_concat, [2, 3, 4, 5])

  def test_caps_remove_the_weakest_skips_first(self):
    skip, conv = 'skip_connect', 'sep_conv_3x3'
    # Skip strengths: e0 .60, e1 .61, e2 .62, e3 .63, e5 .65, e6 .66,
    # e9 .69, e10 .70. The weakest goes first; its edge then offers its conv.
    want = {
        8: [(skip, 0), (skip, 1), (skip, 0), (skip, 1), (skip, 0), (skip, 1),
            (skip, 0), (skip, 1)],
        7: [(conv, 0), (skip, 1), (skip, 0), (skip, 1), (skip, 0), (skip, 1),
            (skip, 0), (skip, 1)],
        6: [(conv, 0), (conv, 1), (skip, 0), (skip, 1), (skip, 0), (skip, 1),
            (skip, 0), (skip, 1)],
        5: [(conv, 0), (conv, 1), (conv, 0), (skip, 1), (skip, 0), (skip, 1),
            (skip, 0), (skip, 1)],
        # Edge 3's conv (0.30) loses node 1 to edge 4's conv (0.331).
        4: [(conv, 0), (conv, 1), (conv, 0), (conv, 2), (skip, 0), (skip, 1),
            (skip, 0), (skip, 1)],
        3: [(conv, 0), (conv, 1), (conv, 0), (conv, 2), (conv, 0), (skip, 1),
            (skip, 0), (skip, 1)],
        2: [(conv, 0), (conv, 1), (conv, 0), (conv, 2), (conv, 0), (conv, 1),
            (skip, 0), (skip, 1)],
        1: [(conv, 0), (conv, 1), (conv, 0), (conv, 2), (conv, 0), (conv, 1),
            (conv, 0), (skip, 1)],
        0: [(conv, 0), (conv, 1), (conv, 0), (conv, 2), (conv, 0), (conv, 1),
            (conv, 0), (conv, 1)],
    }
    self.assertEqual(sorted(self.capped), list(range(9)))
    for m, normal in want.items():
      self.assertEqual(self.capped[m].normal, normal, m)
      self.assertEqual(self.capped[m].reduce, self.genotype.reduce, m)


  def test_skips_with_no_other_op_stay_and_the_loop_ends(self):
    # Edges 0 and 1 (node 0, always kept) offer only 'none' and skip.
    ops2 = [('none', 'skip_connect')] * 2 + [('skip_connect',
                                               'sep_conv_3x3')] * 12
    last = _switches(ops2)
    p = np.tile([.7, .3], (14, 1))
    p[:2] = [.4, .6]
    probs = {'normal': p, 'reduce': p.copy()}
    final = {t: pdarts.prune(probs[t], last, 1, PRIMS, drop_none=True)
             for t in probs}
    _, capped = pdarts.derive_final(
        probs, {'normal': last, 'reduce': last}, final, PRIMS)
    skip = 'skip_connect'
    for m in range(9):   # one skip fewer per cap, down to node 0's two
      self.assertEqual(sum(op == skip for op, _ in capped[m].normal),
                       max(m, 2), m)
      self.assertEqual(capped[m].normal[:2], [(skip, 0), (skip, 1)])


def _pruned_net():
  """A 3-cell network whose edges keep max pool, skip and sep conv 3x3."""
  sw = _switches([('max_pool_3x3', 'skip_connect', 'sep_conv_3x3')] * 5)
  return darts_space.SearchNetwork(
      C=4, num_classes=10, layers=3, steps=2, multiplier=2,
      normal_ops=pdarts.edge_ops(sw, PRIMS),
      reduce_ops=pdarts.edge_ops(sw, PRIMS))


class StepTest(absltest.TestCase):

  def test_rate_changes_without_retracing_and_warmup_leaves_alphas(self):
    net = _pruned_net()
    method = pdarts.make(net, steps_per_epoch=1, epochs=4, warmup_epochs=2,
                         initial_dropout=0.4)
    state = method.init(jax.random.key(0), _batch(0)['image'][:1])
    chex.assert_shape(state.arch['normal'], (5, 3))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch):
      return method.step(state, batch)

    rates = []
    for i in range(4):
      new, m = step(state, {'train': _batch(2 * i + 1),
                            'val': _batch(2 * i + 2)})
      rates.append(float(m['skip_dropout']))
      self.assertEqual(helpers.changed(new.arch, state.arch), i >= 2, i)
      # The reference steps its cosine (to 0) at epoch start: the last
      # epoch runs at lr 0 and leaves the weights as they are.
      self.assertEqual(float(m['lr']) == 0., i == 3, i)
      self.assertEqual(helpers.changed(new.params, state.params), i < 3, i)
      self.assertEqual(float(m['val_loss']) > 0, i >= 2)
      state = new
    np.testing.assert_allclose(
        rates, [_reference_rate(e, 0.4, 4, 2) for e in range(4)], rtol=1e-6)

  def test_shared_backward_step_equals_two_phase_step(self):
    # Through the warm-up (architecture phase skipped) and after it, with
    # skip dropout on: the same updates, masks and metrics.
    net = _pruned_net()
    make = functools.partial(pdarts.make, net, steps_per_epoch=1, epochs=4,
                             warmup_epochs=2, initial_dropout=0.4)
    shared = make(share_backward=True)
    two_phase = make(share_backward=False)
    a = b = shared.init(jax.random.key(0), _batch(0)['image'][:1])
    step_a, step_b = jax.jit(two_phase.step), jax.jit(shared.step)
    for i in range(4):
      batch = {'train': _batch(2 * i + 1), 'val': _batch(2 * i + 2)}
      new_a, metrics_a = step_a(a, batch)
      new_b, metrics_b = step_b(b, batch)
      self.assertEqual(helpers.changed(new_b.arch, b.arch), i >= 2, i)
      self.assertEqual(float(metrics_b['val_loss']) > 0, i >= 2, i)
      chex.assert_trees_all_close(new_b.arch, new_a.arch, rtol=1e-5,
                                  atol=1e-7)
      chex.assert_trees_all_close(new_b.params, new_a.params, rtol=1e-5,
                                  atol=1e-6)
      chex.assert_trees_all_close(new_b.batch_stats, new_a.batch_stats,
                                  rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_close(metrics_b, metrics_a, rtol=1e-5, atol=1e-6)
      a, b = new_a, new_b
    self.assertEqual(int(b.step), 4)
    if jax.default_backend() == 'cpu':  # the loop-friendly gradients
      self.assertLen(helpers.conv_layouts(shared.step, b, batch), 1)
    # Dropout was on, so equal updates mean equal masks.
    self.assertGreater(float(metrics_a['skip_dropout']), 0.)



class NB201Test(absltest.TestCase):

  def test_pruned_cell_ops_and_skip_dropout(self):
    sw = np.array([[p in ('none', 'skip_connect', 'nor_conv_3x3')
                    for p in nb201.NB201_PRIMITIVES]] * 6)
    ops_ = pdarts.edge_ops(sw, nb201.NB201_PRIMITIVES)
    net = nb201.SearchNetwork(C=4, N=1, cell_ops=ops_)
    self.assertEqual(net.arch_shapes(), {'cell': (6, 3)})
    method = pdarts.make(net, steps_per_epoch=1, epochs=2, warmup_epochs=0,
                         initial_dropout=0.5, switches={'cell': sw})
    state = method.init(jax.random.key(0), _batch(0)['image'][:1])
    names = set(state.params['cell0']['edge_1_0'])
    self.assertEqual(names, {'nor_conv_3x3'})   # no pool, no 1x1 conv
    # Mixtures are logged over all five ops, 0 where an op is off.
    full = method.mixing(state.arch)['cell']
    chex.assert_shape(full, (6, 5))
    np.testing.assert_array_equal(full[:, [2, 4]], 0.)
    np.testing.assert_allclose(full.sum(-1), 1., rtol=1e-6)
    # Dropout on the skip makes training outputs depend on the key.
    x = _batch(1)['image']
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    w = {'cell': jax.nn.softmax(state.arch['cell'])}

    def run(rate, k):
      return net.apply(variables, x, w, True, jnp.float32(rate),
                       rngs={'dropout': jax.random.key(k)},
                       mutable=['batch_stats'])[0]
    np.testing.assert_allclose(run(0., 1), run(0., 2), rtol=1e-6)
    self.assertFalse(np.allclose(run(0.5, 1), run(0.5, 2)))
    # The derivation picks among each edge's own ops.
    arch = method.derive(state.replace(arch={'cell': jnp.tile(
        jnp.array([5., 0., 1.]), (6, 1))}))
    self.assertEqual(arch.ops, ('none',) * 6)


if __name__ == '__main__':
  absltest.main()

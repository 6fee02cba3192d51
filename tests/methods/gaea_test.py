"""GAEA: EG steps on the simplex, against hand computations and DARTS."""

import functools

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import search
from experiments.configs import gaea as gaea_config
from jaxnas import arch as arch_lib
from jaxnas import data
from jaxnas import optim
from jaxnas.methods import base
from jaxnas.methods import gaea
from jaxnas.spaces import darts as darts_space
from jaxnas.spaces import nb201
from tests.methods import helpers

B, H = 8, 8
_batch = functools.partial(helpers.random_batch, n=B, size=H)
NB201_OPS = ('skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3')


def _entropy(p):
  p = np.asarray(p, np.float64)
  return float(-np.sum(p * np.log(p)))


class ToyProblemTest(absltest.TestCase):
  """Fit y = 2x with a mixture of 'ops' x -> c x; c = 2 is strictly best."""

  SCALES = jnp.array([0., 1., 2., -1., 0.5])

  def loss(self, weights, x):
    y = jnp.sum(weights[:, None] * self.SCALES[:, None] * x[None], 0)
    return jnp.mean((y - 2. * x) ** 2)

  def descend(self, param, tx, steps):
    arch = param.init(jax.random.key(0), {'e': (5,)}, 0.)
    state = tx.init(arch)
    best, entropy = [], []
    rng = np.random.default_rng(0)
    for _ in range(steps):
      x = jnp.asarray(rng.normal(size=64), jnp.float32)
      g = jax.grad(lambda a: self.loss(param.weights(a)['e'], x))(arch)
      updates, state = tx.update(g, state, arch)
      arch = optax.apply_updates(arch, updates)
      w = param.weights(arch)['e']
      best.append(float(w[2]))
      entropy.append(_entropy(w))
    return np.array(best), np.array(entropy)

  def test_eg_concentrates_monotonically_and_faster_than_softmax_adam(self):
    steps, threshold = 300, 0.5   # uniform over 5 ops: log 5 = 1.61
    best, entropy = self.descend(arch_lib.SIMPLEX, gaea.arch_optimizer(0.1),
                             steps)
    self.assertTrue(np.all(np.diff(best) > 0), best[:20])
    eg_steps = int(np.argmax(entropy < threshold))
    self.assertGreater(eg_steps, 0)
    self.assertLess(entropy[-1], threshold)
    # DARTS' alpha optimiser from the same start (uniform = zero logits).
    _, entropy_adam = self.descend(arch_lib.LOGITS, optim.torch_adam(
        3e-4, b1=0.5, b2=0.999, weight_decay=1e-3), steps)
    self.assertGreater(entropy_adam.min(), threshold)   # not within 300
    self.assertGreater(entropy_adam[eg_steps], entropy[eg_steps] + 0.5)


class GaeaDartsStepTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.net = nb201.SearchNetwork(C=4, N=1, num_classes=10,
                                  primitives=NB201_OPS)
    cls.method = gaea.make(cls.net, steps_per_epoch=4, epochs=2,
                           schedule_epochs=4, arch_lr=0.5)
    cls.state = cls.method.init(jax.random.key(0), _batch(0)['image'][:1])
    cls.batch = {'train': _batch(1), 'val': _batch(2)}
    cls.step = staticmethod(jax.jit(cls.method.step))

  def test_starts_uniform_and_the_arch_step_is_eg_on_the_mixture_gradient(self):
    p0 = self.state.arch['cell']
    np.testing.assert_array_equal(p0, np.full((6, 4), 0.25, np.float32))
    # The gradient of the validation loss with p as the mixing weights.
    g = jax.grad(lambda a: base.classification_loss(
        self.state.params, a, self.state.batch_stats, self.batch['val'],
        net=self.net, weights_fn=dict)[0])(self.state.arch)['cell']
    want = np.asarray(p0, np.float64) * np.exp(-0.5 * np.asarray(g))
    want /= want.sum(-1, keepdims=True)
    state, metrics = self.step(self.state, self.batch)
    np.testing.assert_allclose(state.arch['cell'], want, rtol=2e-5)
    self.assertTrue(helpers.changed(state.params, self.state.params))
    self.assertAlmostEqual(float(metrics['lr']), 0.025, places=7)  # GAEA

  def test_stays_on_the_simplex_and_derives_from_p(self):
    state = self.state
    for i in range(3):
      state, _ = self.step(state, {'train': _batch(10 + i),
                                   'val': _batch(20 + i)})
    p = np.asarray(state.arch['cell'], np.float64)
    np.testing.assert_allclose(p.sum(-1), 1., atol=1e-6)
    self.assertGreaterEqual(p.min(), gaea.FLOOR / (1 + 4 * gaea.FLOOR) - 1e-7)
    arch = self.method.derive(state)
    self.assertEqual(arch, nb201.derive({'cell': p}, self.net.primitives,
                                        exclude=()))


class GaeaGdasStepTest(absltest.TestCase):

  def test_warmup_holds_the_arch_then_eg_moves_it(self):
    net = nb201.SearchNetwork(C=4, N=1, num_classes=10, primitives=NB201_OPS,
                              single_path=True)
    method = gaea.make(net, host='gdas', steps_per_epoch=2, epochs=4,
                       arch_lr=0.5, warmup_epochs=1, zero_terms=True)
    state = method.init(jax.random.key(0), _batch(0)['image'][:1])
    step = jax.jit(method.step)
    taus = []
    for i in range(6):
      before = state.arch
      state, metrics = step(state, {'train': _batch(30 + i),
                                    'val': _batch(40 + i)})
      taus.append(float(metrics['tau']))
      moved = helpers.changed(state.arch, before)
      self.assertEqual(moved, i >= 2, f'step {i}')  # warm-up: steps 0, 1
    # tau holds at tau_max in the warm-up epoch, then the reference's
    # max(epoch - warmup, 0) / (epochs - 1).
    np.testing.assert_allclose(taus, [10., 10., 10., 10., 6.7, 6.7],
                               rtol=1e-6)
    p = np.asarray(state.arch['ops']['cell'], np.float64)
    self.assertGreaterEqual(p.min(), gaea.FLOOR * (1 - 1e-6))  # floor last
    self.assertTrue(np.all(np.abs(p.sum(-1) - 1) < 4 * gaea.FLOOR))

  def test_samples_follow_log_p(self):
    # A vertex of the simplex (floored) is sampled almost surely.
    p = jnp.full((6, 4), 1e-5).at[:, 2].set(1 - 3e-5)
    counts = np.zeros(4)
    for i in range(200):
      sample = arch_lib.sample_single_path(
          jax.random.key(i), {'ops': {'cell': arch_lib.SIMPLEX.logits(p)}},
          1.)
      counts += np.bincount(np.asarray(sample['cell'].index), minlength=4)
    self.assertGreater(counts[2], 0.99 * counts.sum())


class GaeaPcDartsTest(absltest.TestCase):
  """Partial channels with per-node edge probabilities (eedarts)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.net = darts_space.SearchNetwork(C=8, num_classes=10, layers=3,
                                        steps=2, multiplier=2,
                                        partial_channels=4)
    cls.method = gaea.make(cls.net, steps_per_epoch=2, learn_edges=True)
    cls.state = cls.method.init(jax.random.key(0), _batch(0)['image'][:1])

  @staticmethod
  def _row(k, value):
    row = np.full(8, (1 - value) / 7)
    row[k] = value
    return row

  def test_derivation_ranks_edges_by_op_weight_times_edge_weight(self):
    # Node 1 (edges 2, 3, 4 from states 0, 1, 2): by op weight alone edges 2
    # and 3 win (0.6, 0.5 > 0.4); times the edge weights (0.12, 0.225,
    # 0.14) edges 3 and 4 do.
    ops = np.stack([self._row(4, 0.9), self._row(5, 0.8), self._row(4, 0.6),
                    self._row(1, 0.5), self._row(6, 0.4)]).astype(np.float32)
    e = np.array([0.6, 0.4, 0.2, 0.45, 0.35], np.float32)
    arch = {'ops': {'normal': ops, 'reduce': ops},
            'edges': {'normal': e, 'reduce': np.array(
                [0.5, 0.5, 0.5, 0.3, 0.2], np.float32)}}
    g = self.method.derive(self.state.replace(arch=arch))
    self.assertEqual(g.normal, [('sep_conv_3x3', 0), ('sep_conv_5x5', 1),
                                ('max_pool_3x3', 1), ('dil_conv_3x3', 2)])
    self.assertEqual(g.reduce[2:], [('sep_conv_3x3', 0), ('max_pool_3x3', 1)])

  def test_steps_keep_ops_and_edges_on_their_simplices(self):
    arch0 = self.state.arch
    np.testing.assert_allclose(arch0['edges']['normal'],
                               [0.5, 0.5, 1 / 3, 1 / 3, 1 / 3], rtol=1e-6)
    state, _ = jax.jit(self.method.step)(
        self.state, {'train': _batch(1), 'val': _batch(2)})
    for t in ('normal', 'reduce'):
      e = np.asarray(state.arch['edges'][t], np.float64)
      self.assertTrue(helpers.changed(e, arch0['edges'][t]))
      np.testing.assert_allclose([e[:2].sum(), e[2:].sum()], 1., atol=1e-6)
      np.testing.assert_allclose(
          np.asarray(state.arch['ops'][t], np.float64).sum(-1), 1.,
          atol=1e-6)


class SingleLevelDataTest(absltest.TestCase):
  """ERM batches come from the weights half only; bilevel's from the other."""

  def test_single_level_never_touches_the_held_out_half(self):
    n = 200
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None,
                                                            None], (n, 4, 4, 1))
    ds = data.Dataset('ids', data.Split(images.copy(), np.arange(n) % 4),
                      None, 4, mean=(0.,), std=(1.,))
    config = gaea_config.get_config('tiny')
    config.update(dict(crop_padding=0, flip=False, batch_size=16))
    for single_level in (True, False):
      config.single_level = single_level
      batches = search.search_batches(ds, config, seed=0)
      seen = {'train': set(), 'val': set()}
      for step in range(40):
        for k, b in batches.batch(step).items():
          seen[k] |= set(np.asarray(b['image'][:, 0, 0, 0]).astype(int))
      self.assertLessEqual(max(seen['train']), n // 2 - 1)
      if single_level:
        self.assertLessEqual(max(seen['val']), n // 2 - 1)
        self.assertGreater(len(seen['val']), n // 4)
      else:
        self.assertGreaterEqual(min(seen['val']), n // 2)
    # ERM's architecture batch is another batch of the same half.
    config.single_level = True
    batch = search.search_batches(ds, config, seed=0).batch(0)
    self.assertFalse(np.array_equal(batch['train']['image'],
                                    batch['val']['image']))


if __name__ == '__main__':
  absltest.main()

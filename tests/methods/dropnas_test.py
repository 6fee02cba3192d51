"""DropNAS: grouped masks, masked mixtures, alpha adjustment, partial decay."""

import functools

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnas import ops
from jaxnas import parallel
from jaxnas.methods import base
from jaxnas.methods import dropnas
from jaxnas.spaces import darts as darts_space
from jaxnas.spaces import nb201
from tests.methods import helpers

B, H = 8, 8
_batch = functools.partial(helpers.random_batch, n=B, size=H)
GROUPS = dropnas.op_groups(ops.DARTS_PRIMITIVES)


class MaskTest(absltest.TestCase):

  def test_groups_and_per_op_probability(self):
    # none, max, avg, skip | sep3, sep5, dil3, dil5
    np.testing.assert_array_equal(GROUPS, [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(dropnas.drop_probabilities(GROUPS),
                               3e-5 ** 0.25)
    self.assertAlmostEqual(float(3e-5 ** 0.25), 0.0740, places=4)
    nb = dropnas.op_groups(ops.NB201_PRIMITIVES)   # convs: 2, the rest: 3
    np.testing.assert_allclose(dropnas.drop_probabilities(nb, 0.01),
                               [0.01 ** (1 / 3), 0.01 ** (1 / 3), 0.1, 0.1,
                                0.01 ** (1 / 3)])

  def test_drop_frequency_within_four_sigma_and_no_empty_group(self):
    n_masks = 2000
    for rate in (dropnas.DROP_RATE, 0.3):   # p = 0.074 and 0.74
      sample = jax.jit(jax.vmap(functools.partial(
          dropnas.sample_masks, shape=(14, 8), groups=GROUPS,
          drop_rate=rate)))
      masks = np.asarray(sample(jax.random.split(jax.random.key(1),
                                                 n_masks)))
      for g in (0, 1):
        self.assertTrue(np.all(masks[..., GROUPS == g].any(-1)))
      p = rate ** 0.25
      # Dropped, given the group is not emptied: p (1 - p^3) / (1 - p^4).
      want = p * (1 - p ** 3) / (1 - p ** 4)
      trials = n_masks * 14
      freq = 1 - masks.reshape(trials, 8).mean(0)
      bound = 4 * np.sqrt(want * (1 - want) / trials)
      np.testing.assert_array_less(np.abs(freq - want), bound)

  def test_masks_are_a_pure_function_of_the_key(self):
    f = functools.partial(dropnas.sample_masks, shape=(14, 8), groups=GROUPS,
                          drop_rate=0.3)
    a, b = f(jax.random.key(3)), f(jax.random.key(3))
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, f(jax.random.key(4))))


class MixtureTest(absltest.TestCase):

  def test_masked_softmax_renormalises_over_kept_ops(self):
    logits = jnp.array([[0.1, 0.5, -0.2, 0.3]])
    mask = jnp.array([[True, False, True, False]])
    e = np.exp([0.1, -0.2])
    np.testing.assert_allclose(dropnas.masked_softmax(logits, mask),
                               [[e[0] / e.sum(), 0., e[1] / e.sum(), 0.]],
                               rtol=1e-6)

  def test_dropped_alphas_get_exactly_zero_gradient(self):
    net = nb201.SearchNetwork(C=4, N=1, num_classes=10)
    mask = jnp.array([[True, True, False, True, True],
                      [False, True, True, True, True],
                      [True, True, True, False, True],
                      [True, False, True, True, True],
                      [True, True, True, True, False],
                      [True, True, True, True, True]])
    alpha = 1e-3 * jax.random.normal(jax.random.key(0), (6, 5))
    params, stats = base.init_variables(net, jax.random.key(1),
                                        _batch(0)['image'][:1],
                                        {'cell': jax.nn.softmax(alpha)})
    g = jax.grad(lambda a: base.classification_loss(
        params, {'cell': a}, stats, _batch(1), net=net,
        weights_fn=lambda arch: {'cell': dropnas.masked_softmax(
            arch['cell'], mask)})[0])(alpha)
    g = np.asarray(g)
    np.testing.assert_array_equal(g[~np.asarray(mask)], 0.)
    self.assertTrue(np.all(g[np.asarray(mask)] != 0.))


class AdjustAndDecayTest(absltest.TestCase):

  def test_adjustment_restores_the_kept_mass(self):
    rng = np.random.default_rng(0)
    before = jnp.asarray(rng.normal(size=(14, 8)), jnp.float32)
    after = before + jnp.asarray(rng.normal(size=(14, 8)), jnp.float32)
    mask = jnp.asarray(rng.random((14, 8)) > 0.3).at[3].set(True)
    ratio = dropnas.kept_mass(before, mask)
    adjusted = dropnas.adjust_alphas(after, mask, ratio)
    got = np.asarray(dropnas.kept_mass(adjusted, mask), np.float64)
    np.testing.assert_allclose(got, np.asarray(ratio, np.float64), atol=1e-6)
    # Dropped alphas and edges that dropped nothing are untouched.
    np.testing.assert_array_equal(np.asarray(adjusted)[~np.asarray(mask)],
                                  np.asarray(after)[~np.asarray(mask)])
    np.testing.assert_array_equal(adjusted[3], after[3])

  def test_partial_decay_only_where_the_gradient_is_non_zero(self):
    w = {'a': jnp.array([1., -2., 3.]), 'b': jnp.array([[4., 5.]])}
    g = {'a': jnp.array([0., 0.1, 0.]), 'b': jnp.array([[1e-8, 0.]])}
    d = dropnas.partial_decay(w, g, 3e-4)
    np.testing.assert_allclose(d['a'], [0., 2 * 3e-4 * -2., 0.], rtol=1e-6)
    np.testing.assert_allclose(d['b'], [[2 * 3e-4 * 4., 0.]], rtol=1e-6)
    self.assertEqual(float(d['a'][0]), 0.)
    d = dropnas.partial_decay(w, g, 1e-3, threshold=1e-7)   # alphas' rule
    np.testing.assert_array_equal(d['b'], [[0., 0.]])


class StepTest(absltest.TestCase):

  def test_first_step_leaves_dropped_ops_weights_and_mass_split(self):
    net = nb201.SearchNetwork(C=4, N=1, num_classes=10)
    method = dropnas.make(net, steps_per_epoch=2, epochs=2, drop_rate=0.3)
    state = method.init(jax.random.key(0), _batch(0)['image'][:1])
    step = jax.jit(method.step)
    new, metrics = step(state, {'train': _batch(1), 'val': _batch(2)})
    self.assertLess(float(metrics['kept_ops']), 1.)
    # Re-draw the step's masks as the step does.
    key = jax.random.fold_in(state.key, state.step)
    mask = np.asarray(dropnas.sample_masks(
        jax.random.split(key, 1)[0], (6, 5), dropnas.op_groups(
            net.primitives), 0.3))
    self.assertFalse(mask.all())
    ratio = dropnas.kept_mass(state.arch['cell'], mask)
    np.testing.assert_allclose(dropnas.kept_mass(new.arch['cell'], mask),
                               ratio, atol=1e-6)
    # A dropped conv's weights have zero gradient: no loss step, no decay,
    # and no momentum yet, so they are exactly unchanged; kept ones move.
    for e, name in enumerate(nb201.EDGE_KEYS):
      i, j = name.split('<-')
      for o, op in enumerate(net.primitives):
        if 'conv' not in op:
          continue
        w0 = state.params['cell0'][f'edge_{i}_{j}'][op]['Conv_0']['kernel']
        w1 = new.params['cell0'][f'edge_{i}_{j}'][op]['Conv_0']['kernel']
        self.assertEqual(np.array_equal(w0, w1), not mask[e, o], (name, op))

  def test_two_optimizer_steps_per_iteration_with_shared_states(self):
    net = nb201.SearchNetwork(C=4, N=1, num_classes=10)
    method = dropnas.make(net, steps_per_epoch=2, epochs=2, drop_rate=0.3)
    state = method.init(jax.random.key(0), _batch(0)['image'][:1])
    new, _ = jax.jit(method.step)(state, {'train': _batch(1),
                                          'val': _batch(2)})
    # The loss step and the partial-decay step each advance Adam (torch's
    # two `alpha_optim.step()` calls on one state).
    self.assertEqual(int(optax.tree_utils.tree_get(new.a_opt_state,
                                                   'count')), 2)
    # Without the decay step the weights would differ: its gradient is
    # 2 * wd * w on every weight the loss step reached.
    no_decay = dropnas.make(net, steps_per_epoch=2, epochs=2, drop_rate=0.3,
                            weight_decay=0.)
    other, _ = jax.jit(no_decay.step)(state, {'train': _batch(1),
                                              'val': _batch(2)})
    self.assertTrue(helpers.changed(new.params, other.params))

  def test_derivation_ranks_edges_by_raw_alphas(self):
    net = darts_space.SearchNetwork(C=4, num_classes=10, layers=3, steps=2,
                                    multiplier=2)
    method = dropnas.make(net, steps_per_epoch=1)
    # Node 1's edges 2, 3, 4: edge 2's raw max is the largest (2.0) but its
    # softmax is flat (0.125); edge 3 is peaked at 1.5; edge 4 has 0.5.
    # Raw alphas keep edges 2 and 3, softmax weights would keep 3 and 4.
    a = np.zeros((5, 8), np.float32)
    a[2, 1:] = 2.
    a[3] = -10.
    a[3, 4] = 1.5
    a[4, 5] = 0.5
    arch = {'normal': jnp.asarray(a), 'reduce': jnp.asarray(a)}
    g = method.derive(base.SearchState(
        step=jnp.zeros((), jnp.int32), params={}, batch_stats={}, arch=arch,
        w_opt_state=(), a_opt_state=(), key=jax.random.key(0)))
    self.assertEqual(sorted(j for _, j in g.normal[2:]), [0, 1])

  def test_eight_devices_equal_one(self):
    """The mask comes from the replicated state's key: every device drops
    the same ops, so 8 x 1/8 of the batch is the whole batch on one."""
    net = nb201.SearchNetwork(C=4, N=1, num_classes=10,
                              bn_axis_name=parallel.AXIS)
    method = dropnas.make(net, steps_per_epoch=2, epochs=2, drop_rate=0.3)
    state = method.init(jax.random.key(0), _batch(0)['image'][:1])
    batches = [{'train': helpers.random_batch(s, 16, H),
                'val': helpers.random_batch(s + 10, 16, H)} for s in (1, 2)]
    one = jax.jit(method.step)
    state1 = state
    for b in batches:
      state1, m1 = one(state1, b)
    state8, m8 = helpers.pmap_steps(method.step, state, batches)
    self.assertLess(float(m1['kept_ops']), 1.)
    chex.assert_trees_all_close(state8.arch, state1.arch, atol=1e-6)
    chex.assert_trees_all_close(state8.params, state1.params, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m8['train_loss'])[0],
                               float(m1['train_loss']), rtol=1e-5)


if __name__ == '__main__':
  absltest.main()

"""Data parallelism: 8 forced CPU devices against one, pmap against shard_map."""

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import parallel
from jaxnas.methods import darts
from jaxnas.spaces import darts as darts_space

BATCH = 16


def tiny_method(order='first', sync_bn=True, layers=3, steps=2):
  # Four of the eight ops (a zero, a pool, the identity, a convolution):
  # what is compared across devices does not depend on which, and XLA
  # compiles half as much.
  net = darts_space.SearchNetwork(
      C=4, num_classes=10, layers=layers, steps=steps, multiplier=steps,
      stem_multiplier=1,
      primitives=('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3'),
      depthwise_impl='dense',
      bn_axis_name=parallel.AXIS if sync_bn else None)
  return darts.make(net, steps_per_epoch=10, epochs=2, order=order)


def random_batch(seed):
  rng = np.random.default_rng(seed)

  def half():
    return {'image': rng.normal(size=(BATCH, 8, 8, 3)).astype(np.float32),
            'label': rng.integers(0, 10, BATCH).astype(np.int32)}

  return {'train': half(), 'val': half()}


class HelpersTest(absltest.TestCase):

  def test_collectives_are_identity_without_axis(self):
    x = {'a': jnp.arange(3.)}
    chex.assert_trees_all_equal(jax.jit(parallel.pmean)(x), x)
    chex.assert_trees_all_equal(jax.jit(parallel.psum)(x), x)
    self.assertFalse(parallel.axis_bound())

  def test_collectives_under_pmap(self):
    n = jax.local_device_count()
    self.assertEqual(n, 8, 'the root conftest forces 8 CPU devices')
    out = jax.pmap(lambda x: (parallel.pmean(x), parallel.psum(x),
                              parallel.device_index()),
                   axis_name=parallel.AXIS)(jnp.arange(n, dtype=jnp.float32))
    np.testing.assert_allclose(out[0], np.full(n, (n - 1) / 2))
    np.testing.assert_allclose(out[1], np.full(n, n * (n - 1) / 2))
    np.testing.assert_array_equal(out[2], np.arange(n))

  def test_device_key_streams(self):
    key = jax.random.PRNGKey(3)
    keys = jax.pmap(parallel.device_key, axis_name=parallel.AXIS)(
        parallel.replicate(key))
    for i in range(8):
      np.testing.assert_array_equal(keys[i], jax.random.fold_in(key, i))
    self.assertEqual(len({tuple(np.asarray(k)) for k in keys}), 8)
    # One device under jit draws device 0's stream.
    np.testing.assert_array_equal(jax.jit(parallel.device_key)(key), keys[0])

  def test_shard_replicate_unreplicate(self):
    batch = {'image': np.arange(16 * 3).reshape(16, 3), 'label': np.arange(16)}
    sharded = parallel.shard(batch, 8)
    chex.assert_shape(sharded['image'], (8, 2, 3))
    np.testing.assert_array_equal(sharded['label'][3], [6, 7])
    with self.assertRaisesRegex(ValueError, 'not divisible'):
      parallel.shard(batch, 3)
    with self.assertRaisesRegex(ValueError, 'num_devices'):
      parallel.shard(batch, 0)
    tree = {'w': np.ones((2, 3), np.float32), 's': np.int32(4)}
    rep = parallel.replicate(tree)
    chex.assert_shape(rep['w'], (8, 2, 3))
    back = parallel.unreplicate(rep)
    chex.assert_trees_all_equal(jax.device_get(back), tree)
    self.assertEqual(back['w'].devices(), {jax.local_devices()[0]})

  def test_typed_prng_keys_are_placed(self):
    state = {'key': jax.random.key(5), 'w': np.arange(3.)}
    for mode in ('jit', 'pmap', 'shard_map'):
      par = parallel.DataParallel(mode)
      back = par.get_state(par.put_state(state))
      np.testing.assert_array_equal(jax.random.key_data(back['key']),
                                    jax.random.key_data(state['key']))
      np.testing.assert_array_equal(back['w'], state['w'])

  def test_bad_modes(self):
    with self.assertRaisesRegex(ValueError, 'mode must be one of'):
      parallel.DataParallel('dp')
    with self.assertRaisesRegex(ValueError, r'num_devices must be in \[1, 8\]'):
      parallel.DataParallel('pmap', num_devices=9)
    with self.assertRaisesRegex(ValueError, 'one device'):
      parallel.DataParallel('jit', num_devices=2)
    self.assertEqual(parallel.DataParallel('pmap', 4).num_devices, 4)
    self.assertEqual(parallel.DataParallel('shard_map').num_devices, 8)


class StepTest(absltest.TestCase):
  """One DARTS step on 8 devices = the same step on one device, whole batch."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.method = tiny_method(layers=3, steps=1)
    cls.batch = random_batch(0)
    cls.state = cls.method.init(jax.random.PRNGKey(0),
                                cls.batch['train']['image'][:1])
    cls.results, cls.traces = {}, {}
    for mode in ('jit', 'pmap', 'shard_map'):
      par = parallel.DataParallel(mode)

      def counted(state, batch, mode=mode):
        cls.traces[mode] = cls.traces.get(mode, 0) + 1
        return cls.method.step(state, batch)

      step = par.step(counted, donate=False)
      state, metrics = step(par.put_state(cls.state),
                            par.put_batch(cls.batch))
      cls.results[mode] = (par, step, state,
                           jax.device_get(par.get_state(state)),
                           jax.device_get(par.get_state(metrics)))

  def assert_close(self, a, b):
    _, _, _, sa, ma = self.results[a]
    _, _, _, sb, mb = self.results[b]
    # Same maths, another summation order: float32 rounding apart.
    chex.assert_trees_all_close(sa.params, sb.params, atol=2e-6, rtol=1e-5)
    chex.assert_trees_all_close(sa.arch, sb.arch, atol=1e-8, rtol=1e-6)
    chex.assert_trees_all_close(sa.batch_stats, sb.batch_stats, atol=2e-6,
                                rtol=1e-5)
    chex.assert_trees_all_close(ma, mb, rtol=1e-5)
    np.testing.assert_array_equal(sa.step, sb.step)

  def test_pmap_equals_single_device(self):
    self.assert_close('jit', 'pmap')
    # Something moved, so the comparison is not vacuous.
    _, _, _, after, metrics = self.results['jit']
    diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), after.arch,
                        self.state.arch)
    self.assertGreater(max(jax.tree.leaves(diff)), 1e-5)
    self.assertGreater(metrics['grad_norm'], 0.)

  def test_shard_map_equals_pmap(self):
    self.assert_close('pmap', 'shard_map')
    par, step, state, _, _ = self.results['shard_map']
    state, _ = step(state, par.put_batch(random_batch(1)))
    self.assertEqual(self.traces['shard_map'], 1)

  def test_alphas_identical_on_every_device_after_10_steps(self):
    par, step, state, _, _ = self.results['pmap']
    for i in range(1, 10):
      state, _ = step(state, par.put_batch(random_batch(i)))
    # Fed its own output, the step did not compile again.
    self.assertEqual(self.traces['pmap'], 1)
    for name in ('normal', 'reduce'):
      copies = np.asarray(jax.device_get(state.arch[name]))
      chex.assert_shape(copies, (8, 2, 4))  # devices, edges, ops
      for d in range(1, 8):
        np.testing.assert_array_equal(copies[d], copies[0])
    params = jax.device_get(state.params)
    for leaf in jax.tree.leaves(params):
      np.testing.assert_array_equal(leaf[7], leaf[0])

  def test_unsynced_batchnorm_differs_but_stays_replicated(self):
    method = tiny_method(sync_bn=False, layers=3, steps=1)
    par = parallel.DataParallel('pmap')
    state, _ = par.step(method.step, donate=False)(
        par.put_state(self.state), par.put_batch(self.batch))
    stats = jax.device_get(state.batch_stats)
    for leaf in jax.tree.leaves(stats):
      np.testing.assert_array_equal(leaf[3], leaf[0])
    synced = self.results['pmap'][3]
    diff = jax.tree.map(lambda a, b: np.abs(a[0] - b).max(), state.params,
                        synced.params)
    self.assertGreater(max(jax.tree.leaves(diff)), 1e-6,
                       'per-device BN statistics should change the step')


  def test_second_order_pmap_equals_single_device(self):
    # Weight gradients of the virtual step are averaged over devices, so the
    # unrolled hypergradient is the whole batch's (one cell: a fast compile).
    method = tiny_method(order='second', layers=1, steps=1)
    state = method.init(jax.random.PRNGKey(1),
                        self.batch['train']['image'][:1])
    out = {}
    for mode in ('jit', 'pmap'):
      par = parallel.DataParallel(mode)
      new, _ = par.step(method.step, donate=False)(
          par.put_state(state), par.put_batch(self.batch))
      out[mode] = jax.device_get(par.get_state(new))
    chex.assert_trees_all_close(out['jit'].arch, out['pmap'].arch,
                                atol=1e-8, rtol=1e-6)
    chex.assert_trees_all_close(out['jit'].params, out['pmap'].params,
                                atol=2e-6, rtol=1e-5)


if __name__ == '__main__':
  absltest.main()

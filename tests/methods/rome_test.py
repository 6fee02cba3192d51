"""ROME / GDAS on tiny single-path supernets: only sampled ops run, the
straight-through gradients reach both pytrees, accumulation, 8 devices vs 1."""

import functools

from absl.testing import absltest
import chex
import flax
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from jaxnas import arch as arch_lib
from jaxnas import edges
from jaxnas import ops
from jaxnas import parallel
from jaxnas.methods import rome
from jaxnas.spaces import darts as darts_space
from jaxnas.spaces import nb201
from tests.methods import helpers

# Two nodes per cell (5 edges), 3 cells (normal, reduce, reduce): XLA compiles every op of every edge
# (a switch's branches), so the net stays as small as the test allows.
NET = darts_space.SearchNetwork(
    C=4, num_classes=10, layers=3, steps=2, multiplier=2,
    primitives=ops.DARTS_PRIMITIVES[1:], single_path=True)
B, H = 8, 8
_batch = functools.partial(helpers.random_batch, n=B, size=H)


class SinglePathNetworkTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.method = rome.make(NET, steps_per_epoch=4, epochs=2, num_samples=2)
    cls.state = cls.method.init(jax.random.key(0), _batch(0)['image'][:1])

  def _loss(self, params, arch, sample_key):
    loss, _ = rome._sample_loss(  # pylint: disable=protected-access
        params, arch, self.state.batch_stats, _batch(1), sample_key, 0.5,
        net=NET, sample_fn=functools.partial(
            arch_lib.sample_single_path, steps=2, topology='v2'))
    return loss

  def test_only_sampled_ops_run_and_gradients_reach_both(self):
    """Unchosen ops' weights are NaN: a mixture (NaN * 0) would give NaN."""
    key = jax.random.key(7)
    sample = arch_lib.sample_single_path(key, self.state.arch, 0.5, steps=2,
                                         topology='v2')
    params = jax.tree.map(np.array, self.state.params)
    poisoned = 0
    reductions = darts_space.reduction_layers(NET.layers)
    for i in range(NET.layers):
      c, t = f'cell{i}', 'reduce' if i in reductions else 'normal'
      idx = np.asarray(sample[t].index)
      for e in range(5):
        for k, name in enumerate(NET.primitives):
          if idx[e] != k and name in params[c][f'edge{e}']:
            for leaf in jax.tree.leaves(params[c][f'edge{e}'][name]):
              leaf[...] = np.nan
              poisoned += 1
    self.assertGreater(poisoned, 50)
    grad = jax.jit(jax.value_and_grad(self._loss, argnums=(0, 1)))
    loss, (g_params, g_arch) = grad(params, self.state.arch, key)
    self.assertTrue(np.isfinite(float(loss)))
    for leaf in jax.tree.leaves((g_params, g_arch)):
      self.assertTrue(np.all(np.isfinite(leaf)))
    # Straight-through: the op logits and the topology logits both learn.
    for part in ('ops', 'edges'):
      for t in ('normal', 'reduce'):
        self.assertGreater(float(jnp.abs(g_arch[part][t]).sum()), 0.,
                           msg=f'{part} {t}')
    # Unchosen edges of node 1 (3 inputs, 2 chosen) get no weight gradient.
    idx = np.asarray(sample['normal'].index)
    off = [e for e in range(2, 5) if idx[e] < 0]
    self.assertLen(off, 1)
    for leaf in jax.tree.leaves(g_params['cell0'][f'edge{off[0]}']):
      np.testing.assert_array_equal(leaf, 0.)

  def test_remat_passes_no_residuals_and_same_gradients(self):
    """Rematerialised edges: each conditional hands the backward pass only
    its output (no residual activations), and the gradients are unchanged."""
    sample_fn = functools.partial(arch_lib.sample_single_path, steps=2,
                                  topology='v2')
    key = jax.random.key(5)

    def loss(net):
      return lambda params, arch: rome._sample_loss(  # pylint: disable=protected-access
          params, arch, self.state.batch_stats, _batch(1), key, 0.5,
          net=net, sample_fn=sample_fn)[0]

    def cond_activations(jaxpr):
      """Per edge's `cond` (not those inside its branches: the kernel
      gradient's in `ops.conv2d`'s VJP), how many outputs are batch-sized
      activations."""
      counts = []
      for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'cond':
          counts.append(sum(v.aval.ndim == 4 and v.aval.shape[0] == B
                            for v in eqn.outvars))
          continue
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          counts += cond_activations(sub)
      return counts

    results = {}
    for remat in (True, False):
      net = NET.clone(single_path_remat=remat)
      traced = jax.jit(jax.value_and_grad(loss(net), argnums=(0, 1))).trace(
          self.state.params, self.state.arch)
      counts = cond_activations(traced.jaxpr.jaxpr)
      self.assertLen(counts, 2 * 5 * NET.layers)  # forward and backward
      results[remat] = traced.lower().compile()(self.state.params,
                                                self.state.arch)
      if remat:  # the output, the input kept to run the op again, and (at
        # stride 2) one output-sized tensor
        self.assertLessEqual(max(counts), 3)
      else:  # every residual of a separable convolution
        self.assertGreaterEqual(max(counts), 10)
    chex.assert_trees_all_close(results[True], results[False], rtol=1e-5,
                                atol=1e-6)

  def test_bad_weights_rejected(self):
    with self.assertRaisesRegex(ValueError, 'SinglePath'):
      NET.apply({'params': self.state.params,
                 'batch_stats': self.state.batch_stats},
                _batch(0)['image'], {'normal': jnp.ones((5, 7)),
                                     'reduce': jnp.ones((5, 7))}, train=False)


class NB201SinglePathTest(absltest.TestCase):

  def test_equals_mixture_with_one_hot_weights(self):
    """Same weights layout: one op per edge equals the one-hot mixture."""
    kw = dict(C=4, N=1, num_classes=10)
    mix_net = nb201.SearchNetwork(**kw)
    sp_net = nb201.SearchNetwork(**kw, single_path=True)
    x = _batch(3)['image']
    x = jnp.concatenate([x] * 3, -1)
    variables = mix_net.init(jax.random.key(0), x,
                             {'cell': jnp.full((6, 5), 0.2)}, train=False)
    index = jnp.array([1, 2, 3, 4, 0, 3], jnp.int32)  # 'none' on edge 4
    one_hot = jax.nn.one_hot(index, 5)
    sample = edges.SinglePath(index, jnp.ones(6), jnp.zeros(6))
    sp_vars = sp_net.init(jax.random.key(0), x, {'cell': sample}, train=False)
    chex.assert_trees_all_equal_shapes(variables, sp_vars)
    for train in (False, True):
      y_mix = mix_net.apply(variables, x, {'cell': one_hot}, train=train,
                            mutable=['batch_stats'] if train else False)
      y_sp = sp_net.apply(variables, x, {'cell': sample}, train=train,
                          mutable=['batch_stats'] if train else False)
      if train:
        (y_mix, s_mix), (y_sp, s_sp) = y_mix, y_sp
        chosen = {f'edge_{i}_{j}': nb201.NB201_PRIMITIVES[int(index[e])]
                  for e, (i, j) in enumerate(nb201.EDGES)}
        flat = lambda t: flax.traverse_util.flatten_dict(t, sep='/')
        before = flat(variables['batch_stats'])
        s_mix, s_sp = flat(s_mix['batch_stats']), flat(s_sp['batch_stats'])
        checked = 0
        for path, v in s_sp.items():
          parts = path.split('/')
          edge = next((p for p in parts if p.startswith('edge_')), None)
          if edge is None or parts[parts.index(edge) + 1] == chosen[edge]:
            np.testing.assert_allclose(v, s_mix[path], atol=1e-6)
            checked += 1
          else:  # an op that did not run keeps its statistics
            np.testing.assert_array_equal(v, before[path])
            self.assertFalse(np.allclose(s_mix[path], before[path]), path)
        self.assertGreater(checked, 5)
      np.testing.assert_allclose(y_mix, y_sp, atol=1e-5)


class RomeStepTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # SyncBN, so that devices normalise by the statistics of the whole batch;
    # three ops (pool, identity, convolution) keep the pmap compile short.
    cls.net = NET.clone(bn_axis_name=parallel.AXIS, primitives=(
        'max_pool_3x3', 'skip_connect', 'sep_conv_3x3'))
    cls.method = rome.make(cls.net, steps_per_epoch=4, epochs=2,
                           num_samples=2)
    cls.state = cls.method.init(jax.random.key(0), _batch(0)['image'][:1])
    cls.batch = {'train': _batch(1), 'val': _batch(2)}

  def test_init_shapes(self):
    chex.assert_shape([self.state.arch['ops']['normal'],
                       self.state.arch['ops']['reduce']], (5, 3))
    chex.assert_shape([self.state.arch['edges']['normal'],
                       self.state.arch['edges']['reduce']], (5,))

  def test_eight_devices_equal_one_and_trace_once(self):
    """Same samples on every device: 8 x 1/8 batch equals 1 x whole batch."""
    @jax.jit
    @chex.assert_max_traces(n=1)
    def one(state, batch):
      return self.method.step(state, batch)

    state1 = self.state
    for _ in range(2):
      new1, m1 = one(state1, self.batch)
      self.assertTrue(helpers.changed(new1.params, state1.params))
      self.assertTrue(helpers.changed(new1.arch, state1.arch))
      state1 = new1
    self.assertEqual(int(state1.step), 2)
    self.assertAlmostEqual(float(m1['tau']), 10.)  # epoch 0 of 2
    for k in ('train_loss', 'val_loss', 'grad_norm'):
      self.assertTrue(np.isfinite(float(m1[k])), k)

    state8, m8 = helpers.pmap_steps(self.method.step, self.state,
                                    [self.batch] * 2)
    chex.assert_trees_all_close(state8.arch, state1.arch, atol=1e-6)
    chex.assert_trees_all_close(state8.params, state1.params, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m8['train_loss'])[0],
                               float(m1['train_loss']), rtol=1e-5)

  def test_shared_step_equals_search_step(self):
    # float64, two steps, both orders, K_arch != K_weights: one loop of
    # K_arch + K_weights samples gives search_step's two accumulations.
    net = self.net.clone(bn_axis_name=None)
    with jax.enable_x64(True):
      to64 = lambda t: jax.tree.map(
          lambda x: x.astype(jnp.float64)
          if jnp.issubdtype(x.dtype, jnp.floating) else x, t)
      for weights_first, reduce in ((False, 'sum'), (True, 'mean')):
        make = functools.partial(
            rome.make, net, steps_per_epoch=4, epochs=2, num_samples=2,
            weight_samples=3, weight_reduce=reduce,
            weights_first=weights_first)
        shared, two_phase = make(share_backward=True), make(
            share_backward=False)
        a = b = start = to64(self.state)
        step_a, step_b = jax.jit(two_phase.step), jax.jit(shared.step)
        for i in range(2):  # the second step has momentum and Adam moments
          batch = to64({'train': _batch(2 * i + 3), 'val': _batch(2 * i + 4)})
          a, metrics_a = step_a(a, batch)
          b, metrics_b = step_b(b, batch)
        self.assertTrue(helpers.changed(b.arch, start.arch))
        self.assertTrue(helpers.changed(b.params, start.params))
        for x, y in ((b.arch, a.arch), (b.params, a.params),
                     (b.batch_stats, a.batch_stats),
                     (b.a_opt_state, a.a_opt_state),
                     (b.w_opt_state, a.w_opt_state)):
          chex.assert_trees_all_close(x, y, rtol=1e-9, atol=1e-12)
        # search_step averages accuracies in float32.
        chex.assert_trees_all_close(metrics_b, metrics_a, rtol=1e-6)
    uneven = {'train': _batch(7), 'val': _batch(7, n=B // 2)}
    with self.assertRaisesRegex(ValueError, 'one shape'):
      jax.make_jaxpr(shared.step)(self.state, uneven)

  def test_derive_uses_topology(self):
    state = self.state.replace(arch={
        'ops': {t: jnp.zeros((5, 3)).at[:, 2].set(1.)
                for t in ('normal', 'reduce')},
        'edges': {t: jnp.array([0., 0., 2., -1., 1.])
                  for t in ('normal', 'reduce')}})
    g = self.method.derive(state)
    op = self.net.primitives[2]
    # Node 1's inputs 0, 1, 2 have topology logits 2, -1, 1: inputs 0 and 2.
    self.assertEqual(g.normal, [(op, 0), (op, 1), (op, 0), (op, 2)])


class AccumulateTest(absltest.TestCase):

  def test_network_gradients_equal_the_unrolled_sum(self):
    # In the scan body the convolutions take `ops.conv2d`'s loop-friendly
    # gradients (on CPU), the weights' with kernel gradients, the
    # architecture's without; unrolled, JAX's own rules.
    net = NET.clone(primitives=('max_pool_3x3', 'skip_connect',
                                'sep_conv_3x3'))
    method = rome.make(net, steps_per_epoch=4, epochs=2, num_samples=2,
                       share_backward=False)
    state = method.init(jax.random.key(0), _batch(0)['image'][:1])
    loss = functools.partial(rome._sample_loss, net=net,
                             sample_fn=method.step.keywords['sample_fn'])
    batch, keys = _batch(1), jax.random.split(jax.random.key(3), 2)
    for argnums, kernel_grads in ((0, True), (1, False)):
      zeros = jax.tree.map(jnp.zeros_like, (state.params, state.arch)[argnums])

      def grad_fn(key, stats, argnums=argnums):
        return jax.value_and_grad(loss, argnums=argnums, has_aux=True)(
            state.params, state.arch, stats, batch, key, 1.)

      def looped(kernel_grads=kernel_grads, grad_fn=grad_fn, zeros=zeros):
        return rome.accumulate(grad_fn, keys, state.batch_stats, zeros,
                               kernel_grads=kernel_grads)

      def unrolled(grad_fn=grad_fn, zeros=zeros):
        total, stats = zeros, state.batch_stats
        for i in range(len(keys)):
          (_, (stats, _)), g = grad_fn(keys[i], stats)
          total = jax.tree.map(jnp.add, total, g)
        return total, stats

      g, stats, _, _ = jax.jit(looped)()
      want_g, want_stats = jax.jit(unrolled)()
      chex.assert_trees_all_close(g, want_g, rtol=1e-4, atol=1e-5)
      chex.assert_trees_all_close(stats, want_stats, rtol=1e-5, atol=1e-6)
      if jax.default_backend() == 'cpu':  # one layout: the loop-friendly VJP
        self.assertLen(helpers.conv_layouts(looped), 1)

  def test_sums_in_order_and_threads_state(self):
    keys = jax.random.split(jax.random.key(0), 3)

    def grad_fn(key, stats):
      v = jax.random.normal(key, (2,))
      return (jnp.sum(v), (stats + 1., v[None])), {'w': v}

    g, stats, losses, logits = rome.accumulate(
        grad_fn, keys, jnp.zeros(()), {'w': jnp.zeros(2)})
    vs = jnp.stack([jax.random.normal(k, (2,)) for k in keys])
    np.testing.assert_allclose(g["w"], vs.sum(0), rtol=1e-5)
    self.assertEqual(float(stats), 3.)
    np.testing.assert_allclose(losses, vs.sum(1), rtol=1e-5)
    chex.assert_shape(logits, (3, 1, 2))

  def test_tau_schedule(self):
    tau = rome.linear_tau(10., 0.1, epochs=3, steps_per_epoch=2)
    np.testing.assert_allclose([float(tau(s)) for s in range(7)],
                               [10, 10, 5.05, 5.05, 0.1, 0.1, 0.1],
                               rtol=1e-5)

  def test_bad_arguments(self):
    mix = darts_space.SearchNetwork(C=4, layers=2, steps=2, multiplier=2)
    with self.assertRaisesRegex(ValueError, 'single_path=True'):
      rome.make(mix, steps_per_epoch=1)
    with self.assertRaisesRegex(ValueError, 'topology'):
      rome.make(NET, steps_per_epoch=1, topology='v3')
    with self.assertRaisesRegex(ValueError, 'fixed'):
      rome.make(nb201.SearchNetwork(single_path=True), steps_per_epoch=1)
    with self.assertRaisesRegex(ValueError, 'SyncBN'):
      rome.make(NET.clone(bn_axis_name=parallel.AXIS), steps_per_epoch=1,
                per_device_samples=True)
    with self.assertRaisesRegex(ValueError, 'num_samples'):
      rome.make(NET, steps_per_epoch=1, num_samples=0)


if __name__ == '__main__':
  absltest.main()

"""NAO-V2's weight-sharing supernet, its step and pool scoring.

One tiny supernet (5 cells of 4 channels, 2 nodes, 8x8 images) and one
initialisation serve every test; the switch-heavy programs compile slowly
on a CPU (the step ~50 s), so each is compiled once.
"""

import functools

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnas import optim
from jaxnas.methods import nao as nao_method
from jaxnas.spaces import nao
from jaxnas.spaces import nao_supernet
from tests.methods import helpers

NODES = 2
NET = nao_supernet.NASWSNetwork(layers=1, nodes=NODES, channels=4,
                                drop_path_keep=1.0, bn_axis_name='batch')
TX = optim.torch_sgd(0.05, momentum=0.9, weight_decay=0., clip_norm=5.)
INIT, STEP, POOL = nao_method.make(NET, TX, phase_steps=4)


@functools.cache
def _state():
  return INIT(jax.random.PRNGKey(0), (16, 8, 8, 3))


@functools.cache
def _forward():
  return jax.jit(lambda v, x, a: NET.apply(v, x, a))


def _archs(n, seed, nodes=NODES):
  return nao.random_archs(n, np.random.default_rng(seed), nodes=nodes
                          ).reshape(n, 2, nodes, 4)


class SupernetTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.net = NET
    cls.params = _state().params
    cls.variables = nao_method.state_variables(_state())
    cls.batch = helpers.random_batch(1, 8, 8, channels=3)

  def test_weights_per_node_branch_op_and_input(self):
    p = self.params
    # Node i of every cell keeps one kernel per input index 0..i+1.
    for i in range(NODES):
      for branch in 'xy':
        ops = p['cell0'][f'node{i}_{branch}']
        chex.assert_shape(ops['sep3']['depthwise1'], (i + 2, 3, 3, 1, 4))
        chex.assert_shape(ops['sep5']['pointwise2'], (i + 2, 4, 4))
        chex.assert_shape(ops['sep5']['bn1']['scale'], (i + 2, 4))
        self.assertNotIn('reduce', ops)   # stride-1 identity: no weights
        red = p['cell1'][f'node{i}_{branch}']['reduce']
        chex.assert_shape(red['conv1'], (2, 8, 4))   # FR per input 0, 1
    chex.assert_shape(p['cell0']['combine'], (NODES + 2, 4, 4))
    chex.assert_shape(p['cell1']['combine'], (NODES + 2, 8, 8))
    # Kaiming normal, fan-in of the depthwise kernel 3 * 3.
    dw = np.asarray(p['cell4']['node1_x']['sep5']['depthwise1'])
    self.assertAlmostEqual(dw.std(), np.sqrt(2 / 25), delta=0.05)

  def test_traced_architecture_equals_concrete_without_retrace(self):
    forward = _forward()
    outs = []
    for arch in _archs(3, seed=1):
      y = forward(self.variables, self.batch['image'],
                  jnp.asarray(arch, jnp.int32))
      # The concrete path indexes with Python ints, no switch.
      ref = self.net.apply(self.variables, self.batch['image'], arch)
      chex.assert_shape(y, (8, 10))
      np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
      outs.append(np.asarray(y))
    self.assertEqual(forward._cache_size(), 1)   # one trace, 3 archs
    self.assertGreater(np.abs(outs[0] - outs[1]).max(), 1e-3)
    # The default runs the chosen op alone ('switch'); 'mask' runs every op
    # and keeps the chosen one: the same outputs.
    self.assertEqual(nao_supernet.resolve_op_select('auto'), 'switch')
    mask = NET.clone(op_select='mask')
    f = jax.jit(lambda v, x, a: mask.apply(v, x, a))
    for arch, y in zip(_archs(3, seed=1), outs):
      np.testing.assert_allclose(
          f(self.variables, self.batch['image'], jnp.asarray(arch, jnp.int32)),
          y, rtol=1e-4, atol=1e-4)
    self.assertEqual(f._cache_size(), 1)

  def test_switch_gradients_equal_the_masked(self):
    # The switched branches' convolutions take the loop-friendly gradients
    # on CPU (one layout); their weight gradients equal those of running
    # every op and keeping the chosen one, for reduction cells' 10-way
    # switches (2 nodes: node 1 reads inputs at stride 2 or node 0).
    net = nao_supernet.NASWSNetwork(layers=0, nodes=2, channels=4,
                                    drop_path_keep=1.0)
    archs = jnp.asarray(_archs(2, seed=8), jnp.int32)
    variables = net.init(jax.random.PRNGKey(2), self.batch['image'],
                         archs[0])

    def grad(op_select, arch):
      def loss(params):
        logits, _ = net.clone(op_select=op_select).apply(
            {**variables, 'params': params}, self.batch['image'], arch,
            train=True, mutable=['batch_stats'],
            rngs={'drop_path': jax.random.PRNGKey(0)})
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, self.batch['label']).mean()
      return jax.grad(loss)(variables['params'])

    both = jax.jit(lambda a: (grad('switch', a), grad('mask', a)))
    for arch in archs:
      switched, masked = both(arch)
      self.assertTrue(helpers.changed(masked, jax.tree.map(
          jnp.zeros_like, masked)))
      chex.assert_trees_all_close(switched, masked, atol=1e-5, rtol=1e-4)
    if jax.default_backend() == 'cpu':  # in the switches: one layout
      jaxpr = jax.make_jaxpr(lambda a: grad('switch', a))(archs[0]).jaxpr
      in_switches = [q for c in helpers.all_eqns(jaxpr)
                     if c.primitive.name == 'cond'
                     for b in c.params['branches']
                     for q in helpers.all_eqns(b.jaxpr)
                     if q.primitive.name == 'conv_general_dilated']
      self.assertGreater(len(in_switches), 0)
      self.assertLen({q.params['dimension_numbers'] for q in in_switches}, 1)

  def test_running_batch_norm(self):
    bn = nao_supernet.RunningBatchNorm()
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 2)) * 2. + 1.
    v = bn.init(jax.random.PRNGKey(1), x, train=False)
    y, upd = bn.apply(v, x, train=True, mutable=['batch_stats'])
    flat = np.asarray(x).reshape(-1, 2)
    # PyTorch: running = 0.9 * running + 0.1 * batch (unbiased variance).
    np.testing.assert_allclose(upd['batch_stats']['mean'],
                               0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(upd['batch_stats']['var'],
                               0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2),
                               (flat - flat.mean(0)) / np.sqrt(
                                   flat.var(0) + 1e-5), rtol=1e-4, atol=1e-5)
    _, same = bn.apply(v, x, train=True, update=False,
                       mutable=['batch_stats'])
    np.testing.assert_array_equal(same['batch_stats']['var'], 1.)
    # Without `train` the averages normalise.
    z = bn.apply({**v, 'batch_stats': upd['batch_stats']}, x, train=False)
    np.testing.assert_allclose(np.asarray(z).reshape(-1, 2), (flat - 0.1 *
                                flat.mean(0)) / np.sqrt(np.asarray(
                                    upd['batch_stats']['var']) + 1e-5),
                               rtol=1e-4, atol=1e-5)

  def test_drop_path(self):
    x = jnp.ones((4000, 1, 1, 2))
    y = np.asarray(nao_supernet._drop_path(x, 0.8, jax.random.PRNGKey(0)))
    kept = y[:, 0, 0, 0] > 0
    np.testing.assert_allclose(y[kept], 1 / 0.8, rtol=1e-6)   # scaled
    np.testing.assert_array_equal(y[~kept], 0.)                # whole rows
    self.assertAlmostEqual(kept.mean(), 0.8, delta=4 * np.sqrt(.16 / 4000))
    np.testing.assert_array_equal(
        nao_supernet._drop_path(x, 1., jax.random.PRNGKey(0)), x)

  def test_drop_path_schedule(self):
    f = nao_supernet.drop_path_keep_prob
    # apply_drop_path: depth-scaled, then ramped with (step + 1) / steps.
    self.assertAlmostEqual(f(0.9, 10, 11, 1.), 0.9)
    self.assertAlmostEqual(f(0.9, 10, 11, 0.5), 0.95)
    self.assertAlmostEqual(f(0.9, 0, 11, 1.), 1 - 0.1 / 11)
    self.assertAlmostEqual(f(0.9, 4, 11, 35200 / 35200 / 2),
                           1 - 0.5 * 5 / 11 * 0.1)


class StepTest(absltest.TestCase):

  def test_step_gradients_devices_and_pool(self):
    # No weight decay (TX): the first step moves exactly the weights with
    # a gradient (momentum's first buffer is the gradient).
    nodes, step, state = NODES, STEP, _state()
    traces = []

    def counted(s, b):
      traces.append(1)
      return step(s, b)

    jstep = jax.jit(counted)
    archs = _archs(3, seed=3, nodes=nodes)
    batches = [dict(helpers.random_batch(10 + t, 16, 8, channels=3),
                    arch=jnp.broadcast_to(jnp.asarray(archs[t], jnp.int32),
                                          (16, 2, nodes, 4)))
               for t in range(3)]
    s = state
    for t, b in enumerate(batches):
      prev, (s, m) = s, jstep(s, b)
      self.assertTrue(np.isfinite(float(m['train_loss'])))
      if t == 0:
        self._check_moved(prev.params, s.params, archs[0], nodes)
        # Running averages: the stem's move every step; a reduction cell's
        # fac_k only when the architecture leaves input k unread.
        self.assertTrue(helpers.changed(prev.batch_stats['stem_bn'],
                                        s.batch_stats['stem_bn']))
        read = set(archs[0][1][:, ::2].reshape(-1))
        for k in (0, 1):
          self.assertEqual(helpers.changed(
              prev.batch_stats['cell1'][f'reduce_{k}'],
              s.batch_stats['cell1'][f'reduce_{k}']), k not in read, k)
    self.assertLen(traces, 1)       # three architectures, one trace
    self.assertEqual(int(s.step), 3)

    # Pool scoring: lax.map over architectures = one call per architecture.
    rng = np.random.default_rng(4)
    val = helpers.random_batch(20, 40, 8, channels=3)
    pool_archs = jnp.asarray(_archs(6, seed=5, nodes=nodes), jnp.int32)
    idx = jnp.asarray(np.stack([rng.choice(40, 12, replace=False)
                                for _ in range(6)]))
    variables = nao_method.state_variables(s)
    got = jax.jit(POOL)(variables, val['image'], val['label'], pool_archs,
                        idx)
    chex.assert_shape(got, (6,))
    forward = _forward()
    want = [int(np.sum(np.argmax(forward(variables, val['image'][i], a), -1)
                       == val['label'][i])) for a, i in zip(pool_archs, idx)]
    np.testing.assert_array_equal(got, want)

  def test_eight_devices_equal_one(self):
    # The smallest supernet (2 reduction cells of one node): the data
    # parallel plumbing, the per-example architecture rows and SyncBN.
    net = nao_supernet.NASWSNetwork(layers=0, nodes=1, channels=4,
                                    drop_path_keep=1.0, bn_axis_name='batch')
    init, step, _ = nao_method.make(net, TX, phase_steps=4)
    state = init(jax.random.PRNGKey(1), (16, 8, 8, 3))
    archs = [[[[0, 0, 1, 1]], [[1, 4, 0, 0]]], [[[1, 3, 0, 4]], [[0, 2, 1, 1]]]]
    batches = [dict(helpers.random_batch(30 + t, 16, 8, channels=3),
                    arch=jnp.broadcast_to(jnp.asarray(a, jnp.int32),
                                          (16, 2, 1, 4)))
               for t, a in enumerate(archs)]
    s1, jstep = state, jax.jit(step)
    for b in batches:
      s1, _ = jstep(s1, b)
    s8, _ = helpers.pmap_steps(step, state, batches)
    self.assertTrue(helpers.changed(s1.params, state.params))
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)

  def _check_moved(self, before, after, arch, nodes):
    """Only the weights of (node, branch, op, input) the architecture uses,
    and the 1x1 combine slices of its unread states, moved."""
    moved = lambda x, y, axes: set(np.nonzero(
        np.abs(np.asarray(x) - np.asarray(y)).sum(axes))[0])
    for name, cell_type in (('cell0', 0), ('cell1', 1)):
      cell = arch[cell_type]
      unread = set(range(nodes + 2)) - set(cell[:, ::2].reshape(-1))
      self.assertEqual(moved(before[name]['combine'], after[name]['combine'],
                             (1, 2)), unread, name)
      for i in range(nodes):
        for b, branch in enumerate('xy'):
          j, op = cell[i, 2 * b], cell[i, 2 * b + 1]
          x, y = before[name][f'node{i}_{branch}'], after[name][
              f'node{i}_{branch}']
          for k, key in ((0, 'sep3'), (1, 'sep5')):
            for leaf in ('depthwise1', 'pointwise2'):
              axes = tuple(range(1, x[key][leaf].ndim))
              self.assertEqual(moved(x[key][leaf], y[key][leaf], axes),
                               {j} if op == k else set(),
                               (name, i, branch, key, leaf))
          if cell_type == 1:
            self.assertEqual(
                moved(x['reduce']['conv1'], y['reduce']['conv1'], (1, 2)),
                {j} if op == 4 and j < 2 else set())


if __name__ == '__main__':
  absltest.main()

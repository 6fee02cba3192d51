"""The NAS-Bench-201 space: arch strings, derivation, cell and network."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.methods import base
from jaxnas.spaces import nb201

PRIMS = nb201.NB201_PRIMITIVES
IDX = {n: i for i, n in enumerate(PRIMS)}
# Best CIFAR-100 cell of the benchmark (index 9930).
BEST_C100 = ('|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+'
             '|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|')


class ArchTest(parameterized.TestCase):

  def test_official_order(self):
    self.assertEqual(PRIMS, ('none', 'skip_connect', 'nor_conv_1x1',
                             'nor_conv_3x3', 'avg_pool_3x3'))
    self.assertEqual(nb201.EDGES,
                     ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)))
    # AutoDL's NAS201SearchCell orders edges by sorted 'i<-j' keys.
    self.assertEqual(nb201.EDGE_KEYS, tuple(sorted(nb201.EDGE_KEYS)))

  def test_string_round_trip(self):
    arch = nb201.Arch.from_string(BEST_C100)
    self.assertEqual(arch.ops, ('nor_conv_3x3', 'nor_conv_3x3',
                                'nor_conv_3x3', 'skip_connect',
                                'nor_conv_3x3', 'nor_conv_3x3'))
    self.assertEqual(arch.to_string(), BEST_C100)
    self.assertEqual(str(arch), BEST_C100)
    self.assertEqual(arch.edges()[3], (3, 0, 'skip_connect'))
    self.assertEqual(nb201.Arch.from_string(f'  {BEST_C100}\n'), arch)
    self.assertEqual(nb201.Arch.from_dict(arch.to_dict()), arch)
    self.assertEqual(nb201.Arch.from_json(arch.to_json()), arch)
    self.assertEqual(nb201.Arch.from_dict({'arch': BEST_C100}), arch)
    self.assertEqual(
        nb201.Arch.from_dict({'edges': arch.to_dict()['edges']}), arch)
    self.assertEqual(arch.to_dict()['edges']['3<-0'], 'skip_connect')
    self.assertEqual(hash(arch), hash(nb201.Arch(list(arch.ops))))

  def test_all_archs(self):
    archs = list(nb201.all_archs())
    self.assertLen(archs, 5**6)
    self.assertLen(set(archs), 5**6)
    self.assertLen({a.to_string() for a in archs}, 5**6)

  @parameterized.named_parameters(
      ('two_nodes', '|none~0|+|none~0|none~1|', 'nodes'),
      ('four_nodes', BEST_C100 + '+|none~0|', 'nodes'),
      ('missing_input', '|none~0|+|none~0|+|none~0|none~1|none~2|', 'inputs'),
      ('extra_input', '|none~0|none~1|+|none~0|none~1|+|none~0|none~1|none~2|',
       'inputs'),
      ('wrong_index', '|none~0|+|none~0|none~2|+|none~0|none~1|none~2|',
       'input 1'),
      ('swapped', '|none~0|+|none~1|none~0|+|none~0|none~1|none~2|', 'input 0'),
      ('unknown_op', '|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|',
       'unknown'),
      ('darts_op', '|sep_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|',
       'unknown'),
      ('no_tilde', '|none0|+|none~0|none~1|+|none~0|none~1|none~2|',
       'op~input'),
      ('no_bars', 'none~0+|none~0|none~1|+|none~0|none~1|none~2|', r'\|op~j\|'),
      ('empty', '', 'nodes'),
  )
  def test_bad_strings(self, text, message):
    with self.assertRaisesRegex(ValueError, message):
      nb201.Arch.from_string(text)

  def test_bad_constructions(self):
    with self.assertRaisesRegex(ValueError, 'from_string'):
      nb201.Arch(BEST_C100)
    with self.assertRaisesRegex(ValueError, '6 edges'):
      nb201.Arch(('none',) * 5)
    with self.assertRaisesRegex(ValueError, 'unknown'):
      nb201.Arch(('none',) * 5 + ('max_pool_3x3',))
    with self.assertRaisesRegex(ValueError, 'disagree'):
      nb201.Arch.from_dict({'arch': BEST_C100,
                            'edges': dict.fromkeys(nb201.EDGE_KEYS, 'none')})
    with self.assertRaisesRegex(ValueError, 'needs'):
      nb201.Arch.from_dict({'genotype': BEST_C100})
    with self.assertRaisesRegex(ValueError, 'JSON'):
      nb201.Arch.from_json('{not json')


class DeriveTest(absltest.TestCase):

  def _weights(self, entries):
    w = np.full((6, 5), 0.1)
    for (e, op), v in entries.items():
      w[e, IDX[op]] = v
    return {'cell': w}

  def test_hand_built(self):
    w = self._weights({
        # 'none' strongest on edge 0: skipped by default, the runner-up wins.
        (0, 'none'): 0.9, (0, 'nor_conv_1x1'): 0.5, (0, 'nor_conv_3x3'): 0.4,
        (1, 'avg_pool_3x3'): 0.3,
        # A tie keeps the earlier op (skip_connect before nor_conv_3x3).
        (2, 'skip_connect'): 0.6, (2, 'nor_conv_3x3'): 0.6,
        (3, 'nor_conv_3x3'): 0.2,
        (4, 'none'): 0.5, (4, 'skip_connect'): 0.49,
        (5, 'nor_conv_1x1'): 0.7,
    })
    self.assertEqual(
        nb201.derive(w).to_string(),
        '|nor_conv_1x1~0|+|avg_pool_3x3~0|skip_connect~1|+'
        '|nor_conv_3x3~0|skip_connect~1|nor_conv_1x1~2|')
    # AutoDL's TinyNetworkDarts.genotype(): argmax over all ops.
    self.assertEqual(nb201.derive(w, exclude=()).ops,
                     ('none', 'avg_pool_3x3', 'skip_connect', 'nor_conv_3x3',
                      'none', 'nor_conv_1x1'))
    # The bare array works too, and a softmax does not change the result.
    logits = np.log(w['cell'])
    self.assertEqual(nb201.derive(logits), nb201.derive(w))

  def test_gaea_nozero_space(self):
    w = np.zeros((6, 4))
    w[np.arange(6), [0, 1, 2, 3, 0, 1]] = 1.
    arch = nb201.derive({'cell': w}, PRIMS[1:])
    self.assertEqual(arch.ops, ('skip_connect', 'nor_conv_1x1',
                                'nor_conv_3x3', 'avg_pool_3x3',
                                'skip_connect', 'nor_conv_1x1'))

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, 'shape'):
      nb201.derive({'cell': np.ones((6, 4))})
    with self.assertRaisesRegex(ValueError, 'NaN'):
      nb201.derive({'cell': np.full((6, 5), np.nan)})
    with self.assertRaisesRegex(ValueError, 'leaves none'):
      nb201.derive({'cell': np.ones((6, 1))}, ('none',))
    with self.assertRaisesRegex(ValueError, 'unknown'):
      nb201.derive({'cell': np.ones((6, 2))}, ('none', 'sep_conv_3x3'))


def _cell_apply(weights, x, primitives=PRIMS):
  cell = nb201.SearchCell(x.shape[-1], primitives)
  variables = cell.init(jax.random.key(0), x, weights, False)
  out, _ = cell.apply(variables, x, weights, True, mutable=['batch_stats'])
  return out


class CellTest(absltest.TestCase):

  def test_edge_order_and_node_sums(self):
    # Skip-connects weighted c_e on edge e: node1 = c0 x, node2 = c1 x +
    # c2 node1, node3 = c3 x + c4 node1 + c5 node2 = (7 + 11*2 + 13*(3 + 5*2))
    # x = 198 x. Any other edge order or node sum gives another factor.
    c = jnp.array([2., 3., 5., 7., 11., 13.])
    w = c[:, None] * jax.nn.one_hot(IDX['skip_connect'], 5)[None, :]
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    np.testing.assert_allclose(_cell_apply(w, x), 198. * x, rtol=1e-6)

  def test_none_everywhere_gives_zero(self):
    w = jnp.tile(jax.nn.one_hot(IDX['none'], 5), (6, 1))
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    out = _cell_apply(w, x)
    chex.assert_shape(out, x.shape)
    np.testing.assert_array_equal(out, 0.)

  def test_pool_has_no_bn(self):
    # avg_pool alone on edge 1<-0 (excluding padding), nothing else: the cell
    # output is node 3 = 0, node 1 = pool(x); check node 1 via edge 3<-1.
    w = np.zeros((6, 5))
    w[0, IDX['avg_pool_3x3']] = 1.
    w[4, IDX['skip_connect']] = 1.
    x = jnp.ones((1, 4, 4, 2)) * 3.
    np.testing.assert_allclose(_cell_apply(jnp.asarray(w), x), x)

  def test_bn_axis_name_syncs_batch_statistics(self):
    # Untracked BNs under pmap with bn_axis_name equal one device on the
    # whole batch (conftest provides 8 CPU devices).
    if jax.local_device_count() < 2:
      self.skipTest('needs 2 devices')
    x = jax.random.normal(jax.random.key(1), (4, 4, 4, 3))
    w = jnp.full((6, 5), 0.2)
    cell = nb201.SearchCell(3, track_running_stats=False)
    variables = cell.init(jax.random.key(0), x, w, False)
    whole = cell.apply(variables, x, w, False)
    synced = nb201.SearchCell(3, track_running_stats=False,
                              bn_axis_name='batch')
    per_device = jax.pmap(lambda v, x: synced.apply(v, x, w, False),
                          axis_name='batch', in_axes=(None, 0))(
                              variables, x.reshape((2, 2) + x.shape[1:]))
    np.testing.assert_allclose(per_device.reshape(x.shape), whole,
                               rtol=1e-4, atol=1e-5)


class NetworkTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.net = nb201.SearchNetwork(C=4, N=1, num_classes=3)
    cls.x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    cls.w = {'cell': jnp.full((6, 5), 0.2)}
    params, stats = base.init_variables(cls.net, jax.random.key(1), cls.x,
                                        cls.w)
    cls.variables = {'params': params, 'batch_stats': stats}

  def test_reference_param_count(self):
    net = nb201.SearchNetwork(C=16, N=5, num_classes=10)
    self.assertEqual(net.arch_shapes(), {'cell': (6, 5)})
    self.assertEqual(net.edge_ops('cell'), (PRIMS,) * 6)
    variables = jax.eval_shape(lambda: net.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), {'cell': jnp.ones(
            (6, 5))}, train=False))
    # By hand, from AutoDL's TinyNetworkDarts(C=16, N=5, max_nodes=4,
    # num_classes=10, NAS-Bench-201 ops, affine=False):
    stem = 3 * 3 * 3 * 16 + 2 * 16         # conv 3x3 3->16 + affine BN
    # A search cell of c channels: 6 edges, each nor_conv_1x1 (c*c) and
    # nor_conv_3x3 (9*c*c) without bias; non-affine BN, pool, skip and none
    # have no parameters.
    cell = lambda c: 6 * (c * c + 9 * c * c)
    cells = 5 * (cell(16) + cell(32) + cell(64))   # 76800 + 307200 + 1228800
    # ResNetBasicblock(i->o, stride 2): conv_a 3x3 i->o + affine BN, conv_b
    # 3x3 o->o + affine BN, shortcut avgpool + 1x1 conv i->o (no bias).
    block = lambda i, o: 9 * i * o + 2 * o + 9 * o * o + 2 * o + i * o
    blocks = block(16, 32) + block(32, 64)          # 14464 + 57600
    lastact = 2 * 64                                # affine BN
    classifier = 64 * 10 + 10
    expected = stem + cells + blocks + lastact + classifier
    self.assertEqual(expected, 1_686_106)
    self.assertEqual(nb201.count_params(variables['params']), expected)
    # Cross-check: TinyNetworkDarts.get_weights() of AutoDL-Projects at the
    # NB-201 paper's code and GAEA's fork (ReLUConvBN bias=False) sums to
    # 1,686,106 too; its arch_parameters (6 x 5 = 30) are a separate tensor.
    # AutoDL after commit b9a5d28 (July 2020) uses bias=not affine, adding
    # 2 * c per edge: 6 * 2 * 5 * (16 + 32 + 64) = 6720 -> 1,692,826.
    self.assertEqual(expected + 6 * 2 * 5 * (16 + 32 + 64), 1_692_826)
    # Running statistics (mean, var) of 15 cells x 6 edges x 2 conv BNs and
    # of the 6 BNs of stem, ResNet blocks and last activation.
    self.assertLen(jax.tree.leaves(variables['batch_stats']),
                   2 * (15 * 6 * 2 + 6))

  def test_logits_train_and_eval(self):
    logits, updates = self.net.apply(self.variables, self.x, self.w,
                                     train=True, mutable=['batch_stats'])
    chex.assert_shape(logits, (4, 3))
    chex.assert_tree_all_finite(logits)
    self.assertEqual(jax.tree.structure(updates['batch_stats']),
                     jax.tree.structure(self.variables['batch_stats']))
    logits = self.net.apply(self.variables, self.x, self.w, train=False)
    chex.assert_shape(logits, (4, 3))
    chex.assert_tree_all_finite(logits)

  def test_gradient_wrt_mixing_weights(self):

    def loss(wc):
      logits, _ = self.net.apply(self.variables, self.x, {'cell': wc},
                                 train=True, mutable=['batch_stats'])
      return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

    g = jax.jit(jax.grad(loss))(self.w['cell'])
    chex.assert_shape(g, (6, 5))
    chex.assert_tree_all_finite(g)
    self.assertGreater(float(jnp.abs(g[:, 1:]).min()), 0.)
    # 'none' outputs zero, so its weight gets no gradient (as x.mul(0.)).
    np.testing.assert_array_equal(g[:, IDX['none']], 0.)

  def test_untracked_bn_uses_batch_statistics_in_eval(self):
    x = self.x

    def eval_first(net, variables, batch):
      return net.apply(variables, batch, self.w, train=False)[0]

    other = x.at[1:].set(5. * x[1:] + 1.)   # same first image, other batch
    tracked = eval_first(self.net, self.variables, x)
    np.testing.assert_allclose(eval_first(self.net, self.variables, other),
                               tracked, rtol=1e-5, atol=1e-6)
    net = nb201.SearchNetwork(C=4, N=1, num_classes=3,
                              track_running_stats=False)
    params, stats = base.init_variables(net, jax.random.key(1), x, self.w)
    # Only the stem, the two ResNet blocks (2 BNs each) and the last BN keep
    # running statistics; the cells' BNs have none.
    self.assertEqual(sorted(stats), ['lastact_bn', 'resblock1', 'resblock3',
                                     'stem_bn'])
    variables = {'params': params, 'batch_stats': stats}
    self.assertGreater(
        float(jnp.abs(eval_first(net, variables, other) -
                      eval_first(net, variables, x)).max()), 1e-4)

  def test_rejects_bad_inputs(self):
    x = jnp.ones((1, 8, 8, 3))
    with self.assertRaisesRegex(ValueError, 'shape'):
      self.net.init(jax.random.key(0), x, {'cell': jnp.ones((6, 4))},
                    train=False)
    with self.assertRaisesRegex(ValueError, 'missing'):
      self.net.init(jax.random.key(0), x, {'normal': jnp.ones((6, 5))},
                    train=False)
    with self.assertRaisesRegex(ValueError, 'NCHW'):
      self.net.init(jax.random.key(0), jnp.ones((1, 3, 8, 8)), self.w,
                    train=False)
    with self.assertRaisesRegex(ValueError, 'NHWC'):
      self.net.init(jax.random.key(0), jnp.ones((8, 8, 3)), self.w,
                    train=False)
    with self.assertRaisesRegex(ValueError, 'one cell type'):
      self.net.edge_ops('normal')


if __name__ == '__main__':
  absltest.main()

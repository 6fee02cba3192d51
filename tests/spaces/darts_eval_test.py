"""Evaluation networks: parameter counts, drop path, auxiliary heads, MACs."""

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import ops
from jaxnas.spaces import darts_eval
from jaxnas.spaces import genotype as genotype_lib
from jaxnas.spaces import nb201


def _count(net, size):
  return darts_eval.count_params(
      darts_eval.abstract_params(net, (1, size, size, 3)))


class ParamCountTest(absltest.TestCase):
  """The papers' parameter counts (auxiliary head excluded)."""

  def test_published_cells_match_the_papers(self):
    # (genotype, CIFAR-10 count, ImageNet count, paper CIFAR M, ImageNet M).
    # DARTS_V2's are the reference's own logs ("param size = 3.349342MB",
    # 4.718752MB for ImageNet); the papers print one decimal.
    cases = [('DARTS_V2', 3_349_342, 4_718_752, 3.3, 4.7),
             ('PDARTS', 3_433_798, 4_944_352, 3.4, 4.9)]
    for name, cifar, imagenet, paper_c, paper_i in cases:
      g = genotype_lib.named(name)
      n_c = _count(darts_eval.cifar_network(g), 32)
      n_i = _count(darts_eval.imagenet_network(g), 224)
      self.assertEqual((n_c, n_i), (cifar, imagenet), name)
      self.assertEqual(round(n_c / 1e6, 1), paper_c, name)
      self.assertEqual(round(n_i / 1e6, 1), paper_i, name)

  def test_auxiliary_head_is_counted_apart(self):
    g = genotype_lib.named('DARTS_V2')
    params = darts_eval.abstract_params(darts_eval.cifar_network(g),
                                        (1, 32, 32, 3))
    # ReLU, pool, Conv1x1 576 -> 128 + BN, Conv2x2 128 -> 768 + BN, linear.
    aux = 576 * 128 + 2 * 128 + 4 * 128 * 768 + 2 * 768 + 768 * 10 + 10
    self.assertEqual(darts_eval.count_params(params, exclude=()),
                     3_349_342 + aux)

  def test_nb201_network_from_arch_string(self):
    def count(arch):
      net = nb201.InferNetwork(arch)
      variables = jax.eval_shape(lambda: net.init(
          jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
      return darts_eval.count_params(variables['params'])

    c = (16, 32, 64)
    fixed = (27 * 16 + 2 * 16                       # stem conv + BN
             + 9 * 16 * 32 + 2 * 32 + 9 * 32 * 32 + 2 * 32 + 16 * 32
             + 9 * 32 * 64 + 2 * 64 + 9 * 64 * 64 + 2 * 64 + 32 * 64
             + 2 * 64 + 64 * 10 + 10)               # last BN, classifier
    conv3 = lambda k: 9 * k * k + 2 * k             # ReLU-conv3x3-BN(affine)
    conv1 = lambda k: k * k + 2 * k
    every3x3 = '|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+' \
               '|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|'
    # NB-201's largest network: 1.531546 MB of parameters.
    self.assertEqual(count(every3x3), 1_531_546)
    self.assertEqual(count(every3x3), fixed + 5 * sum(6 * conv3(k) for k in c))
    mixed = '|nor_conv_1x1~0|+|none~0|avg_pool_3x3~1|+' \
            '|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|'
    self.assertEqual(count(mixed), fixed + 5 * sum(
        2 * conv1(k) + conv3(k) for k in c))
    every_none = '|none~0|+|none~0|none~1|+|none~0|none~1|none~2|'
    self.assertEqual(count(every_none), fixed)


class DropPathTest(absltest.TestCase):

  def test_drops_whole_examples_and_scales_the_rest(self):
    x = jnp.ones((4000, 2, 2, 3))
    y = np.asarray(darts_eval.drop_path(x, 0.25, jax.random.key(0)))
    per_example = y.reshape(4000, -1)
    # Every example is all zeros or all 1 / keep.
    self.assertTrue(np.all(per_example.min(1) == per_example.max(1)))
    np.testing.assert_allclose(np.unique(per_example), [0., 1 / 0.75],
                               rtol=1e-6)
    dropped = np.mean(per_example[:, 0] == 0)
    # Binomial(4000, 0.25): sd 0.0068; 4 sd.
    self.assertLess(abs(dropped - 0.25), 0.03)
    np.testing.assert_array_equal(
        darts_eval.drop_path(x, 0., jax.random.key(1)), x)

  def test_identity_at_eval_and_not_on_skip_connects(self):
    def cell(op):
      pairs = ((op, 0), (op, 1), (op, 0), (op, 2))
      return darts_eval.EvalCell(pairs, (2, 3), 4, False, False)

    s0 = jax.random.normal(jax.random.key(0), (8, 6, 6, 4))
    s1 = jax.random.normal(jax.random.key(1), (8, 6, 6, 4))
    rngs = {'drop_path': jax.random.key(2)}
    for op, dropped in (('skip_connect', False), ('sep_conv_3x3', True)):
      c = cell(op)
      v = c.init(jax.random.key(3), s0, s1, train=False)
      evals = [c.apply(v, s0, s1, train=False, drop_path_rate=r)
               for r in (None, 0.5)]
      np.testing.assert_array_equal(evals[0], evals[1])
      train = [c.apply(v, s0, s1, train=True, drop_path_rate=r, rngs=rngs,
                       mutable=['batch_stats'])[0] for r in (None, 0.5)]
      self.assertEqual(not np.allclose(train[0], train[1]), dropped, op)


class NetworkTest(absltest.TestCase):

  def test_auxiliary_head_shapes(self):
    g = genotype_lib.named('DARTS_V2')
    cases = ((darts_eval.cifar_network(g, C=4, layers=3), 32, 10),
             (darts_eval.imagenet_network(g, C=8, layers=3), 224, 1000))
    for net, size, classes in cases:
      x = jnp.zeros((2, size, size, 3))
      variables = jax.eval_shape(lambda n=net, x=x: n.init(
          jax.random.key(0), x, train=True))
      (logits, aux), _ = jax.eval_shape(
          lambda v, x, n=net: n.apply(v, x, train=True,
                                      mutable=['batch_stats']), variables, x)
      chex.assert_shape([logits, aux], (2, classes))
      logits, aux = jax.eval_shape(
          lambda v, x, n=net: n.apply(v, x, train=False), variables, x)
      chex.assert_shape(logits, (2, classes))
      self.assertIsNone(aux)
    # ImageNet's head has no BN after its second conv; CIFAR's has.
    aux_bns = [
        [k for k in jax.eval_shape(lambda n=n, s=s: n.init(
            jax.random.key(0), jnp.zeros((1, s, s, 3)), train=True))[
                'batch_stats'][darts_eval.AUX_NAME]] for n, s, _ in cases]
    self.assertEqual([len(b) for b in aux_bns], [2, 1])

  def test_forward_and_stride_layout(self):
    g = genotype_lib.named('PDARTS')
    net = darts_eval.cifar_network(g, C=4, layers=3, auxiliary=False)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = net.init(jax.random.key(1), x, train=False)
    logits, aux = net.apply(variables, x, train=False)
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite(logits)
    self.assertIsNone(aux)
    # Ops are named by their pair's position: a skip-connect and a pool have
    # no parameters, a convolution has.
    params = variables['params']
    self.assertNotIn('op0', params['cell0'])      # ('skip_connect', 0)
    self.assertIn('op1', params['cell0'])         # ('dil_conv_3x3', 1)
    self.assertNotIn('op0', params['cell1'])      # ('avg_pool_3x3', 0)
    self.assertIn('op1', params['cell1'])         # ('sep_conv_5x5', 1)

  def test_small_aux_input_fails_clearly(self):
    net = darts_eval.cifar_network(genotype_lib.named('DARTS_V2'), C=4,
                                   layers=3)
    with self.assertRaisesRegex(ValueError, 'auxiliary head needs'):
      jax.eval_shape(lambda: net.init(jax.random.key(0),
                                      jnp.zeros((1, 16, 16, 3)), train=True))


  def test_reduction_skip_is_dropped_and_pool_bn_counts(self):
    # Skip-connects from the inputs of a reduction cell are FactorizedReduce
    # (stride 2): drop path applies to them.
    pairs = (('skip_connect', 0), ('skip_connect', 1),
             ('skip_connect', 0), ('skip_connect', 2))
    c = darts_eval.EvalCell(pairs, (2, 3), 4, True, False)
    s0 = jax.random.normal(jax.random.key(0), (8, 6, 6, 4))
    v = c.init(jax.random.key(1), s0, s0, train=False)
    out = [c.apply(v, s0, s0, train=True, drop_path_rate=r,
                   rngs={'drop_path': jax.random.key(2)},
                   mutable=['batch_stats'])[0] for r in (None, 0.5)]
    self.assertFalse(np.allclose(out[0], out[1]))
    # pt.darts' PoolBN (DropNAS): an affine BN (2C) after each pool.
    g = genotype_lib.named('DROPNAS')
    plain = _count(darts_eval.cifar_network(g, C=8, layers=5), 32)
    with_bn = _count(darts_eval.cifar_network(g, C=8, layers=5, pool_bn=True),
                     32)
    # One max pool per reduction cell (cells 1 and 3, C = 16 and 32).
    self.assertEqual(with_bn - plain, 2 * 16 + 2 * 32)


class CountMacsTest(absltest.TestCase):

  def test_hand_built(self):
    def f(x, k, w):
      y = jax.lax.conv_general_dilated(x, k, (2, 2), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO',
                                                          'NHWC'))
      z = jax.lax.conv_general_dilated(
          y, jnp.ones((3, 3, 1, 6)), (1, 1), 'SAME', feature_group_count=6,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return jax.jit(lambda a: a.mean((1, 2)) @ w)(z)

    x, k, w = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 6)), jnp.ones((6, 5))
    # 4x4x6 outputs x 27 taps; depthwise 4x4x6 x 9; dense 6 x 5.
    self.assertEqual(darts_eval.count_macs(f, x, k, w),
                     4 * 4 * 6 * 27 + 4 * 4 * 6 * 9 + 6 * 5)

  def test_depthwise_forms_count_alike_only_when_grouped(self):
    g = genotype_lib.named('DARTS_V2')
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    counts = {}
    for impl in ('grouped', 'dense'):
      net = darts_eval.cifar_network(g, C=4, layers=3, auxiliary=False,
                                     depthwise_impl=impl)
      v = jax.eval_shape(lambda n=net: n.init(
          jax.random.key(0), jnp.zeros(x.shape), train=False))
      counts[impl] = darts_eval.count_macs(
          lambda v, x, n=net: n.apply(v, x, train=False), v, x)
    self.assertGreater(counts['dense'], counts['grouped'])


class PublishedTest(absltest.TestCase):

  def test_names_load_and_validate(self):
    for name, g in genotype_lib.PUBLISHED.items():
      g.validate()
      self.assertEqual(genotype_lib.load(name), g)
      self.assertLen(g.normal, 8)
    self.assertIs(genotype_lib.named('DARTS'), genotype_lib.named('DARTS_V2'))
    with self.assertRaisesRegex(ValueError, 'neither a published genotype'):
      genotype_lib.load('DARTS_V3')

  def test_dropnas_readme_form_parses_to_the_shipped_cell(self):
    # DropNAS README.md's `--genotype` argument, pt.darts' per-node lists.
    text = (
        "Genotype(normal=[[('sep_conv_3x3', 1), ('skip_connect', 0)], "
        "[('sep_conv_3x3', 1), ('sep_conv_3x3', 0)], [('sep_conv_3x3', 1), "
        "('sep_conv_3x3', 0)], [('dil_conv_5x5', 4), ('dil_conv_3x3', 1)]], "
        "normal_concat=range(2, 6), reduce=[[('max_pool_3x3', 0), "
        "('sep_conv_5x5', 1)], [('dil_conv_5x5', 2), ('sep_conv_5x5', 1)], "
        "[('dil_conv_5x5', 3), ('dil_conv_5x5', 2)], [('dil_conv_5x5', 3), "
        "('dil_conv_5x5', 4)]], reduce_concat=range(2, 6))")
    self.assertEqual(genotype_lib.Genotype.from_string(text),
                     genotype_lib.named('DROPNAS'))
    with self.assertRaisesRegex(ValueError, 'pairs'):
      genotype_lib.Genotype.from_string(
          'Genotype(normal=[1, 2], normal_concat=[2], reduce=[], '
          'reduce_concat=[])')

  def test_random_genotype_is_valid_and_varies(self):
    rng = np.random.default_rng(0)
    gs = [genotype_lib.random_genotype(rng) for _ in range(20)]
    for g in gs:
      g.validate()
      self.assertNotIn('none', [op for op, _ in g.normal + g.reduce])
      for i in range(4):
        self.assertNotEqual(g.normal[2 * i][1], g.normal[2 * i + 1][1])
    self.assertGreater(len({str(g) for g in gs}), 15)
    self.assertLen(ops.DARTS_PRIMITIVES, 8)


if __name__ == '__main__':
  absltest.main()

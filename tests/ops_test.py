"""Shapes of every candidate op, and stacked ops equal to the plain ones."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import ops
from jaxnas import stacked_ops

C, B, H = 6, 2, 8


def _apply(module, x, train=True):
  variables = module.init(jax.random.key(0), x, False)
  y, _ = module.apply(variables, x, train, mutable=['batch_stats'])
  return variables, y


class OpsTest(parameterized.TestCase):

  @parameterized.product(name=ops.DARTS_PRIMITIVES, stride=(1, 2))
  def test_shape_and_finite(self, name, stride):
    x = jax.random.normal(jax.random.key(1), (B, H, H, C))
    _, y = _apply(ops.make_op(name, C, stride, affine=False), x)
    chex.assert_shape(y, (B, H // stride, H // stride, C))
    chex.assert_tree_all_finite(y)
    if name == 'none':
      np.testing.assert_array_equal(y, 0.)
    if name == 'skip_connect' and stride == 1:
      np.testing.assert_array_equal(y, x)

  def test_avg_pool_excludes_padding(self):
    x = jnp.ones((1, 4, 4, 1))
    _, y = _apply(ops.make_op('avg_pool_3x3', 1, 1, False), x)
    np.testing.assert_allclose(y, 1.)  # counting padding would give 4/9

  def test_no_conv_bias_and_search_bn_non_affine(self):
    x = jnp.ones((B, H, H, C))
    for name in ('sep_conv_3x3', 'dil_conv_5x5'):
      variables, _ = _apply(ops.make_op(name, C, 1, affine=False), x)
      leaves = jax.tree_util.tree_leaves_with_path(variables['params'])
      self.assertTrue(all('kernel' in jax.tree_util.keystr(p)
                          for p, _ in leaves))

  def test_factorized_reduce_uses_shifted_input(self):
    x = jnp.zeros((1, 4, 4, 2)).at[0, 1, 1, :].set(1.)
    fr = ops.FactorizedReduce(2, affine=False)
    variables = fr.init(jax.random.key(0), x, False)
    y = fr.apply(variables, x, False)  # running stats: mean 0, var 1
    # The pixel (1, 1) is seen only by the second (shifted) branch.
    self.assertEqual(float(jnp.abs(y[..., 0]).sum()), 0.)
    self.assertGreater(float(jnp.abs(y[..., 1]).sum()), 0.)

  @parameterized.product(impl=('grouped', 'dense', 'shift'), stride=(1, 2),
                         dilation=(1, 2))
  def test_depthwise_impls_agree(self, impl, stride, dilation):
    x = jax.random.normal(jax.random.key(1), (B, H, H, C))
    ref = ops.DepthwiseConv(3, stride, dilation, dilation, impl='grouped')
    variables = ref.init(jax.random.key(0), x)
    got = ops.DepthwiseConv(3, stride, dilation, dilation, impl=impl).apply(
        variables, x)
    np.testing.assert_allclose(got, ref.apply(variables, x), atol=1e-5)


def _stacked_to_plain(stacked, e):
  """Edge e's slice of stacked params, renamed to the plain op's layout."""
  def conv(k):
    return {'kernel': k[e]}

  def dil(p):
    return {'DepthwiseConv_0': conv(p['depthwise_kernel']),
            'Conv_0': conv(p['pointwise']['kernel'])}

  if 'block0' in stacked:
    return {'DilConv_0': dil(stacked['block0']),
            'DilConv_1': dil(stacked['block1'])}
  if 'depthwise_kernel' in stacked:
    return dil(stacked)
  return {'Conv_0': conv(stacked['conv0']['kernel']),
          'Conv_1': conv(stacked['conv1']['kernel'])}


class StackedOpsTest(parameterized.TestCase):

  @parameterized.product(
      name=('sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5',
            'skip_connect'),
      stride=(1, 2), impl=('grouped', 'dense', 'shift'))
  def test_each_edge_equals_plain_op(self, name, stride, impl):
    if name == 'skip_connect' and stride == 1:
      return  # identity: no parameters, shared rather than stacked
    if name == 'skip_connect' and impl != 'grouped':
      return  # no depthwise conv inside
    e = 3
    x = jax.random.normal(jax.random.key(1), (e, B, H, H, C))
    stacked = stacked_ops.make_stacked_op(name, C, stride,
                                          depthwise_impl=impl)
    variables = stacked.init(jax.random.key(0), x, False)
    y, _ = stacked.apply(variables, x, True, mutable=['batch_stats'])
    chex.assert_shape(y, (e, B, H // stride, H // stride, C))
    plain = ops.make_op(name, C, stride, affine=False)
    for i in range(e):
      params = _stacked_to_plain(variables['params'], i)
      want, _ = plain.apply(
          {'params': params,
           'batch_stats': plain.init(jax.random.key(0), x[i],
                                     False)['batch_stats']},
          x[i], True, mutable=['batch_stats'])
      np.testing.assert_allclose(y[i], want, atol=2e-5, rtol=1e-4)

  def test_stacked_init_matches_torch_bounds(self):
    x = jnp.ones((4, B, H, H, C))
    variables = stacked_ops.make_stacked_op('dil_conv_5x5', C, 1).init(
        jax.random.key(0), x, False)
    dw = variables['params']['depthwise_kernel']
    chex.assert_shape(dw, (4, 5, 5, 1, C))
    bound = 1 / np.sqrt(25)  # fan-in of a 5x5 depthwise kernel, per edge
    self.assertLessEqual(float(jnp.abs(dw).max()), bound)
    self.assertGreater(float(jnp.abs(dw).max()), 0.8 * bound)


if __name__ == '__main__':
  absltest.main()

"""Shapes of every candidate op, and stacked ops equal to the plain ones."""

import contextlib
import functools
import logging
import re

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import ops
from jaxnas import stacked_ops
from jaxnas.spaces import darts
from tests.methods import helpers

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

  @parameterized.product(stride=(1, 2), shape=((2, 8, 8, 3), (3, 7, 5, 2)))
  def test_max_pool_index_equals_xla(self, stride, shape):
    x = jax.random.normal(jax.random.key(1), shape)
    # Ties: a constant block, and a row of equal maxima; the gradient must
    # go to the first maximum of each window, as select-and-scatter's.
    x = x.at[0, :3, :3, 0].set(5.).at[1, 2, :, 1].set(7.)
    pool = {i: (lambda x, i=i: ops.max_pool_3x3(x, stride, i))
            for i in ('xla', 'index')}
    y = {i: jax.jit(f)(x) for i, f in pool.items()}
    chex.assert_shape(y['index'], (shape[0], -(-shape[1] // stride),
                                   -(-shape[2] // stride), shape[3]))
    np.testing.assert_array_equal(y['index'], y['xla'])
    ct = jax.random.normal(jax.random.key(2), y['xla'].shape)
    t = jax.random.normal(jax.random.key(3), shape)
    grads, tangents = {}, {}
    for i, f in pool.items():
      grads[i] = jax.jit(lambda x, f=f: jax.vjp(f, x)[1](ct)[0])(x)
      tangents[i] = jax.jit(lambda x, f=f: jax.jvp(f, (x,), (t,))[1])(x)
    np.testing.assert_allclose(grads['index'], grads['xla'], atol=1e-6)
    np.testing.assert_allclose(tangents['index'], tangents['xla'], atol=1e-6)
    # Each window's gradient lands on one input: the routed mass is exact.
    np.testing.assert_allclose(grads['index'].sum(), ct.sum(), rtol=1e-5)
    # vmap and second order go through the custom rule too.
    xs, cts, ts = jnp.stack([x, -x]), jnp.stack([ct, -ct]), jnp.stack([t, -t])
    for transform in (
        lambda f: jax.vmap(lambda x, c: jax.vjp(f, x)[1](c)[0])(xs, cts),
        lambda f: jax.vmap(lambda x, t: jax.jvp(f, (x,), (t,))[1])(xs, ts)):
      np.testing.assert_allclose(transform(pool['index']),
                                 transform(pool['xla']), atol=1e-6)
    hess = {i: jax.grad(lambda x, f=f: jnp.sum(
        jax.grad(lambda x: jnp.sum(f(x) ** 2))(x) * t))(x) for i, f in
            pool.items()}
    np.testing.assert_allclose(hess['index'], hess['xla'], atol=1e-5)

  def test_max_pool_index_keeps_only_an_int8_index(self):
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    _, vjp = jax.vjp(lambda x: ops.max_pool_3x3(x, 1, 'index'), x)
    residuals = [r for r in jax.tree.leaves(vjp) if hasattr(r, 'dtype')]
    self.assertEqual([(r.dtype, r.shape) for r in residuals],
                     [(jnp.int8, (2, 8, 8, 3))])
    with self.assertRaisesRegex(ValueError, 'max_pool_impl'):
      ops.max_pool_3x3(x, 1, 'fast')

  @parameterized.product(impl=('grouped', 'dense', 'dense_loop', 'shift'),
                         stride=(1, 2), dilation=(1, 2))
  def test_depthwise_impls_agree(self, impl, stride, dilation):
    x = jax.random.normal(jax.random.key(1), (B, H, H, C))
    ref = ops.DepthwiseConv(3, stride, dilation, dilation, impl='grouped')
    variables = ref.init(jax.random.key(0), x)
    got = ops.DepthwiseConv(3, stride, dilation, dilation, impl=impl).apply(
        variables, x)
    np.testing.assert_allclose(got, ref.apply(variables, x), atol=1e-5)

  @parameterized.product(impl=('dense', 'dense_loop', 'shift'),
                         stride=(1, 2), dilation=(1, 2))
  def test_depthwise_pointwise_values_and_gradients(self, impl, stride,
                                                    dilation):
    # The plain formulation: grouped depthwise, then the 1x1 contraction.
    # 'dense' folds both into one product kernel; its gradients reach the
    # two kernels through the product, so all three gradients are checked.
    e, f, k = 3, 5, 3
    keys = jax.random.split(jax.random.key(2), 4)
    x = jax.random.normal(keys[0], (e, B, H, H, C))
    dw = jax.random.normal(keys[1], (e, k, k, 1, C))
    pw = jax.random.normal(keys[2], (e, C, f))
    ho = (H + 2 * dilation - dilation * (k - 1) - 1) // stride + 1
    probe = jax.random.normal(keys[3], (e, B, ho, ho, f))

    def loss(impl):
      def fn(x, dw, pw):
        y = ops.depthwise_pointwise(x, dw, pw, stride=stride,
                                    padding=dilation, dilation=dilation,
                                    impl=impl)
        chex.assert_shape(y, (e, B, ho, ho, f))
        return jnp.sum(y * probe)
      return jax.value_and_grad(fn, argnums=(0, 1, 2))(x, dw, pw)

    (want, want_grads), (got, got_grads) = loss('grouped'), loss(impl)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
      chex.assert_shape(g, w.shape)
      np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)

  @parameterized.parameters(
      # (size, kernel, stride, padding, dilation)
      (8, 3, 1, 1, 1), (8, 5, 1, 2, 1), (8, 3, 1, 2, 2), (9, 5, 1, 4, 2),
      (8, 3, 2, 1, 1), (7, 3, 2, 1, 1), (8, 5, 2, 4, 2), (7, 1, 2, 0, 1),
      (8, 3, 1, 0, 1), (6, 1, 1, 1, 1))
  def test_conv2d_values_and_gradients(self, size, k, stride, padding,
                                       dilation):
    # The canonical-layout VJP (used on CPU) against JAX's transpose rules.
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], (2, size, size + 1, 3))
    kernel = jax.random.normal(keys[1], (k, k, 3, 4))
    out = [(n + 2 * padding - dilation * (k - 1) - 1) // stride + 1
           for n in (size, size + 1)]
    probe = jax.random.normal(keys[2], (2, *out, 4))

    def value_and_grads(conv):
      def fn(x, kernel):
        y = conv(x, kernel, stride, padding, dilation)
        chex.assert_shape(y, probe.shape)
        return jnp.sum(jnp.tanh(y) * probe)
      return jax.value_and_grad(fn, argnums=(0, 1))(x, kernel)

    def in_loop(kernel_grads):
      def conv(x, k, s, p, d):
        with ops.convolutions_in_loop_body(kernel_grads):
          return ops.conv2d(x, k, stride=s, padding=p, dilation=d)
      return conv

    want, want_grads = value_and_grads(ops._lax_conv)
    for kernel_grads in (True, jnp.bool_(True), False):
      got, (got_dx, got_dk) = value_and_grads(in_loop(kernel_grads))
      np.testing.assert_allclose(got, want, rtol=1e-6)
      np.testing.assert_allclose(got_dx, want_grads[0], atol=1e-4, rtol=1e-5)
      chex.assert_shape(got_dk, kernel.shape)
      if kernel_grads or jax.default_backend() != 'cpu':
        np.testing.assert_allclose(got_dk, want_grads[1], atol=1e-4,
                                   rtol=1e-5)
      else:  # skipped (on CPU, where the loop-friendly VJP is used): zeros
        np.testing.assert_array_equal(got_dk, np.zeros_like(kernel))

  def test_conv2d_gradients_stay_canonical_in_a_loop(self):
    # Inside a loop body XLA:CPU runs convolutions in layouts other than
    # NHWC x HWIO through a slow generic loop; JAX's own gradient rules give
    # such layouts there, the canonical VJP does not.
    if jax.default_backend() != 'cpu':
      self.skipTest('the loop-friendly gradients are for XLA:CPU')
    x, kernel = jnp.ones((4, 9, 9, 3)), jnp.ones((3, 3, 3, 5))

    def labels(conv):
      def loss(x, kernel):
        def body(c, _):
          return c + jnp.sum(conv(x, kernel, 2, 1, 1) ** 2), None
        return jax.lax.scan(body, 0., None, length=2)[0]
      hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, kernel).compile(
      ).as_text()
      return set(re.findall(r'convolution\(.*dim_labels=([^,\s]+)', hlo))

    def in_loop(x, kernel, stride, padding, dilation):
      with ops.convolutions_in_loop_body():
        return ops.conv2d(x, kernel, stride=stride, padding=padding,
                          dilation=dilation)

    self.assertEqual(labels(in_loop), {'b01f_01io->b01f'})
    self.assertGreater(len(labels(ops._lax_conv)), 1)

  def test_conditional_branches_take_the_loop_friendly_gradients(self):
    # XLA:CPU runs a conditional branch's gradient convolutions as slowly as
    # a loop body's: `in_conditional_branch` gives them the canonical VJP
    # (one layout), with JAX's values and gradients; inside a loop body the
    # branch keeps the body's `kernel_grads`.
    keys = jax.random.split(jax.random.key(5), 2)
    x = jax.random.normal(keys[0], (2, 9, 9, 3))
    kernel = jax.random.normal(keys[1], (3, 3, 3, 5))
    branches = [lambda x, k: ops.conv2d(x, k, stride=2, padding=1),
                lambda x, k: ops.conv2d(x, k, stride=2, padding=2,
                                        dilation=2)]

    def grads(wrap, context=contextlib.nullcontext):
      def loss(i, x, k):
        with context():
          y = jax.lax.switch(i, [wrap(b) for b in branches], x, k)
        return jnp.sum(jnp.tanh(y) ** 2)
      return jax.grad(loss, (1, 2))

    plain, wrapped = grads(lambda b: b), grads(ops.in_conditional_branch)
    for i in (0, 1):
      for got, want in zip(wrapped(i, x, kernel), plain(i, x, kernel)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    # No kernel gradients: from the loop body around, or the branch's own.
    for no_kernel_grads in (
        grads(ops.in_conditional_branch, functools.partial(
            ops.convolutions_in_loop_body, False)),
        grads(functools.partial(ops.in_conditional_branch,
                                kernel_grads=False))):
      dx, dk = no_kernel_grads(1, x, kernel)
      np.testing.assert_allclose(dx, plain(1, x, kernel)[0], atol=1e-4,
                                 rtol=1e-5)
      if jax.default_backend() == 'cpu':
        np.testing.assert_array_equal(dk, np.zeros_like(kernel))
      self.assertLen(helpers.conv_layouts(wrapped, 1, x, kernel), 1)
      self.assertGreater(len(helpers.conv_layouts(plain, 1, x, kernel)), 1)

  def test_dense_loop_scans_the_edges(self):
    # 'dense_loop' compiles one convolution per scan body for all edges;
    # 'dense' one per edge.
    x = jnp.ones((5, B, H, H, C))
    dw, pw = jnp.ones((5, 3, 3, 1, C)), jnp.ones((5, C, 4))

    def names(impl):
      jaxpr = _depthwise_pointwise_jaxpr(impl, x, dw, pw)
      top = [q.primitive.name for q in jaxpr.eqns]
      return top, [q.primitive.name for q in helpers.all_eqns(jaxpr.jaxpr)]

    top, everywhere = names('dense')
    self.assertEqual(top.count('conv_general_dilated'), 5)
    self.assertEqual(everywhere.count('conv_general_dilated'), 5)
    top, everywhere = names('dense_loop')
    self.assertEqual(top.count('scan'), 1)
    self.assertNotIn('conv_general_dilated', top)
    # Inside the scan: one convolution, with the loop-friendly VJP on CPU.
    self.assertEqual(everywhere.count('conv_general_dilated'), 1)
    self.assertEqual(everywhere.count('custom_vjp_call'),
                     int(jax.default_backend() == 'cpu'))

  def test_dense_depthwise_pointwise_is_one_conv_per_edge(self):
    # One convolution per edge with a [k, k, C, F] kernel and no separate
    # pointwise contraction, forward; the other impls keep the contraction.
    x = jnp.ones((3, B, H, H, C))
    dw, pw = jnp.ones((3, 5, 5, 1, C)), jnp.ones((3, C, 4))

    def eqns(impl):
      jaxpr = _depthwise_pointwise_jaxpr(impl, x, dw, pw)
      return [q for q in helpers.all_eqns(jaxpr.jaxpr)
              if q.primitive.name in ('conv_general_dilated', 'dot_general')]

    dense = eqns('dense')
    self.assertEqual([q.primitive.name for q in dense],
                     ['conv_general_dilated'] * 3)
    for q in dense:
      chex.assert_shape(q.invars[1].aval, (5, 5, C, 4))
    self.assertEqual([q.primitive.name for q in eqns('grouped')],
                     ['conv_general_dilated', 'dot_general'])


def _depthwise_pointwise_jaxpr(impl, x, dw, pw):
  """The jaxpr of a stride-1, same-size `ops.depthwise_pointwise`."""
  k = dw.shape[1]
  return jax.make_jaxpr(lambda x, dw, pw: ops.depthwise_pointwise(
      x, dw, pw, stride=1, padding=k // 2, dilation=1, impl=impl))(x, dw, pw)


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


class LazyInitTest(absltest.TestCase):

  def test_jitted_equals_eager_and_runs_initialisers_only(self):
    # A one-cell search network: the same variables jitted and eager. The
    # jitted program keeps only the initialisers (no convolution survives
    # to XLA), and it is compiled once: eager, each op is its own compile.
    net = darts.SearchNetwork(C=4, num_classes=5, layers=1, steps=2,
                              multiplier=2, depthwise_impl='dense')
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    w = {t: jnp.full(s, 1. / s[1]) for t, s in net.arch_shapes().items()}
    key = jax.random.key(3)
    compiles = []

    def init(jit):
      with jax.log_compiles(True), self.assertLogs(level='WARNING') as logs:
        variables = ops.lazy_init(net, key, x, w, train=False, jit=jit)
        jax.block_until_ready(variables)
        logging.warning('done')  # at least one record
      compiles.append(sum('Finished XLA compilation' in r
                          for r in logs.output))
      return variables

    jax.clear_caches()
    jitted, eager = init(True), init(False)
    chex.assert_trees_all_equal(jitted, eager)
    # Under a transformation (restoring a checkpoint takes the state's
    # shapes this way) the key is traced: the same shapes come out.
    chex.assert_trees_all_equal_shapes_and_dtypes(
        jax.eval_shape(lambda k: ops.lazy_init(net, k, x, w, train=False),
                       key), jitted)
    with self.assertRaisesRegex(ValueError, "key_impl must be 'unsafe_rbg'"):
      ops.lazy_init(net, key, x, w, train=False, key_impl='threefry2x32')
    kernels = [v for p, v in jax.tree_util.tree_leaves_with_path(jitted)
               if 'kernel' in jax.tree_util.keystr(p)]
    self.assertGreater(len(kernels), 10)
    for k in kernels:
      self.assertGreater(float(jnp.std(k)), 0.)
      # PyTorch's default init, U(+-1/sqrt(fan_in)); a stacked kernel's
      # leading edge axis is not part of the fan-in.
      fan_in = np.prod(k.shape[1:-1] if k.ndim == 5 else k.shape[:-1])
      self.assertLessEqual(float(jnp.max(jnp.abs(k))),
                           1 / np.sqrt(fan_in) + 1e-7)
    # The derived keys do not collide: every kernel draws its own values.
    firsts = {tuple(np.asarray(k).ravel()[:4].tolist()) for k in kernels}
    self.assertLen(firsts, len(kernels))
    self.assertLessEqual(compiles[0], 3)
    self.assertGreater(compiles[1], 20)


class StackedOpsTest(parameterized.TestCase):

  @parameterized.product(
      name=('sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5',
            'skip_connect'),
      stride=(1, 2), impl=('grouped', 'dense', 'dense_loop', 'shift'))
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

  @parameterized.product(
      name=('sep_conv_3x3', 'dil_conv_5x5', 'skip_connect'), stride=(1, 2),
      impl=('grouped', 'dense', 'dense_loop'))
  def test_reading_sources_equals_stacked_copies(self, name, stride, impl):
    # Edges reading a search cell's states by index (`sources`) against the
    # same op on the states copied per edge: values, BN statistics and the
    # gradients of the states and of every parameter. 'dense' runs one
    # convolution per source, the others index the states first; the
    # edges' out-of-order sources check the reordering.
    if name == 'skip_connect' and stride == 1:
      return
    sources = (1, 0, 1, 1, 2)
    keys = jax.random.split(jax.random.key(4), 2)
    states = jax.random.normal(keys[0], (3, B, H, H, C))
    probe = jax.random.normal(
        keys[1], (len(sources), B, H // stride, H // stride, C))
    op = stacked_ops.make_stacked_op(name, C, stride, depthwise_impl=impl)
    copies = states[np.array(sources)]
    variables = op.init(jax.random.key(0), copies, False)
    self.assertEqual(
        jax.tree.map(jnp.shape, op.init(jax.random.key(0), states, False,
                                        sources)),
        jax.tree.map(jnp.shape, variables))

    def loss(states, params, by_index):
      args = (states, True, sources) if by_index else (
          states[np.array(sources)], True)
      y, new = op.apply({'params': params,
                         'batch_stats': variables['batch_stats']}, *args,
                        mutable=['batch_stats'])
      chex.assert_shape(y, probe.shape)
      return jnp.sum(jnp.tanh(y) * probe), new

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    want, want_stats = grad(states, variables['params'], False)
    got, got_stats = grad(states, variables['params'], True)
    chex.assert_trees_all_close(got_stats, want_stats, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-4)
    self.assertGreater(float(jnp.abs(got[0]).max()), 0.)
    with self.assertRaisesRegex(ValueError, 'do not index'):
      op.init(jax.random.key(0), states, False, (0, 3))

  def test_dense_reading_sources_runs_one_conv_per_source(self):
    # sep_conv's first block: one [k, k, C, n * C] convolution per source
    # (n edges read it); its second block reads per-edge inputs, one each.
    states = jnp.ones((2, B, H, H, C))
    op = stacked_ops.make_stacked_op('sep_conv_3x3', C, 1,
                                     depthwise_impl='dense')
    sources = (0, 1, 0, 1, 0)
    variables = op.init(jax.random.key(0), states, False, sources)
    jaxpr = jax.make_jaxpr(lambda s: op.apply(
        variables, s, True, sources, mutable=['batch_stats']))(states)
    kernels = [q.invars[1].aval.shape for q in helpers.all_eqns(jaxpr.jaxpr)
               if q.primitive.name == 'conv_general_dilated']
    self.assertEqual(kernels, [(3, 3, C, 3 * C), (3, 3, C, 2 * C)] +
                     [(3, 3, C, C)] * 5)

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

"""The DARTS search cell and network: shapes, counts, topology."""

import collections
import functools

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import arch as arch_lib
from jaxnas import edges
from jaxnas.methods import base
from jaxnas.spaces import darts
from tests.methods import helpers


def _uniform(shapes):
  return {t: jnp.full(s, 1. / s[1]) for t, s in shapes.items()}


def _same_variables(net, other, x):
  """Architecture logits, and the variables of `net`, which `other` (the
  same network with another execution option) must initialise identically:
  same names and values."""
  arch = arch_lib.init_logits(jax.random.key(1), net.arch_shapes(), 1.)
  params, stats = base.init_variables(
      net, jax.random.key(2), x, arch_lib.softmax_weights(arch))
  params_o, stats_o = base.init_variables(
      other, jax.random.key(2), x, arch_lib.softmax_weights(arch))
  chex.assert_trees_all_equal(params, params_o)
  chex.assert_trees_all_equal(stats, stats_o)
  return arch, params, stats


def _loss_and_grad(net, stats, x, y):
  """value_and_grad over (params, arch logits) of the training-mode
  cross-entropy; the aux is (logits, updated batch stats)."""
  def loss(params, arch):
    logits, new = net.apply(
        {'params': params, 'batch_stats': stats}, x,
        arch_lib.softmax_weights(arch), train=True, mutable=['batch_stats'])
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None],
                              1).mean()
    return ce, (logits, new['batch_stats'])
  return jax.value_and_grad(loss, (0, 1), has_aux=True)


class DartsSpaceTest(absltest.TestCase):

  def test_reference_weight_count_and_alpha_shapes(self):
    net = darts.SearchNetwork(C=16, num_classes=10, layers=8)
    shapes = net.arch_shapes()
    self.assertEqual(shapes, {'normal': (14, 8), 'reduce': (14, 8)})
    variables = jax.eval_shape(lambda: net.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), _uniform(shapes),
        train=False))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        variables['params']))
    self.assertEqual(n, 1_930_618)  # quark0/darts Network(16, 10, 8)

  def test_topology(self):
    self.assertEqual(darts.num_edges(4), 14)
    self.assertEqual(darts.edge_inputs(4),
                     (0, 1, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4))
    self.assertEqual(darts.reduction_layers(8), (2, 5))
    self.assertEqual(darts.reduction_layers(20), (6, 13))

  def test_cell_shapes(self):
    s = jnp.ones((2, 8, 8, 12))
    w = jnp.full((14, 8), 1 / 8)
    for reduction, reduction_prev, h_in0, out_hw in ((False, False, 8, 8),
                                                     (True, False, 8, 4),
                                                     (False, True, 16, 8)):
      cell = darts.SearchCell(
          6, reduction, reduction_prev,
          darts.uniform_edge_ops(darts.ops.DARTS_PRIMITIVES))
      s0 = jnp.ones((2, h_in0, h_in0, 12))
      out = jax.eval_shape(
          lambda: cell.init_with_output(jax.random.key(0), s0, s, w,
                                        False)[0])
      chex.assert_shape(out, (2, out_hw, out_hw, 24))

  def test_cell_gradient_has_no_per_edge_padding(self):
    # A group's stacked mixtures [E, ...] are split into edges by one
    # unstack (transpose: one stack). Indexing each row instead transposes
    # to a zero-padded [E, ...] copy per edge, which XLA fused, summed, into
    # the backward of every op of the group.
    cell = darts.SearchCell(4, False, False, darts.uniform_edge_ops(
        ('skip_connect', 'sep_conv_3x3')), steps=3, multiplier=3)
    s = jnp.ones((2, 4, 4, 4))
    w = jnp.full((9, 2), 0.5)
    variables = jax.tree.map(  # traced only: values do not matter
        lambda a: jnp.ones(a.shape, a.dtype),
        jax.eval_shape(lambda: cell.init(jax.random.key(0), s, s, w, True)))

    def loss(params, s0, s1):
      out, _ = cell.apply({**variables, 'params': params}, s0, s1, w, True,
                          mutable=['batch_stats'])
      return out.sum()
    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(
        variables['params'], s, s).jaxpr
    edge_pads = [q for q in helpers.all_eqns(jaxpr)
                 if q.primitive.name == 'pad' and q.invars[0].aval.ndim == 5
                 and tuple(q.params['padding_config'][0][:2]) != (0, 0)]
    self.assertEmpty(edge_pads)  # 21 of them with y[m] per edge

  def test_network_output_and_mixing_weights_matter(self):
    net = darts.SearchNetwork(C=4, num_classes=5, layers=3)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    arch = arch_lib.init_logits(jax.random.key(1), net.arch_shapes())
    w = arch_lib.softmax_weights(arch)
    params, stats = base.init_variables(net, jax.random.key(2), x, w)
    apply = jax.jit(lambda w: net.apply(
        {'params': params, 'batch_stats': stats}, x, w, train=False))
    logits = apply(w)
    chex.assert_shape(logits, (2, 5))
    chex.assert_tree_all_finite(logits)
    # Only skip-connects on every edge: a different function.
    skip = {t: jax.nn.one_hot(jnp.full((14,), 3), 8) for t in w}
    other = apply(skip)
    self.assertGreater(float(jnp.abs(other - logits).max()), 1e-4)

  def test_cell_remat_same_values(self):
    kw = dict(C=4, num_classes=5, layers=3, steps=2, multiplier=2,
              primitives=('none', 'max_pool_3x3', 'skip_connect',
                          'sep_conv_3x3'), depthwise_impl='dense')
    plain = darts.SearchNetwork(**kw)
    remat = darts.SearchNetwork(**kw, cell_remat=True)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    y = jnp.arange(4) % 5
    arch, params, stats = _same_variables(plain, remat, x)
    loss_fn = lambda net: jax.jit(_loss_and_grad(net, stats, x, y))

    (l0, (_, s0)), g0 = loss_fn(plain)(params, arch)
    (l1, (_, s1)), g1 = loss_fn(remat)(params, arch)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    chex.assert_trees_all_close(s0, s1, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(g0, g1, rtol=1e-4, atol=1e-6)
    self.assertGreater(float(jnp.abs(g0[1]['normal']).max()), 0.)

    # The remat program recomputes the cells behind optimization barriers.
    # (XLA:CPU drops the barriers and merges the recomputation with the
    # forward pass, so the memory saving cannot be checked on CPU.)
    def barriers(net):
      return loss_fn(net).lower(params, arch).as_text().count(
          'optimization_barrier')
    self.assertGreaterEqual(barriers(remat), barriers(plain) + 3)  # 3 cells

  def test_bfloat16_activations_float32_parameters_and_gradients(self):
    kw = dict(C=4, num_classes=5, layers=3, steps=2, multiplier=2,
              primitives=('none', 'max_pool_3x3', 'avg_pool_3x3',
                          'skip_connect', 'sep_conv_3x3', 'dil_conv_3x3'),
              depthwise_impl='grouped')
    f32 = darts.SearchNetwork(**kw)
    bf16 = darts.SearchNetwork(**kw, compute_dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
    y = jnp.arange(8) % 5
    # float32 parameters and statistics, the same values.
    arch, params, stats = _same_variables(f32, bf16, x)
    loss_fn = lambda net: _loss_and_grad(net, stats, x, y)

    (l32, (z32, s32)), g32 = jax.jit(loss_fn(f32))(params, arch)
    (l16, (z16, s16)), g16 = jax.jit(loss_fn(bf16))(params, arch)
    for tree in (z16, s16, g16):
      self.assertEqual({a.dtype for a in jax.tree.leaves(tree)},
                       {jnp.dtype(jnp.float32)})
    # bfloat16 keeps 8 bits of mantissa: close, not equal. Over four seeds
    # the loss differed by 1e-4 to 1e-3 relative, the logits by 2-3%, and
    # the gradients' cosine similarity was 0.976-0.994.
    np.testing.assert_allclose(l16, l32, rtol=5e-3)
    self.assertLess(float(jnp.linalg.norm(z16 - z32) / jnp.linalg.norm(z32)),
                    0.1)
    self.assertGreater(float(jnp.abs(z16 - z32).max()), 0.)
    flat = lambda t: jnp.concatenate([a.ravel() for a in jax.tree.leaves(t)])
    a, b = flat(g32), flat(g16)
    self.assertGreater(float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b)),
                       0.95)
    a, b = flat(g32[1]), flat(g16[1])  # the architecture's gradient
    self.assertGreater(float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b)),
                       0.95)

    # Every convolution and contraction runs in bfloat16 except the
    # classifier's (on float32 pooled features).
    kinds, float32_out = collections.Counter(), []
    jaxpr = jax.make_jaxpr(loss_fn(bf16))(params, arch).jaxpr
    for eqn in helpers.all_eqns(jaxpr):
      if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
        kinds[(eqn.primitive.name,
               tuple(str(v.aval.dtype) for v in eqn.invars))] += 1
        if eqn.invars[0].aval.dtype == jnp.float32:
          float32_out.append(eqn.outvars[0].aval.shape)
    float32 = {k: n for k, n in kinds.items() if 'float32' in k[1]}
    self.assertEqual(float32, {('dot_general', ('float32', 'float32')): 9},
                     str(kinds))
    # The classifier's forward, input gradient and kernel gradient (32
    # features), and the mixing weights' gradient of each of the 6 source
    # groups (3 cells x 2: 4 edges leave the inputs, 1 leaves node 0),
    # [edges, 1, 5 ops], accumulated in float32.
    self.assertCountEqual(
        float32_out, [(8, 5), (8, 32), (5, 32)] + [(4, 1, 5), (1, 1, 5)] * 3)
    self.assertGreater(kinds[('conv_general_dilated',
                              ('bfloat16', 'bfloat16'))], 20)

  def test_bfloat16_with_edge_weights_and_single_path(self):
    # PC-DARTS edge weights and single-path gates are float32: the cells'
    # convolutions must still all run in bfloat16, and the gradients of the
    # weights and gates stay float32.
    kw = dict(C=8, num_classes=5, layers=3, steps=2, multiplier=2,
              primitives=('none', 'max_pool_3x3', 'skip_connect',
                          'sep_conv_3x3'), depthwise_impl='grouped',
              compute_dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32)
    cases = {
        'edge weights': (
            darts.SearchNetwork(**kw, partial_channels=2),
            lambda e, k: edges.EdgeWeighted(
                jnp.full((e, k), 1. / k, jnp.float32),  # not weakly typed
                jnp.full((e,), .5, jnp.float32))),
        'single path': (
            darts.SearchNetwork(**kw, single_path=True),
            lambda e, k: edges.SinglePath(jnp.arange(e) % k,
                                          jnp.ones(e, jnp.float32),
                                          jnp.zeros(e, jnp.float32))),
    }
    for name, (net, make) in cases.items():
      with self.subTest(name):
        weights = {t: make(*s) for t, s in net.arch_shapes().items()}
        variables = jax.eval_shape(
            functools.partial(net.init, train=True), jax.random.key(0), x,
            weights)

        def loss(variables, weights, net=net):
          logits, _ = net.apply(variables, jnp.zeros(x.shape, x.dtype),
                                weights, train=True, mutable=['batch_stats'])
          return logits.sum()

        grad = jax.grad(loss, (0, 1), allow_int=True)  # the int index
        out = jax.eval_shape(grad, variables, weights)
        self.assertEqual({a.dtype for a in jax.tree.leaves(out)
                          if a.dtype != jax.dtypes.float0},
                         {jnp.dtype(jnp.float32)})
        convs = collections.Counter(
            str(eqn.invars[0].aval.dtype) for eqn in helpers.all_eqns(
                jax.make_jaxpr(grad)(variables, weights).jaxpr)
            if eqn.primitive.name == 'conv_general_dilated')
        self.assertEqual(set(convs), {'bfloat16'}, str(convs))
        self.assertGreater(convs['bfloat16'], 20)

  def test_channel_shuffle_is_the_nchw_reference_permutation(self):
    x = np.arange(2 * 3 * 3 * 8, dtype=np.float32).reshape(2, 3, 3, 8)
    # PC-DARTS: view(B, g, C/g, H, W).transpose(1, 2).view(B, C, H, W).
    nchw = x.transpose(0, 3, 1, 2)
    want = nchw.reshape(2, 4, 2, 3, 3).transpose(0, 2, 1, 3, 4).reshape(
        2, 8, 3, 3).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(edges.channel_shuffle(jnp.asarray(x), 4),
                                  want)
    with self.assertRaisesRegex(ValueError, 'groups'):
      edges.channel_shuffle(jnp.ones((1, 6)), 4)

  def test_partial_channels_bypass_and_edge_weights(self):
    # Every op weight on 'none': each edge's ops give zeros, so an edge
    # outputs shuffle([0 on C/K channels, its input's other channels]) and a
    # node the edge-weighted sum of those.
    c, k, b = 8, 4, 2
    beta = jnp.asarray([0.3, 0.7, 0.2, 0.5, 0.3])
    ops_w = jax.nn.one_hot(jnp.zeros(5, jnp.int32), 8)
    w = edges.EdgeWeighted(ops_w, beta)
    rng = np.random.default_rng(0)
    for reduction in (False, True):
      cell = darts.SearchCell(
          c, reduction, False,
          darts.uniform_edge_ops(darts.ops.DARTS_PRIMITIVES, 2), steps=2,
          multiplier=2, partial_channels=k)
      s0, s1 = (jnp.asarray(rng.normal(size=(b, 8, 8, 12)), jnp.float32)
                for _ in range(2))
      variables = cell.init(jax.random.key(0), s0, s1, w, False)
      out, inter = cell.apply(variables, s0, s1, w, False,
                              capture_intermediates=True,
                              mutable=['intermediates'])
      inter = inter['intermediates']
      p0 = inter['preprocess0']['__call__'][0]
      p1 = inter['preprocess1']['__call__'][0]

      def edge(x, stride):
        rest = x[..., c // k:]
        if stride == 2:
          rest = jax.lax.reduce_window(rest, -jnp.inf, jax.lax.max,
                                       (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
        zeros = jnp.zeros(rest.shape[:-1] + (c // k,))
        return edges.channel_shuffle(jnp.concatenate([zeros, rest], -1), k)

      st = 2 if reduction else 1
      n0 = beta[0] * edge(p0, st) + beta[1] * edge(p1, st)
      n1 = (beta[2] * edge(p0, st) + beta[3] * edge(p1, st) +
            beta[4] * edge(n0, 1))
      np.testing.assert_allclose(out, jnp.concatenate([n0, n1], -1),
                                 rtol=1e-6, atol=1e-6)

  def test_rejects_bad_weights(self):
    net = darts.SearchNetwork(C=4, num_classes=5, layers=3)
    x = jnp.ones((1, 8, 8, 1))
    with self.assertRaisesRegex(ValueError, 'shape'):
      net.init(jax.random.key(0), x,
               {'normal': jnp.ones((14, 7)), 'reduce': jnp.ones((14, 8))},
               train=False)
    with self.assertRaisesRegex(ValueError, 'missing'):
      net.init(jax.random.key(0), x, {'normal': jnp.ones((14, 8))},
               train=False)

  def test_per_edge_op_subsets(self):
    ops_ = tuple(('max_pool_3x3', 'sep_conv_3x3') if e % 2 else
                 ('skip_connect', 'dil_conv_3x3') for e in range(14))
    net = darts.SearchNetwork(C=4, num_classes=3, layers=3, normal_ops=ops_,
                              reduce_ops=ops_)
    self.assertEqual(net.arch_shapes()['normal'], (14, 2))
    x = jnp.ones((2, 8, 8, 1))
    w = {t: jnp.full((14, 2), .5) for t in ('normal', 'reduce')}
    logits = jax.eval_shape(lambda: net.init_with_output(
        jax.random.key(0), x, w, train=True)[0])
    chex.assert_shape(logits, (2, 3))


if __name__ == '__main__':
  absltest.main()

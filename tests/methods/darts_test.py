"""DARTS steps on a tiny supernet: what each step touches, tracing, 2nd order."""

import functools

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnas import arch as arch_lib
from jaxnas import hypergrad
from jaxnas import optim
from jaxnas.methods import base
from jaxnas.methods import darts
from jaxnas.spaces import darts as darts_space
from tests.methods import helpers

# Two nodes per cell (5 edges) and four of the eight ops (a zero, a pool,
# the identity, a convolution) keep XLA's compile time small on a CPU; what
# these tests check does not depend on the op set.
NET = darts_space.SearchNetwork(
    C=4, num_classes=10, layers=3, steps=2, multiplier=2,
    primitives=('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3'))
B, H = 8, 8
_batch = functools.partial(helpers.random_batch, n=B, size=H)


class DartsStepTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.method = darts.make(NET, steps_per_epoch=4, epochs=2)
    cls.state = cls.method.init(jax.random.key(0), _batch(0)['image'][:1])
    cls.batch = {'train': _batch(1), 'val': _batch(2)}

  def test_init_shapes(self):
    chex.assert_shape(self.state.arch['normal'], (5, 4))
    chex.assert_shape(self.state.arch['reduce'], (5, 4))
    self.assertLess(float(jnp.abs(self.state.arch['normal']).max()), 1e-2)
    self.assertEqual(int(self.state.step), 0)

  def test_step_updates_both_and_traces_once(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch):
      return self.method.step(state, batch)

    state = self.state
    for _ in range(3):
      new, metrics = step(state, self.batch)
      self.assertTrue(helpers.changed(new.params, state.params))
      self.assertTrue(helpers.changed(new.arch, state.arch))
      chex.assert_tree_all_finite(metrics)
      state = new
    self.assertEqual(int(state.step), 3)
    self.assertEqual(
        set(metrics),
        {'train_loss', 'train_acc', 'val_loss', 'val_acc', 'grad_norm', 'lr'})

  def test_shared_backward_step_equals_two_phase_step(self):
    shared = darts.make(NET, steps_per_epoch=4, epochs=2, share_backward=True)
    two_phase = darts.make(NET, steps_per_epoch=4, epochs=2,
                           share_backward=False)
    step_a = jax.jit(two_phase.step)
    step_b = jax.jit(shared.step)
    a = b = self.state
    for _ in range(2):
      a, metrics_a = step_a(a, self.batch)
      b, metrics_b = step_b(b, self.batch)
    chex.assert_trees_all_close(b.arch, a.arch, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(b.params, a.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(b.batch_stats, a.batch_stats, rtol=1e-5,
                                atol=1e-6)
    chex.assert_trees_all_close(metrics_b, metrics_a, rtol=1e-5, atol=1e-6)
    self.assertEqual(int(b.step), 2)
    # The shared step's gradient convolutions are in the forward's layout
    # (`ops.conv2d`'s loop-friendly VJP); the two-phase step's, from JAX's
    # own rules, are not.
    conv_layouts = lambda step: helpers.conv_layouts(step, self.state,
                                                     self.batch)
    if jax.default_backend() != 'cpu':
      self.skipTest('the loop-friendly gradients are for XLA:CPU')
    self.assertLen(conv_layouts(shared.step), 1)
    self.assertGreater(len(conv_layouts(two_phase.step)), 1)
    # On CPU the default (share_backward=None) is the shared step where the
    # two batches have one shape, and the two-phase step where they do not;
    # share_backward=True refuses them.
    self.assertLen(conv_layouts(self.method.step), 1)
    uneven = {'train': self.batch['train'], 'val': _batch(7, n=B // 2)}
    jax.make_jaxpr(self.method.step)(self.state, uneven)
    with self.assertRaisesRegex(ValueError, 'one shape'):
      jax.make_jaxpr(shared.step)(self.state, uneven)
    with self.assertRaisesRegex(ValueError, 'share_backward'):
      darts.make(NET, steps_per_epoch=4, order='exact', share_backward=True)
    with self.assertRaisesRegex(ValueError, 'dense_loop'):
      darts.make(NET.clone(depthwise_impl='dense_loop'), steps_per_epoch=4,
                 order='exact')

  def test_each_half_step_touches_only_its_pytree(self):
    loss_fn = functools.partial(base.classification_loss, net=NET,
                                weights_fn=arch_lib.softmax_weights)
    a_tx = optim.torch_adam(3e-4, b1=0.5, b2=0.999, weight_decay=1e-3)
    w_tx = optim.torch_sgd(0.025, momentum=0.9, weight_decay=3e-4,
                           clip_norm=5.)
    arch_step = jax.jit(functools.partial(darts.arch_step, loss_fn=loss_fn,
                                          a_tx=a_tx))
    after_arch, _ = arch_step(self.state, self.batch['train'],
                              self.batch['val'])
    self.assertTrue(helpers.changed(after_arch.arch, self.state.arch))
    chex.assert_trees_all_equal(after_arch.params, self.state.params)
    chex.assert_trees_all_equal(after_arch.w_opt_state,
                                self.state.w_opt_state)
    weight_step = jax.jit(functools.partial(base.weight_step, loss_fn=loss_fn,
                                            w_tx=w_tx))
    after_w, _ = weight_step(self.state, self.batch['train'])
    self.assertTrue(helpers.changed(after_w.params, self.state.params))
    chex.assert_trees_all_equal(after_w.arch, self.state.arch)
    chex.assert_trees_all_equal(after_w.a_opt_state, self.state.a_opt_state)

  def test_derive(self):
    g = self.method.derive(self.state)
    self.assertLen(g.normal, 4)  # 2 nodes x 2 inputs
    self.assertEqual(g.normal_concat, [2, 3])

  def test_bad_order(self):
    with self.assertRaisesRegex(ValueError, 'order'):
      darts.make(NET, steps_per_epoch=4, order='third')


class SecondOrderTest(absltest.TestCase):
  """Finite-difference vs exact Hessian-vector products.

  Run in float64: in float32 the central difference's rounding error is a few
  percent of the second-order term at R = 0.01 / ||v||, which would measure
  float32, not the algorithm.
  """

  def test_finite_difference_agrees_with_exact_and_step_uses_it(self):
    # Four ops (zero, pool, identity, convolution): the hypergradient maths
    # does not depend on which, and XLA compiles the float64 programs faster.
    net = darts_space.SearchNetwork(
        C=4, num_classes=10, layers=3, steps=1, multiplier=1,
        primitives=('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3'))
    method = darts.make(net, steps_per_epoch=4, epochs=2, order='second')
    state = method.init(jax.random.key(0), _batch(0)['image'][:1])
    # One real step first, so that the momentum buffer is non-zero.
    state, _ = jax.jit(method.step)(state, {'train': _batch(3),
                                            'val': _batch(4)})
    loss_fn = functools.partial(base.classification_loss, net=net,
                                weights_fn=arch_lib.softmax_weights)
    schedule = optim.darts_cosine(0.025, 0.001, 2, 4)
    with jax.enable_x64(True):
      to64 = lambda t: jax.tree.map(
          lambda x: x.astype(jnp.float64)
          if jnp.issubdtype(x.dtype, jnp.floating) else x, t)
      state64 = to64(state)
      kw = dict(lr=schedule(state.step).astype(jnp.float64),
                momentum_buf=optim.momentum_buffer(state64.w_opt_state,
                                                   state64.params),
                momentum=0.9, weight_decay=3e-4)
      self.assertGreater(float(optax.tree.norm(kw['momentum_buf'])), 0.)
      trn, val = to64(_batch(5)), to64(_batch(6))
      args = (state64.params, state64.arch, state64.batch_stats, trn, val)
      # r and lr are traced arguments: two compiles serve four results.
      fd_fn = jax.jit(lambda r, *a: hypergrad.unrolled_fd(
          loss_fn, *a, r=r, **kw)[0])
      exact_fn = jax.jit(lambda lr, *a: hypergrad.unrolled_exact(
          loss_fn, *a, **dict(kw, lr=lr))[0])
      fd = fd_fn(jnp.float64(hypergrad.DARTS_FD_R), *args)
      fd_small_r = fd_fn(jnp.float64(1e-5), *args)
      exact = exact_fn(kw['lr'], *args)
      no_hvp = exact_fn(jnp.zeros_like(kw['lr']), *args)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    f, e, e0 = flat(fd), flat(exact), flat(no_hvp)
    cosine = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    # The reference's r = 0.01: the hypergradients agree closely; how closely
    # depends on the point (ReLU kinks within R of the weights).
    self.assertGreater(cosine(f, e), 0.95)
    # The second-order terms alone: at r = 0.01 the central difference spans
    # ReLU kinks (cosine ~0.95 here); as r shrinks it converges to the exact
    # Hessian-vector product.
    hvp_exact, hvp_small_r = e - e0, flat(fd_small_r) - e0
    self.assertGreater(cosine(hvp_small_r, hvp_exact), 0.999)
    self.assertGreater(cosine(hvp_small_r, hvp_exact),
                       cosine(f - e0, hvp_exact))
    # arch_step(order='second') applies the finite-difference gradient
    # (float32 here, so compare loosely).
    a_tx = optim.torch_adam(3e-4, b1=0.5, b2=0.999, weight_decay=1e-3)
    new, _ = jax.jit(functools.partial(
        darts.arch_step, loss_fn=loss_fn, a_tx=a_tx, order='second',
        lr_schedule=schedule))(state, _batch(5), _batch(6))
    step_delta = flat(new.arch) - flat(state.arch)
    updates, _ = a_tx.update(jax.tree.map(lambda x: x.astype(jnp.float32),
                                          fd), state.a_opt_state, state.arch)
    self.assertGreater(cosine(step_delta, flat(updates)), 0.99)

  def test_shared_second_order_step_equals_two_phase_step(self):
    # float64: the finite differences divide float rounding by R.
    net = darts_space.SearchNetwork(
        C=4, num_classes=10, layers=3, steps=1, multiplier=1,
        primitives=('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3'))
    make = functools.partial(darts.make, net, steps_per_epoch=4, epochs=2,
                             order='second')
    shared, two_phase = make(share_backward=True), make(share_backward=False)
    with jax.enable_x64(True):
      to64 = lambda t: jax.tree.map(
          lambda x: x.astype(jnp.float64)
          if jnp.issubdtype(x.dtype, jnp.floating) else x, t)
      a = b = start = to64(shared.init(jax.random.key(0),
                                       _batch(0)['image'][:1]))
      step_a, step_b = jax.jit(two_phase.step), jax.jit(shared.step)
      for i in range(2):  # the second step has a momentum buffer
        batch = to64({'train': _batch(2 * i + 3), 'val': _batch(2 * i + 4)})
        a, metrics_a = step_a(a, batch)
        b, metrics_b = step_b(b, batch)
      self.assertTrue(helpers.changed(b.arch, start.arch))
      for x, y in ((b.arch, a.arch), (b.params, a.params),
                   (b.batch_stats, a.batch_stats), (b.a_opt_state,
                                                    a.a_opt_state),
                   (metrics_b, metrics_a)):
        chex.assert_trees_all_close(x, y, rtol=1e-9, atol=1e-12)
      self.assertEqual(int(b.step), 2)
      if jax.default_backend() == 'cpu':
        self.assertLen(helpers.conv_layouts(shared.step, b, batch), 1)
    uneven = {'train': _batch(7), 'val': _batch(7, n=B // 2)}
    with self.assertRaisesRegex(ValueError, 'one shape'):
      jax.make_jaxpr(shared.step)(b, uneven)


if __name__ == '__main__':
  absltest.main()

"""Optimizers and schedules against PyTorch's update rules, by hand."""

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np
import optax

from jaxnas import optim


class ScheduleTest(absltest.TestCase):

  def test_darts_cosine_is_stepped_at_epoch_start(self):
    lr = optim.darts_cosine(0.025, 0.001, epochs=50, steps_per_epoch=10)
    self.assertAlmostEqual(float(lr(0)), 0.024976, places=6)
    self.assertAlmostEqual(float(lr(9)), 0.024976, places=6)
    self.assertAlmostEqual(float(lr(10)), 0.024905, places=6)
    self.assertAlmostEqual(float(lr(499)), 0.001, places=7)
    want = [0.001 + 0.024 * (1 + np.cos(np.pi * (e + 1) / 50)) / 2
            for e in range(50)]
    np.testing.assert_allclose([lr(10 * e) for e in range(50)], want,
                               rtol=1e-5)

  def test_bad_arguments(self):
    with self.assertRaises(ValueError):
      optim.darts_cosine(0.025, 0.05, 50, 10)
    with self.assertRaises(ValueError):
      optim.per_epoch(lambda e: e, 0)


class TorchOptimizersTest(absltest.TestCase):

  def test_sgd_matches_torch_formula(self):
    tx = optim.torch_sgd(0.1, momentum=0.9, weight_decay=0.01, clip_norm=1.)
    w = {'w': jnp.array([1., -2.])}
    state = tx.init(w)
    buf, wn = np.zeros(2), np.array([1., -2.])
    for raw in ([3., 4.], [0.1, 0.2]):
      # clip_grad_norm_(max_norm=1), then SGD(momentum, weight_decay).
      g = np.array(raw) * min(1., 1. / np.linalg.norm(raw))
      buf = 0.9 * buf + (g + 0.01 * wn)
      wn = wn - 0.1 * buf
      u, state = tx.update({'w': jnp.asarray(raw)}, state, w)
      w = optax.apply_updates(w, u)
      np.testing.assert_allclose(w['w'], wn, rtol=1e-6)
      np.testing.assert_allclose(optim.momentum_buffer(state, w)['w'], buf,
                                 rtol=1e-6)

  def test_nesterov_sgd_matches_torch_formula(self):
    tx = optim.torch_sgd(0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    w = {'w': jnp.array([1., -2.])}
    state = tx.init(w)
    buf, wn = np.zeros(2), np.array([1., -2.])
    for raw in ([3., 4.], [0.1, 0.2], [-1., 0.5]):
      # torch.optim.SGD(nesterov=True): d = g + wd * w; buf = mu * buf + d;
      # w -= lr * (d + mu * buf).
      d = np.array(raw) + 0.01 * wn
      buf = 0.9 * buf + d
      wn = wn - 0.1 * (d + 0.9 * buf)
      u, state = tx.update({'w': jnp.asarray(raw)}, state, w)
      w = optax.apply_updates(w, u)
      np.testing.assert_allclose(w['w'], wn, rtol=1e-6)

  def test_adam_adds_l2_to_gradient(self):
    tx = optim.torch_adam(0.1, b1=0.5, b2=0.999, weight_decay=0.5)
    a = {'a': jnp.array([2.])}
    u, _ = tx.update({'a': jnp.array([0.])}, tx.init(a), a)
    # First Adam step moves by ~lr * sign(g + wd * a) = -0.1.
    np.testing.assert_allclose(u['a'], [-0.1], rtol=1e-4)

  def test_momentum_buffer_defaults_to_zeros(self):
    tx = optax.adam(1e-3)
    p = {'w': jnp.ones(3)}
    np.testing.assert_array_equal(
        optim.momentum_buffer(tx.init(p), p)['w'], np.zeros(3))


if __name__ == '__main__':
  absltest.main()

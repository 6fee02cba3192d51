"""Optimizers and schedules against PyTorch's update rules, by hand."""

from absl.testing import absltest
import jax
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


def _eg_step(tx, p, g):
  state = tx.init(p)
  updates, _ = tx.update(g, state, p)
  return optax.apply_updates(p, updates)


class ExponentiatedGradientTest(absltest.TestCase):

  def test_one_step_is_the_closed_form(self):
    p = jnp.array([[0.5, 0.3, 0.2], [0.25, 0.25, 0.5]])
    g = jnp.array([[1., -2., 0.5], [0., 3., -1.]])
    got = _eg_step(optim.exponentiated_gradient(0.1, floor=1e-5), p, g)
    # By hand: p * exp(-0.1 g), then divide by the row sum (no entry is near
    # the floor).
    w = np.array([[0.5 * np.exp(-0.1), 0.3 * np.exp(0.2), 0.2 * np.exp(-0.05)],
                  [0.25, 0.25 * np.exp(-0.3), 0.5 * np.exp(0.1)]])
    np.testing.assert_allclose(got, w / w.sum(1, keepdims=True), rtol=1e-6)

  def test_floor_then_renormalise(self):
    p = jnp.array([0.5, 0.5])
    got = np.asarray(_eg_step(optim.exponentiated_gradient(1., floor=0.1), p,
                              jnp.array([0., 10.])))
    # Unfloored: [1 / (1 + e^-10), e^-10 / (1 + e^-10)]; the second is lifted
    # to 0.1, then both are divided by their new sum.
    q = 1 / (1 + np.exp(-10.))
    np.testing.assert_allclose(got, np.array([q, 0.1]) / (q + 0.1), rtol=1e-6)
    # EGDAS' order: normalise first, then floor (the sum exceeds 1).
    got = _eg_step(optim.exponentiated_gradient(
        1., floor=0.1, floor_after_normalise=True), p, jnp.array([0., 10.]))
    np.testing.assert_allclose(got, [q, 0.1], rtol=1e-6)

  def test_stays_on_the_simplex_under_random_and_extreme_gradients(self):
    floor, n = 1e-5, 7
    tx = optim.exponentiated_gradient(0.1, floor=floor)
    rng = np.random.default_rng(0)
    p = jnp.full((14, n), 1 / n)
    state = tx.init(p)
    for scale in (1., 1e3, 1e6, -1e6, 1e6):
      g = jnp.asarray(rng.standard_normal((14, n)) * scale, jnp.float32)
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
      q = np.asarray(p, np.float64)
      self.assertTrue(np.all(np.isfinite(q)))
      # optax adds the update `q - p` to p: float32 rounding at 1 (1.2e-7).
      self.assertGreaterEqual(q.min(), floor / (1 + n * floor) - 1.2e-7)
      np.testing.assert_allclose(q.sum(-1), 1., atol=1e-6)
    # After +-1e6 gradients every row is a vertex lifted to the floor.
    np.testing.assert_allclose(np.sort(q, -1)[:, :-1], floor / (1 + 6 * floor),
                               atol=1.2e-7)

  def test_segments_normalise_each_nodes_edges(self):
    ids = [0, 0, 1, 1, 1]   # node 0: edges 0-1; node 1: edges 2-4
    p = jnp.array([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3])
    g = jnp.array([1e6, 0., 0., 2., -1.])
    got = np.asarray(_eg_step(optim.exponentiated_gradient(
        0.5, floor=0., segment_ids=ids), p, g))
    np.testing.assert_allclose(got[:2], [0., 1.], atol=1e-7)
    w = np.exp(-0.5 * np.array([0., 2., -1.]))
    np.testing.assert_allclose(got[2:], w / w.sum(), rtol=1e-6)

  def test_learning_rate_schedule_and_errors(self):
    tx = optim.exponentiated_gradient(lambda count: 0.1 * count)
    p, g = jnp.array([0.5, 0.5]), jnp.array([1., 0.])
    state = tx.init(p)
    u, state = tx.update(g, state, p)          # count 0: lr 0, no change
    np.testing.assert_allclose(u, 0., atol=1e-7)
    u, state = tx.update(g, state, p)
    self.assertLess(float(optax.apply_updates(p, u)[0]), 0.5)
    with self.assertRaisesRegex(ValueError, 'needs the params'):
      tx.update(g, state)

  def test_entropic_regulariser_is_the_gradient_of_kl_to_uniform(self):
    p = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    kl = lambda q: 0.01 * jnp.sum(q * jnp.log(q * 3))
    g, _ = optim.entropic_regulariser(0.01).update(jnp.zeros_like(p),
                                                   optax.EmptyState(), p)
    np.testing.assert_allclose(g, jax.grad(kl)(p), rtol=1e-6)


if __name__ == '__main__':
  absltest.main()

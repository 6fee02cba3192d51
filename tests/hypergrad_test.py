"""Hypergradients against closed forms on a quadratic bilevel problem."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import hypergrad

jax.config.update('jax_enable_x64', False)

RNG = np.random.default_rng(0)
N, K = 5, 3
P = RNG.normal(size=(N, N)); P = P @ P.T + N * np.eye(N)
M = RNG.normal(size=(N, K))
Q = np.diag(RNG.uniform(1, 2, K))
NV = RNG.normal(size=(N, K))
T = RNG.normal(size=N)


def loss_fn(params, arch, batch_stats, batch):
  """batch 0: L_trn = w'Pw/2 + w'Ma;  batch 1: L_val = |w-t|^2/2 + a'Qa/2 + w'Na."""
  w, a = params['w'], arch['a']
  trn = 0.5 * w @ P @ w + w @ M @ a
  val = 0.5 * jnp.sum((w - T) ** 2) + 0.5 * a @ Q @ a + w @ NV @ a
  loss = jnp.where(batch == 0, trn, val)
  return loss, (batch_stats, None)


class HypergradTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.w = {'w': jnp.asarray(RNG.normal(size=N), jnp.float32)}
    self.a = {'a': jnp.asarray(RNG.normal(size=K), jnp.float32)}
    self.m = {'w': jnp.asarray(RNG.normal(size=N), jnp.float32)}
    self.kw = dict(lr=0.05, momentum_buf=self.m, momentum=0.9,
                   weight_decay=3e-4)

  def expected(self):
    w, a, m = (np.asarray(self.w['w'], np.float64),
               np.asarray(self.a['a'], np.float64),
               np.asarray(self.m['w'], np.float64))
    xi = 0.05
    w1 = w - xi * (0.9 * m + P @ w + M @ a + 3e-4 * w)
    v = w1 - T + NV @ a
    return Q @ a + NV.T @ w1 - xi * M.T @ v

  def test_first_order(self):
    g, _, _ = hypergrad.first_order(loss_fn, self.w, self.a, {}, 1)
    w, a = np.asarray(self.w['w']), np.asarray(self.a['a'])
    np.testing.assert_allclose(g['a'], Q @ a + NV.T @ w, rtol=1e-5)

  def test_exact_matches_closed_form(self):
    g, _, _ = hypergrad.unrolled_exact(loss_fn, self.w, self.a, {}, 0, 1,
                                       **self.kw)
    np.testing.assert_allclose(g['a'], self.expected(), rtol=1e-4, atol=1e-5)

  def test_finite_difference_matches_closed_form(self):
    g, _, _ = hypergrad.unrolled_fd(loss_fn, self.w, self.a, {}, 0, 1,
                                    **self.kw)
    # The loss is quadratic, so central differences are exact up to rounding.
    np.testing.assert_allclose(g['a'], self.expected(), rtol=2e-3, atol=2e-3)

  def test_second_order_term_has_the_reference_sign(self):
    g_exact, _, _ = hypergrad.unrolled_exact(loss_fn, self.w, self.a, {}, 0,
                                             1, **self.kw)
    g_zero_lr, _, _ = hypergrad.unrolled_exact(
        loss_fn, self.w, self.a, {}, 0, 1, **dict(self.kw, lr=0.))
    w1 = np.asarray(self.w['w']) - 0.05 * (
        0.9 * np.asarray(self.m['w']) + P @ np.asarray(self.w['w']) +
        M @ np.asarray(self.a['a']) + 3e-4 * np.asarray(self.w['w']))
    self.assertFalse(np.allclose(g_exact['a'], g_zero_lr['a']))
    v = w1 - T + NV @ np.asarray(self.a['a'])
    np.testing.assert_allclose(
        g_exact['a'] - (Q @ np.asarray(self.a['a']) + NV.T @ w1),
        -0.05 * M.T @ v, rtol=1e-3, atol=1e-5)


if __name__ == '__main__':
  absltest.main()

"""`edges.mix`, the mixture as one contraction, against the plain sum."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import edges


def _plain_mix(terms, num_edges):
  """sum_o w[e, o] * y_o[e] as a chain of scaled adds (the plain form)."""
  shape = (num_edges,) + terms[0][2].shape[1:]
  out = jnp.zeros(shape, terms[0][2].dtype)
  for rows, w, y in terms:
    out = out.at[jnp.asarray(rows)].add(
        w.reshape((-1,) + (1,) * (y.ndim - 1)) * y)
  return out


def _terms(rows_per_op, shape, seed):
  rng = np.random.default_rng(seed)
  return [(rows, jnp.asarray(rng.uniform(size=len(rows)), jnp.float32),
           jnp.asarray(rng.standard_normal((len(rows),) + shape), jnp.float32))
          for rows in rows_per_op]


class MixTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('every_edge_every_op', [[0, 1, 2]] * 4),
      ('per_edge_subsets', [[0, 1, 2], [1], [0, 2], [2]]),
      ('unordered_rows', [[2, 0, 1], [1, 2, 0], [2, 0]]),
      ('one_op', [[0, 1]]),
  )
  def test_values_and_gradients_equal_the_plain_sum(self, rows_per_op):
    num_edges = max(max(r) for r in rows_per_op) + 1
    terms = _terms(rows_per_op, (2, 5, 5, 3), seed=0)
    ws, ys = [w for _, w, _ in terms], [y for _, _, y in terms]

    def run(fn):
      def f(ws, ys):
        return fn([(r, w, y) for r, w, y in zip(rows_per_op, ws, ys)],
                  num_edges)
      out, vjp = jax.vjp(f, ws, ys)
      g = jnp.asarray(np.random.default_rng(1).standard_normal(out.shape),
                      jnp.float32)
      return out, vjp(g)

    out, (g_ws, g_ys) = run(edges.mix)
    ref, (r_ws, r_ys) = run(_plain_mix)
    chex.assert_shape(out, (num_edges, 2, 5, 5, 3))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_ws + g_ys, r_ws + r_ys):
      chex.assert_equal_shape([a, b])
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  def test_hand_computed_mixture(self):
    ones = jnp.ones((2, 1, 1, 1, 1))
    terms = [([0, 1], jnp.array([0.25, 0.5]), ones),
             ([1], jnp.array([2.0]), 3 * ones[:1])]
    np.testing.assert_allclose(
        edges.mix(terms, 2).ravel(), [0.25, 0.5 + 2.0 * 3])

  def test_one_contraction_per_mixture(self):
    """The mixture is a dot_general (XLA does not fuse it into consumers)."""
    terms = _terms([[0, 1]] * 3, (2, 4, 4, 3), seed=2)
    jaxpr = jax.make_jaxpr(lambda ws, ys: edges.mix(
        [([0, 1], w, y) for w, y in zip(ws, ys)], 2))(
            [w for _, w, _ in terms], [y for _, _, y in terms])
    prims = [str(e.primitive) for e in jaxpr.jaxpr.eqns]
    self.assertNotIn('add', prims)
    text = str(jaxpr)
    self.assertEqual(text.count('dot_general'), 1)

  def test_contraction_second_order_and_vmap(self):
    """Forward and reverse mode to second order (the exact hypergradient
    takes jvp of grad), and vmap over both arguments."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.uniform(size=(3, 4)))
    ys = jnp.asarray(rng.standard_normal((3, 4, 6)))
    with jax.enable_x64():
      jax.test_util.check_grads(edges._weighted_sum, (w, ys), order=2,  # pylint: disable=protected-access
                                modes=('fwd', 'rev'))
    batched = jax.vmap(edges._weighted_sum)(  # pylint: disable=protected-access
        jnp.stack([w, 2 * w]), jnp.stack([ys, -ys]))
    expected = np.einsum('ek,ekn->en', w, ys)
    np.testing.assert_allclose(batched[0], expected, rtol=1e-6)
    np.testing.assert_allclose(batched[1], -2 * expected, rtol=1e-6)

  def test_weight_gradient_on_a_long_sum(self):
    """The weights' gradient sums B*H*W*C terms: within 1e-5 of float64 on
    262k terms (a float32 dot; 2e-6 measured), against the exact sum."""
    rng = np.random.default_rng(4)
    ys = rng.standard_normal((2, 3, 262144)).astype(np.float32)
    g = rng.standard_normal((2, 262144)).astype(np.float32)
    w = np.full((2, 3), 1 / 3, np.float32)
    _, vjp = jax.vjp(edges._weighted_sum, w, ys)  # pylint: disable=protected-access
    g_w = np.asarray(vjp(g)[0], np.float64)
    exact = np.einsum('ekn,en->ek', ys.astype(np.float64), g.astype(np.float64))
    self.assertLess(np.abs(g_w - exact).max() / np.abs(exact).max(), 1e-5)

  def test_dtypes_promote_and_repeated_rows_are_rejected(self):
    half = jnp.ones((1, 2), jnp.bfloat16)
    full = jnp.full((1, 2), 1.001, jnp.float32)
    out = edges.mix([([0], jnp.ones(1), half), ([1], jnp.ones(1), full)], 2)
    self.assertEqual(out.dtype, jnp.float32)
    np.testing.assert_allclose(out, [[1, 1], [1.001, 1.001]], rtol=1e-6)
    with self.assertRaisesRegex(ValueError, 'repeated'):
      edges.mix([([0, 0], jnp.ones(2), jnp.ones((2, 3)))], 2)

  def test_only_none_is_rejected(self):
    with self.assertRaisesRegex(ValueError, 'none'):
      edges.mix([], 3)


if __name__ == '__main__':
  absltest.main()

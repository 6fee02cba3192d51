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
    jaxpr = jax.make_jaxpr(lambda t: edges.mix(t, 2))(terms)
    prims = [str(e.primitive) for e in jaxpr.jaxpr.eqns]
    self.assertNotIn('add', prims)
    text = str(jaxpr)
    self.assertEqual(text.count('dot_general'), 1)

  def test_only_none_is_rejected(self):
    with self.assertRaisesRegex(ValueError, 'none'):
      edges.mix([], 3)


if __name__ == '__main__':
  absltest.main()

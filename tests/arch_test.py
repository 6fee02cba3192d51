"""Single-path samplers: Gumbel-max, Gumbel-Top2 (ROME-v2), pairs (ROME-v1)."""

import itertools

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxnas import arch as arch_lib
from jaxnas import edges

STEPS = 4
N_SAMPLES = 20000


def _hard(st):
  """Forward values of straight-through gates (hard + soft - soft: exact
  zeros, ones up to one rounding), rounded to 0 / 1."""
  v = np.asarray(jax.lax.stop_gradient(st))
  np.testing.assert_allclose(v, np.round(v), atol=1e-6)
  return np.round(v)


def _chi2_pvalue(counts, probs):
  counts = np.asarray(counts, np.float64)
  expected = np.asarray(probs, np.float64) * counts.sum()
  return stats.chi2.sf(np.sum((counts - expected) ** 2 / expected),
                       len(counts) - 1)


class GumbelMaxTest(absltest.TestCase):

  def test_value_one_hot_gradient_of_relaxation(self):
    logits = jnp.array([[0.3, -1., 2., 0.], [1., 1., 1., 1.]])
    key = jax.random.key(3)
    st, index, soft = arch_lib.gumbel_max_st(key, logits, 0.7)
    chex.assert_shape(st, (2, 4))
    np.testing.assert_allclose(
        _hard(st), np.eye(4)[np.asarray(index)], atol=1e-6)
    np.testing.assert_allclose(np.asarray(soft).sum(-1), 1., rtol=1e-6)
    c = jnp.arange(8.).reshape(2, 4)
    g_st = jax.grad(lambda l: jnp.sum(arch_lib.gumbel_max_st(key, l, 0.7)[0]
                                      * c))(logits)
    g_soft = jax.grad(lambda l: jnp.sum(arch_lib.gumbel_max_st(key, l, 0.7)[2]
                                        * c))(logits)
    np.testing.assert_allclose(g_st, g_soft, rtol=1e-6)
    self.assertGreater(float(jnp.abs(g_st).sum()), 0.)

  def test_frequencies_follow_softmax(self):
    logits = jnp.array([0.5, -0.3, 1.2, 0., -1.])
    keys = jax.random.split(jax.random.key(0), N_SAMPLES)
    idx = jax.vmap(lambda k: arch_lib.gumbel_max_st(k, logits, 1.)[1])(keys)
    counts = np.bincount(np.asarray(idx), minlength=5)
    self.assertGreater(
        _chi2_pvalue(counts, jax.nn.softmax(logits)), 1e-3)


class GumbelTop2Test(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.beta = jnp.array(
        [0.2, -0.4,  0.9, 0., -0.7,  1.1, -0.2, 0.3, -1.,
         0.4, 0.1, -0.8, 1.3, -0.1])

  def _sample(self, sampler, beta):
    keys = jax.random.split(jax.random.key(1), N_SAMPLES)
    return _hard(jax.vmap(lambda k: sampler(k, beta, STEPS, 0.5))(keys))

  def test_two_distinct_edges_per_node(self):
    for sampler, beta in ((arch_lib.gumbel_top2_st, self.beta),
                          (arch_lib.gumbel_pair_st, jnp.zeros(20))):
      hard = self._sample(sampler, beta)
      self.assertTrue(np.all((hard == 0) | (hard == 1)))
      for start, n in arch_lib.node_segments(STEPS):
        np.testing.assert_array_equal(hard[:, start:start + n].sum(1), 2)

  def test_pairs_match_sampling_without_replacement(self):
    hard = self._sample(arch_lib.gumbel_top2_st, self.beta)
    for start, n in arch_lib.node_segments(STEPS)[1:]:
      b = np.asarray(self.beta[start:start + n], np.float64)
      p = np.exp(b) / np.exp(b).sum()
      pairs = list(itertools.combinations(range(n), 2))
      # P{i, k} = p_i p_k / (1 - p_i) + p_k p_i / (1 - p_k).
      probs = [p[i] * p[k] / (1 - p[i]) + p[k] * p[i] / (1 - p[k])
               for i, k in pairs]
      self.assertAlmostEqual(sum(probs), 1., places=9)
      h = hard[:, start:start + n]
      counts = [np.sum((h[:, i] == 1) & (h[:, k] == 1)) for i, k in pairs]
      self.assertGreater(_chi2_pvalue(counts, probs), 1e-3,
                         msg=f'node with {n} inputs: {counts}')

  def test_v1_pairs_follow_pair_softmax(self):
    beta = jnp.linspace(-1., 1., 20)
    hard = self._sample(arch_lib.gumbel_pair_st, beta)
    start_pair = 0
    for start, n in arch_lib.node_segments(STEPS):
      pairs = arch_lib.node_pairs(n)
      p = jax.nn.softmax(beta[start_pair:start_pair + len(pairs)])
      h = hard[:, start:start + n]
      counts = [np.sum((h[:, i] == 1) & (h[:, k] == 1)) for i, k in pairs]
      if len(pairs) > 1:
        self.assertGreater(_chi2_pvalue(counts, p), 1e-3)
      start_pair += len(pairs)

  def test_shapes_and_probabilities(self):
    self.assertEqual(arch_lib.topology_shape(4, 'v2'), (14,))
    self.assertEqual(arch_lib.topology_shape(4, 'v1'), (1 + 3 + 6 + 10,))
    with self.assertRaisesRegex(ValueError, 'v1'):
      arch_lib.topology_shape(4, 'v3')
    probs = np.asarray(arch_lib.edge_probabilities(self.beta, STEPS, 'v2'))
    for start, n in arch_lib.node_segments(STEPS):
      self.assertAlmostEqual(float(probs[start:start + n].sum()), 1.,
                             places=6)
    # v1: the best pair's two inputs score highest at each node.
    beta = jnp.zeros(20).at[1 + 3 + 2].set(5.)  # node 2, pair (1, 2)
    probs = np.asarray(arch_lib.edge_probabilities(beta, STEPS, 'v1'))
    self.assertEqual(sorted(np.argsort(-probs[5:9])[:2]), [1, 2])


class SinglePathSampleTest(absltest.TestCase):

  def _arch(self, topology):
    key = jax.random.key(0)
    arch = {'ops': arch_lib.init_logits(key, {'normal': (14, 7),
                                               'reduce': (14, 7)}, 1.)}
    if topology != 'none':
      shape = arch_lib.topology_shape(STEPS, topology)
      arch['edges'] = arch_lib.init_logits(
          key, {'normal': shape, 'reduce': shape}, 1.)
    return arch

  def test_sample_structure(self):
    for topology in ('none', 'v1', 'v2'):
      arch = self._arch(topology)
      s = arch_lib.sample_single_path(jax.random.key(4), arch, 1.,
                                      steps=STEPS, topology=topology)
      for t in ('normal', 'reduce'):
        sp = s[t]
        self.assertIsInstance(sp, edges.SinglePath)
        chex.assert_shape([sp.index, sp.gate, sp.offset], (14,))
        on = np.asarray(sp.index) >= 0
        np.testing.assert_allclose(np.asarray(sp.gate), on.astype(float),
                                   atol=1e-6)
        np.testing.assert_array_equal(np.asarray(sp.offset), 0.)
        if topology == 'none':
          self.assertTrue(on.all())
        else:
          for start, n in arch_lib.node_segments(STEPS):
            self.assertEqual(on[start:start + n].sum(), 2)

  def test_gradients_reach_ops_and_edges(self):
    arch = self._arch('v2')

    def f(a):
      s = arch_lib.sample_single_path(jax.random.key(5), a, 0.5,
                                      steps=STEPS, topology='v2')
      return sum(jnp.sum(sp.gate * jnp.arange(14.)) for sp in s.values())

    g = jax.grad(f)(arch)
    for leaf in jax.tree.leaves(g):
      self.assertTrue(np.all(np.isfinite(leaf)))
      self.assertGreater(float(jnp.abs(leaf).sum()), 0.)

  def test_zero_terms(self):
    arch = self._arch('none')
    s = arch_lib.sample_single_path(jax.random.key(6), arch, 1.,
                                    zero_terms=True)['normal']
    np.testing.assert_array_equal(np.asarray(s.offset), 0.)
    g = jax.grad(lambda a: jnp.sum(arch_lib.sample_single_path(
        jax.random.key(6), a, 1., zero_terms=True)['normal'].offset))(arch)
    self.assertGreater(float(jnp.abs(g['ops']['normal']).sum()), 0.)

  def test_mode(self):
    arch = self._arch('v2')
    m = arch_lib.mode_single_path(arch, steps=STEPS, topology='v2')['normal']
    idx = np.asarray(m.index)
    probs = np.asarray(arch_lib.edge_probabilities(arch['edges']['normal'],
                                                   STEPS, 'v2'))
    for start, n in arch_lib.node_segments(STEPS):
      chosen = set(np.flatnonzero(idx[start:start + n] >= 0))
      self.assertEqual(chosen, set(np.argsort(-probs[start:start + n])[:2]))
    on = idx >= 0
    np.testing.assert_array_equal(
        idx[on], np.argmax(np.asarray(arch['ops']['normal']), -1)[on])


if __name__ == '__main__':
  absltest.main()

"""NAO's token codec and encoder-predictor-decoder."""

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxnas import epd
from jaxnas.spaces import nao
from jaxnas.spaces import nb201


class CodecTest(absltest.TestCase):

  def test_round_trip_and_reference_tokens(self):
    rng = np.random.default_rng(0)
    archs = nao.random_archs(500, rng)
    enc = nao.encoding()
    self.assertEqual((enc.vocab_size, enc.length), (12, 40))
    for a in archs:
      t = nao.to_tokens(a)
      self.assertTrue(enc.valid(t))
      np.testing.assert_array_equal(nao.from_tokens(t), a)
    # utils.parse_arch_to_seq: input j -> j + 1, op k -> k + 7.
    cell = [0, 4, 1, 0, 2, 3, 0, 1, 3, 2, 1, 0, 4, 1, 0, 4, 5, 3, 2, 2]
    t = nao.to_tokens([cell, cell])
    self.assertEqual(t[:20].tolist(), [1, 11, 2, 7, 3, 10, 1, 8, 4, 9, 2, 7,
                                       5, 8, 1, 11, 6, 10, 3, 9])
    # Node 0 may read inputs 0, 1 only; node 4 inputs 0..5.
    np.testing.assert_array_equal(np.nonzero(enc.allowed[0])[0], [1, 2])
    np.testing.assert_array_equal(np.nonzero(enc.allowed[16])[0],
                                  [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(np.nonzero(enc.allowed[21])[0],
                                  [7, 8, 9, 10, 11])
    bad = t.copy()
    bad[0] = 3   # node 0 reading node 1
    with self.assertRaisesRegex(ValueError, 'not a valid'):
      nao.from_tokens(bad)
    # Every input and op value occurs (uniform sampling).
    flat = archs.reshape(500, 2, 5, 2, 2)
    self.assertEqual(set(flat[:, :, 4, :, 0].ravel()), set(range(6)))
    self.assertEqual(set(flat[..., 1].ravel()), set(range(5)))

  def test_swap_exchanges_one_node_per_cell(self):
    rng = np.random.default_rng(1)
    tokens = np.stack([nao.to_tokens(a) for a in nao.random_archs(30, rng)])
    out = nao.swap_augment(tokens, 3, rng)
    chex.assert_shape(out, (90, 40))
    for c in range(3):
      for i in range(30):
        a = tokens[i].reshape(2, 5, 2, 2)
        b = out[c * 30 + i].reshape(2, 5, 2, 2)
        for cell in range(2):
          changed = [n for n in range(5) if not np.array_equal(a[cell, n],
                                                               b[cell, n])]
          self.assertLessEqual(len(changed), 1)
          for n in changed:
            np.testing.assert_array_equal(b[cell, n], a[cell, n][::-1])

  def test_nb201_tokens(self):
    archs = list(nb201.all_archs())
    tokens = np.stack([nb201.to_tokens(a) for a in archs])
    self.assertLen({tuple(t) for t in tokens}, 15625)
    enc = nb201.encoding()
    self.assertTrue(all(enc.valid(t) for t in tokens[::97]))
    for a, t in zip(archs[::501], tokens[::501]):
      self.assertEqual(nb201.from_tokens(t), a)


class BalancedSamplingTest(absltest.TestCase):

  def test_param_count_on_hand_built_cells(self):
    # N=1 (5 cells, reductions at 1 and 3), 1 node, C=4, 10 classes; the
    # arithmetic per cell is in the comments (see nao.param_count).
    kw = dict(layers=1, nodes=1, channels=4)
    normal = [0, 4, 1, 4]            # identity on both inputs: concat [2]
    # stem 27*12 + 24 = 348; cell0 two ReLUConvBN 12->4: 112; cell1
    # (C=8) 12->8 and 4->8: 112 + 48, sep3 stride 2: 2*(72+64+16) = 304;
    # cell2 FR 4->8: 48; cell3 (C=16) 8->16 twice: 320, sep3: 864; cell4
    # FR 8->16: 160; classifier 16*10 + 10 = 170.
    self.assertEqual(nao.param_count([normal, [0, 0, 1, 2]], **kw), 2486)
    # Reduce cell: identity at stride 2 (FactorizedReduce 8->8: 80) and a
    # max pool, both on input 0: input 1 is unused, factorized-reduced into
    # the concat (80), which is 2C wide. cell1 112 + 48 + 80 + 80; cell2 FR
    # 4->8 48 + 16->8 144; cell3 8->16 160 + FR 288 + FR 288; cell4 FR
    # 8->16 160 + 32->16 544.
    self.assertEqual(nao.param_count([normal, [0, 4, 0, 3]], **kw), 2582)

  def test_param_count_equals_the_built_network(self):
    archs = nao.random_archs(6, np.random.default_rng(5))
    for a, (layers, channels) in zip(archs, [(1, 8)] * 5 + [(3, 20)]):
      net = nao.network(a, layers=layers, channels=channels)
      x = jnp.zeros((2, 32, 32, 3))
      variables = jax.eval_shape(lambda n=net, x=x: n.init(
          jax.random.key(0), x, train=False))
      self.assertEqual(
          sum(int(np.prod(v.shape))
              for v in jax.tree.leaves(variables['params'])),
          nao.param_count(a, layers=layers, channels=channels))
      logits = jax.eval_shape(lambda v, x, n=net: n.apply(v, x, train=False),
                              variables, x)
      chex.assert_shape(logits, (2, 10))

  def test_sampling_follows_parameter_counts(self):
    archs = nao.random_archs(8, np.random.default_rng(3))
    probs = nao.sample_probabilities(archs)
    counts = np.asarray([nao.param_count(a) for a in archs])
    np.testing.assert_allclose(probs, counts / counts.sum())
    self.assertGreater(counts.max() / counts.min(), 1.2)
    draws = np.bincount([nao.sample_index(probs, 0, s) for s in range(20000)],
                        minlength=8)
    self.assertEqual(nao.sample_index(probs, 0, 7), nao.sample_index(
        probs, 0, 7))
    p = stats.chisquare(draws, 20000 * probs).pvalue
    self.assertGreater(p, 1e-3)
    # ... and not uniform.
    self.assertLess(stats.chisquare(draws).pvalue, 1e-3)


class EPDTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.enc = nao.encoding()
    cls.model = epd.EPD(cls.enc.vocab_size, cls.enc.length)
    rng = np.random.default_rng(0)
    cls.tokens = np.stack([nao.to_tokens(a)
                           for a in nao.random_archs(40, rng)])
    # A learnable target: the share of sep_conv_3x3 (token 7) in the arch.
    cls.targets = (cls.tokens == 7).mean(1) * 3.
    cls.params = cls.model.init(jax.random.PRNGKey(0),
                                cls.tokens[:1])['params']

  def test_loss_falls_and_shapes(self):
    pred, logp = self.model.apply({'params': self.params}, self.tokens[:4])
    chex.assert_shape(pred, (4,))
    chex.assert_shape(logp, (4, 40, 12))
    np.testing.assert_allclose(jnp.exp(logp).sum(-1), 1., rtol=1e-5)
    params, history = epd.fit(self.model, self.params, self.tokens,
                              self.targets, epochs=100,
                              key=jax.random.PRNGKey(1), batch_size=20)
    self.assertLen(history, 100)
    # (Measured: loss 0.55 -> 0.29 by epoch 60, MSE 0.063 -> 0.003.)
    self.assertLess(history[-1]['loss'], 0.6 * history[0]['loss'])
    self.assertLess(history[-1]['mse'], 0.25 * history[0]['mse'])
    self.assertLess(history[-1]['nll'], history[0]['nll'])
    self.__class__.trained = params

  def test_greedy_decoding_is_always_valid(self):
    params = getattr(self, 'trained', self.params)
    for p in (self.params, params):
      new, step = epd.generate(self.model, p, self.tokens, self.enc.allowed,
                               count=60)
      self.assertGreater(len(new), 0)
      self.assertBetween(step, 1, 51)
      for t in new:
        self.assertTrue(self.enc.valid(t), t)
        nao.from_tokens(t)
      self.assertEmpty({tuple(t) for t in new} &
                       {tuple(t) for t in self.tokens})

  def test_ascent_raises_the_prediction(self):
    model, params = self.model, self.params
    t = jnp.asarray(self.tokens[:8], jnp.int32)
    outs = model.apply({'params': params}, t, method=epd.EPD.encode)
    chex.assert_shape(outs, (8, 20, 64))
    np.testing.assert_allclose(jnp.linalg.norm(outs, axis=-1), 1., rtol=1e-5)

    def pred(o):
      return model.apply({'params': params}, o, method=epd.EPD.predict)[1]

    g = jax.grad(lambda o: pred(o).sum())(outs)
    moved = epd._normalise(outs + 0.5 * g)  # pylint: disable=protected-access
    self.assertTrue(np.all(np.asarray(pred(moved)) > np.asarray(pred(outs))))


if __name__ == '__main__':
  absltest.main()

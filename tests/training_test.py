"""Training a found cell: the step, its devices, and experiments.train."""

import contextlib
import io
import json
import os
import shutil
import tempfile

from absl.testing import absltest
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds

from experiments import train as train_lib
from experiments.configs import train as train_config
from jaxnas import optim
from jaxnas import parallel
from jaxnas import training
from jaxnas.spaces import darts_eval
from jaxnas.spaces import genotype as genotype_lib
from tests.methods import helpers


class TrainStepTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    g = genotype_lib.named('DARTS_V2')
    # 32x32 images: the auxiliary head reads the 8x8 output of cell 2.
    cls.net = darts_eval.cifar_network(g, C=4, layers=3,
                                       bn_axis_name=parallel.AXIS)
    cls.batch = helpers.random_batch(0, 16, 32, 3)

  def make(self, **kw):
    tx = optim.torch_sgd(0.05, momentum=0.9, weight_decay=3e-4, clip_norm=5.)
    return training.make(self.net, tx, steps_per_epoch=2, epochs=4, **kw)

  def test_loss_falls_with_aux_and_drop_path_ramps_per_epoch(self):
    trainer = self.make(drop_path_prob=0.2, aux_weight=0.4)
    state = trainer.init(jax.random.key(0), (1, 32, 32, 3))
    self.assertIn(darts_eval.AUX_NAME, state.params)
    step = jax.jit(chex.assert_max_traces(trainer.step, n=1))
    losses, rates = [], []
    for _ in range(8):
      state, m = step(state, self.batch)
      losses.append(float(m['train_loss']))
      rates.append(float(m['drop_path']))
      # The auxiliary loss is added with weight 0.4.
      self.assertGreater(float(m['train_total_loss']),
                         float(m['train_loss']))
    # Epoch e of 4 (2 steps each) drops with 0.2 * e / 4.
    np.testing.assert_allclose(rates, np.repeat([0., .05, .1, .15], 2),
                               rtol=1e-6)
    self.assertLess(np.mean(losses[-2:]), losses[0])
    # Rows labelled -1 are padding: not counted.
    padded = dict(self.batch, label=self.batch['label'].at[10:].set(-1))
    sums = jax.jit(trainer.eval_step)(state, padded)
    logits, _ = self.net.apply(
        {'params': state.params, 'batch_stats': state.batch_stats},
        self.batch['image'][:10], train=False)
    labels = self.batch['label'][:10]
    self.assertEqual(int(sums['count']), 10)
    self.assertEqual(int(sums['correct']),
                     int(jnp.sum(jnp.argmax(logits, -1) == labels)))
    top5 = jnp.argsort(-logits, -1)[:, :5]
    self.assertEqual(int(sums['correct5']),
                     int(jnp.sum(jnp.any(top5 == labels[:, None], -1))))
    np.testing.assert_allclose(
        float(sums['loss_sum']),
        float(training.cross_entropy(logits, labels).sum()), rtol=1e-5)

  def test_eight_devices_equal_one(self):
    trainer = self.make(drop_path_prob=0., aux_weight=0.4)
    state = trainer.init(jax.random.key(1), (1, 32, 32, 3))
    one = jax.jit(trainer.step)
    s1 = state
    for _ in range(2):
      s1, m1 = one(s1, self.batch)
    s8, m8 = helpers.pmap_steps(trainer.step, state, [self.batch] * 2)
    chex.assert_trees_all_close(s8.params, s1.params, atol=1e-5)
    chex.assert_trees_all_close(s8.batch_stats, s1.batch_stats, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m8['train_loss'])[0],
                               float(m1['train_loss']), rtol=1e-5)

  def test_label_smoothing_is_the_references(self):
    logits = jnp.array([[2., 0., -1.], [0.5, 0.5, 3.]])
    labels = jnp.array([0, 2])
    eps = 0.1
    target = (1 - eps) * jax.nn.one_hot(labels, 3) + eps / 3
    expected = -(target * jax.nn.log_softmax(logits)).sum(-1)
    np.testing.assert_allclose(
        training.cross_entropy(logits, labels, eps), expected, rtol=1e-6)
    np.testing.assert_allclose(
        training.cross_entropy(logits, labels),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _tiny(**overrides):
  config = train_config.get_config('tiny')
  config.progress = False
  config.tensorboard = False
  config.parallel = 'jit'
  config.max_eval_examples = 100
  config.update(overrides)
  return config


class TrainEntryPointTest(absltest.TestCase):

  def test_epochs_zero_prints_counts_and_exits(self):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      state, result = train_lib.train(_epochs0('cifar10'), tempfile.mkdtemp(),
                                      'DARTS_V2')
    self.assertIsNone(state)
    self.assertEqual(result['params'], 3_349_342)
    self.assertIn('parameters: 3.35M (3,349,342, auxiliary head excluded',
                  out.getvalue())
    self.assertGreater(result['macs'], 4e8)
    _, result = train_lib.train(_epochs0('imagenet'), tempfile.mkdtemp(),
                                'PDARTS')
    self.assertEqual(result['params'], 4_944_352)

  def test_bad_genotype_and_config_fail_clearly(self):
    with self.assertRaisesRegex(train_lib.ConfigError, 'DARTS_V9'):
      train_lib.train(_epochs0('cifar10'), tempfile.mkdtemp(), 'DARTS_V9')
    with self.assertRaisesRegex(train_lib.ConfigError, 'arch string'):
      train_lib.train(_epochs0('nb201'), tempfile.mkdtemp(), 'DARTS_V2')
    for field, value, message in (
        ('drop_path_prob', 1.5, 'drop_path_prob'),
        ('dataset', 'imagenet2012', 'goes with imagenet2012'),
        ('lr_schedule', 'step', 'lr_schedule'),
        ('max_steps_per_epoch', -1, 'max_steps_per_epoch')):
      config = _epochs0('cifar10')
      config[field] = value
      with self.assertRaisesRegex(train_lib.ConfigError, message):
        train_lib.train(config, tempfile.mkdtemp())
    config = _epochs0('nb201')
    config.drop_path_prob = 0.2
    with self.assertRaisesRegex(train_lib.ConfigError, 'no drop path'):
      train_lib.train(config, tempfile.mkdtemp())

  def test_runs_resumes_exactly_and_reports(self):
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, True)
    ref = os.path.join(tmp, 'ref')
    config = _tiny(checkpoint_every_steps=2, keep_checkpoints=5)
    state, result = train_lib.train(config, ref, 'DARTS_V1')
    with open(os.path.join(ref, 'result.json')) as f:
      saved = json.load(f)
    self.assertEqual(saved, result)
    self.assertEqual(result['step'], 8)
    self.assertBetween(result['test_acc'], 0., 1.)
    self.assertTrue(os.path.isdir(os.path.join(ref, 'checkpoints', '8')))
    with open(os.path.join(ref, 'metrics.jsonl')) as f:
      epochs = [r for r in map(json.loads, f) if 'test_acc' in r]
    self.assertEqual([r['epoch'] for r in epochs], [0, 1])
    self.assertGreater(epochs[1]['drop_path'], epochs[0]['drop_path'])
    # A run stopped after step 2, in the middle of epoch 0 (its checkpoint
    # alone), resumes exactly: weights, and the epoch's running means.
    cut = os.path.join(tmp, 'cut')
    os.makedirs(os.path.join(cut, 'checkpoints'))
    shutil.copytree(os.path.join(ref, 'checkpoints', '2'),
                    os.path.join(cut, 'checkpoints', '2'))
    resumed, result2 = train_lib.train(config, cut, 'DARTS_V1')
    chex.assert_trees_all_equal(resumed.params, state.params)
    self.assertEqual(result2['test_acc'], result['test_acc'])
    with open(os.path.join(cut, 'metrics.jsonl')) as f:
      resumed_epochs = [r for r in map(json.loads, f) if 'test_acc' in r]
    self.assertEqual(resumed_epochs, epochs)
    # Another genotype is another run: the checkpoint refuses it.
    from jaxnas import checkpoint  # pylint: disable=g-import-not-at-top
    with self.assertRaisesRegex(checkpoint.CheckpointError, 'config'):
      train_lib.train(config, cut, 'DARTS_V2')


class ImageNetTrainTest(absltest.TestCase):

  def test_one_step_on_mock_imagenet_with_label_smoothing(self):
    config = train_config.get_config('imagenet')
    config.update(dict(init_channels=8, layers=3, batch_size=4, epochs=1,
                       max_steps_per_epoch=2, max_eval_examples=4,
                       eval_batch_size=4, parallel='jit', progress=False,
                       tensorboard=False))
    wd = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, wd, True)
    with tfds.testing.mock_data(num_examples=8):
      _, result = train_lib.train(config, wd, 'DARTS_V2')
    self.assertEqual(result['step'], 2)
    self.assertBetween(result['test_top5'], result['test_acc'], 1.)
    with open(os.path.join(wd, 'metrics.jsonl')) as f:
      record = [r for r in map(json.loads, f) if 'test_acc' in r][0]
    # lr 0.1 x (4 / 128) x 0.97 in epoch 0 (StepLR stepped first).
    self.assertAlmostEqual(record['lr'], 0.1 * 4 / 128 * 0.97, places=7)
    self.assertTrue(np.isfinite(record['train_loss']))


def _epochs0(variant):
  config = train_config.get_config(variant)
  config.epochs = 0
  return config


if __name__ == '__main__':
  absltest.main()

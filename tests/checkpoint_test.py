"""Checkpointer: exact round trips, retention, and loud failures."""

import os
import shutil
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnas import checkpoint
from jaxnas.methods.base import SearchState


def make_state(width=4, seed=0):
  """A tiny SearchState with SGD-momentum and Adam states and a PRNG key."""
  k1, k2, key = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {'dense': {'w': jax.random.normal(k1, (3, width)),
                      'b': jnp.zeros((width,), jnp.bfloat16)}}
  arch = {'normal': jax.random.normal(k2, (2, 3))}
  w_tx = optax.chain(optax.clip_by_global_norm(5.),
                     optax.sgd(0.1, momentum=0.9))
  a_tx = optax.adam(1e-3)
  state = SearchState(
      step=jnp.array(0, jnp.int32), params=params,
      batch_stats={'mean': jnp.arange(2, dtype=jnp.float32)}, arch=arch,
      w_opt_state=w_tx.init(params), a_opt_state=a_tx.init(arch), key=key)
  # One update so the optimizer states hold non-trivial values.
  grads = jax.tree.map(jnp.ones_like, params)
  w_up, w_opt = w_tx.update(grads, state.w_opt_state, params)
  _, a_opt = a_tx.update(jax.tree.map(jnp.ones_like, arch),
                         state.a_opt_state, arch)
  return state.replace(step=state.step + 1,
                       params=optax.apply_updates(params, w_up),
                       w_opt_state=w_opt, a_opt_state=a_opt)


def files_under(d):
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)


class CheckpointTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

  def open(self, **kw):
    ckpt = checkpoint.Checkpointer(self.dir, **kw)
    self.addCleanup(ckpt.close)
    return ckpt

  def save_one(self, step=5, state=None, meta=None):
    ckpt = self.open()
    ckpt.save(step, make_state() if state is None else state,
              {'config_fingerprint': 'abc', 'epoch': 1} if meta is None
              else meta)
    ckpt.wait()
    return ckpt

  def test_round_trip_is_exact(self):
    state = make_state()
    meta = {'config_fingerprint': 'abc', 'step': 5, 'stage': 'search'}
    self.save_one(state=state, meta=meta).close()
    # A fresh Checkpointer, as after a restart, into a differently seeded state.
    restored, got_meta = self.open().restore(make_state(seed=1))
    self.assertEqual(got_meta, meta)
    self.assertEqual(jax.tree.structure(restored), jax.tree.structure(state))
    for path, a, b in zip(*zip(*jax.tree_util.tree_flatten_with_path(state)[0]),
                          jax.tree.leaves(restored)):
      self.assertEqual(a.dtype, b.dtype, path)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), str(path))
    self.assertIsInstance(restored.a_opt_state[0], optax.ScaleByAdamState)
    self.assertIsInstance(restored.w_opt_state[1][0], optax.TraceState)
    self.assertEqual(restored.key.dtype, jnp.uint32)

  def test_restore_from_abstract_target(self):
    state = make_state()
    self.save_one(state=state)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, _ = self.open().restore(abstract)
    np.testing.assert_array_equal(restored.params['dense']['w'],
                                  state.params['dense']['w'])

  def test_keeps_last_k_and_latest_step(self):
    ckpt = self.open(max_to_keep=2)
    self.assertIsNone(ckpt.latest_step())
    state = make_state()
    for step in (1, 2, 3, 4):
      self.assertTrue(ckpt.save(step, state.replace(step=jnp.array(step)),
                                {'step': step}))
    ckpt.wait()
    self.assertEqual(ckpt.all_steps(), [3, 4])
    self.assertEqual(ckpt.latest_step(), 4)
    self.assertEqual(sorted(os.listdir(self.dir)), ['3', '4'])
    restored, meta = ckpt.restore(state, step=3)
    self.assertEqual((int(restored.step), meta), (3, {'step': 3}))

  def test_no_checkpoint_raises(self):
    with self.assertRaisesRegex(checkpoint.CheckpointError,
                                'No checkpoint in .*latest_step'):
      self.open().restore(make_state())
    self.save_one(step=5)
    with self.assertRaisesRegex(checkpoint.CheckpointError, r'step 7.*\[5\]'):
      self.open().restore(make_state(), step=7)

  def test_shape_mismatch_raises(self):
    self.save_one()
    before = files_under(self.dir)
    with self.assertRaises(checkpoint.CheckpointError) as cm:
      self.open().restore(make_state(width=5))
    msg = str(cm.exception)
    self.assertIn(self.dir, msg)
    self.assertIn('step 5', msg)
    self.assertIn('params.dense.w: checkpoint float32[3, 4], target '
                  'float32[3, 5]', msg)
    self.assertIn('w_opt_state.1.0.trace.dense.w', msg)
    self.assertIn('new workdir', msg)
    self.assertEqual(files_under(self.dir), before)

  def test_dtype_and_structure_mismatch_raise(self):
    self.save_one()
    state = make_state()
    wrong_dtype = state.replace(step=state.step.astype(jnp.float32))
    with self.assertRaisesRegex(checkpoint.CheckpointError,
                                r'step: checkpoint int32\[\], target float32'):
      self.open().restore(wrong_dtype)
    extra = state.replace(arch={**state.arch, 'reduce': jnp.zeros(3)})
    with self.assertRaisesRegex(checkpoint.CheckpointError,
                                'arch.reduce: not in the checkpoint'):
      self.open().restore(extra)

  def test_fingerprint_mismatch_raises(self):
    config = {'lr': 0.025, 'layers': 8, 'workdir': '/a'}
    fp = checkpoint.config_fingerprint(config)
    self.assertEqual(fp, checkpoint.config_fingerprint(
        {'workdir': '/b', 'layers': 8, 'lr': 0.025}))
    other = checkpoint.config_fingerprint({**config, 'layers': 5})
    self.assertNotEqual(fp, other)
    self.save_one(meta={'config_fingerprint': fp})
    ckpt = self.open()
    _, meta = ckpt.restore(make_state(), expect={'config_fingerprint': fp})
    self.assertEqual(meta['config_fingerprint'], fp)
    with self.assertRaisesRegex(
        checkpoint.CheckpointError,
        f"(?s)step 5 .*meta\\['config_fingerprint'\\]: checkpoint \"{fp}\", "
        f'expected "{other}"'):
      ckpt.restore(make_state(), expect={'config_fingerprint': other})
    self.assertEqual(ckpt.all_steps(), [5])

  def test_corrupt_checkpoint_raises_and_keeps_files(self):
    for damage in ('delete', 'truncate'):
      with self.subTest(damage):
        shutil.rmtree(self.dir)
        self.save_one().close()
        step_dir = os.path.join(self.dir, '5', 'state')
        # The array data (the merged OCDBT store, not the per-process copy).
        data = [f for f in files_under(step_dir)
                if '/d/' in f and 'ocdbt.process' not in f]
        self.assertNotEmpty(data)
        if damage == 'delete':
          os.remove(data[0])
        else:
          open(data[0], 'wb').close()
        before = files_under(self.dir)
        with self.assertRaisesRegex(checkpoint.CheckpointError,
                                    '(?s)step 5 is unreadable.*new workdir'):
          self.open().restore(make_state())
        self.assertEqual(files_under(self.dir), before)

  def test_missing_metadata_raises(self):
    self.save_one().close()
    os.remove(os.path.join(self.dir, '5', 'meta', 'metadata'))
    with self.assertRaisesRegex(checkpoint.CheckpointError, 'unreadable'):
      self.open().restore(make_state())

  def test_fingerprint_ignores_nested_paths(self):
    a = {'model': {'width': 16, 'name': 'x'}, 'log_every_steps': 10}
    b = {'model': {'width': 16, 'name': 'y'}, 'log_every_steps': 50}
    self.assertEqual(checkpoint.config_fingerprint(a, ignore=(
        'model.name', 'log_every_steps')), checkpoint.config_fingerprint(
            b, ignore=('model.name', 'log_every_steps')))
    self.assertNotEqual(checkpoint.config_fingerprint(a),
                        checkpoint.config_fingerprint(b))


if __name__ == '__main__':
  absltest.main()

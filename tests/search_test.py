"""The search entry point: outputs, exact resume after SIGKILL / SIGTERM, and
clear errors for bad input that leave existing checkpoints untouched.

The runs are real subprocesses of `python -m experiments.search` sharing one
persistent compilation cache, so only the first one compiles.
"""

import contextlib
import glob
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl.testing import absltest
import jax
import numpy as np
from PIL import Image

from experiments import common
from experiments import search
from experiments.configs import darts as darts_config
from experiments.configs import dropnas as dropnas_config
from experiments.configs import gaea as gaea_config
from experiments.configs import gdas as gdas_config
from experiments.configs import pdarts as pdarts_config
from experiments.configs import rome as rome_config
from jaxnas import checkpoint
from jaxnas import data
from jaxnas.spaces import genotype as genotype_lib
from tests import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 epochs x 4 steps, a checkpoint every 2 steps; cells of 1 node (2 edges:
# what these tests check does not depend on the cell, and each run compiles).
OVERRIDES = dict(epochs=2, max_steps_per_epoch=4, checkpoint_every_steps=2,
                 log_every_steps=2, max_eval_examples=200, steps=1,
                 multiplier=1)
ARGS = ('--config=experiments/configs/darts.py:tiny',
        *(f'--config.{k}={v}' for k, v in OVERRIDES.items()))
TOTAL_STEPS = 8


def _tiny_config():
  config = darts_config.get_config('tiny')
  config.update(OVERRIDES)
  config.progress = False
  return config


def _snapshot(path):
  """{relative path: (size, mtime)} of every file under `path`."""
  out = {}
  for dirpath, _, files in os.walk(path):
    for name in files:
      full = os.path.join(dirpath, name)
      st = os.stat(full)
      out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
  return out


def _not_blank(test, path):
  with Image.open(path) as im:
    pixels = np.asarray(im.convert('RGB'), np.float32)
  test.assertGreater(pixels.shape[0] * pixels.shape[1], 10_000, path)
  test.assertGreater(pixels.std(), 5., f'{path} looks blank')


def _tb_scalars(logdir):
  """{tag: [(step, value)]} read from the TensorBoard event files."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


class XlaFlagsTest(absltest.TestCase):
  """`common.xla_flags`: YNN fusions off unless the user chose otherwise."""

  def test_adds_ynn_off_and_keeps_the_users_choices(self):
    self.assertEqual(common.xla_flags({}), common.YNN_OFF)
    self.assertEqual(common.xla_flags({'XLA_FLAGS': '--a=1'}),
                     '--a=1 ' + common.YNN_OFF)
    mine = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'
    self.assertEqual(common.xla_flags({'XLA_FLAGS': mine}), mine)
    self.assertEqual(
        common.xla_flags({'XLA_FLAGS': '--a=1', 'JAXNAS_YNN': '1'}), '--a=1')


class HugePagesTest(absltest.TestCase):
  """`common.use_hugepages`: the entry points' re-exec with huge pages."""

  _CHILD = """
import ctypes, os, resource
from experiments import common
print('start', flush=True)
common.use_hugepages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20  # an mmap-sized block: 16384 pages of 4 KiB
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(n), 1, n)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.environ.get('GLIBC_TUNABLES'), faults)
"""

  def _child(self, **env):
    env = {k: v for k, v in dict(os.environ, **env).items() if v is not None}
    out = subprocess.run([sys.executable, '-c', self._CHILD], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()

  def test_opt_outs(self):
    self.assertFalse(common.hugepages_wanted({'JAXNAS_HUGEPAGES': '0'}))
    self.assertFalse(common.hugepages_wanted(
        {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'}))
    self.assertEqual(
        self._child(JAXNAS_HUGEPAGES='0', GLIBC_TUNABLES=None)[:2],
        ['start', 'None'])

  def test_reexec_once_keeps_other_tunables_and_cuts_page_faults(self):
    if not common.hugepages_wanted({}):
      self.skipTest('needs Linux, glibc >= 2.35 and transparent huge pages '
                    "in 'madvise' mode")
    start, again, tunables, faults = self._child(
        JAXNAS_HUGEPAGES=None, GLIBC_TUNABLES='glibc.malloc.arena_max=4')
    self.assertEqual([start, again], ['start', 'start'])  # exactly one exec
    self.assertEqual(tunables,
                     'glibc.malloc.arena_max=4:' + common.HUGEPAGE_TUNABLE)
    # 2 MiB pages: ~32 faults (544 measured), against 16385 with 4 KiB.
    self.assertLess(int(faults), 4096)
    plain = self._child(JAXNAS_HUGEPAGES='0', GLIBC_TUNABLES=None)
    self.assertGreater(int(plain[-1]), 16000)


class SearchRunTest(absltest.TestCase):
  """One uninterrupted reference run, then interrupted runs against it."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    # Two devices: the pmap path, without 8 programs sharing 2 cores.
    cls.env = dict(os.environ, JAXNAS_CACHE_DIR=os.path.join(cls.tmp, 'xla'),
                   PYTHONPATH=ROOT,
                   XLA_FLAGS=fixtures.xla_flags(2))
    cls.ref = os.path.join(cls.tmp, 'ref')
    proc = cls.run_search(cls.ref)
    if proc.returncode:
      raise AssertionError(f'reference run failed:\n{proc.stderr[-3000:]}')

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  @classmethod
  def command(cls, workdir, *extra):
    return [sys.executable, '-m', 'experiments.search', *ARGS,
            f'--workdir={workdir}', *extra]

  @classmethod
  def run_search(cls, workdir, *extra):
    return subprocess.run(cls.command(workdir, *extra), cwd=ROOT, env=cls.env,
                          capture_output=True, text=True, timeout=900)

  def start_and_signal(self, workdir, signum, after_step):
    """Runs on `workdir`; sends `signum` once checkpoint `after_step` exists.

    Returns (return code, stdout, stderr).
    """
    proc = subprocess.Popen(self.command(workdir), cwd=ROOT, env=self.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ready = os.path.join(workdir, 'checkpoints', str(after_step))
    deadline = time.time() + 600
    while not os.path.isdir(ready) and proc.poll() is None:
      self.assertLess(time.time(), deadline, 'no checkpoint after 600 s')
      time.sleep(0.05)
    self.assertIsNone(proc.poll(), 'the run ended before it was signalled')
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err

  def assert_same_result(self, workdir):
    with np.load(os.path.join(self.ref, 'alphas.npz')) as a, \
        np.load(os.path.join(workdir, 'alphas.npz')) as b:
      self.assertEqual(sorted(a.files), sorted(b.files))
      for k in a.files:
        self.assertEqual(a[k].tobytes(), b[k].tobytes(), k)  # bitwise
    for name in ('genotype.json', 'metrics.jsonl'):
      with open(os.path.join(self.ref, name)) as f, \
          open(os.path.join(workdir, name)) as g:
        self.assertEqual(f.read(), g.read(), name)

  def test_workdir_outputs(self):
    wd = self.ref
    self.assertEqual(checkpoint.Checkpointer(
        os.path.join(wd, 'checkpoints')).latest_step(), TOTAL_STEPS)
    for e in range(2):
      with open(os.path.join(wd, 'genotypes', f'epoch_{e:03d}.json')) as f:
        genotype_lib.Genotype.from_json(f.read()).validate()
      self.assertTrue(os.path.exists(
          os.path.join(wd, 'alphas', f'epoch_{e:03d}.npz')))
    with open(os.path.join(wd, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    epochs = [r for r in records if 'valid_acc' in r]
    self.assertEqual([r['epoch'] for r in epochs], [0, 1])
    self.assertEqual([r['step'] for r in epochs], [4, 8])
    for r in epochs:
      self.assertTrue(np.isfinite(r['train_loss']))
      self.assertBetween(r['valid_acc'], 0., 1.)
    self.assertLen([r for r in records if 'genotype' in r], 2)
    scalars = _tb_scalars(os.path.join(wd, 'tensorboard'))
    self.assertEqual([s for s, _ in scalars['epoch/valid_acc']], [4, 8])
    self.assertEqual([s for s, _ in scalars['train/train_loss']],
                     [2, 4, 6, 8])
    for name in ('normal.png', 'reduce.png', 'alpha_heatmap.png',
                 'alpha_trajectories.png'):
      _not_blank(self, os.path.join(wd, name))
    with open(os.path.join(wd, 'config.json')) as f:
      self.assertEqual(json.load(f)['epochs'], 2)

  def test_sigkill_then_sigterm_then_resume_is_exact(self):
    wd = os.path.join(self.tmp, 'interrupted')
    # SIGKILL once checkpoint 2 exists: nothing is saved on the way out.
    rc, _, err = self.start_and_signal(wd, signal.SIGKILL, after_step=2)
    self.assertEqual(rc, -signal.SIGKILL, err[-2000:])
    # Resume, then SIGTERM once checkpoint 4 exists: a checkpoint of the step
    # it stopped at is written before the process exits.
    rc, out, err = self.start_and_signal(wd, signal.SIGTERM, after_step=4)
    self.assertIn('resuming', out)
    self.assertEqual(rc, 128 + signal.SIGTERM, err[-2000:])
    stopped = int(err.split('stopped by SIGTERM at step ')[1].split(';')[0])
    self.assertEqual(checkpoint.Checkpointer(
        os.path.join(wd, 'checkpoints')).latest_step(), stopped)
    # Resume to the end: bitwise the uninterrupted run's alphas and logs.
    proc = self.run_search(wd)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn(f'from step {stopped}', proc.stdout)
    self.assert_same_result(wd)

  def test_bad_input_fails_clearly_and_leaves_checkpoints(self):
    before = _snapshot(self.ref)
    bad = [
        ('method', 'enas', 'unknown method'),
        ('dataset', 'mnist-9000', 'unknown dataset'),
        ('primitives', ('sep_conv_3x3', 'conv_9x9'), 'unknown operations'),
        ('space', 'nb101', 'does not search space'),
        ('init_channels', 0, 'init_channels must be a positive integer'),
        ('batch_size', -4, 'batch_size must be a positive integer'),
        ('epochs', 0, 'epochs must be a positive integer'),
        ('order', 'third', 'order must be one of'),
    ]
    for field, value, message in bad:
      with self.subTest(field):
        config = _tiny_config()
        config[field] = value
        with self.assertRaisesRegex(search.ConfigError, message):
          search.search(config, self.ref)
    config = _tiny_config()
    config.init_channels = 8  # the checkpoint holds a 4-channel network
    with self.assertRaisesRegex(checkpoint.CheckpointError,
                                'does not match this run'):
      search.search(config, self.ref)
    self.assertEqual(_snapshot(self.ref), before)

  def test_unknown_key_and_bad_value_exit_before_anything(self):
    wd = os.path.join(self.tmp, 'never')
    proc = self.run_search(wd, '--config.no_such_field=1')
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn('no_such_field', proc.stderr)
    proc = self.run_search(wd, '--config.layers=-1')
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn('layers must be a positive integer', proc.stderr)
    self.assertFalse(os.path.exists(wd))

  def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(self):
    # A NaN pixel in the weights batch of step 5: steps 0-4 are good, the
    # checkpoint of step 4 must survive and step 6's must not be written.
    original = data.SearchBatches.batch

    def batch_with_nan(self_, step):
      b = original(self_, step)
      if step == 5:
        b['train']['image'] = b['train']['image'].copy()
        b['train']['image'][0, 0, 0, 0] = np.nan
      return b

    wd = os.path.join(self.tmp, 'nan')
    config = _tiny_config()
    config.layers, config.steps, config.multiplier = 1, 1, 1  # compiles fast
    with mock.patch.object(data.SearchBatches, 'batch', batch_with_nan):
      with self.assertRaisesRegex(FloatingPointError,
                                  'non-finite metrics at step 5 '):
        search.search(config, wd)
    ckpt = checkpoint.Checkpointer(os.path.join(wd, 'checkpoints'))
    self.assertEqual(ckpt.all_steps(), [2, 4])
    with open(os.path.join(wd, 'metrics.jsonl')) as f:
      steps = [json.loads(line)['step'] for line in f]
    self.assertEqual(max(steps), 4)


class DataTest(absltest.TestCase):

  def test_search_on_real_cifar10_image_folder(self):
    root = fixtures.cifar10_folder()
    if root is None:
      self.skipTest(f'{fixtures.CIFAR10_TARBALL} is absent: no real CIFAR-10 '
                    'to search on')
    config = darts_config.get_config('tiny')
    config.dataset = 'folder:' + root
    config.crop_padding, config.flip = 4, True
    config.layers, config.steps, config.multiplier = 1, 2, 2
    config.batch_size, config.epochs, config.max_steps_per_epoch = 8, 1, 3
    config.max_eval_examples = config.eval_batch_size = 500
    config.progress = False
    workdir = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, workdir, True)
    with mock.patch.dict(os.environ, {'JAXNAS_DATA_CACHE': 'off'}):
      search.search(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    losses = [r['train_loss'] for r in records if 'train_loss' in r]
    self.assertNotEmpty(losses)
    self.assertTrue(np.all(np.isfinite(losses)))
    epoch = [r for r in records if 'valid_acc' in r][0]
    self.assertBetween(epoch['valid_acc'], 0., 1.)


def _fast_config(**overrides):
  """The tiny config shrunk to one cell of one node: compiles in seconds."""
  config = _tiny_config()
  config.layers, config.steps, config.multiplier = 1, 1, 1
  config.epochs, config.max_steps_per_epoch = 1, 3
  config.tensorboard = False
  config.update(overrides)
  return config


class ManySeedsTest(absltest.TestCase):

  def test_four_seeds_vmapped_equal_four_single_runs(self):
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, True)
    config = _fast_config(num_seeds=4, seed=2, arch_lr=0.05)
    state, genotypes = search.search(config, os.path.join(tmp, 'many'))
    self.assertLen(genotypes, 4)
    for i, seed in enumerate(range(2, 6)):
      single_state, single = search.search(
          _fast_config(seed=seed, arch_lr=0.05),
          os.path.join(tmp, f'single{seed}'))
      self.assertEqual(genotypes[i], single, f'seed {seed}')
      for t in ('normal', 'reduce'):
        np.testing.assert_allclose(state.arch[t][i], single_state.arch[t],
                                   rtol=1e-5, atol=1e-7)
      with open(os.path.join(tmp, 'many', f'seed_{seed}',
                             'genotype.json')) as f:
        self.assertEqual(genotype_lib.Genotype.from_json(f.read()), single)
    # The seeds really differ (else the comparison above proves little).
    self.assertGreater(np.abs(state.arch['normal'][0] -
                              state.arch['normal'][1]).max(), 1e-4)
    with open(os.path.join(tmp, 'many', 'seeds.json')) as f:
      summary = json.load(f)
    self.assertEqual([s['seed'] for s in summary['seeds']], [2, 3, 4, 5])
    counts = summary['counts']
    self.assertEqual(counts['genotypes'], 4)
    expected = genotype_lib.choice_counts(genotypes)
    self.assertEqual(counts, json.loads(json.dumps(expected)))
    # One node, two (op, input) pairs per cell and seed.
    self.assertEqual(sum(counts['normal']['ops'].values()), 8)
    self.assertEqual(sum(counts['reduce']['edges'].values()), 8)


class MultiHostTest(absltest.TestCase):
  """Two real processes x 4 CPU devices with jax.distributed (gloo)."""

  def test_two_processes_pmap(self):
    self.check_two_processes('pmap')

  def test_two_processes_shard_map(self):
    self.check_two_processes('shard_map')

  def check_two_processes(self, mode):
    """Both processes end with one architecture; only process 0 writes."""
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp, True)
    with socket.socket() as sock:
      sock.bind(('localhost', 0))
      port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
               XLA_FLAGS=fixtures.xla_flags(4),
               JAXNAS_CACHE_DIR='')
    workdir = os.path.join(tmp, 'wd')
    procs = [subprocess.Popen(
        [sys.executable, '-m', 'experiments.search',
         '--config=experiments/configs/darts.py:tiny', f'--workdir={workdir}',
         '--config.layers=1', '--config.steps=1', '--config.multiplier=1',
         '--config.epochs=2', '--config.max_steps_per_epoch=2',
         '--config.log_every_steps=1', '--config.checkpoint_every_steps=2',
         '--config.max_eval_examples=64', '--config.progress=False',
         '--config.distributed=True', f'--config.parallel={mode}',
         f'--config.coordinator_address=localhost:{port}',
         '--config.num_processes=2', f'--config.process_id={i}'],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outs = []
    for p in procs:
      out, err = p.communicate(timeout=600)
      self.assertEqual(p.returncode, 0, err[-3000:])
      outs.append(out)
    digests = [out.split('final architecture digest ')[1].split()[0]
               for out in outs]
    self.assertEqual(digests[0], digests[1])
    self.assertIn('8 device(s)', outs[0])
    self.assertIn('final genotype written', outs[0])
    self.assertNotIn('final genotype written', outs[1])
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    steps = [r['step'] for r in records if 'train_loss' in r and
             'valid_acc' not in r]
    self.assertEqual(steps, [1, 2, 3, 4])  # written once, by process 0
    with np.load(os.path.join(workdir, 'alphas.npz')) as f:
      alphas = {t: f[f'alpha_{t}'] for t in ('normal', 'reduce')}
    digest = checkpoint.config_fingerprint(
        {'arch': {t: a.tolist() for t, a in alphas.items()}}, ())
    self.assertEqual(digest[:16], digests[0])
    self.assertEqual(checkpoint.Checkpointer(
        os.path.join(workdir, 'checkpoints')).all_steps(), [2, 4])


class SinglePathSearchTest(absltest.TestCase):
  """ROME and GDAS through the search entry point (tiny configs, digits)."""

  def run_config(self, config):
    config.update(dict(progress=False, tensorboard=False, epochs=2,
                       max_steps_per_epoch=2, max_eval_examples=64,
                       parallel='jit'))
    wd = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, wd, True)
    state, genotype = search.search(config, wd)
    with open(os.path.join(wd, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    with open(os.path.join(wd, 'genotype.json')) as f:
      self.assertEqual(genotype_lib.Genotype.from_json(f.read()), genotype)
    taus = [r['tau'] for r in records if 'tau' in r]
    np.testing.assert_allclose([taus[0], taus[-1]], [10., 0.1], rtol=1e-5)
    losses = [r['train_loss'] for r in records if 'train_loss' in r]
    self.assertTrue(np.all(np.isfinite(losses)))
    return state, genotype

  def test_rome_takes_edges_from_beta_and_ops_from_alpha(self):
    config = rome_config.get_config('tiny')
    # Three ops: each is a switch branch XLA compiles, and the rule does not
    # depend on how many there are.
    config.primitives = ('max_pool_3x3', 'skip_connect', 'sep_conv_3x3')
    state, genotype = self.run_config(config)
    primitives = list(config.primitives)
    for t in ('normal', 'reduce'):
      beta = np.asarray(state.arch['edges'][t])
      alpha = np.asarray(state.arch['ops'][t])
      expected, start = [], 0
      for i in range(config.steps):   # node i has edges start..start+i+1
        ids = range(start, start + 2 + i)
        expected += [(primitives[int(np.argmax(alpha[e]))], e - start)
                     for e in sorted(ids, key=lambda e: -beta[e])[:2]]
        start += 2 + i
      self.assertEqual([tuple(g) for g in getattr(genotype, t)], expected, t)

  def test_gdas_takes_the_two_strongest_pairs_per_node(self):
    config = gdas_config.get_config('tiny')
    config.primitives = ('none', 'max_pool_3x3', 'skip_connect',
                         'sep_conv_3x3')
    state, genotype = self.run_config(config)
    primitives = list(config.primitives)
    self.assertEqual(primitives[0], 'none')
    for t in ('normal', 'reduce'):
      p = np.asarray(jax.nn.softmax(state.arch['ops'][t], -1))
      expected, start = [], 0
      for i in range(config.steps):
        pairs = [(-p[e, o], e - start, o) for e in range(start, start + 2 + i)
                 for o in range(1, len(primitives))]   # never 'none'
        expected += [(primitives[o], j) for _, j, o in sorted(pairs)[:2]]
        start += 2 + i
      self.assertEqual(sorted(tuple(g) for g in getattr(genotype, t)),
                       sorted(expected), t)


class GaeaSearchTest(absltest.TestCase):
  """GAEA PC-DARTS (tiny) through the search entry point."""

  def test_pc_darts_tiny_logs_entropy_and_derives_with_edge_weights(self):
    config = gaea_config.get_config('tiny')
    config.update(dict(progress=False, tensorboard=False, epochs=2,
                       max_steps_per_epoch=2, max_eval_examples=64, steps=2,
                       multiplier=2, parallel='jit'))
    wd = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, wd, True)
    state, genotype = search.search(config, wd)
    ops, e = state.arch['ops'], state.arch['edges']
    for t in ('normal', 'reduce'):
      np.testing.assert_allclose(np.asarray(ops[t]).sum(-1), 1., atol=1e-6)
      score = np.asarray(ops[t])[:, 1:].max(-1) * np.asarray(e[t])
      self.assertEqual(sorted(j for _, j in getattr(genotype, t)[2:]),
                       sorted(np.argsort(-score[2:], kind='stable')[:2]), t)
    with open(os.path.join(wd, 'metrics.jsonl')) as f:
      epochs = [json.loads(l) for l in f if 'valid_acc' in json.loads(l)]
    self.assertLen(epochs, 2)
    for record in epochs:
      for t in ('normal', 'reduce'):
        self.assertBetween(record[f'entropy_{t}'], 0., np.log(8) + 1e-6)
    _not_blank(self, os.path.join(wd, 'entropy.png'))

  def test_share_backward_on_both_hosts(self):
    from jaxnas.methods import darts  # pylint: disable=g-import-not-at-top
    from jaxnas.methods import rome  # pylint: disable=g-import-not-at-top
    for variant, shared, two_phase in (
        ('tiny', darts.shared_first_order_step, darts.search_step),
        ('gdas_nb201_tiny', rome.shared_search_step, rome.search_step)):
      for value, want in (('on', shared), ('off', two_phase)):
        config = gaea_config.get_config(variant)
        config.share_backward = value
        search.validate(config)
        _, method = search.build(config, 10, steps_per_epoch=4)
        self.assertIs(method.step.func, want, (variant, value))


class DropNASSearchTest(absltest.TestCase):
  """DropNAS (NB-201 tiny) through the search entry point."""

  def test_one_level_on_all_training_data_derives_on_raw_alphas(self):
    from jaxnas.spaces import nb201  # pylint: disable=g-import-not-at-top
    config = dropnas_config.get_config('nb201_tiny')
    config.update(dict(progress=False, tensorboard=False, parallel='jit',
                       max_eval_examples=64))
    ds = data.load(config.dataset)
    train, held_out = search.search_splits(ds, config)
    self.assertIs(train, ds.train)      # no split: evaluation on the test set
    self.assertEqual(sorted(held_out.labels.tolist()),
                     sorted(ds.test.labels.tolist()))
    # A test split listed class by class (an image folder) is shuffled, so
    # that max_eval_examples takes every class.
    labels = np.repeat(np.arange(10), 30)
    by_class = data.Dataset('folder:x', ds.train, data.Split(
        np.zeros((300, 8, 8, 1), np.uint8), labels), 10, (0.,), (1.,))
    _, held_out = search.search_splits(by_class, config)
    self.assertLen(np.unique(held_out.labels[:30]), 10)
    self.assertEqual(sorted(held_out.labels.tolist()), labels.tolist())
    wd = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, wd, True)
    state, arch = search.search(config, wd)
    # genotypes.parse: per-edge argmax of the raw alphas, 'none' ignored.
    alpha = np.asarray(state.arch['cell'])
    none = nb201.NB201_PRIMITIVES.index('none')
    self.assertEqual(arch, nb201.derive(
        {'cell': np.where(np.arange(5) == none, -np.inf, alpha)}, exclude=()))
    with open(os.path.join(wd, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    kept = [r['kept_ops'] for r in records if 'kept_ops' in r]
    self.assertNotEmpty(kept)
    self.assertTrue(all(0. < k <= 1. for k in kept))
    self.assertLess(min(kept), 1.)   # r = 0.01: ops were dropped
    _not_blank(self, os.path.join(wd, 'group_alphas.png'))

  def test_config_errors(self):
    config = dropnas_config.get_config('nb201_tiny')
    config.single_level = False
    with self.assertRaisesRegex(search.ConfigError, 'single_level=True'):
      search.validate(config)
    config = dropnas_config.get_config('nb201_tiny')
    config.primitives = ('skip_connect', 'avg_pool_3x3')
    config.drop_rate = 1.
    with self.assertRaisesRegex(search.ConfigError,
                                '(?s)drop_rate.*parametric ops'):
      search.validate(config)


class PDartsSearchTest(absltest.TestCase):
  """P-DARTS' stages through the search entry point: two stages over 3 ops
  (3 -> 2 -> 1 per edge) keep the compile time down."""

  def test_killed_in_stage_two_resumes_there_with_the_same_switches(self):
    config = pdarts_config.get_config('tiny')
    config.update(dict(
        progress=False, tensorboard=False, parallel='jit',
        max_eval_examples=64, num_to_keep=(2, 1), add_layers=(0, 1),
        dropout_rates=(0.1, 0.4),
        primitives=('none', 'skip_connect', 'sep_conv_3x3')))
    wd = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, wd, True)
    stage1 = os.path.join(wd, 'stage_1')

    class KillInStageTwo(common.StopSignals):
      """SIGTERM once stage 2 (index 1) has saved its first checkpoint."""

      @property
      def received(self):
        return signal.SIGTERM if glob.glob(
            os.path.join(stage1, 'checkpoints', '*')) else None

      @received.setter
      def received(self, value):
        del value

    with mock.patch.object(common, 'StopSignals', KillInStageTwo):
      with self.assertRaises(common.Interrupted):
        search.search(config, wd)
    self.assertEqual(checkpoint.Checkpointer(
        os.path.join(stage1, 'checkpoints')).latest_step(), 4)
    self.assertFalse(os.path.exists(os.path.join(wd, 'genotype.json')))
    with open(os.path.join(stage1, 'config.json')) as f:
      killed = json.load(f)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      _, genotype = search.search(config, wd)
    self.assertIn(f'resuming {stage1} from step 4 of 8', out.getvalue())
    with open(os.path.join(stage1, 'config.json')) as f:
      resumed = json.load(f)
    for t in ('normal', 'reduce'):
      self.assertEqual(resumed[f'switches_{t}'], killed[f'switches_{t}'])
    # Stage s: its cell count, alphas over the ops left, switches after it.
    with open(os.path.join(wd, 'switches.json')) as f:
      after = json.load(f)
    for s, (cells, ops_on) in enumerate([(3, 3), (4, 2)]):
      with open(os.path.join(wd, f'stage_{s}', 'config.json')) as f:
        self.assertEqual(json.load(f)['layers'], cells)
      with np.load(os.path.join(wd, f'stage_{s}', 'alphas.npz')) as f:
        self.assertEqual(f['alpha_normal'].shape, (5, ops_on))
        self.assertEqual(f['alpha_reduce'].shape, (5, ops_on))
      for t in ('normal', 'reduce'):
        self.assertEqual({len(e) for e in after[s][t]},
                         {config.num_to_keep[s]})
        if s == 1:   # 'none' is forced out at the last pruning
          self.assertNotIn(['none'], after[s][t])
    with open(os.path.join(wd, 'genotypes_by_max_skips.json')) as f:
      capped = json.load(f)
    self.assertEqual(sorted(capped), ['0', '1', '2', '3', '4', '5', '6', '7',
                                      '8', 'unrestricted'])
    self.assertEqual(genotype.to_dict(), capped['2'])
    skips = [sum(op == 'skip_connect' for op, _ in capped[str(m)]['normal'])
             for m in range(9)]
    self.assertEqual(skips, sorted(skips))   # never more under a lower cap
    _not_blank(self, os.path.join(wd, 'switches.png'))

  def test_nb201_stages_end_with_the_scored_last_ops(self):
    csv = os.path.join(fixtures.SHARED_DATA, 'nb201',
                       'nb201_hp200_mean_acc.csv')
    if not os.path.exists(csv):
      self.skipTest(f'{csv} is absent: no NAS-Bench-201 table')
    from jaxnas.benchmarks import nb201 as nb201_bench  # pylint: disable=g-import-not-at-top
    config = pdarts_config.get_config('nb201_tiny')
    config.update(dict(progress=False, tensorboard=False, parallel='jit',
                       max_eval_examples=64, num_to_keep=(2, 1),
                       add_layers=(0, 0), dropout_rates=(0.1, 0.4),
                       nb201_table=csv))
    wd = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, wd, True)
    _, arch = search.search(config, wd)
    with open(os.path.join(wd, 'switches.json')) as f:
      after = json.load(f)
    self.assertEqual(list(arch.ops), [e[0] for e in after[-1]['cell']])
    self.assertNotIn('none', arch.ops)   # forced out at the last pruning
    for s, ops_on in enumerate([5, 2]):
      with np.load(os.path.join(wd, f'stage_{s}', 'alphas.npz')) as f:
        self.assertEqual(f['alpha_cell'].shape, (6, ops_on))
    with open(os.path.join(wd, 'nb201.json')) as f:
      (run,) = json.load(f)['runs']
    self.assertEqual(run['index'],
                     nb201_bench.Table.load(csv).index(arch))


class NB201SearchTest(absltest.TestCase):
  """DARTS on the NAS-Bench-201 space, scored against the benchmark table."""

  CSV = os.path.join(fixtures.SHARED_DATA, 'nb201', 'nb201_hp200_mean_acc.csv')

  def config(self, **overrides):
    config = darts_config.get_config('nb201_tiny')
    config.update(dict(progress=False, tensorboard=False,
                       max_eval_examples=64, nb201_table=self.CSV))
    config.update(overrides)
    return config

  def test_tiny_search_logs_and_reports_ground_truth(self):
    if not os.path.exists(self.CSV):
      self.skipTest(f'{self.CSV} is absent: no NAS-Bench-201 table')
    from jaxnas import arch as arch_lib  # pylint: disable=g-import-not-at-top
    from jaxnas.benchmarks import nb201 as nb201_bench  # pylint: disable=g-import-not-at-top
    from jaxnas.spaces import nb201  # pylint: disable=g-import-not-at-top
    wd = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, wd, True)
    state, arch = search.search(self.config(), wd)
    self.assertIsInstance(arch, nb201.Arch)
    # AutoDL's rule: per-edge argmax of the softmax, 'none' allowed.
    weights = arch_lib.softmax_weights(state.arch)
    self.assertEqual(arch, nb201.derive(
        {'cell': np.asarray(weights['cell'])}, exclude=()))
    table = nb201_bench.Table.load(self.CSV)
    with open(os.path.join(wd, 'nb201.json')) as f:
      report = json.load(f)
    (run,) = report['runs']
    self.assertEqual(run['arch'], arch.to_string())
    self.assertEqual(run['index'], table.index(arch))
    for m in ('cifar10_test', 'cifar100_test', 'imagenet16_test'):
      self.assertEqual(run[m]['accuracy'], table.accuracy(arch, m))
      self.assertEqual(run[m]['rank'], table.rank(arch, m))
    self.assertEqual(report['best']['cifar10_test'], 94.3733)
    self.assertEqual(report['random']['cifar10_test'],
                     table.random_stats('cifar10_test'))
    # Every epoch logs the ground truth of that epoch's genotype.
    with open(os.path.join(wd, 'metrics.jsonl')) as f:
      epochs = [json.loads(l) for l in f if 'valid_acc' in json.loads(l)]
    self.assertLen(epochs, 2)
    for e, record in enumerate(epochs):
      with open(os.path.join(wd, 'genotypes', f'epoch_{e:03d}.json')) as f:
        arch_e = nb201.Arch.from_json(f.read())
      self.assertEqual(record['nb201_index'], table.index(arch_e))
      self.assertEqual(record['nb201_cifar10_test'],
                       table.accuracy(arch_e, 'cifar10_test'))
    with open(os.path.join(wd, 'genotype.txt')) as f:
      self.assertEqual(f.read().strip(), arch.to_string())
    _not_blank(self, os.path.join(wd, 'alpha_heatmap.png'))
    self.assertFalse(os.path.exists(os.path.join(wd, 'normal.png')))

  def test_table_and_space_errors_come_first(self):
    wd = os.path.join(tempfile.mkdtemp(), 'never')
    self.addCleanup(shutil.rmtree, os.path.dirname(wd), True)
    with self.assertRaisesRegex(FileNotFoundError, 'nb201'):
      search.search(self.config(nb201_table='/nonexistent/nb201.csv'), wd)
    config = _tiny_config()
    config.nb201_table = self.CSV
    with self.assertRaisesRegex(search.ConfigError, "needs space='nb201'"):
      search.search(config, wd)
    with self.assertRaisesRegex(search.ConfigError, 'unknown operations'):
      search.search(self.config(primitives=('none', 'sep_conv_3x3')), wd)
    with self.assertRaisesRegex(search.ConfigError, 'local or mounted path'):
      search.search(self.config(), 'gs://bucket/runs/x')
    with self.assertRaisesRegex(search.ConfigError, r'num_devices must be in'):
      search.search(self.config(num_devices=9), wd)
    with self.assertRaisesRegex(search.ConfigError, 'DARTS space only'):
      search.search(self.config(compute_dtype='bfloat16'), wd)
    config = _tiny_config()
    config.compute_dtype = 'float16'
    with self.assertRaisesRegex(search.ConfigError,
                                "compute_dtype must be one of.*'float16'"):
      search.search(config, wd)
    config.compute_dtype = 'bfloat16'
    config.order = 'second'
    with self.assertRaisesRegex(search.ConfigError,
                                "order='second'.*meaningless"):
      search.search(config, wd)
    config = _tiny_config()
    config.order = 'exact'
    config.depthwise_impl = 'dense_loop'
    with self.assertRaisesRegex(search.ConfigError,
                                "order='exact'.*dense_loop"):
      search.search(config, wd)
    config = _tiny_config()
    config.order = 'exact'  # the tiny config sets share_backward='on'
    with self.assertRaisesRegex(search.ConfigError,
                                "share_backward='on' needs order=first or "
                                "second"):
      search.search(config, wd)
    config.share_backward = 'yes'
    with self.assertRaisesRegex(search.ConfigError,
                                "share_backward must be one of"):
      search.search(config, wd)
    config.share_backward = 'False'  # an old command line's value
    search.validate(config)
    self.assertFalse(os.path.exists(wd))



class FingerprintTest(absltest.TestCase):

  def test_added_keys_at_their_old_value_keep_old_runs_resumable(self):
    config = _tiny_config().to_dict()
    self.assertEqual(config['compute_dtype'], 'float32')
    before = {k: v for k, v in config.items() if k != 'compute_dtype'}
    fingerprint = lambda d: checkpoint.config_fingerprint(
        search._fingerprinted(d), search.RESUME_IGNORE)  # pylint: disable=protected-access
    self.assertEqual(fingerprint(config), fingerprint(before))
    self.assertNotEqual(fingerprint({**config, 'compute_dtype': 'bfloat16'}),
                        fingerprint(before))


if __name__ == '__main__':
  absltest.main()

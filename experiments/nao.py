r"""NAO-V2 search: a balanced one-shot supernet and an encoder-predictor-decoder.

renqianluo/NAO_pytorch `NAO_V2/train_search.py` (../shared/methods/nao_v2.md):

  pool_to_train = `seed_archs` random architectures; pool = []
  for phase in 0 .. phases - 1:
    train the supernet `epochs` epochs (cosine restarting, weights and
      momentum kept), one architecture per step drawn from pool_to_train in
      proportion to its stand-alone parameter count
    pool += pool_to_train; score every architecture of the pool on one
      random `eval_batch_size` validation batch (shared weights, batch BN)
    last phase: stop
    train the EPD (warm-started) on the pool's min-max normalised scores;
    pool_to_train = `new_archs` architectures generated from the top
      `top_archs` by gradient ascent (step sizes 1, 2, ...)
  re-rank the top `rerank_top` by training each from scratch

  python -m experiments.nao --config experiments/configs/nao.py:tiny \
      --config.dataset=folder:/path/to/cifar10 --workdir runs/nao-tiny

Writes to the workdir: `rounds/<phase>.json` (the scored pool, sorted, the
EPD's metrics, the architectures generated for the next phase) and
`rounds/epd_<phase>.msgpack`, checkpoints of the supernet, `metrics.jsonl`
(and TensorBoard), and at the end `arch_pool.final` (the reference's format:
40 ints per line, best first), `final.json` (sorted pool with scores,
re-ranking results, the best architecture) and `best_arch.txt`.

A killed run resumes from its last checkpoint; a phase's scoring and EPD
round are redone if the run stopped between the phase's last step and its
round file. One process only (the pool scoring is not split over hosts).
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import common

RESUME_IGNORE = ('data_dir', 'log_every_steps', 'checkpoint_every_steps',
                 'keep_checkpoints', 'progress', 'tensorboard', 'variant',
                 'parallel', 'num_devices', 'pool_chunk', 'pool_block')


class ConfigError(ValueError):
  """A config that cannot run; raised before anything is built."""


def validate(config) -> None:
  problems = []
  if config.layers < 0:
    problems.append(f'layers must be >= 0 (3N + 2 cells), got '
                    f'{config.layers}')
  positive = ('nodes', 'channels', 'phases', 'epochs', 'batch_size',
              'seed_archs', 'eval_batch_size', 'epd_batch_size',
              'pool_chunk', 'pool_block')
  for name in positive:
    if config[name] < 1:
      problems.append(f'{name} must be >= 1, got {config[name]}')
  if config.phases > 1 and (config.new_archs < 1 or config.top_archs < 1):
    problems.append('new_archs and top_archs must be >= 1 with phases > 1')
  if config.channels % 2:
    problems.append(f'channels must be even (FactorizedReduce), got '
                    f'{config.channels}')
  if not 0 < config.train_portion < 1:
    problems.append(f'train_portion must be in (0, 1), got '
                    f'{config.train_portion}')
  if not 0 < config.drop_path_keep <= 1:
    problems.append(f'drop_path_keep must be in (0, 1], got '
                    f'{config.drop_path_keep}')
  if not 0 <= config.epd_trade_off <= 1:
    problems.append(f'epd_trade_off must be in [0, 1], got '
                    f'{config.epd_trade_off}')
  if not 0 < config.epd_train_portion < 1:
    problems.append('epd_train_portion must be in (0, 1)')
  if config.op_select not in ('auto', 'switch', 'mask'):
    problems.append(f"op_select must be 'auto', 'switch' or 'mask', got "
                    f'{config.op_select!r}')
  if config.parallel not in ('pmap', 'jit'):
    problems.append(f"parallel must be 'pmap' or 'jit', got "
                    f'{config.parallel!r}')
  if problems:
    raise ConfigError('; '.join(problems))


def _splits(ds, config):
  """(supernet split, scoring split): the training split shuffled with the
  seed, then cut at `train_portion` (the reference shuffles its indices)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxnas import data  # pylint: disable=g-import-not-at-top
  order = np.random.default_rng([config.seed, 7]).permutation(len(ds.train))
  return data.split(ds.train.take(order), config.train_portion)


def _arch_text(arch) -> str:
  import numpy as np  # pylint: disable=g-import-not-at-top
  return ' '.join(str(int(x)) for x in np.asarray(arch).reshape(-1))


class PoolScorer:
  """Scores architectures with the supernet's current weights: each on its
  own random batch of the scoring split, drawn by (seed, phase, position),
  the pool split over the devices."""

  def __init__(self, config, pool_fn, split, mean, std, par):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from jaxnas import data  # pylint: disable=g-import-not-at-top
    self.n = min(config.eval_batch_size, len(split))
    self.size, self.seed, self.par = len(split), config.seed, par
    self.block = config.pool_block
    self.images = jnp.asarray(data.normalise(split.images, mean, std))
    self.labels = jnp.asarray(split.labels.astype('int32'))
    fn = lambda p, x, y, a, i: pool_fn(p, x, y, a, i,
                                       chunk=config.pool_chunk)
    if par.mode == 'pmap':
      self.fn = jax.pmap(fn, axis_name='pool', in_axes=(0, None, None, 0, 0))
    else:
      self.fn = jax.jit(fn)

  def __call__(self, state, archs, phase: int):
    """Scores of `archs` [P, 2, nodes, 4]: one compiled call per block of
    `pool_block` architectures per device (the last block padded), so pools
    of any size share one compilation."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jaxnas.methods import nao as nao_method  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng([self.seed, 5, phase])
    idx = np.stack([rng.choice(self.size, self.n, replace=False)
                    for _ in range(len(archs))]).astype(np.int32)
    archs = np.asarray(archs, np.int32)
    pmap = self.par.mode == 'pmap'
    d = self.par.num_local_devices if pmap else 1
    block = self.block * d
    pad = common.round_up(len(archs), block) - len(archs)
    fill = lambda x: np.concatenate([x, np.repeat(x[:1], pad, 0)])
    archs, idx = fill(archs), fill(idx)
    variables = nao_method.state_variables(
        state if pmap else self.par.get_state(state))
    out = []
    for s in range(0, len(archs), block):
      a, i = archs[s:s + block], idx[s:s + block]
      if pmap:
        a = a.reshape((d, -1) + a.shape[1:])
        i = i.reshape((d, -1) + i.shape[1:])
      out.append(np.asarray(jax.device_get(self.fn(
          variables, self.images, self.labels, a, i))).reshape(-1))
    return np.concatenate(out)[:len(archs) - pad] / self.n


def epd_round(config, model, params, pool, acc, phase: int, log):
  """Trains the EPD on the scored pool and generates the next
  architectures (train_search.py between phases).

  Returns (params, new architectures [K, 2, nodes, 4], metrics).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  from jaxnas import epd  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import nao  # pylint: disable=g-import-not-at-top
  nodes = config.nodes
  tokens = np.stack([nao.to_tokens(a, nodes) for a in pool])
  acc = np.asarray(acc, np.float64)
  span = acc.max() - acc.min()
  targets = (acc - acc.min()) / (span if span > 0 else 1.)
  rng = np.random.default_rng([config.seed, 6, phase])
  order = rng.permutation(len(pool))
  cut = max(1, int(len(pool) * config.epd_train_portion))
  tr, va = order[:cut], order[cut:]
  train_tokens, train_targets = tokens[tr], targets[tr]
  if config.epd_expand > 1:
    swapped = nao.swap_augment(train_tokens, config.epd_expand - 1, rng,
                               nodes)
    train_tokens = np.concatenate([train_tokens, swapped])
    train_targets = np.tile(train_targets, config.epd_expand)
  start = time.time()
  tx = epd.make_optimizer(config.epd_lr, config.epd_grad_clip)
  params, history = epd.fit(
      model, params, train_tokens, train_targets, epochs=config.epd_epochs,
      key=jax.random.fold_in(jax.random.PRNGKey(config.seed), phase),
      batch_size=config.epd_batch_size, trade_off=config.epd_trade_off,
      tx=tx)
  metrics = {'epd_loss': history[-1]['loss'], 'epd_mse': history[-1]['mse'],
             'epd_nll': history[-1]['nll'],
             'epd_seconds': round(time.time() - start, 1)}
  if len(va) > 1:
    pred = epd.predict(model, params, tokens[va])
    metrics['epd_valid_tau'] = float(stats.kendalltau(
        pred, targets[va]).statistic)
  enc = nao.encoding(nodes)
  top = np.argsort(-acc, kind='stable')[:config.top_archs]
  new, step_size = epd.generate(model, params, tokens[top], enc.allowed,
                                config.new_archs, exclude=tokens,
                                max_step_size=config.max_step_size)
  metrics.update(generated=len(new), last_step_size=step_size)
  log(f'phase {phase}: EPD loss {metrics["epd_loss"]:.4f} '
      f'(mse {metrics["epd_mse"]:.4f}, nll {metrics["epd_nll"]:.4f}), '
      f'valid tau {metrics.get("epd_valid_tau", float("nan")):.3f}; '
      f'{len(new)} new architectures (step sizes up to {step_size})')
  archs = np.stack([nao.from_tokens(t, nodes) for t in new]) if len(new) \
      else np.zeros((0, 2, 4 * nodes), np.int64)
  return params, archs.reshape(-1, 2, nodes, 4), metrics


def rerank(config, archs, train_split, valid_split, mean, std, num_classes,
           log):
  """Trains each architecture's stand-alone network from scratch and
  returns its accuracy on the whole scoring split
  (train_and_evaluate_top_on_cifar10: SGD lr 0.025 -> 0.001 cosine over
  `rerank_epochs`, momentum 0.9, wd 3e-4, clip 5)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxnas import data  # pylint: disable=g-import-not-at-top
  from jaxnas import optim  # pylint: disable=g-import-not-at-top
  from jaxnas import training  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import nao  # pylint: disable=g-import-not-at-top
  batches = data.TrainBatches(
      train_split, batch_size=config.batch_size, seed=config.seed,
      augment=data.Augment(config.crop_padding, config.flip, config.cutout),
      mean=mean, std=std, stream=8)
  steps_per_epoch = batches.steps_per_epoch
  if config.rerank_max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.rerank_max_steps_per_epoch)
  scores = []
  for k, arch in enumerate(archs):
    start = time.time()
    net = nao.Trainable(nao.network(arch, layers=config.layers,
                                    channels=config.channels,
                                    num_classes=num_classes))
    lr = optim.darts_cosine(config.lr, config.lr_min, config.rerank_epochs,
                            steps_per_epoch)
    tx = optim.torch_sgd(lr, momentum=config.momentum,
                         weight_decay=config.weight_decay,
                         clip_norm=config.grad_clip)
    trainer = training.make(net, tx, steps_per_epoch=steps_per_epoch,
                            epochs=config.rerank_epochs)
    state = trainer.init(jax.random.PRNGKey(config.seed),
                         (1,) + train_split.images.shape[1:])
    step = jax.jit(trainer.step, donate_argnums=0)
    for t in range(config.rerank_epochs * steps_per_epoch):
      state, _ = step(state, batches.batch(t))
    totals = common.evaluate(
        jax.jit(trainer.eval_step), state,
        data.eval_batches(valid_split, 500, mean, std), lambda b: b,
        lambda x: x)
    scores.append(float(totals['correct'] / totals['count']))
    log(f're-rank {k + 1}/{len(archs)}: {_arch_text(arch)}: valid '
        f'{scores[-1]:.4f} ({time.time() - start:.0f}s)')
  return scores


def search(config, workdir: str):
  """Runs (or resumes) the NAO-V2 search of `config` in `workdir`.

  Returns the final dict also written to `final.json`.
  """
  validate(config)
  import flax.serialization  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxnas import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxnas import data  # pylint: disable=g-import-not-at-top
  from jaxnas import epd  # pylint: disable=g-import-not-at-top
  from jaxnas import optim  # pylint: disable=g-import-not-at-top
  from jaxnas import parallel  # pylint: disable=g-import-not-at-top
  from jaxnas.methods import nao as nao_method  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import nao  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import nao_supernet  # pylint: disable=g-import-not-at-top

  if jax.process_count() > 1:
    raise ConfigError('experiments.nao runs in one process (its pool '
                      'scoring is not split over hosts)')
  try:
    common.check_local_workdir(workdir)
    par = common.data_parallel(config)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  ds = data.load(config.dataset, config.data_dir)
  train_split, valid_split = _splits(ds, config)
  augment = data.Augment(config.crop_padding, config.flip, config.cutout)
  batches = data.TrainBatches(train_split, batch_size=config.batch_size,
                              seed=config.seed, augment=augment,
                              mean=ds.mean, std=ds.std)
  steps_per_epoch = batches.steps_per_epoch
  if config.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  phase_steps = config.epochs * steps_per_epoch
  total_steps = config.phases * phase_steps
  size_kw = dict(layers=config.layers, nodes=config.nodes,
                 channels=config.channels)

  net = nao_supernet.NASWSNetwork(
      **size_kw, num_classes=ds.num_classes,
      drop_path_keep=config.drop_path_keep,
      depthwise_impl=config.depthwise_impl, op_select=config.op_select,
      bn_axis_name=parallel.AXIS if config.sync_bn else None)
  cosine = optim.darts_cosine(config.lr, config.lr_min, config.epochs,
                              steps_per_epoch)
  schedule = lambda step: cosine(step % phase_steps)   # restarts per phase
  w_tx = optim.torch_sgd(schedule, momentum=config.momentum,
                         weight_decay=config.weight_decay,
                         clip_norm=config.grad_clip)
  init, step, pool_fn = nao_method.make(net, w_tx, phase_steps=phase_steps,
                                        schedule=schedule)
  image_shape = (1,) + train_split.images.shape[1:]
  scorer = PoolScorer(config, pool_fn, valid_split, ds.mean, ds.std, par)
  enc = nao.encoding(config.nodes)
  epd_model = epd.EPD(enc.vocab_size, enc.length, emb_size=config.epd_emb,
                      hidden=config.epd_hidden)
  rounds = os.path.join(workdir, 'rounds')
  os.makedirs(rounds, exist_ok=True)
  config_dict = config.to_dict()
  common.atomic_write(os.path.join(workdir, 'config.json'),
                      json.dumps(config_dict, indent=2, default=repr))

  ckpts = common.RunCheckpoints(
      workdir, checkpoint.config_fingerprint(config_dict, RESUME_IGNORE), par,
      config.keep_checkpoints, steps_per_epoch)
  pending, start = ckpts.pending, ckpts.start
  if start is None:
    state = par.put_state(init(jax.random.PRNGKey(config.seed), image_shape))
    print(f'NAO-V2 search on {config.dataset}: {len(train_split)} supernet / '
          f'{len(valid_split)} scoring examples; supernet {3 * config.layers + 2}'
          f' cells, {config.nodes} nodes, C={config.channels}; {config.phases}'
          f' phases x {config.epochs} epochs x {steps_per_epoch} steps of '
          f'{config.batch_size}; {config.seed_archs} seed architectures, '
          f'{config.new_archs} new per round; {par.num_devices} device(s)',
          flush=True)
  else:
    state = ckpts.restore(jax.eval_shape(
        lambda key: init(key, image_shape), jax.random.PRNGKey(0)))
    print(f'resuming {workdir} from step {start} of {total_steps}',
          flush=True)
  start = start or 0
  log = common.MetricLog(workdir, config.tensorboard)
  log.truncate(start)
  progress = common.Progress(total_steps, start, enabled=config.progress)

  def round_path(p, ext='json'):
    return os.path.join(rounds, f'epd_{p}.msgpack' if ext == 'msgpack'
                        else f'{p}.json')

  def read_round(p):
    with open(round_path(p)) as f:
      return json.load(f)

  def trained_in(p):
    """The architectures phase p trains (its pool_to_train)."""
    if p == 0:
      return nao.random_archs(config.seed_archs,
                              np.random.default_rng([config.seed, 3]),
                              config.nodes).reshape(-1, 2, config.nodes, 4)
    return np.asarray(read_round(p - 1)['new'], np.int64).reshape(
        -1, 2, config.nodes, 4)

  def to_train(p):
    """`trained_in(p)`, or the whole pool so far if the EPD found no new
    architecture (every ascent step decoded to known ones)."""
    archs = trained_in(p)
    if len(archs):
      return archs
    progress.write(f'phase {p}: no new architectures were generated; '
                   'training the whole pool instead')
    return np.concatenate([trained_in(q) for q in range(p)])

  epd_params = epd_model.init(jax.random.PRNGKey(config.seed),
                              np.zeros((1, enc.length), np.int32))['params']

  def end_of_phase(p, state):
    """Scores the pool; between phases trains the EPD and generates."""
    nonlocal epd_params
    pool = np.concatenate([trained_in(q) for q in range(p + 1)])
    t0 = time.time()
    acc = scorer(state, pool, p)
    order = np.argsort(-acc, kind='stable')
    pool, acc = pool[order], acc[order]
    record = {'phase': p, 'pool_size': len(pool),
              'pool_best': float(acc[0]), 'pool_mean': float(acc.mean()),
              'score_seconds': round(time.time() - t0, 1)}
    progress.write(f'phase {p}: scored {len(pool)} architectures in '
                   f'{record["score_seconds"]}s: best {acc[0]:.4f}, mean '
                   f'{acc.mean():.4f}\n  best: {_arch_text(pool[0])}')
    new = np.zeros((0, 2, config.nodes, 4), np.int64)
    if p < config.phases - 1:
      if p > 0:
        with open(round_path(p - 1, 'msgpack'), 'rb') as f:
          epd_params = flax.serialization.from_bytes(epd_params, f.read())
      epd_params, new, metrics = epd_round(config, epd_model, epd_params,
                                           pool, acc, p, progress.write)
      record.update(metrics)
      with open(round_path(p, 'msgpack') + '.tmp', 'wb') as f:
        f.write(flax.serialization.to_bytes(epd_params))
      os.replace(round_path(p, 'msgpack') + '.tmp', round_path(p, 'msgpack'))
    log.write((p + 1) * phase_steps, record, prefix='phase/')
    common.atomic_write(round_path(p), json.dumps({
        **record, 'pool': [_arch_text(a) for a in pool],
        'acc': acc.tolist(), 'new': [[int(x) for x in a.reshape(-1)]
                                      for a in new]}))
    return pool, acc

  # A run stopped between a phase's last step and its round file.
  done_phases = start // phase_steps
  for p in range(done_phases):
    if not os.path.exists(round_path(p)):
      if p != done_phases - 1:
        raise checkpoint.CheckpointError(
            f'{round_path(p)} is missing but later phases ran')
      log.truncate(start, drop=lambda r, p=p: r.get('phase') == p)
      end_of_phase(p, state)

  step_fn = par.step(step)
  timer = common.Timer()
  probs, phase_archs, last = None, None, None
  try:
    with common.StopSignals() as signals:
      for t in range(start, total_steps):
        p, i = divmod(t, phase_steps)
        if phase_archs is None or i == 0:
          phase_archs = to_train(p)
          probs = nao.sample_probabilities(
              phase_archs, **size_kw, classes=ds.num_classes,
              in_channels=train_split.images.shape[-1])
        arch = phase_archs[nao.sample_index(probs, config.seed, t)]
        batch = batches.batch(t)
        batch['arch'] = np.broadcast_to(arch.astype(np.int32),
                                        (config.batch_size,) + arch.shape)
        state, metrics = step_fn(state, par.put_batch(batch))
        pending.append(t, metrics)
        done = t + 1
        if t == start:
          jax.block_until_ready(metrics)
          progress.write(f'compiled and ran step {done} in {timer():.1f}s')
        logged = config.log_every_steps and done % config.log_every_steps == 0
        if logged:
          values = {k: float(np.mean(v)) for k, v in pending.flush().items()}
          progress.update(0, loss=f"{values['train_loss']:.3f}")
          log.write(done, values, prefix='train/')
        progress.update(1)
        phase_end = done % phase_steps == 0
        if phase_end or done % config.checkpoint_every_steps == 0:
          ckpts.save(done, state)
        if phase_end:
          means = {k: float(np.mean(v)) for k, v in pending.means().items()}
          progress.write(f'phase {p} trained: loss {means["train_loss"]:.4f}'
                         f' acc {means["train_acc"]:.4f}')
          pending.reset()
          last = end_of_phase(p, state)
        ckpts.stop_if_signalled(signals, done, state,
                                synced=bool(logged or phase_end))
  finally:
    progress.close()
    log.close()
    ckpts.close()
  if last is None:  # resumed after the last phase
    r = read_round(config.phases - 1)
    last = (np.asarray([[int(x) for x in a.split()] for a in r['pool']]),
            np.asarray(r['acc']))
  pool, acc = last
  return _finish(config, workdir, pool, acc, train_split, valid_split, ds)


def _finish(config, workdir, pool, acc, train_split, valid_split, ds):
  """Re-ranks the top architectures and writes the final outputs."""
  final = {'pool': [{'arch': _arch_text(a), 'score': float(s)}
                    for a, s in zip(pool, acc)]}
  best = pool[0]
  if config.rerank_top and config.rerank_epochs:
    top = pool[:config.rerank_top]
    scores = rerank(config, top, train_split, valid_split, ds.mean, ds.std,
                    ds.num_classes, lambda s: print(s, flush=True))
    final['rerank'] = sorted(
        [{'arch': _arch_text(a), 'valid_acc': s, 'supernet_score':
          float(acc[k])} for k, (a, s) in enumerate(zip(top, scores))],
        key=lambda r: -r['valid_acc'])
    best = top[max(range(len(top)), key=lambda k: scores[k])]
  final['best'] = _arch_text(best)
  common.atomic_write(os.path.join(workdir, 'final.json'),
                      json.dumps(final, indent=1))
  common.atomic_write(os.path.join(workdir, 'arch_pool.final'), ''.join(
      r['arch'] + '\n' for r in final.get('rerank', final['pool'])))
  common.atomic_write(os.path.join(workdir, 'best_arch.txt'),
                      final['best'] + '\n')
  print(f'best architecture (written to {workdir}/best_arch.txt):\n'
        f'  {final["best"]}', flush=True)
  return final


_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs',
                               'nao.py')


def _define_flags():
  config = config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG + ':tiny', 'NAO config file and variant.',
      lock_config=True)
  workdir = flags.DEFINE_string(
      'workdir', None, 'Output directory (default: runs/nao-<variant>).')
  return config, workdir


def main(argv, flag_values):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.start_process()  # may exec this process again, once
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  config_flag, workdir_flag = flag_values
  config = config_flag.value
  workdir = workdir_flag.value or os.path.join('runs', f'nao-{config.variant}')
  common.enable_compilation_cache()
  common.exit_on_error(search, config, workdir, errors=(ConfigError,))


if __name__ == '__main__':
  _flag_values = _define_flags()
  app.run(lambda argv: main(argv, _flag_values))

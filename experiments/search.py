r"""Runs an architecture search in a workdir, resuming if it holds a checkpoint.

With no arguments this runs the `digits` DARTS search (real data shipped with
scikit-learn, a few minutes on a 2-core CPU):

  python -m experiments.search

Otherwise:

  python -m experiments.search --config experiments/configs/darts.py:cifar10 \
      --workdir runs/darts-cifar10 [--config.order=second ...]

Running the same command again on the same workdir resumes from the last
checkpoint (exactly: the batches are a pure function of (seed, step), so a
resumed run ends with the alphas of an uninterrupted one). SIGTERM / SIGINT
save a checkpoint and exit; a non-finite loss stops the run without saving.

Workdir layout:

  config.json                 the resolved config
  checkpoints/<step>/         Orbax checkpoints (the last `keep_checkpoints`)
  metrics.jsonl               one JSON line per logged step and per epoch
  tensorboard/                TensorBoard events of the same metrics
  genotype.json, genotype.txt the latest genotype
  genotypes/epoch_NNN.json    the genotype after each epoch
  alphas/epoch_NNN.npz        architecture parameters and mixing weights
  normal.png, reduce.png      drawings of the latest cells
  alpha_heatmap.png           the latest mixing weights per edge and op
  alpha_trajectories.png      mixing weights over the epochs
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import common

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs',
                               'darts.py') + ':digits'

_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Search config file and variant.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory (default: runs/<method>-<variant>).')

# Methods and the search spaces each one supports.
METHOD_SPACES = {'darts': ('darts',)}
_POSITIVE_INTS = ('batch_size', 'epochs', 'init_channels', 'layers', 'steps',
                  'multiplier', 'stem_multiplier', 'eval_batch_size',
                  'checkpoint_every_steps', 'keep_checkpoints')
_POSITIVE_FLOATS = ('lr', 'arch_lr')


class ConfigError(ValueError):
  """A config that cannot run; raised before anything is compiled."""


def validate(config) -> None:
  """Raises ConfigError listing everything wrong with `config`."""
  from jaxnas import ops  # pylint: disable=g-import-not-at-top
  from jaxnas.data import sources  # pylint: disable=g-import-not-at-top
  from jaxnas.methods import darts  # pylint: disable=g-import-not-at-top
  problems = []
  method = config.get('method')
  if method not in METHOD_SPACES:
    problems.append(f'unknown method {method!r}; known: '
                    f'{sorted(METHOD_SPACES)}')
  elif config.get('space', 'darts') not in METHOD_SPACES[method]:
    problems.append(
        f"method {method!r} does not search space {config.get('space')!r}; "
        f'it supports {METHOD_SPACES[method]}')
  dataset = config.get('dataset')
  if not (dataset in sources.SOURCES or (
      isinstance(dataset, str) and dataset.startswith(sources.FOLDER_PREFIX))):
    problems.append(f'unknown dataset {dataset!r}; known: '
                    f"{sorted(sources.SOURCES)} or 'folder:/path/to/root'")
  try:
    ops.check_primitives(tuple(config.get('primitives', ops.DARTS_PRIMITIVES)))
  except ValueError as e:
    problems.append(f'primitives: {e}')
  for k in _POSITIVE_INTS:
    v = config.get(k)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      problems.append(f'{k} must be a positive integer, got {v!r}')
  for k in _POSITIVE_FLOATS:
    v = config.get(k)
    if not isinstance(v, (int, float)) or v <= 0:
      problems.append(f'{k} must be positive, got {v!r}')
  msp = config.get('max_steps_per_epoch')
  if msp is not None and msp <= 0:
    problems.append(f'max_steps_per_epoch must be positive or None, got {msp}')
  if not 0 < config.get('train_portion', 0.5) < 1:
    problems.append('train_portion must be in (0, 1), got '
                    f"{config.get('train_portion')}")
  if config.get('order', 'first') not in darts.ORDERS:
    problems.append(f"order must be one of {darts.ORDERS}, got "
                    f"{config.get('order')!r}")
  if config.get('share_backward') and config.get('order') != 'first':
    problems.append('share_backward needs order=first; set '
                    '--config.share_backward=False')
  if config.get('depthwise_impl', 'auto') not in ops.DEPTHWISE_IMPLS:
    problems.append(f'depthwise_impl must be one of {ops.DEPTHWISE_IMPLS}, '
                    f"got {config.get('depthwise_impl')!r}")
  if problems:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(problems) +
                      '\nFix it with --config.<field>=<value>; nothing was '
                      'compiled or written.')


def build(config, num_classes: int, steps_per_epoch: int):
  """The search network and method of `config`."""
  # Imported here so that `--help` answers without starting JAX.
  from jaxnas import ops  # pylint: disable=g-import-not-at-top
  from jaxnas.methods import darts  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import darts as darts_space  # pylint: disable=g-import-not-at-top
  if config.method not in METHOD_SPACES:
    raise ConfigError(f'unknown method {config.method!r}; known: '
                      f'{sorted(METHOD_SPACES)}')
  net = darts_space.SearchNetwork(
      C=config.init_channels, num_classes=num_classes, layers=config.layers,
      steps=config.steps, multiplier=config.multiplier,
      stem_multiplier=config.stem_multiplier,
      primitives=tuple(config.get('primitives', ops.DARTS_PRIMITIVES)),
      depthwise_impl=config.depthwise_impl)
  method = darts.make(
      net, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
      order=config.order, lr=config.lr, lr_min=config.lr_min,
      momentum=config.momentum, weight_decay=config.weight_decay,
      grad_clip=config.grad_clip, arch_lr=config.arch_lr,
      arch_betas=(config.arch_b1, config.arch_b2),
      arch_weight_decay=config.arch_weight_decay,
      arch_init_scale=config.arch_init_scale, fd_r=config.fd_r,
      share_backward=config.get('share_backward', False))
  return net, method


# Config fields that do not change what a checkpoint means.
RESUME_IGNORE = ('workdir', 'data_dir', 'log_every_steps', 'eval_batch_size',
                 'checkpoint_every_steps', 'keep_checkpoints', 'progress',
                 'tensorboard', 'variant', 'max_eval_examples')


def _epoch_outputs(workdir, epoch, state, genotype, primitives):
  """Writes the genotype, alphas and pictures after `epoch` (process 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxnas import arch as arch_lib  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import viz  # pylint: disable=g-import-not-at-top
  for sub in ('genotypes', 'alphas'):
    os.makedirs(os.path.join(workdir, sub), exist_ok=True)
  common.atomic_write(
      os.path.join(workdir, 'genotypes', f'epoch_{epoch:03d}.json'),
      genotype.to_json())
  common.atomic_write(os.path.join(workdir, 'genotype.json'),
                      genotype.to_json())
  common.atomic_write(os.path.join(workdir, 'genotype.txt'),
                      str(genotype) + '\n')
  alphas = jax.tree.map(np.asarray, jax.device_get(state.arch))
  weights = jax.tree.map(np.asarray, arch_lib.softmax_weights(alphas))
  arrays = {**{f'alpha_{k}': v for k, v in alphas.items()},
            **{f'weights_{k}': v for k, v in weights.items()}}
  for path in (os.path.join(workdir, 'alphas', f'epoch_{epoch:03d}.npz'),
               os.path.join(workdir, 'alphas.npz')):
    tmp = path + '.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  viz.plot_genotype(genotype, os.path.join(workdir, ''))
  # Only ops offered on every edge can share columns; the DARTS space's are.
  # Edges are labelled 'j→i' in the reference's order (viz's default).
  viz.plot_alpha_heatmap(weights, None, primitives,
                         os.path.join(workdir, 'alpha_heatmap.png'))
  history = []
  for e in range(epoch + 1):
    with np.load(os.path.join(workdir, 'alphas', f'epoch_{e:03d}.npz'),
                 allow_pickle=False) as f:
      history.append({t: f[f'weights_{t}'] for t in weights})
  viz.plot_alpha_trajectories(history, primitives,
                              os.path.join(workdir, 'alpha_trajectories.png'))


def search(config, workdir: str):
  """Runs (or resumes) the search of `config` in `workdir`.

  Returns:
    (final SearchState, Genotype).

  Raises:
    ConfigError: before anything is compiled or written, for a bad config.
    jaxnas.checkpoint.CheckpointError: the workdir's checkpoint is unreadable
      or from another config (nothing is overwritten).
    FloatingPointError: a non-finite loss (the last good checkpoint stays).
    common.Interrupted: SIGTERM / SIGINT, after saving a checkpoint.
  """
  validate(config)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxnas import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxnas import data  # pylint: disable=g-import-not-at-top
  from jaxnas import ops  # pylint: disable=g-import-not-at-top

  ds = data.load(config.dataset, config.data_dir)
  weights_half, arch_half = data.split(ds.train, config.train_portion)
  augment = (data.Augment(config.crop_padding, config.flip)
             if config.crop_padding or config.flip else None)
  batches = data.SearchBatches(
      weights_half, arch_half, batch_size=config.batch_size, seed=config.seed,
      augment=augment, mean=ds.mean, std=ds.std)
  steps_per_epoch = batches.steps_per_epoch
  if steps_per_epoch == 0:
    raise ConfigError(f'batch_size {config.batch_size} is larger than the '
                      f'{len(weights_half)} examples of the weights half')
  if config.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  total_steps = config.epochs * steps_per_epoch
  eval_split = arch_half
  if config.get('max_eval_examples'):
    eval_split = arch_half.take(np.arange(
        min(config.max_eval_examples, len(arch_half))))
  _, method = build(config, ds.num_classes, steps_per_epoch)
  primitives = tuple(config.get('primitives', ops.DARTS_PRIMITIVES))
  chief = common.is_chief()

  config_dict = config.to_dict()
  fingerprint = checkpoint.config_fingerprint(config_dict, RESUME_IGNORE)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 max_to_keep=config.keep_checkpoints)
  sample = batches.batch(0)['train']['image'][:1]
  key = jax.random.PRNGKey(config.seed)
  start = ckpt.latest_step()
  if start is None:
    state = method.init(key, sample)
    sums, count = {}, 0
    msg = (f'{config.method} search on {config.dataset}: '
           f'{len(weights_half)} weight / {len(arch_half)} architecture '
           f'examples, {config.epochs} epochs x {steps_per_epoch} steps of '
           f'{config.batch_size}, C={config.init_channels}, {config.layers} '
           f'cells, order={config.order}')
  else:
    abstract = jax.eval_shape(method.init, key, sample)
    state, meta = ckpt.restore(abstract, start,
                               expect={'config_fingerprint': fingerprint})
    sums, count = meta['epoch_sums'], meta['epoch_count']
    msg = f'resuming {workdir} from step {start} of {total_steps}'
  start = start or 0
  os.makedirs(workdir, exist_ok=True)
  if chief:
    common.atomic_write(os.path.join(workdir, 'config.json'),
                        json.dumps(config_dict, indent=2, default=repr))
  log = common.MetricLog(workdir, config.get('tensorboard', True))
  log.truncate(start)
  print(msg, flush=True)

  step_fn = jax.jit(method.step, donate_argnums=0)
  eval_fn = jax.jit(method.eval_step)
  pending = []  # (step, device metrics) not yet fetched

  def flush():
    """Fetches pending metrics (one host sync), checks them, adds them up."""
    nonlocal count
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      bad = {k: float(v) for k, v in m.items() if not np.isfinite(v)}
      if bad:
        raise FloatingPointError(
            f'non-finite metrics at step {s} (epoch {s // steps_per_epoch}): '
            f'{bad}. Lower the learning rates or check the data. The last '
            f'good checkpoint is step {ckpt.latest_step()} in {workdir} '
            '(nothing after it was saved).')
      for k, v in m.items():
        sums[k] = sums.get(k, 0.) + float(v)
      count += 1
    last = fetched[-1] if fetched else None
    pending.clear()
    return last

  saved = start  # the last step checkpointed

  def save(step):
    nonlocal saved
    flush()
    if saved == step:
      return
    saved = step
    ckpt.save(step, state, {'config_fingerprint': fingerprint, 'step': step,
                            'epoch_sums': sums, 'epoch_count': count},
              force=True)

  progress = common.Progress(total_steps, start,
                             enabled=config.get('progress', True))
  genotype = method.derive(state)
  timer = common.Timer()
  try:
    with common.StopSignals() as signals:
      for step in range(start, total_steps):
        epoch, i = divmod(step, steps_per_epoch)
        state, metrics = step_fn(state, batches.batch(step))
        pending.append((step, metrics))
        done = step + 1
        if step == start:
          jax.block_until_ready(metrics)
          progress.write(f'compiled and ran step {done} in {timer():.1f}s')
        logged = (config.log_every_steps and
                  done % config.log_every_steps == 0)
        if logged or i == steps_per_epoch - 1:
          last = flush()
          progress.update(0, loss=f"{last['train_loss']:.3f}")
          if logged:
            log.write(done, {k: float(v) for k, v in last.items()},
                      prefix='train/')
        progress.update(1)
        if i == steps_per_epoch - 1:
          record = {k: v / count for k, v in sums.items()}
          totals = {}
          for b in data.eval_batches(eval_split, config.eval_batch_size,
                                     ds.mean, ds.std):
            for k, v in jax.device_get(eval_fn(state, b)).items():
              totals[k] = totals.get(k, 0) + float(v)
          record.update(epoch=epoch,
                        valid_loss=totals['loss_sum'] / totals['count'],
                        valid_acc=totals['correct'] / totals['count'])
          genotype = method.derive(state)
          log.write(done, record, prefix='epoch/')
          log.write(done, {'epoch': epoch, 'genotype': genotype.to_dict()})
          if chief:
            _epoch_outputs(workdir, epoch, state, genotype, primitives)
          progress.write(
              f"epoch {epoch}: lr {record['lr']:.6f} | train loss "
              f"{record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
              f"valid loss {record['valid_loss']:.4f} acc "
              f"{record['valid_acc']:.4f}\n  genotype = {genotype}")
          sums, count = {}, 0
        if done == total_steps or done % config.checkpoint_every_steps == 0:
          save(done)
        if signals.received is not None:
          save(done)
          ckpt.wait()
          raise common.Interrupted(signals.received, done)
  finally:
    progress.close()
    log.close()
    ckpt.close()
  if chief:
    print(f'final genotype written to {workdir}/genotype.json\n{genotype}',
          flush=True)
  return state, genotype


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
      'runs', f'{config.method}-{config.variant}')
  try:
    validate(config)
  except ConfigError as e:
    sys.exit(f'error: {e}')
  common.enable_compilation_cache()
  try:
    search(config, workdir)
  except common.Interrupted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except (ConfigError, FileNotFoundError, FloatingPointError) as e:
    sys.exit(f'error: {e}')
  except Exception as e:  # pylint: disable=broad-except
    from jaxnas import checkpoint  # pylint: disable=g-import-not-at-top
    if isinstance(e, checkpoint.CheckpointError):
      sys.exit(f'error: {e}')
    raise


if __name__ == '__main__':
  app.run(main)

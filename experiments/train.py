r"""Trains a found cell from scratch, resuming if the workdir holds a checkpoint.

  python -m experiments.train --genotype DARTS_V2 \
      --config experiments/configs/train.py:cifar10 --workdir runs/train-v2

`--genotype` is a published cell (DARTS_V1, DARTS_V2 = DARTS, PDARTS,
DROPNAS; `jaxnas.spaces.genotype.PUBLISHED`), `random:SEED` (the random
baseline: uniform ops and inputs), a search's genotype.json, a
file holding a printed `Genotype(...)`, or with `:nb201` a NAS-Bench-201 arch
string. At start it prints the network's parameter count (auxiliary head
excluded, as the papers count) and multiply-adds per image;
`--config.epochs=0` prints them and exits without loading data.

Each epoch is followed by an evaluation on the test split (top-1 and top-5
accuracy). The batches are a pure function of (seed, step), so a resumed run
replays an uninterrupted one; SIGTERM / SIGINT save a checkpoint and exit; a
non-finite loss stops without saving. Devices and hosts as
`experiments.search` (pmap over local devices, `--config.distributed=True`
on pods).

Workdir layout:

  config.json              the resolved config
  network.json             genotype, parameter count, multiply-adds
  checkpoints/<step>/      Orbax checkpoints; the last one is the final model
  metrics.jsonl            one JSON line per logged step and per epoch
  tensorboard/             TensorBoard events of the same metrics
  result.json              final test accuracy (top-1, top-5) and loss
"""

import json
import os
from typing import Any, NamedTuple

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import common

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs',
                               'train.py') + ':cifar10'

NETWORKS = ('cifar', 'imagenet', 'nb201')
SCHEDULES = ('cosine', 'cosine_steps', 'exponential')
# Fields that may change between a run and its resumption.
RESUME_IGNORE = ('progress', 'tensorboard', 'log_every_steps',
                 'checkpoint_every_steps', 'keep_checkpoints', 'data_dir',
                 'eval_batch_size', 'num_devices', 'parallel', 'distributed',
                 'coordinator_address', 'num_processes', 'process_id')


class ConfigError(ValueError):
  """A config value that cannot work, found before anything runs."""


def validate(config) -> None:
  """Raises ConfigError for a config that cannot work."""
  problems = []
  if config.network not in NETWORKS:
    problems.append(f'network must be one of {NETWORKS}, got '
                    f'{config.network!r}')
  for name in ('init_channels', 'layers', 'batch_size', 'eval_batch_size',
               'log_every_steps', 'checkpoint_every_steps',
               'eval_every_epochs', 'cells_per_stage'):
    v = config.get(name)
    if not isinstance(v, int) or v < 1:
      problems.append(f'{name} must be a positive integer, got {v!r}')
  if not isinstance(config.epochs, int) or config.epochs < 0:
    problems.append(f'epochs must be >= 0, got {config.epochs!r}')
  if not 0 <= config.drop_path_prob < 1:
    problems.append(f'drop_path_prob must be in [0, 1), got '
                    f'{config.drop_path_prob}')
  if config.lr <= 0 or config.lr_min < 0 or config.lr_min > config.lr:
    problems.append(f'need 0 <= lr_min <= lr and lr > 0, got lr={config.lr}, '
                    f'lr_min={config.lr_min}')
  if config.lr_schedule not in SCHEDULES:
    problems.append(f'lr_schedule must be one of {SCHEDULES}, got '
                    f'{config.lr_schedule!r}')
  if config.lr_offset not in (0, 1):
    problems.append(f'lr_offset must be 0 or 1, got {config.lr_offset!r}')
  if not 0 < config.lr_decay <= 1:
    problems.append(f'lr_decay must be in (0, 1], got {config.lr_decay}')
  if config.aux_weight < 0:
    problems.append(f'aux_weight must be >= 0, got {config.aux_weight}')
  if config.max_steps_per_epoch is not None and (
      not isinstance(config.max_steps_per_epoch, int) or
      config.max_steps_per_epoch < 1):
    problems.append('max_steps_per_epoch must be a positive integer or None, '
                    f'got {config.max_steps_per_epoch!r}')
  if (config.dataset == 'imagenet2012') != (config.network == 'imagenet'):
    problems.append(f'network {config.network!r} on dataset '
                    f'{config.dataset!r}: the imagenet network (stride-8 '
                    'stem, 224x224 crops) goes with imagenet2012 and only '
                    'with it')
  if config.dataset == 'imagenet2012' and config.cutout:
    problems.append('imagenet2012 is augmented as the reference '
                    '(RandomResizedCrop, flip, ColorJitter): set cutout=0')
  if config.network == 'nb201' and config.drop_path_prob:
    problems.append('the NAS-Bench-201 network has no drop path: set '
                    '--config.drop_path_prob=0')
  if config.cutout < 0 or config.crop_padding < 0:
    problems.append('cutout and crop_padding must be >= 0')
  if not 0 <= config.label_smoothing < 1:
    problems.append(f'label_smoothing must be in [0, 1), got '
                    f'{config.label_smoothing}')
  if config.network == 'nb201' and config.auxiliary:
    problems.append('the NAS-Bench-201 network has no auxiliary head: set '
                    '--config.auxiliary=False')
  if problems:
    raise ConfigError('; '.join(problems))


def load_architecture(config, genotype: str):
  """The Genotype (or NB-201 Arch) named by `genotype`; ConfigError if bad."""
  from jaxnas.spaces import genotype as genotype_lib  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import nb201  # pylint: disable=g-import-not-at-top
  try:
    if config.network == 'nb201':
      try:
        return nb201.Arch.from_string(genotype)
      except ValueError as e:
        raise ValueError(f'not a NAS-Bench-201 arch string: {e}') from e
    return genotype_lib.load(genotype)
  except ValueError as e:
    raise ConfigError(f'--genotype {genotype!r}: {e}') from e


def build_network(config, arch, num_classes: int, bn_axis_name=None):
  """The evaluation network of `arch` as `config` sizes it."""
  from jaxnas.spaces import darts_eval  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import nb201  # pylint: disable=g-import-not-at-top
  if config.network == 'nb201':
    return nb201.InferNetwork(arch.to_string(), C=config.init_channels,
                              N=config.cells_per_stage,
                              num_classes=num_classes,
                              bn_axis_name=bn_axis_name)
  build = (darts_eval.cifar_network if config.network == 'cifar'
           else darts_eval.imagenet_network)
  return build(arch, C=config.init_channels, layers=config.layers,
               num_classes=num_classes, auxiliary=config.auxiliary,
               pool_bn=config.pool_bn, depthwise_impl=config.depthwise_impl,
               bn_axis_name=bn_axis_name)


def network_summary(net, image_shape) -> dict:
  """Parameter count (auxiliary head excluded) and multiply-adds per image
  (convolutions and dense layers, evaluation mode), from shapes only."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import darts_eval  # pylint: disable=g-import-not-at-top
  image_shape = (1,) + tuple(image_shape[1:])
  if hasattr(net, 'depthwise_impl'):
    # Same parameter shapes; no zero taps counted as multiply-adds.
    net = net.clone(depthwise_impl='grouped')
  # One trace in training mode gives every variable (auxiliary head too);
  # evaluation mode reads the same ones.
  variables = darts_eval.abstract_variables(net, image_shape)
  params = variables['params']
  macs = darts_eval.count_macs(
      lambda v, x: net.apply(v, x, train=False), variables,
      jax.ShapeDtypeStruct(image_shape, jnp.float32))
  return {'params': darts_eval.count_params(params),
          'params_with_aux': darts_eval.count_params(params, exclude=()),
          'macs': macs}


def make_optimizer(config, steps_per_epoch: int):
  """(learning-rate schedule, SGD with clipping) as the reference's."""
  import optax  # pylint: disable=g-import-not-at-top
  from jaxnas import optim  # pylint: disable=g-import-not-at-top
  lr = config.lr
  if config.get('lr_batch_size'):
    lr = lr * config.batch_size / config.lr_batch_size
  if config.lr_schedule == 'cosine':
    schedule = optim.darts_cosine(lr, config.lr_min, config.epochs,
                                  steps_per_epoch, config.lr_offset)
  elif config.lr_schedule == 'cosine_steps':
    schedule = optax.cosine_decay_schedule(
        lr, config.epochs * steps_per_epoch, alpha=config.lr_min / lr)
  else:  # StepLR(1, gamma), by default stepped at each epoch's start
    schedule = optim.per_epoch(optax.exponential_decay(
        lr, 1, config.lr_decay, staircase=True), steps_per_epoch,
                               config.lr_offset)
  tx = optim.torch_sgd(schedule, momentum=config.momentum,
                       weight_decay=config.weight_decay,
                       clip_norm=config.grad_clip, nesterov=config.nesterov)
  return schedule, tx


def train(config, workdir: str, genotype: str = None):
  """Trains (or resumes) `config` in `workdir`; every process calls it.

  Returns:
    (final TrainState on the host, or None with epochs=0; result dict).

  Raises:
    ConfigError: for a bad config or genotype, before anything is written.
    jaxnas.checkpoint.CheckpointError: the workdir holds another run.
    FloatingPointError: a non-finite loss (the last checkpoint stays).
    common.Interrupted: SIGTERM / SIGINT, after saving a checkpoint.
  """
  validate(config)
  genotype = genotype or config.genotype
  arch = load_architecture(config, genotype)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxnas import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxnas import data  # pylint: disable=g-import-not-at-top
  from jaxnas import parallel  # pylint: disable=g-import-not-at-top
  from jaxnas import training  # pylint: disable=g-import-not-at-top

  try:
    common.check_local_workdir(workdir)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  chief = common.is_chief()
  if config.epochs == 0:
    size = 224 if config.network == 'imagenet' else 32
    classes = 1000 if config.network == 'imagenet' else 10
    net = build_network(config, arch, classes)
    summary = network_summary(net, (1, size, size, 3))
    if chief:
      print(_summary_text(config, arch, summary, size, classes), flush=True)
    return None, {'genotype': str(arch), **summary}

  try:
    par = common.data_parallel(config)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  eval_batch_size = common.round_up(config.eval_batch_size, par.num_devices)
  rank, hosts = jax.process_index(), jax.process_count()
  feed = _data(config, eval_batch_size, rank, hosts)
  batches = feed.batches
  steps_per_epoch = batches.steps_per_epoch
  if config.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  total_steps = config.epochs * steps_per_epoch
  image_shape = feed.image_shape
  net = build_network(config, arch, feed.num_classes,
                      parallel.AXIS if config.sync_bn else None)
  summary = network_summary(net, (1,) + image_shape)
  schedule, tx = make_optimizer(config, steps_per_epoch)
  trainer = training.make(
      net, tx, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
      drop_path_prob=config.drop_path_prob,
      aux_weight=config.aux_weight if config.auxiliary else 0.,
      label_smoothing=config.label_smoothing)

  def put_batch(batch):
    if feed.host_local:  # already this host's rows
      return par.put_batch(batch)
    return par.put_batch(data.host_slice(batch, rank, hosts))

  config_dict = dict(config.to_dict(), genotype=str(arch))
  # A raw uint32 key: Orbax saves it as an array.
  init = lambda: trainer.init(jax.random.PRNGKey(config.seed),
                              (1,) + image_shape)
  ckpts = common.RunCheckpoints(
      workdir, checkpoint.config_fingerprint(config_dict, RESUME_IGNORE), par,
      config.keep_checkpoints, steps_per_epoch,
      advice='Lower the learning rate or check the data.')
  pending, start = ckpts.pending, ckpts.start
  if start is None:
    state = par.put_state(init())
    msg = (_summary_text(config, arch, summary, image_shape[0],
                         feed.num_classes) +
           f'\ntraining on {config.dataset}: {feed.num_train} examples, '
           f'{config.epochs} epochs x {steps_per_epoch} steps of '
           f'{config.batch_size}, {par.num_devices} device(s)')
  else:
    state = ckpts.restore(jax.eval_shape(init))
    msg = f'resuming {workdir} from step {start} of {total_steps}'
  start = start or 0
  if chief:
    os.makedirs(workdir, exist_ok=True)
    common.atomic_write(os.path.join(workdir, 'config.json'),
                        json.dumps(config_dict, indent=2, default=repr))
    common.atomic_write(os.path.join(workdir, 'network.json'), json.dumps(
        {'genotype': str(arch), **summary}, indent=1))
    print(msg, flush=True)
  log = common.MetricLog(workdir, config.tensorboard)
  log.truncate(start)
  step_fn = par.step(trainer.step)
  eval_fn = par.step(trainer.eval_step, donate=False)
  def test_metrics():
    t = common.evaluate(eval_fn, state, feed.eval_batches(), put_batch,
                        par.get_state)
    return {'test_loss': float(t['loss_sum'] / t['count']),
            'test_acc': float(t['correct'] / t['count']),
            'test_top5': float(t['correct5'] / t['count'])}

  progress = common.Progress(total_steps, start, enabled=config.progress,
                             desc='train')
  timer = common.Timer()
  result = None
  try:
    with common.StopSignals() as signals:
      for step in range(start, total_steps):
        epoch, i = divmod(step, steps_per_epoch)
        state, metrics = step_fn(state, put_batch(batches.batch(step)))
        pending.append(step, metrics)
        done = step + 1
        if step == start:
          jax.block_until_ready(metrics)
          progress.write(f'compiled and ran step {done} in {timer():.1f}s')
        logged = done % config.log_every_steps == 0
        last_of_epoch = i == steps_per_epoch - 1
        if logged or last_of_epoch:
          last = {k: float(v) for k, v in pending.flush().items()}
          progress.update(0, loss=f"{last['train_loss']:.3f}")
          if logged:
            log.write(done, last, prefix='train/')
        progress.update(1)
        if last_of_epoch:
          record = {k: float(v) for k, v in pending.means().items()}
          record['epoch'] = epoch
          record['lr'] = float(schedule(step))
          if ((epoch + 1) % config.eval_every_epochs == 0 or
              done == total_steps):
            record.update(test_metrics())
            result = record
          log.write(done, record, prefix='epoch/')
          text = (f"epoch {epoch}: lr {record['lr']:.6f} drop path "
                  f"{record['drop_path']:.3f} | train loss "
                  f"{record['train_loss']:.4f} acc {record['train_acc']:.4f}")
          if 'test_acc' in record:
            text += (f" | test loss {record['test_loss']:.4f} acc "
                     f"{record['test_acc']:.4f} top5 "
                     f"{record['test_top5']:.4f}")
          progress.write(text)
          pending.reset()
        checkpointed = (done == total_steps or last_of_epoch or
                        done % config.checkpoint_every_steps == 0)
        if checkpointed:
          ckpts.save(done, state)
        ckpts.stop_if_signalled(signals, done, state,
                                synced=logged or checkpointed)
  finally:
    progress.close()
    log.close()
    ckpts.close()
  if result is None:  # resumed after the last step
    result = {'epoch': config.epochs - 1, **test_metrics()}
  result = {'genotype': str(arch), 'step': total_steps, **summary,
            **{k: result[k] for k in ('epoch', 'test_loss', 'test_acc',
                                      'test_top5')}}
  if chief:
    common.atomic_write(os.path.join(workdir, 'result.json'),
                        json.dumps(result, indent=1))
    print(f"test accuracy {result['test_acc']:.4f} (top-5 "
          f"{result['test_top5']:.4f}) after {config.epochs} epochs; model "
          f'in {workdir}/checkpoints/{total_steps}, result.json written',
          flush=True)
  return jax.device_get(par.get_state(state)), result


class _Feed(NamedTuple):
  batches: Any            # .batch(step), .steps_per_epoch
  eval_batches: Any       # () -> iterator of evaluation batches
  host_local: bool        # batches hold this host's rows only
  num_train: int
  num_classes: int
  image_shape: tuple


def _data(config, eval_batch_size: int, rank: int, hosts: int) -> _Feed:
  """Training and test batches: in memory (CIFAR-size datasets), or read by
  index from tfds' array_record files (imagenet2012)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxnas import data  # pylint: disable=g-import-not-at-top
  if config.dataset == 'imagenet2012':
    from jaxnas.data import imagenet  # pylint: disable=g-import-not-at-top
    train_src, val_src = imagenet.sources(config.data_dir)
    batches = imagenet.ImageNetBatches(
        train_src, batch_size=config.batch_size, seed=config.seed,
        process_index=rank, process_count=hosts)
    return _Feed(batches, lambda: imagenet.eval_batches(
        val_src, eval_batch_size, process_index=rank, process_count=hosts,
        max_examples=config.max_eval_examples), True, len(train_src),
                 train_src.dataset_info.features['label'].num_classes,
                 (224, 224, 3))
  ds = data.load(config.dataset, config.data_dir)
  if ds.test is None:
    raise ConfigError(f'{config.dataset} has no test split to report')
  batches = data.TrainBatches(
      ds.train, batch_size=config.batch_size, seed=config.seed,
      augment=data.Augment(config.crop_padding, config.flip, config.cutout),
      mean=ds.mean, std=ds.std)
  test = ds.test
  if config.max_eval_examples:
    test = test.take(np.arange(min(config.max_eval_examples, len(test))))
  return _Feed(batches, lambda: data.eval_batches(
      test, eval_batch_size, ds.mean, ds.std), False, len(ds.train),
               ds.num_classes, ds.train.images.shape[1:])


def _summary_text(config, arch, summary, size, classes) -> str:
  what = ('NAS-Bench-201 network' if config.network == 'nb201' else
          f'{config.network} network, C={config.init_channels}, '
          f'{config.layers} cells')
  return (f'{what} of {arch}\n'
          f"parameters: {summary['params'] / 1e6:.2f}M "
          f"({summary['params']:,}, auxiliary head excluded; "
          f"{summary['params_with_aux']:,} with it); multiply-adds: "
          f"{summary['macs'] / 1e6:.0f}M per {size}x{size} image, "
          f'{classes} classes')


def _define_flags():
  """The command line's flags (defined when run as a program, so that
  importing this module next to experiments.search defines none)."""
  config = config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG, 'Training config file and variant.',
      lock_config=True)
  genotype = flags.DEFINE_string(
      'genotype', None, 'Published genotype name (DARTS_V1, DARTS_V2, '
      'PDARTS, DROPNAS), genotype file, or NB-201 arch string (default: the '
      "config's `genotype`).")
  workdir = flags.DEFINE_string(
      'workdir', None, 'Output directory (default: runs/train-<variant>).')
  return config, genotype, workdir


def main(argv, flag_values):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.start_process()  # may exec this process again, once
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  config_flag, genotype_flag, workdir_flag = flag_values
  config = config_flag.value
  workdir = workdir_flag.value or os.path.join('runs',
                                               f'train-{config.variant}')
  common.enable_compilation_cache()
  # ValueError: also e.g. images too small for the auxiliary head.
  common.exit_on_error(train, config, workdir, genotype_flag.value,
                       errors=(ValueError,))


if __name__ == '__main__':
  _flag_values = _define_flags()
  app.run(lambda argv: main(argv, _flag_values))

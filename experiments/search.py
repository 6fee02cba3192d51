r"""Runs an architecture search in a workdir, resuming if it holds a checkpoint.

With no arguments this runs the `digits` DARTS search (real data shipped with
scikit-learn, a few minutes on a 2-core CPU):

  python -m experiments.search

Otherwise:

  python -m experiments.search --config experiments/configs/darts.py:cifar10 \
      --workdir runs/darts-cifar10 [--config.order=second ...]

Running the same command again on the same workdir resumes from the last
checkpoint (exactly: the batches are a pure function of (seed, step), so a
resumed run ends with the alphas of an uninterrupted one on the same devices;
on another device count it continues the same search up to float rounding,
or, with sync_bn=False, with other per-device BatchNorm batches). SIGTERM / SIGINT
save a checkpoint and exit; a non-finite loss stops the run without saving.

Devices and hosts: the step runs data-parallel over every local device
(`--config.parallel=pmap`, the default; `shard_map` or `jit` on one device),
with one synchronised architecture. On several hosts (a TPU pod slice, or
several processes on one machine) set `--config.distributed=True` and start
the same command on every host; see README.md. `--config.num_seeds=N` runs N
searches (seeds seed, seed+1, ...) as one vmapped program, each in
`seed_<seed>/`, with `seeds.json` counting how often each op and edge won.

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
  seed_<seed>/, seeds.json    with num_seeds > 1: the genotype files above per
                              seed, and the choices counted over seeds
"""

import functools
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
# Activation dtypes of the search network (`SearchNetwork.compute_dtype`);
# float16 would need loss scaling, which is not implemented.
COMPUTE_DTYPES = ('float32', 'bfloat16')
METHOD_SPACES = {'darts': ('darts', 'nb201'), 'rome': ('darts', 'nb201'),
                 'gdas': ('darts', 'nb201'), 'gaea': ('darts', 'nb201'),
                 'dropnas': ('darts', 'nb201'), 'pdarts': ('darts', 'nb201')}
# Methods whose network runs one sampled op per edge (jaxnas.methods.rome).
SINGLE_PATH = ('rome', 'gdas')


def _single_path(config) -> bool:
  """Whether `config`'s network runs one sampled op per edge."""
  return config.method in SINGLE_PATH or (
      config.method == 'gaea' and config.get('host') == 'gdas')
_POSITIVE_INTS = ('batch_size', 'epochs', 'init_channels', 'layers', 'steps',
                  'multiplier', 'stem_multiplier', 'eval_batch_size',
                  'checkpoint_every_steps', 'keep_checkpoints', 'num_seeds')
_PARALLEL_MODES = ('pmap', 'shard_map', 'jit')  # jaxnas.parallel.MODES
_POSITIVE_FLOATS = ('lr', 'arch_lr')


class ConfigError(ValueError):
  """A config that cannot run; raised before anything is compiled."""


# config.share_backward -> the methods' share_backward (None: their automatic
# choice). Bools and 'true' / 'false' are configs and command lines written
# before 'auto' existed (`--config.share_backward=False` arrives as a string).
_SHARE_BACKWARD = {'auto': None, 'on': True, 'off': False, True: True,
                   False: False, 'true': True, 'false': False}


def _share_backward(config):
  """config.share_backward as darts.make takes it; KeyError if invalid."""
  value = config.get('share_backward', 'off')
  return _SHARE_BACKWARD[value.lower() if isinstance(value, str) else value]


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
  space = config.get('space', 'darts')
  try:
    ops.check_primitives(
        tuple(config.get('primitives', ops.DARTS_PRIMITIVES)),
        ops.NB201_PRIMITIVES if space == 'nb201' else ops.DARTS_PRIMITIVES)
  except ValueError as e:
    problems.append(f'primitives: {e}')
  if space == 'nb201':
    v = config.get('cells_per_stage')
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      problems.append(f'cells_per_stage must be a positive integer, got {v!r}')
  elif config.get('nb201_table'):
    problems.append("nb201_table scores NAS-Bench-201 cells: it needs "
                    "space='nb201'")
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
  portion = config.get('train_portion', 0.5)
  if not 0 < portion <= 1:
    problems.append(f'train_portion must be in (0, 1], got {portion}')
  elif portion == 1 and not config.get('single_level'):
    problems.append('train_portion=1 leaves no held-out half for bilevel '
                    'architecture steps: set --config.single_level=True or '
                    'train_portion < 1')
  if method in SINGLE_PATH:
    problems.extend(_single_path_problems(config))
  if method == 'gaea':
    problems.extend(_gaea_problems(config))
  if method == 'dropnas':
    problems.extend(_dropnas_problems(config))
  if method == 'pdarts':
    problems.extend(_pdarts_problems(config))
  if config.get('order', 'first') not in darts.ORDERS:
    problems.append(f"order must be one of {darts.ORDERS}, got "
                    f"{config.get('order')!r}")
  try:
    share = _share_backward(config)
  except (KeyError, TypeError):
    problems.append(f"share_backward must be one of ('auto', 'on', 'off'), "
                    f"got {config.get('share_backward')!r}")
    share = None
  if share and config.get('order', 'first') == 'exact':
    problems.append("share_backward='on' needs order=first or second; set "
                    "--config.share_backward=auto")
  dt = config.get('compute_dtype', 'float32')
  if dt not in COMPUTE_DTYPES:
    problems.append(f'compute_dtype must be one of {COMPUTE_DTYPES}, got '
                    f'{dt!r}')
  elif dt != 'float32' and config.get('space', 'darts') != 'darts':
    problems.append(f'compute_dtype={dt!r} is implemented for the DARTS '
                    "space only; set --config.compute_dtype=float32")
  elif dt != 'float32' and config.get('order', 'first') == 'second':
    # w +- eps*v moves each weight by ~1e-5, under bfloat16's spacing at
    # the kernels' scale (2e-4 to 1e-3): the difference would be rounding.
    problems.append(f"order='second' (finite differences) is meaningless "
                    f"with compute_dtype={dt!r}; use order='exact' or "
                    'float32')
  if config.get('depthwise_impl', 'auto') not in ops.DEPTHWISE_IMPLS:
    problems.append(f'depthwise_impl must be one of {ops.DEPTHWISE_IMPLS}, '
                    f"got {config.get('depthwise_impl')!r}")
  elif (config.get('depthwise_impl') == 'dense_loop' and
        config.get('order', 'first') == 'exact'):
    problems.append("order='exact' needs forward-mode autodiff, which "
                    "depthwise_impl='dense_loop' does not support; set "
                    "--config.depthwise_impl=dense")
  if config.get('parallel', 'pmap') not in _PARALLEL_MODES:
    problems.append(f'parallel must be one of {_PARALLEL_MODES}, got '
                    f"{config.get('parallel')!r}")
  nd = config.get('num_devices')
  if nd is not None and (not isinstance(nd, int) or nd <= 0):
    problems.append(f'num_devices must be a positive integer or None, got '
                    f'{nd!r}')
  if problems:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(problems) +
                      '\nFix it with --config.<field>=<value>; nothing was '
                      'compiled or written.')


def _single_path_problems(config) -> list:
  """What is wrong with a ROME / GDAS config's own fields."""
  from jaxnas.methods import rome  # pylint: disable=g-import-not-at-top
  problems = []
  topology = config.get('topology')
  if topology not in rome.TOPOLOGIES:
    problems.append(f'topology must be one of {rome.TOPOLOGIES}, got '
                    f'{topology!r}')
  elif topology != 'none' and config.get('space') == 'nb201':
    problems.append('NAS-Bench-201 cells have a fixed topology: set '
                    '--config.topology=none')
  elif topology != 'none' and 'none' in config.get('primitives', ()):
    problems.append("topology sampling picks each node's edges, so 'none' "
                    'must not be an op (ROME removes it); drop it from '
                    'primitives or set topology=none')
  for k in ('num_samples', 'weight_samples'):
    v = config.get(k)
    if not (v is None and k == 'weight_samples') and (
        not isinstance(v, int) or isinstance(v, bool) or v <= 0):
      problems.append(f'{k} must be a positive integer, got {v!r}')
  if config.get('weight_reduce') not in rome.REDUCTIONS:
    problems.append(f'weight_reduce must be one of {rome.REDUCTIONS}, got '
                    f"{config.get('weight_reduce')!r}")
  if not 0 < config.get('tau_min', 0) <= config.get('tau_max', 0):
    problems.append('need 0 < tau_min <= tau_max, got '
                    f"{config.get('tau_min')} and {config.get('tau_max')}")
  if config.get('per_device_samples') and config.get('sync_bn', True):
    problems.append('per_device_samples runs other ops on each device, which '
                    'SyncBN cannot synchronise: set --config.sync_bn=False')
  return problems


def _gaea_problems(config) -> list:
  """What is wrong with a GAEA config's own fields."""
  from jaxnas.methods import gaea  # pylint: disable=g-import-not-at-top
  problems = []
  if config.get('host') not in gaea.HOSTS:
    problems.append(f'host must be one of {gaea.HOSTS}, got '
                    f"{config.get('host')!r}")
  if not 0 <= config.get('floor', -1) < 1:
    problems.append(f"floor must be in [0, 1), got {config.get('floor')}")
  if config.get('host') == 'gdas' and not (
      0 < config.get('tau_min', 0) <= config.get('tau_max', 0)):
    problems.append('need 0 < tau_min <= tau_max, got '
                    f"{config.get('tau_min')} and {config.get('tau_max')}")
  if config.get('host') == 'darts' and config.get('warmup_epochs'):
    problems.append('warmup_epochs applies to host=gdas only')
  k = config.get('partial_channels', 1)
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    problems.append(f'partial_channels must be a positive integer, got {k!r}')
  elif k > 1 and (config.get('space') != 'darts' or
                  config.get('host') != 'darts'):
    problems.append('partial_channels applies to host=darts on the DARTS '
                    'space only')
  elif k > 1 and config.get('init_channels', 0) % (2 * k):
    problems.append(f'partial_channels={k} needs init_channels divisible by '
                    f'{2 * k} (C/K channels, even for FactorizedReduce), got '
                    f"{config.get('init_channels')}")
  if config.get('learn_edges') and (config.get('space') != 'darts' or
                                    config.get('host') != 'darts'):
    problems.append('learn_edges applies to host=darts on the DARTS space '
                    'only')
  return problems


def _dropnas_problems(config) -> list:
  """What is wrong with a DropNAS config's own fields."""
  from jaxnas import ops  # pylint: disable=g-import-not-at-top
  problems = []
  r = config.get('drop_rate')
  if not isinstance(r, (int, float)) or not 0 < r < 1:
    problems.append(f'drop_rate must be in (0, 1), got {r!r}')
  w = config.get('warmup_epochs')
  if not isinstance(w, int) or isinstance(w, bool) or w < 0:
    problems.append(f'warmup_epochs must be a non-negative integer, got {w!r}')
  prims = tuple(config.get('primitives', ()))
  conv = ops.parametric_mask(prims)
  if conv.all() or not conv.any():
    problems.append('DropNAS drops ops in two groups, so primitives needs '
                    f'parametric ops ({", ".join(ops.PARAMETRIC_OPS)}) and '
                    f'parameter-free ones, got {prims}')
  if not config.get('single_level'):
    problems.append('DropNAS is one-level (weights and alphas on the same '
                    'batch): set --config.single_level=True')
  return problems


def _pdarts_problems(config) -> list:
  """What is wrong with a P-DARTS config's own fields."""
  problems = []
  keep = tuple(config.get('num_to_keep', ()))
  k = len(config.get('primitives', ()))
  if not keep or any(not isinstance(n, int) or n < 1 for n in keep) or list(
      keep) != sorted(keep, reverse=True) or len(set(keep)) != len(keep) or (
          keep[0] >= k):
    problems.append(f'num_to_keep must decrease strictly from below the {k} '
                    f'primitives to at least 1, got {keep}')
  for name in ('add_layers', 'dropout_rates'):
    if len(tuple(config.get(name, ()))) != len(keep):
      problems.append(f'{name} needs one value per stage ({len(keep)}), got '
                      f'{tuple(config.get(name, ()))}')
  if any(not 0 <= r < 1 for r in config.get('dropout_rates', ())):
    problems.append('dropout_rates must be in [0, 1), got '
                    f"{tuple(config.get('dropout_rates'))}")
  w = config.get('warmup_epochs')
  if not isinstance(w, int) or not 0 <= w <= config.get('epochs', 0):
    problems.append(f'warmup_epochs must be in [0, epochs], got {w!r}')
  if not isinstance(config.get('max_skips'), int) or config.max_skips < 0:
    problems.append('max_skips must be a non-negative integer, got '
                    f"{config.get('max_skips')!r}")
  if config.get('num_seeds', 1) > 1:
    problems.append('P-DARTS runs one seed per search (num_seeds=1)')
  if config.get('space') == 'nb201' and any(config.get('add_layers', ())):
    problems.append('NAS-Bench-201 cells are fixed by the benchmark: set '
                    'add_layers to zeros (depth is cells_per_stage)')
  if keep[-1:] != (1,):
    problems.append('the last pruning leaves the final op of each edge: end '
                    'num_to_keep with 1')
  if config.get('single_level'):
    problems.append('P-DARTS is bilevel: set --config.single_level=False')
  if 'skip_connect' not in config.get('primitives', ()):
    problems.append("P-DARTS caps skip-connects: primitives needs "
                    "'skip_connect'")
  return problems


def search_splits(ds, config):
  """(weights half, held-out half) of the training split of `ds`.

  Bilevel search takes architecture batches from the held-out half; a
  single-level (ERM) search takes them from the weights half as well (another
  random batch each step: GAEA's `search.single_level`), and the held-out
  half is only evaluated on, never trained on (see `search_batches`).
  With `train_portion=1` (DropNAS' one-level search on the whole training
  set) the whole training split is the first part and the test split the
  second, evaluated on for monitoring only; the test split comes in one
  fixed shuffled order, so that `max_eval_examples` takes every class (an
  image folder lists it class by class).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxnas import data  # pylint: disable=g-import-not-at-top
  if config.train_portion == 1:
    if ds.test is None:
      raise ConfigError(
          f'train_portion=1 trains on all of {config.dataset}\'s training '
          'split and evaluates on its test split, which it does not have; '
          'set --config.train_portion < 1')
    order = np.random.default_rng(0).permutation(len(ds.test))
    return ds.train, ds.test.take(order)
  weights_half, arch_half = data.split(ds.train, config.train_portion)
  only = set(np.unique(weights_half.labels)) ^ set(np.unique(arch_half.labels))
  if only:
    raise ConfigError(
        f'classes {sorted(int(c) for c in only)} appear in only one half of '
        f'the {config.dataset} training split (split at train_portion='
        f'{config.train_portion}): the examples are ordered by class, or '
        'those classes are too rare to reach both halves')
  return weights_half, arch_half


def search_batches(ds, config, seed: int, splits=None):
  """The `jaxnas.data.SearchBatches` of `seed`: weights batches from the
  weights half, architecture batches from the held-out half, or with
  `config.single_level` from the weights half too. `splits`: the
  `search_splits` of `ds` if already made."""
  from jaxnas import data  # pylint: disable=g-import-not-at-top
  weights_half, arch_half = splits or search_splits(ds, config)
  augment = (data.Augment(config.crop_padding, config.flip)
             if config.crop_padding or config.flip else None)
  return data.SearchBatches(
      weights_half, weights_half if config.get('single_level') else arch_half,
      batch_size=config.batch_size, seed=seed, augment=augment,
      mean=ds.mean, std=ds.std)


def build(config, num_classes: int, steps_per_epoch: int):
  """The search network and method of `config`."""
  # Imported here so that `--help` answers without starting JAX.
  from jaxnas import ops  # pylint: disable=g-import-not-at-top
  from jaxnas import parallel  # pylint: disable=g-import-not-at-top
  from jaxnas.methods import darts  # pylint: disable=g-import-not-at-top
  from jaxnas.methods import base  # pylint: disable=g-import-not-at-top
  from jaxnas.methods import dropnas  # pylint: disable=g-import-not-at-top
  from jaxnas.methods import gaea  # pylint: disable=g-import-not-at-top
  from jaxnas.methods import pdarts  # pylint: disable=g-import-not-at-top
  from jaxnas.methods import rome  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import darts as darts_space  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import genotype as genotype_lib  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import nb201  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if config.method not in METHOD_SPACES:
    raise ConfigError(f'unknown method {config.method!r}; known: '
                      f'{sorted(METHOD_SPACES)}')
  bn_axis = parallel.AXIS if config.get('sync_bn', True) else None
  single_path = _single_path(config)
  nb = config.get('space', 'darts') == 'nb201'
  primitives = tuple(config.get(
      'primitives', ops.NB201_PRIMITIVES if nb else ops.DARTS_PRIMITIVES))
  switches = None
  if config.get('stage') is not None:  # a P-DARTS stage: its switches
    switches = {t: np.array(config[f'switches_{t}'], bool)
                for t in stage_cell_types(config)}
  if nb:
    net = nb201.SearchNetwork(
        C=config.init_channels, N=config.cells_per_stage,
        num_classes=num_classes, primitives=primitives,
        track_running_stats=config.get('track_running_stats', True),
        bn_axis_name=bn_axis, single_path=single_path,
        single_path_remat=config.get('single_path_remat', True),
        cell_ops=switches and pdarts.edge_ops(switches['cell'], primitives))
    derive_fn = base.space_derive(
        net, exclude=('none',) if config.get('exclude_none') else ())
  else:
    net = darts_space.SearchNetwork(
        C=config.init_channels, num_classes=num_classes, layers=config.layers,
        steps=config.steps, multiplier=config.multiplier,
        stem_multiplier=config.stem_multiplier, primitives=primitives,
        normal_ops=switches and pdarts.edge_ops(switches['normal'],
                                                primitives),
        reduce_ops=switches and pdarts.edge_ops(switches['reduce'],
                                                primitives),
        depthwise_impl=config.depthwise_impl, bn_axis_name=bn_axis,
        single_path=single_path,
        single_path_remat=config.get('single_path_remat', True),
        partial_channels=config.get('partial_channels', 1),
        cell_remat=config.get('cell_remat', False),
        compute_dtype=config.get('compute_dtype', 'float32'))
    derive_fn = base.space_derive(net)
    if config.get('derive_top_pairs'):
      derive_fn = functools.partial(
          genotype_lib.derive_top_pairs, primitives=net.primitives,
          steps=net.steps, multiplier=net.multiplier)
  if config.method == 'gaea':
    method = gaea.make(
        net, steps_per_epoch=steps_per_epoch, host=config.host,
        epochs=config.epochs, schedule_epochs=config.get('schedule_epochs'),
        lr=config.lr, lr_min=config.lr_min, momentum=config.momentum,
        weight_decay=config.weight_decay, grad_clip=config.grad_clip,
        nesterov=config.get('nesterov', False), arch_lr=config.arch_lr,
        entropy_weight=config.entropy_weight, floor=config.floor,
        tau_max=config.tau_max, tau_min=config.tau_min,
        warmup_epochs=config.warmup_epochs, zero_terms=config.zero_terms,
        learn_edges=config.learn_edges, edge_lr=config.edge_lr,
        share_backward=_share_backward(config),
        derive_fn=derive_fn)
    return net, method
  if config.method == 'pdarts':
    method = pdarts.make(
        net, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
        initial_dropout=config.get('skip_dropout') or 0.,
        warmup_epochs=config.warmup_epochs, decay=config.dropout_decay,
        lr=config.lr, lr_min=config.lr_min, momentum=config.momentum,
        weight_decay=config.weight_decay, grad_clip=config.grad_clip,
        arch_lr=config.arch_lr, arch_betas=(config.arch_b1, config.arch_b2),
        arch_weight_decay=config.arch_weight_decay,
        arch_grad_clip=config.arch_grad_clip,
        arch_init_scale=config.arch_init_scale, switches=switches,
        share_backward=_share_backward(config), derive_fn=derive_fn)
    return net, method
  if config.method == 'dropnas':
    method = dropnas.make(
        net, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
        lr=config.lr, lr_min=config.lr_min, momentum=config.momentum,
        weight_decay=config.weight_decay, grad_clip=config.grad_clip,
        arch_lr=config.arch_lr, arch_betas=(config.arch_b1, config.arch_b2),
        arch_decay=config.arch_weight_decay, drop_rate=config.drop_rate,
        warmup_epochs=config.warmup_epochs,
        arch_init_scale=config.arch_init_scale, derive_fn=derive_fn)
    return net, method
  if single_path:
    method = rome.make(
        net, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
        topology=config.topology, num_samples=config.num_samples,
        weight_samples=config.get('weight_samples'),
        weight_reduce=config.weight_reduce, lr=config.lr,
        lr_min=config.lr_min, momentum=config.momentum,
        weight_decay=config.weight_decay, grad_clip=config.grad_clip,
        nesterov=config.get('nesterov', False), arch_lr=config.arch_lr,
        arch_betas=(config.arch_b1, config.arch_b2),
        arch_weight_decay=config.arch_weight_decay,
        arch_init_scale=config.arch_init_scale, tau_max=config.tau_max,
        tau_min=config.tau_min, zero_terms=config.zero_terms,
        per_device_samples=config.per_device_samples,
        weights_first=config.weights_first,
        share_backward=_share_backward(config), derive_fn=derive_fn)
    return net, method
  method = darts.make(
      net, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
      order=config.order, lr=config.lr, lr_min=config.lr_min,
      momentum=config.momentum, weight_decay=config.weight_decay,
      grad_clip=config.grad_clip, arch_lr=config.arch_lr,
      arch_betas=(config.arch_b1, config.arch_b2),
      arch_weight_decay=config.arch_weight_decay,
      arch_init_scale=config.arch_init_scale, fd_r=config.fd_r,
      share_backward=_share_backward(config),
      nesterov=config.get('nesterov', False), derive_fn=derive_fn)
  return net, method


# Config fields that do not change what a checkpoint means.
# A run may resume on other hardware: the device count and layout, and how the
# processes find each other, are not part of what a checkpoint means.
RESUME_IGNORE = ('workdir', 'data_dir', 'log_every_steps', 'eval_batch_size',
                 'checkpoint_every_steps', 'keep_checkpoints', 'progress',
                 'tensorboard', 'variant', 'max_eval_examples', 'parallel',
                 'num_devices', 'distributed', 'coordinator_address',
                 'num_processes', 'process_id', 'nb201_table',
                 'single_path_remat', 'cell_remat', 'share_backward')


# Keys added after runs were started with them absent, at the value that
# reproduces those runs: left out of the resume fingerprint at that value so
# that the runs still resume.
ADDED_KEYS = {'compute_dtype': 'float32'}


def _fingerprinted(config_dict: dict) -> dict:
  return {k: v for k, v in config_dict.items()
          if k not in ADDED_KEYS or v != ADDED_KEYS[k]}


def _epoch_outputs(workdir, epoch, state, genotype, primitives, mixing):
  """Writes the genotype, alphas and pictures after `epoch` (process 0).

  DARTS genotypes are drawn as cells; NAS-Bench-201 archs are strings (in
  genotype.txt) and their heatmaps label edges 'i<-j' as the benchmark.
  `mixing` maps the architecture to the op weights drawn; the .npz files hold
  every architecture array (`alpha_<path>`, e.g. alpha_ops_normal for ROME).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from jaxnas import ops  # pylint: disable=g-import-not-at-top
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
  weights = jax.tree.map(np.asarray, mixing(alphas))
  arrays = {**{f'alpha_{k}': v for k, v in traverse_util.flatten_dict(
      alphas, sep='_').items()},
            **{f'weights_{k}': v for k, v in weights.items()}}
  for path in (os.path.join(workdir, 'alphas', f'epoch_{epoch:03d}.npz'),
               os.path.join(workdir, 'alphas.npz')):
    tmp = path + '.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  edge_labels = None  # DARTS: 'j→i' in the reference's order (viz's default)
  if hasattr(genotype, 'normal'):
    viz.plot_genotype(genotype, os.path.join(workdir, ''))
  else:
    from jaxnas.spaces import nb201  # pylint: disable=g-import-not-at-top
    edge_labels = {'cell': nb201.EDGE_KEYS}
  # Only ops offered on every edge can share columns; both spaces' are.
  viz.plot_alpha_heatmap(weights, edge_labels, primitives,
                         os.path.join(workdir, 'alpha_heatmap.png'))
  history, alpha_history = common.read_alpha_history(workdir, primitives,
                                                     epoch + 1)
  viz.plot_alpha_trajectories(history, primitives,
                              os.path.join(workdir, 'alpha_trajectories.png'),
                              edge_labels)
  viz.plot_entropy(history, os.path.join(workdir, 'entropy.png'))
  # DropNAS' groups: parametric ops vs the rest, drawn on the raw alphas.
  conv = ops.parametric_mask(primitives)
  if alpha_history and conv.any() and not conv.all():
    viz.plot_group_means(alpha_history,
                         {'parametric': conv, 'parameter-free': ~conv},
                         os.path.join(workdir, 'group_alphas.png'))


class _Seeds:
  """One search, or `num_seeds` independent ones as one vmapped program.

  Seed i is `config.seed + i`: its init key, data order and augmentation are
  those of a single-seed run with that seed. State leaves get a leading seed
  axis; batches are stacked on axis 1 ([B, seeds, ...]) so that the batch
  axis stays first for host and device sharding.
  """

  def __init__(self, config, method, batches_fn):
    import jax  # pylint: disable=g-import-not-at-top
    self.seeds = [config.seed + i for i in range(config.get('num_seeds', 1))]
    self.many = len(self.seeds) > 1
    self.method = method
    self.batches = [batches_fn(s) for s in self.seeds]
    if self.many:
      self.step = jax.vmap(method.step, in_axes=(0, 1))
      self.eval_step = jax.vmap(method.eval_step, in_axes=(0, None))
    else:
      self.step, self.eval_step = method.step, method.eval_step

  def init(self, sample):
    """The initial state(s); each seed's equals its single-seed run's."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    states = [self.method.init(jax.random.PRNGKey(s), sample)
              for s in self.seeds]
    if not self.many:
      return states[0]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)

  def batch(self, step):
    if not self.many:
      return self.batches[0].batch(step)
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    return jax.tree.map(lambda *xs: np.stack(xs, axis=1),
                        *[b.batch(step) for b in self.batches])

  def each(self, host_state):
    """(seed, that seed's state) for every seed."""
    import jax  # pylint: disable=g-import-not-at-top
    if not self.many:
      return [(self.seeds[0], host_state)]
    return [(s, jax.tree.map(lambda x, i=i: x[i], host_state))
            for i, s in enumerate(self.seeds)]


def _seed_summary(workdir, results):
  """Writes seeds.json: per-seed genotypes and accuracies, choice counts."""
  from jaxnas.spaces import genotype as genotype_lib  # pylint: disable=g-import-not-at-top
  counts = genotype_lib.choice_counts([g for _, g, _ in results])
  summary = {
      'seeds': [{'seed': s, 'valid_acc': acc, 'genotype': g.to_dict()}
                for s, g, acc in results],
      'counts': counts}
  common.atomic_write(os.path.join(workdir, 'seeds.json'),
                      json.dumps(summary, indent=1))
  return summary


def _nb201_final(table, results):
  """The NB-201 report of each seed's arch, and their spread over seeds."""
  from jaxnas.benchmarks import nb201 as nb201_bench  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  runs = [{'seed': s, **table.report(g)} for s, g in results]
  out = {'runs': runs, 'best': {}, 'random': {}}
  for m in nb201_bench.PAPER_METRICS:
    accs = [r[m]['accuracy'] for r in runs]
    out['best'][m] = table.best(m)[2]
    out['random'][m] = table.random_stats(m)
    if len(runs) > 1:
      out.setdefault('seeds', {})[m] = {'mean': float(np.mean(accs)),
                                        'std': float(np.std(accs))}
  return out


def _nb201_text(report):
  lines = []
  for r in report['runs']:
    accs = ', '.join(
        f"{m.split('_')[0]} {r[m]['accuracy']:.2f} (rank {r[m]['rank']})"
        for m in report['best'])
    lines.append(f"NAS-Bench-201 seed {r['seed']}: index {r['index']} "
                 f"{r['arch']}\n  {accs}")
  for what in ('seeds', 'random'):
    if what not in report:
      continue
    accs = ', '.join(f"{m.split('_')[0]} {v['mean']:.2f}±{v['std']:.2f}"
                     for m, v in report[what].items())
    lines.append(f"  {'over seeds' if what == 'seeds' else 'random archs'}: "
                 f'{accs}')
  return '\n'.join(lines)


def _entropies(mixing, states, many: bool) -> dict:
  """{'entropy_<cell type>': mean mixture entropy per edge} (a list over
  seeds when `many`)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import viz  # pylint: disable=g-import-not-at-top
  per_seed = [{f'entropy_{t}': viz.mixture_entropy(w) for t, w in
               jax.device_get(mixing(st.arch)).items()} for _, st in states]
  if not many:
    return per_seed[0]
  return {k: [e[k] for e in per_seed] for k in per_seed[0]}


def _method_summary(config) -> str:
  """The method's main settings, for the start-up line."""
  level = 'single-level' if config.get('single_level') else 'bilevel'
  if config.method == 'gaea':
    out = f'host={config.host}, EG eta={config.arch_lr}, {level}'
    if config.get('partial_channels', 1) > 1:
      out += f', partial channels 1/{config.partial_channels}'
    if config.get('learn_edges'):
      out += f', edge weights (eta {config.edge_lr})'
    if config.host == 'gdas':
      out += f', tau {config.tau_max} -> {config.tau_min}'
    return out
  if config.method == 'pdarts':
    return (f'stage {config.stage} of {len(config.num_to_keep)}, skip '
            f'dropout {config.skip_dropout:g}, {config.warmup_epochs} warm-up '
            'epochs, first order')
  if config.method == 'dropnas':
    return (f'drop rate r={config.drop_rate:g}, partial decay, '
            f'{"one-level" if config.single_level else level}')
  if config.method in SINGLE_PATH:
    return (f'K={config.num_samples}, topology={config.topology}, '
            f'tau {config.tau_max} -> {config.tau_min}, {level}')
  return f'order={config.order}, {level}'


def search(config, workdir: str):
  """Runs (or resumes) the search of `config` in `workdir`.

  Every process of a multi-host run calls this with the same arguments.

  Returns:
    (final SearchState on the host, Genotype); with `num_seeds` > 1 the state
    has a leading seed axis and the genotype is a list, one per seed.

  Raises:
    ConfigError: before anything is compiled or written, for a bad config.
    jaxnas.checkpoint.CheckpointError: the workdir's checkpoint is unreadable
      or from another config (nothing is overwritten).
    FloatingPointError: a non-finite loss (the last good checkpoint stays).
    common.Interrupted: SIGTERM / SIGINT, after saving a checkpoint.
  """
  validate(config)
  if config.method == 'pdarts' and config.get('stage') is None:
    return search_stages(config, workdir)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxnas import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxnas import data  # pylint: disable=g-import-not-at-top
  from jaxnas import ops  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import genotype as genotype_lib  # pylint: disable=g-import-not-at-top

  try:
    common.check_local_workdir(workdir)
    par = common.data_parallel(config)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  # Evaluation pads its last batch anyway: round its size up to the devices.
  eval_batch_size = common.round_up(config.eval_batch_size, par.num_devices)
  table = None
  if config.get('nb201_table'):
    from jaxnas.benchmarks import nb201 as nb201_bench  # pylint: disable=g-import-not-at-top
    table = nb201_bench.Table.load(config.nb201_table)
  ds = data.load(config.dataset, config.data_dir)
  weights_half, arch_half = search_splits(ds, config)
  steps_per_epoch = len(weights_half) // config.batch_size
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
  if (config.get('space') == 'nb201' and
      not config.get('track_running_stats', True)):
    # BNs normalise evaluation batches by their own statistics: padding rows
    # would change them, so evaluate whole batches only.
    eval_batch_size = min(eval_batch_size, len(eval_split) //
                          par.num_devices * par.num_devices)
    eval_split = eval_split.take(np.arange(
        len(eval_split) // eval_batch_size * eval_batch_size))
  _, method = build(config, ds.num_classes, steps_per_epoch)
  seeds = _Seeds(config, method, lambda seed: search_batches(
      ds, config, seed, (weights_half, arch_half)))
  primitives = tuple(config.get('primitives', ops.DARTS_PRIMITIVES))
  chief = common.is_chief()
  rank, hosts = jax.process_index(), jax.process_count()

  def put_batch(global_batch):
    return par.put_batch(data.host_slice(global_batch, rank, hosts))

  config_dict = config.to_dict()
  sample = seeds.batches[0].batch(0)['train']['image'][:1]
  num_cells = (3 * config.cells_per_stage + 2 if config.get('space') == 'nb201'
               else config.layers)  # NB-201: N cells x 3 + 2 ResNet blocks
  ckpts = common.RunCheckpoints(
      workdir, checkpoint.config_fingerprint(_fingerprinted(config_dict),
                                             RESUME_IGNORE), par,
      config.keep_checkpoints, steps_per_epoch)
  pending, start = ckpts.pending, ckpts.start
  if start is None:
    state = seeds.init(sample)
    # Initialisation leaves executables cached (the jitted initialisers,
    # and op by op the rest of a method's init: NAO's draws, optimiser
    # states) that would stay for the run's lifetime; op by op they held
    # ~0.6 GB at DARTS `small` (BENCHMARKS.md). Nothing else is compiled yet.
    jax.block_until_ready(state)
    jax.clear_caches()
    state = par.put_state(state)
    held_out = ('test examples for evaluation' if config.train_portion == 1
                else 'held out for evaluation')
    halves = (f'{len(weights_half)} examples for weights and architecture, '
              f'{len(arch_half)} {held_out}'
              if config.get('single_level') else
              f'{len(weights_half)} weight / {len(arch_half)} architecture '
              'examples')
    msg = (f'{config.method} search on {config.dataset}: {halves}, '
           f'{config.epochs} epochs x {steps_per_epoch} steps of '
           f'{config.batch_size}, {config.get("space", "darts")} space, '
           f'C={config.init_channels}, {num_cells} cells, '
           f'{_method_summary(config)}, {par.num_devices} device(s) '
           f'({config.get("parallel", "pmap")}, {hosts} process(es))')
    if seeds.many:
      msg += f', seeds {seeds.seeds} vmapped'
  else:
    state = ckpts.restore(jax.eval_shape(seeds.init, sample))
    msg = f'resuming {workdir} from step {start} of {total_steps}'
  start = start or 0
  if chief:
    os.makedirs(workdir, exist_ok=True)
    common.atomic_write(os.path.join(workdir, 'config.json'),
                        json.dumps(config_dict, indent=2, default=repr))
  log = common.MetricLog(workdir, config.get('tensorboard', True))
  log.truncate(start)
  if chief:
    print(msg, flush=True)

  step_fn = par.step(seeds.step)
  eval_fn = par.step(seeds.eval_step, donate=False)

  def scalars(values):
    """Metric arrays (per seed with num_seeds > 1) as loggable numbers."""
    out = {}
    for k, v in values.items():
      v = np.asarray(v, np.float64)
      out[k] = float(v.mean())
      if seeds.many:
        out[f'{k}_seeds'] = v.tolist()
    return out

  def derive_all():
    host = jax.device_get(par.get_state(state))
    return host, [(s, method.derive(st)) for s, st in seeds.each(host)]

  progress = common.Progress(total_steps, start,
                             enabled=config.get('progress', True))
  host_state, genotypes = derive_all()
  valid_acc = None
  timer = common.Timer()
  try:
    with common.StopSignals() as signals:
      for step in range(start, total_steps):
        epoch, i = divmod(step, steps_per_epoch)
        state, metrics = step_fn(state, put_batch(seeds.batch(step)))
        pending.append(step, metrics)
        done = step + 1
        if step == start:
          jax.block_until_ready(metrics)
          progress.write(f'compiled and ran step {done} in {timer():.1f}s')
        logged = (config.log_every_steps and
                  done % config.log_every_steps == 0)
        if logged or i == steps_per_epoch - 1:
          last = scalars(pending.flush())
          progress.update(0, loss=f"{last['train_loss']:.3f}")
          if logged:
            log.write(done, last, prefix='train/')
        progress.update(1)
        if i == steps_per_epoch - 1:
          record = scalars(pending.means())
          totals = common.evaluate(eval_fn, state, data.eval_batches(
              eval_split, eval_batch_size, ds.mean, ds.std), put_batch,
                                   par.get_state)
          valid_acc = totals['correct'] / totals['count']
          record.update(scalars({
              'valid_loss': totals['loss_sum'] / totals['count'],
              'valid_acc': valid_acc}))
          record['epoch'] = epoch
          host_state, genotypes = derive_all()
          record.update(_entropies(method.mixing, seeds.each(host_state),
                                   seeds.many))
          if table is not None:  # the ground truth, as AutoDL logs it
            reports = [table.report(g) for _, g in genotypes]
            truth = {f'nb201_{m}': [r[m]['accuracy'] for r in reports]
                     for m in nb201_bench.PAPER_METRICS}
            record.update(scalars(truth))
            indices = [r['index'] for r in reports]
            record['nb201_index'] = indices if seeds.many else indices[0]
          log.write(done, record, prefix='epoch/')
          for seed, g in genotypes:
            log.write(done, {'epoch': epoch, 'genotype': g.to_dict(),
                             **({'seed': seed} if seeds.many else {})})
          if chief:
            for (seed, g), (_, st) in zip(genotypes, seeds.each(host_state)):
              out_dir = (os.path.join(workdir, f'seed_{seed}') if seeds.many
                         else workdir)
              _epoch_outputs(out_dir, epoch, st, g, primitives,
                             method.mixing)
            if seeds.many:
              _seed_summary(workdir, [
                  (s, g, float(a)) for (s, g), a in zip(genotypes, valid_acc)])
          text = (f"epoch {epoch}: lr {record['lr']:.6f} | train loss "
                  f"{record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
                  f"valid loss {record['valid_loss']:.4f} acc "
                  f"{record['valid_acc']:.4f}")
          if not seeds.many:
            text += ' | entropy ' + ' '.join(
                f'{k[8:]} {v:.3f}' for k, v in record.items()
                if k.startswith('entropy_'))
          for seed, g in genotypes:
            text += (f'\n  seed {seed} genotype = {g}' if seeds.many else
                     f'\n  genotype = {g}')
          if table is not None:
            text += '\n  NAS-Bench-201 ' + ', '.join(
                f"{m.split('_')[0]} {record[f'nb201_{m}']:.2f}"
                for m in nb201_bench.PAPER_METRICS) + (
                    ' (mean over seeds)' if seeds.many else
                    f" (index {reports[0]['index']})")
          progress.write(text)
          pending.reset()
        checkpointed = (done == total_steps or
                        done % config.checkpoint_every_steps == 0)
        if checkpointed:
          ckpts.save(done, state)
        # One process's signal stops all.
        ckpts.stop_if_signalled(
            signals, done, state,
            synced=logged or checkpointed or i == steps_per_epoch - 1)
  finally:
    progress.close()
    log.close()
    ckpts.close()
  if hosts > 1:
    digest = checkpoint.config_fingerprint(
        {'arch': jax.tree.map(lambda x: np.asarray(x).tolist(),
                              host_state.arch)}, ())
    print(f'process {rank}/{hosts}: final architecture digest {digest[:16]}',
          flush=True)
  if chief:
    where = workdir if not seeds.many else f'{workdir}/seed_*'
    print(f'final genotype written to {where}/genotype.json', flush=True)
    for seed, g in genotypes:
      print(f'seed {seed}: {g}' if seeds.many else str(g), flush=True)
    if table is not None:
      report = _nb201_final(table, genotypes)
      common.atomic_write(os.path.join(workdir, 'nb201.json'),
                          json.dumps(report, indent=1))
      print(_nb201_text(report) + f'\n(written to {workdir}/nb201.json)',
            flush=True)
    if seeds.many and valid_acc is not None:
      # seeds.json was written with the last epoch's outputs.
      counts = genotype_lib.choice_counts([g for _, g in genotypes])
      print(f'choices over {len(seeds.seeds)} seeds (seeds.json):\n' +
            genotype_lib.format_counts(counts), flush=True)
  if not seeds.many:
    return host_state, genotypes[0][1]
  return host_state, [g for _, g in genotypes]


def stage_cell_types(config):
  """The cell types of `config`'s space: ('normal', 'reduce') or ('cell',)."""
  return ('cell',) if config.get('space') == 'nb201' else ('normal', 'reduce')


def stage_config(config, stage: int, switches):
  """The config of P-DARTS stage `stage` over `switches` ({cell type:
  [edges, primitives] bool})."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(config.to_dict())
  c.stage = stage
  # A fresh init, data order and dropout stream per stage (the reference
  # runs one RNG through all stages); stage 0 has the run's seed.
  c.seed = config.seed + stage
  c.layers = config.layers + config.add_layers[stage]
  c.skip_dropout = float(config.dropout_rates[stage])
  for t in stage_cell_types(config):
    c[f'switches_{t}'] = switches[t].tolist()
  c.distributed = False   # initialised once, by search_stages
  return c


def search_stages(config, workdir: str):
  """Runs (or resumes) all stages of a P-DARTS search in `workdir`.

  Stage s searches in `workdir/stage_<s>` (a complete search workdir: a
  killed stage resumes from its checkpoint; a finished one is only
  restored), then prunes. The switches after every stage go to
  `workdir/switches.json` and `switches.png`; the final genotype with at
  most `max_skips` skip-connects to `genotype.json` / `genotype.txt`, and the
  genotype for every cap to `genotypes_by_max_skips.json`. On NAS-Bench-201
  the final arch is each edge's last op (no cap: the topology is fixed),
  scored against `nb201_table` when it is given (`nb201.json`).

  Returns:
    (the last stage's final SearchState on the host, the final Genotype or
    NAS-Bench-201 Arch).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxnas import arch as arch_lib  # pylint: disable=g-import-not-at-top
  from jaxnas import parallel  # pylint: disable=g-import-not-at-top
  from jaxnas.methods import pdarts  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import darts as darts_space  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import nb201  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import viz  # pylint: disable=g-import-not-at-top
  if config.get('distributed', False):
    parallel.initialize_distributed(config.get('coordinator_address'),
                                    config.get('num_processes'),
                                    config.get('process_id'))
  primitives = tuple(config.primitives)
  nb = config.get('space') == 'nb201'
  cell_types = stage_cell_types(config)
  shape = (nb201.NUM_EDGES if nb else darts_space.num_edges(config.steps),
           len(primitives))
  switches = {t: np.ones(shape, bool) for t in cell_types}
  stages = len(config.num_to_keep)
  after = []  # the switches after each stage
  chief = common.is_chief()
  for s in range(stages):
    if chief:
      cells = (f'{3 * config.cells_per_stage} cells' if nb else
               f'{config.layers + config.add_layers[s]} cells')
      print(f'P-DARTS stage {s + 1} of {stages}: {cells}, '
            f'{int(switches[cell_types[0]][0].sum())} ops per edge',
            flush=True)
    state, _ = search(stage_config(config, s, switches),
                      os.path.join(workdir, f'stage_{s}'))
    probs = {t: np.asarray(w) for t, w in arch_lib.softmax_weights(
        state.arch).items()}
    before = switches
    n_on = int(before[cell_types[0]][0].sum())
    switches = {t: pdarts.prune(probs[t], before[t],
                                n_on - config.num_to_keep[s], primitives,
                                drop_none=s == stages - 1)
                for t in cell_types}
    after.append(switches)
  if chief:
    common.atomic_write(os.path.join(workdir, 'switches.json'), json.dumps(
        [{t: pdarts.edge_ops(sw[t], primitives) for t in sw} for sw in after],
        indent=1))
    viz.plot_switches(after, primitives,
                      os.path.join(workdir, 'switches.png'))
  if nb:
    return state, _nb201_stages_final(
        config, workdir, pdarts.edge_ops(switches['cell'], primitives))
  genotype, capped = pdarts.derive_final(probs, before, switches, primitives,
                                         steps=config.steps)
  final = capped[min(config.max_skips, max(capped))]
  if chief:
    common.atomic_write(
        os.path.join(workdir, 'genotypes_by_max_skips.json'),
        json.dumps({'unrestricted': genotype.to_dict(),
                    **{str(m): g.to_dict() for m, g in capped.items()}},
                   indent=1))
    common.atomic_write(os.path.join(workdir, 'genotype.json'),
                        final.to_json())
    common.atomic_write(os.path.join(workdir, 'genotype.txt'),
                        str(final) + '\n')
    viz.plot_genotype(final, os.path.join(workdir, ''))
    n_skips = sum(op == 'skip_connect' for op, _ in genotype.normal)
    print(f'no restriction ({n_skips} skip-connects in the normal cell): '
          f'{genotype}', flush=True)
    for m in sorted(capped, reverse=True):
      if m < n_skips:  # the reference logs the caps that change something
        print(f'at most {m} skip-connects: {capped[m]}', flush=True)
    print(f'final genotype (M={config.max_skips}) written to '
          f'{workdir}/genotype.json:\n{final}', flush=True)
  return state, final


def _nb201_stages_final(config, workdir, last_ops):
  """The NAS-Bench-201 arch of P-DARTS' last switches (one op per edge),
  written and, with `nb201_table`, scored."""
  from jaxnas.spaces import nb201  # pylint: disable=g-import-not-at-top
  if any(len(e) != 1 for e in last_ops):
    raise ConfigError(f'the last stage must leave one op per edge '
                      f'(num_to_keep ends with 1), got {last_ops}')
  arch = nb201.Arch(tuple(e[0] for e in last_ops))
  if common.is_chief():
    common.atomic_write(os.path.join(workdir, 'genotype.json'),
                        arch.to_json())
    common.atomic_write(os.path.join(workdir, 'genotype.txt'),
                        str(arch) + '\n')
    print(f'final arch written to {workdir}/genotype.json:\n{arch}',
          flush=True)
    if config.get('nb201_table'):
      from jaxnas.benchmarks import nb201 as nb201_bench  # pylint: disable=g-import-not-at-top
      report = _nb201_final(nb201_bench.Table.load(config.nb201_table),
                            [(config.seed, arch)])
      common.atomic_write(os.path.join(workdir, 'nb201.json'),
                          json.dumps(report, indent=1))
      print(_nb201_text(report) + f'\n(written to {workdir}/nb201.json)',
            flush=True)
  return arch


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.start_process()  # may exec this process again, once
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
  common.exit_on_error(search, config, workdir, errors=(ConfigError,))


if __name__ == '__main__':
  app.run(main)

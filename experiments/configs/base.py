r"""Fields every search config shares: data, network, weights, devices, logs.

`get_config(variant)` returns them for the dataset variants every method
offers (`cifar10`, `digits`, `tiny`, `nb201`, `nb201_tiny`); a method's
config file (darts.py, rome.py, gdas.py) adds its own fields and settings.
"""

import ml_collections

from jaxnas import ops

VARIANTS = ('cifar10', 'digits', 'tiny', 'nb201', 'nb201_tiny')


def get_config(variant: str, method: str) -> ml_collections.ConfigDict:
  """The shared fields of `variant` for `method` (DARTS' values)."""
  c = ml_collections.ConfigDict()
  c.method = method
  c.space = 'darts'
  c.variant = variant
  c.seed = 2                      # train_search.py --seed
  # Data.
  c.dataset = 'cifar10'
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.train_portion = 0.5           # weights half / architecture half
  # True: architecture batches are other random batches of the weights half
  # (single-level / ERM); the held-out half is only evaluated on.
  c.single_level = False
  c.crop_padding = 4              # random crop after zero padding
  c.flip = True                   # random horizontal flip
  c.batch_size = 64
  c.epochs = 50
  c.max_steps_per_epoch = ml_collections.config_dict.placeholder(int)
  # Network.
  c.init_channels = 16
  c.layers = 8
  c.steps = 4                     # intermediate nodes per cell
  c.multiplier = 4
  c.stem_multiplier = 3
  c.primitives = ops.DARTS_PRIMITIVES  # candidate ops of every edge
  c.depthwise_impl = 'auto'       # see jaxnas.ops.DEPTHWISE_IMPLS
  c.single_path_remat = True      # GDAS/ROME: rerun the sampled op in backward
  c.cell_remat = False            # DARTS space: rerun each cell in backward
  c.compute_dtype = 'float32'     # DARTS space: 'bfloat16' activations
  # NAS-Bench-201 space only (space='nb201').
  c.cells_per_stage = 5           # N: cells between the reductions
  c.track_running_stats = True    # cell BNs keep running statistics
  c.exclude_none = False          # derivation may pick 'none' (AutoDL)
  c.nb201_table = ml_collections.config_dict.placeholder(str)  # CSV path
  # Weights: SGD with momentum (train_search.py).
  c.lr = 0.025
  c.lr_min = 0.001                # paper says 0; the code uses 0.001
  c.momentum = 0.9
  c.weight_decay = 3e-4
  c.grad_clip = 5.
  c.nesterov = False
  # Architecture: Adam (DARTS' architect.py).
  c.arch_lr = 3e-4
  c.arch_b1 = 0.5
  c.arch_b2 = 0.999
  c.arch_weight_decay = 1e-3
  c.arch_init_scale = 1e-3        # code: 1e-3 * randn; paper: zeros (use 0.)
  # Devices, hosts, seeds.
  c.parallel = 'pmap'             # 'pmap' | 'shard_map' | 'jit' (one device)
  c.num_devices = ml_collections.config_dict.placeholder(int)  # None: all
  c.sync_bn = True                # BN batch statistics over all devices
  c.num_seeds = 1                 # >1: seeds seed..seed+N-1, one vmapped run
  c.distributed = False           # jax.distributed.initialize() (pods)
  c.coordinator_address = ml_collections.config_dict.placeholder(str)
  c.num_processes = ml_collections.config_dict.placeholder(int)
  c.process_id = ml_collections.config_dict.placeholder(int)
  # Logging and checkpoints.
  c.log_every_steps = 50
  c.eval_batch_size = 256
  # Evaluate on the first N examples of the architecture half (None: all).
  c.max_eval_examples = ml_collections.config_dict.placeholder(int)
  c.checkpoint_every_steps = 500  # and at the end, and on SIGTERM / SIGINT
  c.keep_checkpoints = 3
  c.progress = True               # progress bar with ETA on stderr
  c.tensorboard = True            # events in <workdir>/tensorboard

  if variant in ('digits', 'tiny', 'nb201_tiny'):
    c.dataset = 'digits'
    c.crop_padding = 1
    c.flip = False                # mirrored digits are other digits
  if variant in ('tiny', 'nb201_tiny'):
    c.depthwise_impl = 'grouped'  # compile-bound: grouped compiles fastest
    c.batch_size = 16
    c.epochs = 2
    c.init_channels = 4
    c.checkpoint_every_steps = 4
  if variant in ('nb201', 'nb201_tiny'):
    c.space = 'nb201'
    c.primitives = ops.NB201_PRIMITIVES
    c.weight_decay = 5e-4
    c.nesterov = True

  if variant in ('cifar10', 'nb201'):
    pass
  elif variant == 'digits':
    c.batch_size = 32
    c.epochs = 10
    c.init_channels = 8
    c.layers = 5
    c.log_every_steps = 10
  elif variant == 'tiny':
    c.max_steps_per_epoch = 8
    c.layers = 3
    c.log_every_steps = 4
  elif variant == 'nb201_tiny':
    c.max_steps_per_epoch = 4
    c.cells_per_stage = 1
    c.log_every_steps = 2
  else:
    raise ValueError(f'unknown variant {variant!r}; known: '
                     f'{", ".join(VARIANTS)}')
  return c

r"""Training a found cell from scratch (`python -m experiments.train`).

Variants (`--config=experiments/configs/train.py:VARIANT`):

* `cifar10`: quark0/darts `cnn/train.py` — C=36, 20 cells, batch 96, SGD
  lr 0.025 cosine to 0 over 600 epochs (stepped at each epoch's start),
  momentum 0.9, weight decay 3e-4, gradient clip 5, auxiliary head 0.4,
  Cutout 16, drop path 0.2 ramped linearly from 0, seed 0.
* `cifar10_pdarts`: P-DARTS' `train_cifar.py` — batch 128, drop path 0.3.
* `cifar10_gaea`: GAEA's README command — drop path 0.3, the cosine read
  before stepping (epoch 0 at lr).
* `cifar10_dropnas`: DropNAS' augment config — batch 192, lr 0.05, clip 3,
  pools followed by an affine BatchNorm (pt.darts' PoolBN).
* `imagenet`: quark0/darts `cnn/train_imagenet.py`, the mobile setting —
  C=48, 14 cells, batch 128, lr 0.1 times 0.97 per epoch (stepped at each
  epoch's start), weight decay 3e-5, 250 epochs, label smoothing 0.1,
  auxiliary head 0.4, no drop path, clip 5. On a pod raise `batch_size`:
  the learning rate scales with it (`lr_batch_size`, the linear rule;
  set `lr_batch_size=0` to keep `lr` as given).
* `nb201`: NAS-Bench-201's training of an arch string (`--genotype` an
  arch string): C=16, N=5, batch 256, Nesterov SGD lr 0.1 cosine to 0 over
  200 epochs (stepped per iteration), weight decay 5e-4, no clipping,
  auxiliary head, Cutout or drop path.
* `cpu`: a network small enough to train on a 2-core CPU (C=8, 5 cells,
  batch 64, 3 epochs of CIFAR-10, ~0.45 s a step), the DARTS recipe
  otherwise (auxiliary head, Cutout, drop path, cosine).
* `digits`, `tiny`: sklearn's 8x8 digits (no download); no auxiliary head
  (8x8 images are 2x2 after the reductions). `tiny` is the tests' size.

The genotype comes from the command line (`--genotype NAME_OR_PATH`) or
`genotype` here; `epochs=0` builds the network, prints its parameter count
and multiply-adds, and exits.
"""

import ml_collections

VARIANTS = ('cifar10', 'cifar10_pdarts', 'cifar10_gaea', 'cifar10_dropnas',
            'imagenet', 'nb201', 'cpu', 'digits', 'tiny')


def get_config(variant: str = 'cifar10') -> ml_collections.ConfigDict:
  """The training config of `variant` (see the module docstring)."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}; known: '
                     f'{", ".join(VARIANTS)}')
  c = ml_collections.ConfigDict()
  c.variant = variant
  # A published name (jaxnas.spaces.genotype.PUBLISHED), 'random:SEED', a
  # genotype.json, a file with the printed Genotype(...), or
  # (network='nb201') an arch string.
  c.genotype = 'DARTS_V2'
  c.network = 'cifar'             # 'cifar' | 'imagenet' | 'nb201'
  c.seed = 0                      # train.py --seed
  # Data.
  c.dataset = 'cifar10'
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.crop_padding = 4
  c.flip = True
  c.cutout = 16                   # 0: off
  # Network.
  c.init_channels = 36
  c.layers = 20
  c.cells_per_stage = 5           # NB-201 only
  c.auxiliary = True
  c.aux_weight = 0.4
  c.drop_path_prob = 0.2          # final rate of the linear ramp from 0
  c.pool_bn = False               # affine BN after pools (pt.darts, DropNAS)
  c.depthwise_impl = 'auto'       # see jaxnas.ops.DEPTHWISE_IMPLS
  c.label_smoothing = 0.
  # Optimizer: SGD with momentum.
  c.batch_size = 96
  c.epochs = 600
  c.max_steps_per_epoch = ml_collections.config_dict.placeholder(int)
  c.lr = 0.025
  # 'cosine': to lr_min over the epochs, one value per epoch; 'cosine_steps':
  # per step (AutoDL's NAS-Bench-201 training); 'exponential': StepLR.
  c.lr_schedule = 'cosine'
  # Per-epoch schedules: 1 reads epoch e's rate after stepping the scheduler
  # at the epoch's start (quark0/darts: epoch 0 already at T=1, the last
  # epoch at lr_min); 0 reads it before (GAEA: epoch 0 at lr).
  c.lr_offset = 1
  c.lr_min = 0.
  c.lr_decay = 0.97               # 'exponential': lr * lr_decay^(epoch + 1)
  # The batch size `lr` is given for: lr * batch_size / lr_batch_size (the
  # linear scaling rule); 0 or None keeps `lr` whatever the batch size.
  c.lr_batch_size = ml_collections.config_dict.placeholder(int)
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 3e-4
  c.grad_clip = 5.
  # Devices and hosts (as the search's).
  c.parallel = 'pmap'
  c.num_devices = ml_collections.config_dict.placeholder(int)
  c.sync_bn = False               # the reference's BN is per GPU
  c.distributed = False
  c.coordinator_address = ml_collections.config_dict.placeholder(str)
  c.num_processes = ml_collections.config_dict.placeholder(int)
  c.process_id = ml_collections.config_dict.placeholder(int)
  # Logging and checkpoints.
  c.log_every_steps = 50
  c.eval_batch_size = 256
  c.eval_every_epochs = 1
  c.max_eval_examples = ml_collections.config_dict.placeholder(int)
  c.checkpoint_every_steps = 1000  # and at each epoch's end and on signals
  c.keep_checkpoints = 3
  c.progress = True
  c.tensorboard = True

  if variant == 'cifar10_pdarts':
    c.genotype = 'PDARTS'
    c.batch_size = 128
    c.drop_path_prob = 0.3
  elif variant == 'cifar10_gaea':
    c.drop_path_prob = 0.3
    c.lr_offset = 0               # train_aws.py steps the scheduler at the end
  elif variant == 'cifar10_dropnas':
    c.genotype = 'DROPNAS'
    c.batch_size = 192
    c.lr = 0.05
    c.grad_clip = 3.
    c.pool_bn = True              # pt.darts' PoolBN in the augment network
  elif variant == 'imagenet':
    c.network = 'imagenet'
    c.dataset = 'imagenet2012'
    c.init_channels = 48
    c.layers = 14
    c.batch_size = 128
    c.lr = 0.1
    c.lr_batch_size = 128
    c.lr_schedule = 'exponential'
    c.weight_decay = 3e-5
    c.epochs = 250
    c.label_smoothing = 0.1
    c.drop_path_prob = 0.
    c.cutout = 0
    c.crop_padding = 0            # RandomResizedCrop instead
  elif variant == 'nb201':
    c.network = 'nb201'
    c.genotype = ('|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|'
                  '+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|')
    c.init_channels = 16
    c.auxiliary = False
    c.drop_path_prob = 0.
    c.cutout = 0
    c.batch_size = 256
    c.epochs = 200
    c.lr = 0.1
    c.lr_schedule = 'cosine_steps'  # scheduler.update per iteration
    c.nesterov = True
    c.weight_decay = 5e-4
    c.grad_clip = 0.              # no clipping in NB-201's procedure
  elif variant == 'cpu':
    c.init_channels = 8
    c.layers = 5                  # reductions at cells 1 and 3
    c.batch_size = 64
    c.epochs = 3
    c.depthwise_impl = 'dense'    # 2.3x faster than grouped on XLA:CPU
    c.log_every_steps = 100
  elif variant in ('digits', 'tiny'):
    c.dataset = 'digits'
    c.crop_padding = 1
    c.flip = False                # mirrored digits are other digits
    c.cutout = 4
    c.auxiliary = False
    c.init_channels = 8
    c.layers = 5
    c.batch_size = 32
    c.epochs = 10
    c.log_every_steps = 10
    c.eval_batch_size = 128
    if variant == 'tiny':
      c.depthwise_impl = 'grouped'  # compile-bound: grouped compiles fastest
      c.init_channels = 4
      c.layers = 3
      c.batch_size = 16
      c.epochs = 2
      c.max_steps_per_epoch = 4
      c.log_every_steps = 2
      c.checkpoint_every_steps = 4
  return c

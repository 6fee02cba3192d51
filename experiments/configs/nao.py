r"""NAO-V2 search configs (renqianluo/NAO_pytorch NAO_V2/train_search.py,
train_search_cifar10.sh; ../shared/methods/nao_v2.md).

Variants (`--config experiments/configs/nao.py:VARIANT`):

* `cifar10`: the reference's search: CIFAR-10 train split 45k / 5k (shuffled,
  `ratio=0.9`), supernet N=3 (11 cells), 5 nodes, C=20, batch 64, four phases
  of 50 epochs (SGD 0.025 -> 0.001 cosine restarting each phase, momentum
  0.9, wd 3e-4, clip 5; drop-path keep 0.9), 1000 seed architectures, 3
  rounds of 300 new ones from the top 100, the EPD (emb 32, hidden 64, Adam
  1e-3, clip 5, batch 100, 1000 epochs, trade-off 0.8, swap expansion 10),
  scoring on one random 500-image validation batch per architecture, and a
  top-5 re-ranking of 10 epochs from scratch.
* `tiny`: the whole loop in minutes: 5 cells of 8 channels, 3 nodes, phases
  of 1 epoch x 8 steps, 16 seeds + 3 rounds of 8, EPD 30 epochs, 100-image
  scoring batches, re-ranking the top 2 for 8 steps. On digits (ships with
  scikit-learn); `--config.dataset=folder:/path/to/cifar10` for CIFAR-10.

Run:

  python -m experiments.nao --config experiments/configs/nao.py:cifar10 \
      --config.dataset=folder:/data/cifar10 --workdir runs/nao
"""

import ml_collections

VARIANTS = ('cifar10', 'tiny')


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = 'nao'
  c.variant = variant
  c.seed = 0                      # --seed
  # Data: the training split, shuffled, `train_portion` for the supernet,
  # the rest to score architectures on (build_cifar10(ratio=0.9)).
  c.dataset = 'cifar10'
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.train_portion = 0.9
  c.crop_padding = 4
  c.flip = True
  c.cutout = 0                    # --child_cutout_size None
  # Supernet (NASWSNetworkCIFAR).
  c.layers = 3                    # N: 3N + 2 cells
  c.nodes = 5
  c.channels = 20
  c.drop_path_keep = 0.9          # --child_drop_path_keep_prob
  c.depthwise_impl = 'auto'
  # How a branch runs its op: 'switch' (the chosen op alone), 'mask' (every
  # op, the chosen one kept), 'auto' (switch, on every backend); see
  # jaxnas.spaces.nao_supernet.Branch.
  c.op_select = 'auto'
  # Supernet training: `phases` phases of `epochs` epochs.
  c.phases = 4                    # for i in range(4)
  c.epochs = 50                   # --child_epochs, per phase
  # An epoch is 703 full batches of 45k (the reference's loader adds a
  # partial 704th); the drop-path ramp spans the phase's steps.
  c.max_steps_per_epoch = ml_collections.config_dict.placeholder(int)
  c.batch_size = 64
  # Each phase runs the cosine's epochs 1..50 (a new CosineAnnealingLR per
  # iteration, stepped at each epoch's start), as PyTorch <= 1.3 computes
  # it. (Current PyTorch's chainable form would restart at the optimizer's
  # last rate, 0.001, and stay there: we take the restart the paper means.)
  c.lr = 0.025                    # --child_lr_max
  c.lr_min = 0.001                # --child_lr_min
  c.momentum = 0.9
  c.weight_decay = 3e-4           # --child_l2_reg
  c.grad_clip = 5.                # --child_grad_bound
  # Architecture pool.
  c.seed_archs = 1000             # --controller_seed_arch
  c.new_archs = 300               # --controller_new_arch
  c.top_archs = 100               # arch_pool[:100] seed the generation
  c.max_step_size = 50            # ascent step sizes 1, 2, ... (stops > 50)
  c.eval_batch_size = 500         # --child_eval_batch_size, per architecture
  c.pool_chunk = 1                # architectures vmapped per lax.map step
  c.pool_block = 50               # architectures per device per call
  # Encoder-predictor-decoder (controller.NAO).
  c.epd_epochs = 1000             # --controller_epochs
  c.epd_batch_size = 100
  c.epd_lr = 1e-3
  c.epd_grad_clip = 5.
  c.epd_trade_off = 0.8           # --controller_trade_off
  c.epd_expand = 10               # --controller_expand (9 swapped copies)
  c.epd_train_portion = 0.9       # EPD train / valid split of the pool
  c.epd_emb = 32
  c.epd_hidden = 64
  # Final re-ranking of the pool's top architectures, trained from scratch
  # at search size (train_and_evaluate_top_on_cifar10). 0 turns it off.
  # Differences from the reference: no auxiliary head, drop path or
  # dropout (the reference: aux 0.4, drop-path keep 0.8, keep_prob 0.6),
  # and the convolutions' default (PyTorch) init, not Kaiming normal.
  c.rerank_top = 5
  c.rerank_epochs = 10
  c.rerank_max_steps_per_epoch = ml_collections.config_dict.placeholder(int)
  # Devices (one process), logs, checkpoints.
  c.parallel = 'pmap'             # 'pmap' | 'jit'
  c.num_devices = ml_collections.config_dict.placeholder(int)
  c.sync_bn = True
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000  # and at every phase's end, and on SIGTERM
  c.keep_checkpoints = 3
  c.progress = True
  c.tensorboard = True

  if variant == 'cifar10':
    pass
  elif variant == 'tiny':
    c.dataset = 'digits'
    c.crop_padding = 1
    c.flip = False
    c.layers = 1
    c.nodes = 3
    c.channels = 8
    c.depthwise_impl = 'grouped'  # compile-bound: grouped compiles fastest
    c.epochs = 1
    c.max_steps_per_epoch = 8
    c.batch_size = 32
    c.seed_archs = 16
    c.new_archs = 8
    c.top_archs = 8
    c.eval_batch_size = 100
    c.pool_block = 8
    c.epd_epochs = 30
    c.epd_batch_size = 20
    c.rerank_top = 2
    c.rerank_epochs = 1
    c.rerank_max_steps_per_epoch = 8
    c.log_every_steps = 4
    c.checkpoint_every_steps = 4
  else:
    raise ValueError(f'unknown variant {variant!r}; known: '
                     f'{", ".join(VARIANTS)}')
  return c

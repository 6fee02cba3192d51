r"""DropNAS search configs (Hong et al., IJCAI 2020; ../shared/methods/dropnas.md).

Settings from wiljohnhong/DropNAS (`config.py SearchConfig`, `start.py`).
DropNAS is one-level: weights and alphas are trained together on the same
batch of the whole training set (`train_portion=1`, `single_level=True`);
no split is held out, so the per-epoch validation accuracy is measured on
the test split, for monitoring only (the reference runs no validation pass;
nothing is selected on it).

Variants (`--config experiments/configs/dropnas.py:VARIANT`):

* `cifar10`: the reference's search: C=16, 14 cells, batch 96, 76 epochs,
  SGD 0.0375 -> 0.0015 cosine, momentum 0.9, clip 3; weight decay 3e-4 and
  alpha decay 1e-3 only through the partial decay step; Adam 3e-4
  (betas 0.5, 0.999) on the alphas; drop rate r = 3e-5 (per-op p = r^(1/4)
  ~ 0.074); no warm-up; seed 666. Needs tfds 'cifar10' under `data_dir`, or
  `--config.dataset=folder:/data/cifar10`.
* `cifar100`: the same on CIFAR-100 (the reference's code cannot load it,
  `utils.get_data`; the README reports it with these settings).
* `nb201`: DropNAS on NAS-Bench-201 (not run by the authors: the groups are
  the two convolutions vs skip, pool and 'none', each op dropped with
  p = r^(1/|group|)); data, network and epochs as DARTS' NB-201 run (C=16,
  N=5, batch 64, 50 epochs), optimisers as DropNAS'. Unconfirmed choice.
* `tiny`, `digits`, `nb201_tiny`: small runs on digits; they use r = 0.01
  (p ~ 0.32 in the DARTS space) so that ops are dropped often enough to see
  in a few steps.

Run:

  python -m experiments.search --config experiments/configs/dropnas.py:cifar10 \
      --config.dataset=folder:/data/cifar10
"""

import ml_collections

from experiments.configs import base


def get_config(variant: str = 'digits') -> ml_collections.ConfigDict:
  """Returns the config of `variant` (see the module docstring)."""
  cifar100 = variant == 'cifar100'
  c = base.get_config('cifar10' if cifar100 else variant, 'dropnas')
  c.variant = variant
  if cifar100:
    c.dataset = 'cifar100'
  c.seed = 666                    # config.py --seed
  c.train_portion = 1.            # one-level on the whole training set
  c.single_level = True
  c.lr = 0.0375                   # --w_lr
  c.lr_min = 0.0015               # --w_lr_min
  c.grad_clip = 3.                # --w_grad_clip, both optimizer steps
  # Partial decay: loss terms wd * |w|^2 on weights with non-zero gradient
  # and arch_weight_decay * alpha^2 on alphas with |gradient| > 1e-7.
  c.weight_decay = 3e-4           # --w_weight_decay
  c.arch_weight_decay = 1e-3      # --alpha_weight_decay
  c.nesterov = False
  c.drop_rate = 3e-5              # r: a whole group dropped (resampled)
  c.warmup_epochs = 0             # epochs without drops or alpha steps
  c.exclude_none = True           # genotypes.parse ignores 'none' (NB-201)
  if variant in ('cifar10', 'cifar100'):
    c.batch_size = 96
    c.epochs = 76                 # start.py n_epochs1
    c.layers = 14                 # start.py n_layers1
  elif variant in ('tiny', 'digits', 'nb201_tiny'):
    c.drop_rate = 0.01
  return c

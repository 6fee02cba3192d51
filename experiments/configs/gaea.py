r"""GAEA search configs (Li et al., ICLR 2021; ../shared/methods/gaea.md).

Settings from liamcli/gaea_release (configs/cnn/**.yaml and its README's
commands). The architecture variables are probabilities moved by
exponentiated gradient (`jaxnas.methods.gaea`).

Variants (`--config experiments/configs/gaea.py:VARIANT`):

* `nb201`: GAEA DARTS on NAS-Bench-201, the README's ERM run: single-level
  (architecture batches are other random batches of the training half),
  'none' excluded from the ops, C=24 (search_nasbench201.yaml; the benchmark's
  own nets use 16), N=5, batch 64, SGD 0.025 -> 0.001 on a 50-epoch cosine of
  which 25 epochs run (epoch 0 at 0.025), momentum 0.9, wd 3e-4, clip 5;
  EG eta 0.1, floor 1e-5, no entropic term. `--config.single_level=False`
  gives the bilevel run.
* `cifar10`: GAEA PC-DARTS on the DARTS space (the README's `eedarts` run):
  bilevel, partial channels K=4 with channel shuffle, per-node edge
  probabilities moved by EG (edge eta 0.1), all 8 ops ('none' included),
  C=16, 8 cells, batch 256, SGD 0.1 -> 0 cosine over the 50 epochs (read
  before stepping), momentum 0.9, wd 3e-4, clip 5; op eta 0.1; no warm-up.
* `gdas_nb201`: GAEA GDAS (EGDAS) on NAS-Bench-201: eta 0.01, entropic weight
  0.01, tau 10 -> 0.1 held over 50 warm-up epochs in which the architecture
  does not move; C=24 as above. The README gives no epoch count: 100 here (50 warm-up + 50,
  unconfirmed), with the cosine over the same 100.
* `tiny`, `nb201_tiny`, `gdas_nb201_tiny`, `digits`: small runs on digits
  (`tiny` and `digits`: GAEA PC-DARTS; NB-201 with host DARTS and with host
  GDAS).

Run (the headline GAEA-DARTS ERM search on NB-201):

  python -m experiments.search --config experiments/configs/gaea.py:nb201 \
      --config.dataset=folder:/data/cifar10 \
      --config.nb201_table=../shared/data/nb201/nb201_hp200_mean_acc.csv
"""

import ml_collections

from experiments.configs import base
from jaxnas import ops

VARIANTS = base.VARIANTS + ('gdas_nb201', 'gdas_nb201_tiny')


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  """Returns the config of `variant` (see the module docstring)."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}; known: '
                     f'{", ".join(VARIANTS)}')
  gdas = variant.startswith('gdas_')
  c = base.get_config(variant[5:] if gdas else variant, 'gaea')
  c.variant = variant
  c.host = 'gdas' if gdas else 'darts'
  c.single_level = True           # the README's ERM runs
  c.arch_lr = 0.1                 # EG eta (edarts / eedarts)
  c.floor = 1e-5                  # probability floor (architect_edarts.py)
  c.entropy_weight = 0.           # arch_weight_decay: KL(p || uniform)
  c.schedule_epochs = ml_collections.config_dict.placeholder(int)  # None: epochs
  # Single-path host (gdas) only.
  c.tau_max = 10.
  c.tau_min = 0.1
  c.warmup_epochs = 0
  c.zero_terms = False
  # DARTS space: PC-DARTS' partial channels and learned edge weights.
  c.partial_channels = 1
  c.learn_edges = False
  c.edge_lr = 0.1
  # Host darts: both phases as one compiled loop body ('auto': on CPU; see
  # experiments/configs/darts.py).
  c.share_backward = 'auto'
  if c.space == 'darts':
    c.single_level = False        # the README's PC-DARTS command
    c.partial_channels = 4        # model_search.py: C // 4
    c.learn_edges = True          # eedarts
    c.lr = 0.1                    # search_pcdarts.yaml
    c.lr_min = 0.
    if variant == 'cifar10':
      c.batch_size = 256
    else:
      c.init_channels = 8         # C / K = 2 channels through the ops
  if c.space == 'nb201':
    c.primitives = tuple(p for p in ops.NB201_PRIMITIVES if p != 'none')
    c.exclude_none = True         # search.exclude_zero=true (README)
    c.weight_decay = 3e-4         # GAEA's own SGD, not AutoDL's
    c.nesterov = False
    c.epochs = 25                 # README run.epochs=25
    c.schedule_epochs = 50        # config.yaml run.scheduler_epochs
    if not variant.endswith('tiny'):
      c.init_channels = 24        # search_nasbench201.yaml (both hosts)
  if gdas:
    c.arch_lr = 0.01              # method_egdas_space_nasbench201.yaml
    c.entropy_weight = 0.01
    c.warmup_epochs = 50
    c.epochs = 100                # not given by the README (unconfirmed)
    c.schedule_epochs = 100
    c.zero_terms = True           # AutoDL's forward_gdas adds them
  if variant.endswith('tiny'):
    c.epochs, c.schedule_epochs = 2, None
    c.warmup_epochs = 1 if gdas else 0
  return c

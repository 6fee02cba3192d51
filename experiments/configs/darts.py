r"""DARTS search configs (Liu et al. 2019; quark0/darts `cnn/train_search.py`).

Variants (`--config experiments/configs/darts.py:VARIANT`):

* `cifar10`: the paper's search: CIFAR-10 train split halved into weights /
  architecture, C=16, 8 cells, batch 64, 50 epochs, SGD 0.025 -> 0.001 cosine,
  Adam 3e-4 on the alphas. `order` 'first' (the reference's default), 'second'
  (the reference's `--unrolled`) or 'exact'. Needs tfds 'cifar10' prepared
  under `data_dir` (nothing is downloaded).
* `digits` (the default): the same algorithm on scikit-learn's 8x8 digits,
  C=8, 5 cells, a few minutes on a 2-core CPU.
* `tiny`: a smoke test: 3 cells of 4 channels, 2 epochs of 8 steps.
* `nb201`: DARTS (first order; `order=second` for DARTS-V2) on the
  NAS-Bench-201 space as its authors ran it (AutoDL-Projects
  `configs/nas-benchmark/algos/DARTS.config`, `DARTS-V1.sh`): C=16, N=5
  cells per stage, CIFAR-10 train halves ('cifar10-valid'), batch 64, 50
  epochs, SGD 0.025 -> 0.001 cosine with Nesterov momentum 0.9 and weight
  decay 5e-4, clip 5; Adam 3e-4 on the alphas; the genotype is the per-edge
  argmax with 'none' allowed (AutoDL's `genotype()`). With
  `--config.nb201_table=PATH/nb201_hp200_mean_acc.csv` the benchmark's
  accuracies of the genotype are logged every epoch and reported in
  `WORKDIR/nb201.json`.
* `nb201_tiny`: the same on digits, C=4, one cell per stage, 2 epochs of 4
  steps.

Run:

  python -m experiments.search --config experiments/configs/darts.py:cifar10 \
      --workdir runs/darts-cifar10 --config.order=second
  python -m experiments.search --config experiments/configs/darts.py:nb201 \
      --config.dataset=folder:/data/cifar10 \
      --config.nb201_table=/data/nb201/nb201_hp200_mean_acc.csv
"""

import ml_collections

from experiments.configs import base


def get_config(variant: str = 'digits') -> ml_collections.ConfigDict:
  """Returns the config of `variant` (see the module docstring)."""
  c = base.get_config(variant, 'darts')
  c.order = 'first'               # 'first' | 'second' (finite diff.) | 'exact'
  c.fd_r = 0.01                   # R = fd_r / ||v|| (second order)
  # First order: one compiled forward/backward for both phases
  # (`darts.shared_first_order_step`). 'auto' is on on CPU, where it compiles
  # 40% faster at the same step time (BENCHMARKS.md), off on accelerators
  # (not measured there); 'on' | 'off' force it.
  c.share_backward = 'on' if variant == 'tiny' else 'auto'
  return c

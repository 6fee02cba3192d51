r"""ROME search configs (Wang, Chu et al., ICCV 2023; ../shared/methods/rome.md).

ROME has no public code: every value below is the paper's where it gives one
(Sec. 4.1) and otherwise marked with where it comes from.

Variants (`--config experiments/configs/rome.py:VARIANT`):

* `cifar10`: the paper's CIFAR search: DARTS space without 'none' (7 ops),
  C=16, 8 cells, 50 epochs, K=7 samples for the architecture update
  (gradients averaged) and K=7 others for the weights (summed, Eq. 12),
  topology v2 (Gumbel-Top2), SGD lr 0.05, Adam 3e-4. Batch 64 (the paper's
  memory table; its search batch is not stated).
* `tiny`: a smoke test: 3 cells of 4 channels, 2 nodes per cell, K=2,
  2 epochs of 4 steps on digits (`--config.dataset=folder:...` for CIFAR-10).
* `nb201`: NAS-Bench-201 (not in the paper): every edge present, so only the
  op sampler and the accumulation apply (topology 'none'); C=16, N=5.
* `digits`, `nb201_tiny`: as DARTS' variants of those names.

Run:

  python -m experiments.search --config experiments/configs/rome.py:cifar10 \
      --config.dataset=folder:/data/cifar10 --workdir runs/rome
"""

import ml_collections

from experiments.configs import base
from jaxnas import ops


def get_config(variant: str = 'tiny',
               method: str = 'rome') -> ml_collections.ConfigDict:
  """Returns the config of `variant` (see the module docstring).

  `method='gdas'` gives the fields GDAS' config (gdas.py) starts from.
  """
  c = base.get_config(variant, method)
  if c.space == 'darts':
    c.primitives = ops.DARTS_PRIMITIVES[1:]   # the paper removes 'none'
  c.topology = 'v2'               # 'v2' per-edge | 'v1' per-pair | 'none'
  c.num_samples = 7               # K (Sec. 4.1, Table 5)
  c.weight_samples = ml_collections.config_dict.placeholder(int)  # None: K
  c.weight_reduce = 'sum'         # Eq. 12 sums; 'mean' divides by K
  c.lr = 0.05                     # paper; cosine to lr_min is DARTS' (unstated)
  # Temperature: "gradually decreases" (Sec. 3.3), values not given; GDAS'
  # linear schedule 10 -> 0.1 over the epochs.
  c.tau_max = 10.
  c.tau_min = 0.1
  c.zero_terms = False            # GDAS' NB-201 zero-valued op terms
  c.per_device_samples = False    # True: other samples on each device
  c.weights_first = False         # Alg. 1: architecture update first
  # 'auto': both updates' samples as one loop (one compiled forward and
  # backward) on CPU; 'on' / 'off' (jaxnas.methods.rome.make).
  c.share_backward = 'auto'
  c.derive_top_pairs = False      # GDAS' NASNet genotype rule
  if c.space == 'nb201':
    c.topology = 'none'           # NB-201's cell topology is fixed
  if variant == 'tiny':
    # 3 cells (one normal), 2 nodes per cell: a switch per edge and op
    # compiles slower than DARTS' stacked mixture.
    c.steps = 2
    c.multiplier = 2
    c.num_samples = 2
    c.max_steps_per_epoch = 4
  elif variant == 'nb201_tiny':
    c.num_samples = 2
  return c

r"""GDAS search configs (Dong & Yang, CVPR 2019), as AutoDL-Projects runs it.

GDAS is ROME without topology sampling or accumulation: one Gumbel-max op per
edge per step, straight-through gates (`jaxnas.methods.rome` with
topology='none', K=1). Settings from AutoDL-Projects
(`exps/NAS-Bench-201-algos/GDAS.py`, `configs/search-opts/GDAS-NASNet-CIFAR
.config`, `configs/nas-benchmark/algos/GDAS.config`):

* `cifar10`: DARTS space with all 8 ops ('none' included), C=16, 6 cells
  (AutoDL's N=2: reductions at cells 2 and 4), batch 256, 250 epochs, SGD
  0.025 -> 0.001 cosine per epoch, Nesterov momentum 0.9, weight decay 5e-4,
  clip 5; Adam 3e-4, betas (0.5, 0.999), decay 1e-3; tau 10 -> 0.1 linear over
  the epochs; weight update before the architecture update; genotype: the
  two strongest (op, input) pairs per node over all non-'none' ops
  (`jaxnas.spaces.genotype.derive_top_pairs`; two ops may share an input).
* `nb201`: NAS-Bench-201, C=16, N=5, batch 64, the same optimisers; the
  other ops' zero-valued gates are added to each edge as AutoDL's NB-201 cell
  does (`zero_terms`); per-edge argmax with 'none' allowed.
* `tiny`, `nb201_tiny`, `digits`: small runs on digits.

Known differences from AutoDL: its search convs carry biases (affine=False
gives bias=True there) and its clip covers the alphas' stale gradients too;
jaxnas uses DARTS' ops and clips the weights only.
"""

import ml_collections

from experiments.configs import rome
from jaxnas import ops


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  """Returns the config of `variant` (see the module docstring)."""
  c = rome.get_config(variant, method='gdas')
  c.primitives = (ops.DARTS_PRIMITIVES if c.space == 'darts' else
                  ops.NB201_PRIMITIVES)   # 'none' is a candidate
  c.topology = 'none'
  c.num_samples = 1
  c.lr = 0.025
  c.zero_terms = c.space == 'nb201'
  c.weights_first = True
  c.derive_top_pairs = c.space == 'darts'
  c.nesterov = True
  c.weight_decay = 5e-4
  if variant in ('cifar10', 'nb201'):
    c.epochs = 250
  if variant == 'cifar10':
    c.batch_size = 256
    c.layers = 6
  return c

r"""P-DARTS search configs (Chen et al., ICCV 2019; ../shared/methods/pdarts.md).

Settings from chenxin061/pdarts `train_search.py` and its README command.
The search runs in stages (`num_to_keep`): stage s trains a fresh network of
`layers + add_layers[s]` cells over the ops still switched on per edge, for
`epochs` epochs (the first `warmup_epochs` train the weights only), with
skip-connect dropout starting at `dropout_rates[s]`; then each edge keeps
its `num_to_keep[s]` strongest ops ('none' forced out after the last stage).
The final normal cell is capped at `max_skips` skip-connects (genotypes for
every cap 8 ... 0 are written too). Each stage has its own workdir
(`WORKDIR/stage_<s>`, checkpoints and logs as any search); a run resumes in
the stage it was stopped in.

Variants (`--config experiments/configs/pdarts.py:VARIANT`):

* `cifar10`: the reference's search: C=16, 5 / 11 / 17 cells, 8 -> 5 -> 3
  -> 1 ops per edge, 25 epochs per stage (10 warm-up), batch 96, SGD 0.025
  -> 0 cosine restarted per stage, momentum 0.9, wd 3e-4, clip 5; Adam 6e-4
  (betas 0.5, 0.999, wd 1e-3) on the alphas with their gradient clipped to
  norm 5; dropout rates 0.1 / 0.4 / 0.7 (the README's command; the paper
  gives 0.0 for stage 1); M = 2.
* `cifar100`: the same with rates 0.1 / 0.2 / 0.3 (from secondary sources,
  unconfirmed) on CIFAR-100.
* `tiny`: all three stages on digits in minutes: C=4, cells of 2 nodes,
  3 / 4 / 5 cells, 2 epochs per stage (1 warm-up) of 4 steps.
* `nb201`: P-DARTS where it applies to NAS-Bench-201 (not run by the
  authors; our choices): op pruning 5 -> 3 -> 2 -> 1 per edge over three
  stages and the skip dropout schedule; the depth is the benchmark's (C=16,
  N=5 in every stage, so `add_layers` are zeros) and there is no skip cap
  (the topology is fixed). Batch 64 and CIFAR-10 halves as NB-201's DARTS
  runs; P-DARTS' optimizers and 25-epoch stages. `--config.nb201_table`
  scores every stage's arch and the final one.
* `nb201_tiny`: the same on digits, one cell per stage, 2 epochs of 4 steps
  per stage.

Run:

  python -m experiments.search --config experiments/configs/pdarts.py:cifar10 \
      --config.dataset=folder:/data/cifar10 --workdir runs/pdarts
"""

import ml_collections

from experiments.configs import base

VARIANTS = ('cifar10', 'cifar100', 'tiny', 'nb201', 'nb201_tiny')


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  """Returns the config of `variant` (see the module docstring)."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}; known: '
                     f'{", ".join(VARIANTS)}')
  c = base.get_config('cifar10' if variant == 'cifar100' else variant,
                      'pdarts')
  c.variant = variant
  c.num_to_keep = (5, 3, 1)        # ops per edge after each stage
  c.add_layers = (0, 6, 12)        # cells added to `layers` per stage
  c.dropout_rates = (0.1, 0.4, 0.7)  # skip dropout r per stage (README)
  c.warmup_epochs = 10             # eps_no_archs: weights only
  # Both phases through one compiled forward/backward: compiles 32% faster,
  # steps 8% slower on CPU (BENCHMARKS.md), so only for the compile-bound
  # tiny variant ('auto': on CPU; see jaxnas.methods.darts.choose_step).
  c.share_backward = 'on' if variant == 'tiny' else 'off'
  c.dropout_decay = 0.2            # scale_factor
  c.max_skips = 2                  # M: skip-connects in the final normal cell
  c.layers = 5
  c.epochs = 25                    # per stage
  c.batch_size = 96
  c.weight_decay = 3e-4
  c.nesterov = False
  c.lr = 0.025
  c.lr_min = 0.                    # --learning_rate_min
  c.arch_lr = 6e-4                 # --arch_learning_rate
  c.arch_grad_clip = 5.            # clip_grad_norm_ on the alphas too
  # Set per stage by the driver (a stage's own config in its workdir).
  c.stage = ml_collections.config_dict.placeholder(int)
  c.skip_dropout = ml_collections.config_dict.placeholder(float)
  c.switches_normal = None
  c.switches_reduce = None
  c.switches_cell = None           # NAS-Bench-201
  if variant == 'cifar100':
    c.dataset = 'cifar100'
    c.dropout_rates = (0.1, 0.2, 0.3)
  elif variant in ('nb201', 'nb201_tiny'):
    c.num_to_keep = (3, 2, 1)
    c.add_layers = (0, 0, 0)
    c.batch_size = 64
    if variant == 'nb201_tiny':
      c.batch_size = 16
      c.epochs = 2
      c.warmup_epochs = 1
      c.max_steps_per_epoch = 4
  elif variant == 'tiny':
    c.layers = 3
    c.add_layers = (0, 1, 2)
    c.steps = 2
    c.multiplier = 2
    c.batch_size = 16
    c.epochs = 2
    c.warmup_epochs = 1
    c.max_steps_per_epoch = 4
  return c

"""GAEA: exponentiated-gradient (mirror descent) architecture updates.

GAEA (Li, Khodak, Balcan & Talwalkar, ICLR 2021; ../shared/methods/gaea.md)
keeps a host method's supernet and weight training and replaces its
architecture optimizer: the architecture variables are the mixing
probabilities themselves (`jaxnas.arch.SIMPLEX`, uniform at the start, no
softmax) and move by exponentiated gradient,

    p <- p * exp(-eta * g),  floored at 1e-5,  renormalised per edge

(`jaxnas.optim.exponentiated_gradient`), which reaches sparse mixtures fast.
The hosts here are the methods' own steps, unchanged:

* `host='darts'`: DARTS first order (`jaxnas.methods.darts.search_step`),
  architecture step then weight step, the mixture weighted by p. With
  `learn_edges` (GAEA PC-DARTS, the reference's `eedarts`, on a network with
  `partial_channels=4`) each node also weighs its incoming edges by
  probabilities moved by EG and renormalised over the node's edges
  (`jaxnas.arch.simplex_with_edges`), and the derivation ranks edges by op
  weight times edge weight.
* `host='gdas'`: GDAS' single path (`jaxnas.methods.rome`, one sample, no
  topology) with Gumbel-max from log p (EGDAS); tau and the architecture
  update held for `warmup_epochs`; EGDAS floors after normalising.

Single-level (ERM) or bilevel is a matter of data, not of the step: the
architecture batch (`batch['val']`) comes from the held-out half (bilevel)
or is another random batch of the training set (`single_level` in the
search configs, as the reference's `search.single_level`).

Synopsis:

  method = gaea.make(net, host='darts', steps_per_epoch=390, arch_lr=0.1)
  state = method.init(key, images[:1])
  state, metrics = jax.jit(method.step)(state, {'train': bw, 'val': ba})
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxnas import arch as arch_lib
from jaxnas import optim
from jaxnas.methods import base
from jaxnas.methods import darts
from jaxnas.methods import rome

HOSTS = ('darts', 'gdas')
# The reference's probability floor (architect_edarts.py).
FLOOR = 1e-5


def arch_optimizer(learning_rate: float, *, floor: float = FLOOR,
                   entropy_weight: float = 0.,
                   floor_after_normalise: bool = False,
                   warmup_steps: int = 0) -> optax.GradientTransformation:
  """GAEA's architecture update: optional KL-to-uniform term, then EG.

  Args:
    learning_rate: eta.
    floor: probability floor.
    entropy_weight: weight of `KL(p || uniform)` added to the loss (the
      reference's `arch_weight_decay`: 0 for GAEA DARTS, 0.01 for EGDAS).
    floor_after_normalise: EGDAS' order of floor and normalisation.
    warmup_steps: updates before which eta is 0 (the architecture holds).
  """
  def lr(count):
    return jnp.where(count < warmup_steps, 0., learning_rate)

  return optax.chain(
      optim.entropic_regulariser(entropy_weight),
      optim.exponentiated_gradient(
          lr if warmup_steps else learning_rate, floor=floor,
          floor_after_normalise=floor_after_normalise))


def edge_arch_optimizer(op_tx: optax.GradientTransformation, edge_lr: float,
                        steps: int) -> optax.GradientTransformation:
  """`op_tx` on the op probabilities, EG at `edge_lr` on the edge
  probabilities renormalised per node (no floor, as the reference)."""
  edge_tx = optim.exponentiated_gradient(
      edge_lr, floor=0., segment_ids=arch_lib.node_ids(steps))

  def labels(arch):
    return {k: jax.tree.map(lambda _, k=k: k, v) for k, v in arch.items()}

  return optax.multi_transform({'ops': op_tx, 'edges': edge_tx}, labels)


def make(net: nn.Module, *, steps_per_epoch: int, host: str = 'darts',
         epochs: int = 25, schedule_epochs: Optional[int] = 50,
         lr: float = 0.025, lr_min: float = 0.001, momentum: float = 0.9,
         weight_decay: float = 3e-4, grad_clip: float = 5.,
         nesterov: bool = False, arch_lr: float = 0.1,
         entropy_weight: float = 0., floor: float = FLOOR,
         tau_max: float = rome.TAU_MAX, tau_min: float = rome.TAU_MIN,
         warmup_epochs: int = 0, zero_terms: bool = False,
         learn_edges: bool = False, edge_lr: float = 0.1,
         share_backward: Optional[bool] = None,
         derive_fn: Optional[base.DeriveFn] = None) -> base.Method:
  """GAEA on `host`; defaults are GAEA DARTS on NAS-Bench-201.

  Args:
    net: the host's search network (`single_path=True` for 'gdas').
    steps_per_epoch: weight batches per epoch.
    host: 'darts' or 'gdas'.
    epochs: search epochs (NB-201: 25).
    schedule_epochs: the weight cosine's length (the reference's
      `scheduler_epochs`: 50, so 25 epochs end at half the rate); None:
      `epochs`. The rate is read before the scheduler steps (epoch 0 at
      `lr`, unlike DARTS).
    lr, lr_min, momentum, weight_decay, grad_clip, nesterov: weight SGD.
    arch_lr: eta of the EG update (0.1 GAEA DARTS, 0.01 EGDAS).
    entropy_weight: see `arch_optimizer`.
    floor: probability floor.
    tau_max, tau_min, warmup_epochs, zero_terms: 'gdas' only (see
      `jaxnas.methods.rome.make`).
    learn_edges, edge_lr: 'darts' on the DARTS space only: per-node edge
      probabilities moved by EG at `edge_lr` (GAEA PC-DARTS).
    share_backward: see `jaxnas.methods.darts.make` and
      `jaxnas.methods.rome.make` (None: on CPU, both updates through one
      compiled forward/backward).
    derive_fn: weights -> genotype; default the space's rule on p (for
      NB-201 with `exclude=('none',)` where 'none' is excluded).

  Returns:
    The method's pure functions.
  """
  if host not in HOSTS:
    raise ValueError(f'host must be one of {HOSTS}, got {host!r}')
  if arch_lr <= 0 or not 0 <= floor < 1:
    raise ValueError(f'need arch_lr > 0 and 0 <= floor < 1, got {arch_lr}, '
                     f'{floor}')
  common = dict(
      steps_per_epoch=steps_per_epoch, epochs=epochs, lr=lr, lr_min=lr_min,
      momentum=momentum, weight_decay=weight_decay, grad_clip=grad_clip,
      nesterov=nesterov, schedule_epochs=schedule_epochs, schedule_offset=0,
      arch_param=arch_lib.SIMPLEX, derive_fn=derive_fn)
  if learn_edges and (host != 'darts' or not hasattr(net, 'steps')):
    raise ValueError('learn_edges needs host="darts" on the DARTS space')
  if host == 'darts':
    if warmup_epochs:
      raise ValueError('warmup_epochs applies to host="gdas" only')
    a_tx = arch_optimizer(arch_lr, floor=floor, entropy_weight=entropy_weight)
    if learn_edges:
      a_tx = edge_arch_optimizer(a_tx, edge_lr, net.steps)
      common['arch_param'] = arch_lib.simplex_with_edges(net.steps)
    return darts.make(net, order='first', a_tx=a_tx,
                      share_backward=share_backward, **common)
  a_tx = arch_optimizer(arch_lr, floor=floor, entropy_weight=entropy_weight,
                        floor_after_normalise=True,
                        warmup_steps=warmup_epochs * steps_per_epoch)
  return rome.make(net, topology='none', num_samples=1, weights_first=False,
                   tau_max=tau_max, tau_min=tau_min,
                   warmup_epochs=warmup_epochs, zero_terms=zero_terms,
                   a_tx=a_tx, share_backward=share_backward, **common)

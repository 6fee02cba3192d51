"""DropNAS: one-level DARTS with grouped operation dropout.

DropNAS (Hong et al., IJCAI 2020; wiljohnhong/DropNAS;
../shared/methods/dropnas.md) trains weights and alphas together on the same
training batch and, every step, drops candidate ops in two groups:
parametric (the convolutions) and non-parametric (pools, skip, 'none').

* Masks: each op is dropped independently with `p = r ** (1 / |group|)`
  (r = 3e-5: p ~ 0.074 for groups of 4), conditioned on keeping at least one
  op of each group (the reference resamples an emptied group; `sample_masks`
  draws from that conditional distribution directly, no loop). One mask per
  cell type per step, shared by all cells of the type and all devices.
* Mixture: softmax over the kept ops only, no 1 / (1 - p) rescaling; dropped
  ops have weight 0, and their alphas exactly zero gradient.
* Two optimizer steps per iteration, with shared optimizer states: the loss
  step (weights: SGD, clip 3, no decay; alphas: Adam, no decay), then the
  "partial decay" step on `wd * |w|^2` over weights with non-zero gradient and
  `1e-3 * alpha^2` over alphas with |gradient| > 1e-7 (`partial_decay`).
* Alpha adjustment: after the updates, each edge that dropped something
  shifts its kept alphas so that the kept ops' share of probability mass is
  what it was before the step (`adjust_alphas`).
* Derivation on the raw alphas (not their softmax), 'none' ignored.

Not done: skipping the dropped ops' compute. With ~7% of ops dropped it
would need a conditional per op and edge, which costs far more compile time
on XLA than it saves (see ROME's switches), and the search cell computes
each op stacked over all edges leaving a node. So every op runs, and
dropped ops are multiplied by an exact 0: the same losses and gradients.
One difference: a dropped op's BatchNorm running statistics still update
(the reference does not run it), which only touches the per-epoch
evaluation, not the search.

Synopsis:

  method = dropnas.make(net, steps_per_epoch=521, epochs=76)
  state = method.init(key, images[:1])
  state, metrics = jax.jit(method.step)(state, {'train': batch, 'val': ...})
"""

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnas import arch as arch_lib
from jaxnas import ops
from jaxnas import optim
from jaxnas import parallel
from jaxnas.methods import base
from jaxnas.methods import darts

# r: the probability that a whole group would be dropped (config.py).
DROP_RATE = 3e-5
# Alphas whose |gradient| is at most this get no decay (search_cnn.py).
ALPHA_GRAD_EPS = 1e-7
# Raw alphas, not their softmax, rank ops and edges (genotypes.parse).
RAW_ALPHAS = arch_lib.Parametrisation(
    'logits', arch_lib.init_logits, arch_lib.softmax_weights, lambda a: a,
    arch_lib.softmax_weights, dict)


def op_groups(primitives: Sequence[str]) -> np.ndarray:
  """[K] group id per op: 0 parametric (`ops.PARAMETRIC_OPS`: the
  convolutions), 1 the rest (pools, skip, 'none')."""
  return np.where(ops.parametric_mask(primitives), 0, 1).astype(np.int32)


def drop_probabilities(groups: np.ndarray,
                       drop_rate: float = DROP_RATE) -> np.ndarray:
  """[K] per-op drop probability `drop_rate ** (1 / size of its group)`."""
  sizes = np.bincount(groups)[groups]
  return drop_rate ** (1. / sizes)


def sample_masks(key: jax.Array, shape, groups: np.ndarray,
                 drop_rate: float = DROP_RATE) -> jax.Array:
  """[E, K] bool keep-masks: independent drops, no group left empty.

  Exact conditional sampling: within a group of n ops (each kept with
  q = 1 - p), the first kept op is j with probability
  `p**j q / (1 - p**n)`; ops before it are dropped and ops after it kept
  independently with q. This is the distribution of the reference's
  resample-until-non-empty loop, with no loop.
  """
  e, k = shape
  groups = np.asarray(groups)
  p = drop_probabilities(groups, drop_rate)
  k_first, k_rest = jax.random.split(key)
  keep = jax.random.uniform(k_rest, (e, k)) >= p
  mask = jnp.zeros((e, k), bool)
  for g, g_key in zip(np.unique(groups),
                      jax.random.split(k_first, len(np.unique(groups)))):
    members = np.flatnonzero(groups == g)
    pg = float(p[members[0]])
    j = np.arange(len(members))
    logits = j * np.log(pg) + np.log1p(-pg)      # log(p**j q), unnormalised
    first = jax.random.categorical(g_key, jnp.asarray(logits), shape=(e,))
    pos = jnp.asarray(j)[None]
    g_mask = (pos == first[:, None]) | ((pos > first[:, None]) &
                                        keep[:, members])
    mask = mask.at[:, members].set(g_mask)
  return mask


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the kept entries; dropped ones get 0 and no gradient."""
  return jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1,
                        where=mask)


def kept_mass(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """[E]: the kept ops' share of each edge's softmax probability."""
  p = jax.nn.softmax(logits, axis=-1)
  return jnp.sum(jnp.where(mask, p, 0.), axis=-1)


def adjust_alphas(logits: jax.Array, mask: jax.Array,
                  ratio: jax.Array) -> jax.Array:
  """Shifts each edge's kept logits so their probability mass is `ratio`.

  Edges that dropped nothing are unchanged (the reference's `k`:
  log(ratio / (1 - ratio) * sum_dropped exp / sum_kept exp)).
  """
  shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
  ex = jnp.exp(shifted)
  kept = jnp.sum(jnp.where(mask, ex, 0.), axis=-1)
  dropped = jnp.sum(jnp.where(mask, 0., ex), axis=-1)
  any_dropped = ~jnp.all(mask, axis=-1)
  safe = lambda x: jnp.where(any_dropped, x, 1.)
  k = (jnp.log(safe(ratio)) - jnp.log1p(-safe(ratio)) + jnp.log(safe(dropped))
       - jnp.log(safe(kept)))
  k = jnp.where(any_dropped, k, 0.)
  return logits + jnp.where(mask, k[:, None], 0.)


def partial_decay(params, grads, coefficient: float, *,
                  threshold: float = 0.):
  """Gradient of `coefficient * sum(w**2)` over entries whose gradient
  exceeds `threshold` in magnitude; 0 for the others.

  The reference decides per weight tensor (`grad[0] != 0`); here per entry,
  which agrees on dropped ops (all-zero gradients) and differs only where a
  kept op's single weight has an exactly zero gradient.
  """
  return jax.tree.map(
      lambda w, g: jnp.where(jnp.abs(g) > threshold, 2. * coefficient * w,
                             0.).astype(w.dtype), params, grads)


def search_step(state: base.SearchState, batch, *, net: nn.Module, w_tx,
                a_tx, groups: np.ndarray, drop_rate: float,
                weight_decay: float, arch_decay: float, warmup_steps: int = 0,
                lr_schedule: Optional[optax.Schedule] = None):
  """One DropNAS iteration on `batch['train']` (one-level).

  Returns (state with `step + 1`, metrics averaged over devices).
  """
  key = jax.random.fold_in(state.key, state.step)   # same on every device
  names = sorted(state.arch)
  active = state.step >= warmup_steps   # warm-up: no drops, no alpha steps
  masks = {}
  for n, k in zip(names, jax.random.split(key, len(names))):
    m = sample_masks(k, state.arch[n].shape, groups, drop_rate)
    masks[n] = jnp.where(active, m, True)
  weights_fn = lambda arch: {n: masked_softmax(arch[n], masks[n])
                             for n in arch}
  train = batch['train']
  (loss, (stats, logits)), (g_w, g_a) = jax.value_and_grad(
      base.classification_loss, argnums=(0, 1), has_aux=True)(
          state.params, state.arch, state.batch_stats, train, net=net,
          weights_fn=weights_fn)
  g_w, g_a = parallel.pmean((g_w, g_a))
  ratio = {n: kept_mass(state.arch[n], masks[n]) for n in names}

  def arch_step(state, grads):
    new = base.apply_arch_grads(state, grads, a_tx=a_tx)
    return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state)

  # 1) the loss step.
  state, grad_norm = base.apply_weight_grads(state, g_w, w_tx=w_tx)
  state = arch_step(state, g_a)
  # 2) the partial decay step, with the same optimizer states; the
  # reference takes its alpha step even in the warm-up (search.py).
  state, _ = base.apply_weight_grads(
      state, partial_decay(state.params, g_w, weight_decay), w_tx=w_tx)
  state = base.apply_arch_grads(
      state, partial_decay(state.arch, g_a, arch_decay,
                           threshold=ALPHA_GRAD_EPS), a_tx=a_tx)
  # 3) restore each edge's kept / dropped probability split.
  arch = {n: adjust_alphas(state.arch[n], masks[n], ratio[n]) for n in names}
  state = state.replace(arch=arch, batch_stats=base.sync_batch_stats(stats),
                        step=state.step + 1)
  metrics = {'train_loss': loss, 'train_acc': base.accuracy(
      logits, train['label']), 'grad_norm': grad_norm,
             'kept_ops': jnp.mean(jnp.stack([jnp.mean(m) for m in
                                              masks.values()]))}
  if lr_schedule is not None:
    metrics['lr'] = lr_schedule(state.step - 1)
  return state, parallel.pmean(metrics)


def make(net: nn.Module, *, steps_per_epoch: int, epochs: int = 76,
         lr: float = 0.0375, lr_min: float = 0.0015, momentum: float = 0.9,
         weight_decay: float = 3e-4, grad_clip: float = 3.,
         arch_lr: float = 3e-4, arch_betas=(0.5, 0.999),
         arch_decay: float = 1e-3, drop_rate: float = DROP_RATE,
         warmup_epochs: int = 0,
         arch_init_scale: float = arch_lib.DARTS_INIT_SCALE,
         derive_fn: Optional[base.DeriveFn] = None) -> base.Method:
  """DropNAS with the reference's settings (defaults: its CIFAR search).

  Args:
    net: a mixture search network (DARTS or NAS-Bench-201 space).
    steps_per_epoch, epochs: the cosine schedule (stepped per epoch).
    lr, lr_min, momentum, grad_clip: weight SGD (no decay in the optimizer).
    weight_decay: the partial decay's weight coefficient (a loss term
      `wd * |w|^2`, so twice torch's `weight_decay` gradient).
    arch_lr, arch_betas: alpha Adam (no decay in the optimizer).
    arch_decay: the partial decay's alpha coefficient.
    drop_rate: r, the probability a whole group would be dropped.
    warmup_epochs: epochs without drops or alpha steps (reference: 0).
    arch_init_scale: alphas start at `arch_init_scale * N(0, 1)`.
    derive_fn: raw alphas -> genotype; default the space's rule.
  """
  if not 0 < drop_rate < 1:
    raise ValueError(f'drop_rate must be in (0, 1), got {drop_rate}')
  primitives = getattr(net, 'primitives', None)
  groups = op_groups(primitives)
  if len(np.unique(groups)) != 2:
    raise ValueError('DropNAS needs both parametric (conv) and parameter-free '
                     f'ops, got {primitives}')
  schedule, w_tx, a_tx = optim.search_optimizers(
      lr=lr, lr_min=lr_min, epochs=epochs, steps_per_epoch=steps_per_epoch,
      momentum=momentum, weight_decay=0., grad_clip=grad_clip,
      nesterov=False, arch_lr=arch_lr, arch_betas=arch_betas,
      arch_weight_decay=0.)
  return base.Method(
      init=functools.partial(darts.init, net=net, w_tx=w_tx, a_tx=a_tx,
                             init_scale=arch_init_scale),
      step=functools.partial(
          search_step, net=net, w_tx=w_tx, a_tx=a_tx, groups=groups,
          drop_rate=drop_rate, weight_decay=weight_decay,
          arch_decay=arch_decay,
          warmup_steps=warmup_epochs * steps_per_epoch,
          lr_schedule=schedule),
      eval_step=functools.partial(base.eval_step, net=net,
                                  weights_fn=arch_lib.softmax_weights),
      derive=functools.partial(
          darts.derive, derive_fn=derive_fn or base.space_derive(net),
          weights_fn=RAW_ALPHAS.derive_weights))


"""Optimizers and schedules that match the PyTorch references, built from optax.

* `torch_sgd`: torch's SGD with momentum and L2 weight decay, preceded by
  global-norm clipping of the raw gradient (`clip_grad_norm` then
  `optimizer.step()`): clip -> add wd * w -> momentum trace -> scale by -lr.
* `torch_adam`: torch's Adam with L2 weight decay added to the gradient (not
  AdamW), as the DARTS architect uses on the alphas.
* `exponentiated_gradient`, `entropic_regulariser`: GAEA's mirror descent on
  the simplex, for architecture parameters that are probabilities.
* `per_epoch`: a schedule over epochs evaluated per step, with the reference's
  offset: the PyTorch scheduler is stepped at the start of every epoch, so
  epoch e uses the schedule's value at e + 1 (DARTS epoch 0 runs at 0.024976,
  not 0.025, and the last epoch at lr_min).

Synopsis:

  lr = darts_cosine(0.025, 0.001, epochs=50, steps_per_epoch=390)
  w_tx = torch_sgd(lr, momentum=0.9, weight_decay=3e-4, clip_norm=5.)
  a_tx = torch_adam(3e-4, b1=0.5, b2=0.999, weight_decay=1e-3)
  eg = exponentiated_gradient(0.1, floor=1e-5)   # GAEA, on probabilities
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax


def per_epoch(schedule: optax.Schedule, steps_per_epoch: int,
              offset: int = 1) -> optax.Schedule:
  """`step -> schedule(step // steps_per_epoch + offset)`."""
  if steps_per_epoch < 1:
    raise ValueError(f'steps_per_epoch must be >= 1, got {steps_per_epoch}')

  def fn(step):
    return schedule(jnp.asarray(step) // steps_per_epoch + offset)

  return fn


def darts_cosine(lr: float, lr_min: float, epochs: int,
                 steps_per_epoch: int, offset: int = 1) -> optax.Schedule:
  """CosineAnnealingLR(T_max=epochs, eta_min=lr_min) stepped at epoch start.

  `offset=0` reads the rate before stepping the scheduler (GAEA: epoch 0 at
  `lr`).
  """
  if lr <= 0 or lr_min < 0 or lr_min > lr:
    raise ValueError(f'need 0 <= lr_min <= lr and lr > 0, got {lr}, {lr_min}')
  cosine = optax.cosine_decay_schedule(lr, decay_steps=max(epochs, 1),
                                       alpha=lr_min / lr)
  return per_epoch(cosine, steps_per_epoch, offset)


def torch_sgd(learning_rate: optax.ScalarOrSchedule, *, momentum: float,
              weight_decay: float,
              clip_norm: Optional[float] = None, nesterov: bool = False
              ) -> optax.GradientTransformation:
  """torch.optim.SGD(momentum, weight_decay, nesterov) after clip_grad_norm_.

  optax's Nesterov trace is torch's: buf = mu * buf + g, step g + mu * buf.
  """
  parts = []
  if clip_norm is not None and clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def torch_adam(learning_rate: optax.ScalarOrSchedule, *, b1: float, b2: float,
               weight_decay: float = 0., eps: float = 1e-8,
               clip_norm: Optional[float] = None
               ) -> optax.GradientTransformation:
  """torch.optim.Adam with L2 weight decay added to the gradient, after an
  optional clip_grad_norm_ (P-DARTS clips the alphas' gradient)."""
  parts = []
  if clip_norm is not None and clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def momentum_buffer(opt_state: Any, params: Any) -> Any:
  """The momentum trace of a `torch_sgd` state (zeros if it has none)."""
  buf = optax.tree_utils.tree_get(opt_state, 'trace')
  if buf is None:
    return jax.tree.map(jnp.zeros_like, params)
  return buf


def search_optimizers(*, lr: float, lr_min: float, epochs: int,
                      steps_per_epoch: int, momentum: float,
                      weight_decay: float, grad_clip: float, nesterov: bool,
                      arch_lr: float, arch_betas, arch_weight_decay: float,
                      schedule_epochs: Optional[int] = None,
                      schedule_offset: int = 1, a_tx=None,
                      arch_grad_clip: Optional[float] = None):
  """DARTS' pair of optimizers, shared by the methods built on it.

  `schedule_epochs` (default `epochs`) is the cosine's length (GAEA runs 25
  epochs of a 50-epoch cosine); `schedule_offset` see `darts_cosine`; `a_tx`
  replaces the architecture Adam; `arch_grad_clip` clips the architecture
  gradient's global norm first (P-DARTS: 5).

  Returns (lr schedule, weight SGD with the cosine schedule stepped per
  epoch, architecture optimizer).
  """
  schedule = darts_cosine(lr, lr_min, schedule_epochs or epochs,
                          steps_per_epoch, schedule_offset)
  w_tx = torch_sgd(schedule, momentum=momentum, weight_decay=weight_decay,
                   clip_norm=grad_clip, nesterov=nesterov)
  if a_tx is None:
    a_tx = torch_adam(arch_lr, b1=arch_betas[0], b2=arch_betas[1],
                      weight_decay=arch_weight_decay, clip_norm=arch_grad_clip)
  return schedule, w_tx, a_tx


class ExponentiatedGradientState(NamedTuple):
  count: jax.Array


def _normalise(x: jax.Array, segment_ids, num_segments: int) -> jax.Array:
  """x / (its sum over the last axis, or over its segment of the last axis)."""
  if segment_ids is None:
    return x / jnp.sum(x, axis=-1, keepdims=True)
  seg = jnp.asarray(segment_ids)
  sums = jax.ops.segment_sum(jnp.moveaxis(x, -1, 0), seg, num_segments)
  return x / jnp.moveaxis(sums[seg], 0, -1)


def exponentiated_gradient(
    learning_rate: optax.ScalarOrSchedule, *, floor: float = 1e-5,
    floor_after_normalise: bool = False, segment_ids=None
) -> optax.GradientTransformation:
  """Mirror descent on the probability simplex (GAEA's EG update).

  Each leaf of the parameters is a set of probability vectors along its last
  axis (or, with `segment_ids`, along segments of its last axis: a node's
  incoming edges). One step is

      p <- p * exp(-lr * g);  p <- max(p, floor);  p <- p / sum(p)

  (liamcli/gaea_release `ArchitectEDARTS.step`; with `floor_after_normalise`
  the order of its EGDAS: normalise, then floor, so rows may sum to slightly
  more than 1). It is computed in log space with the group's maximum
  subtracted before `exp`, so a gradient of any finite size gives a vertex of
  the simplex (then lifted to the floor), never inf or NaN. The floored
  entries end at `floor / sum`, i.e. at least `floor / (1 + n * floor)` for
  n entries (less float32 rounding: the update is `p_new - p`, and adding it
  back to p rounds at p's scale, up to 1.2e-7 next to 1).

  Args:
    learning_rate: eta, a scalar or a schedule of the update count.
    floor: lower clamp of every probability (0 for none).
    floor_after_normalise: EGDAS' order (see above).
    segment_ids: None (normalise over the last axis), or a static int
      sequence as long as the last axis naming each entry's group.

  Returns:
    An optax transformation whose updates are `p_new - p` (apply them with
    `optax.apply_updates`); it needs `params`.
  """
  num_segments = None
  if segment_ids is not None:
    segment_ids = np.asarray(segment_ids, np.int32)
    num_segments = int(segment_ids.max()) + 1

  def init_fn(params):
    del params
    return ExponentiatedGradientState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('exponentiated_gradient needs the params: call '
                       'update(grads, state, params)')
    lr = (learning_rate(state.count) if callable(learning_rate)
          else learning_rate)

    def step(g, p):
      logp = jnp.log(jnp.maximum(p, jnp.finfo(p.dtype).tiny)) - lr * g
      if segment_ids is None:
        top = jnp.max(logp, axis=-1, keepdims=True)
      else:
        seg = jnp.asarray(segment_ids)
        top = jnp.moveaxis(jax.ops.segment_max(
            jnp.moveaxis(logp, -1, 0), seg, num_segments)[seg], 0, -1)
      q = _normalise(jnp.exp(logp - top), segment_ids, num_segments)
      if floor:
        if floor_after_normalise:
          q = jnp.maximum(q, floor)
        else:
          q = _normalise(jnp.maximum(q, floor), segment_ids, num_segments)
      return (q - p).astype(p.dtype)

    new = jax.tree.map(step, updates, params)
    return new, ExponentiatedGradientState(count=optax.safe_int32_increment(
        state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def entropic_regulariser(weight: float) -> optax.GradientTransformation:
  """Adds the gradient of `weight * KL(p || uniform)` per probability row.

  `KL = sum(p * log(p * n))` over the last axis (n its size), as GAEA's
  `arch_weight_decay` term; its gradient is `weight * (log(p * n) + 1)`.
  """
  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('entropic_regulariser needs the params')
    if not weight:
      return updates, state

    def add(g, p):
      n = p.shape[-1]
      tiny = jnp.finfo(p.dtype).tiny
      return g + weight * (jnp.log(jnp.maximum(p, tiny) * n) + 1.)
    return jax.tree.map(add, updates, params), state

  return optax.GradientTransformation(
      lambda params: optax.EmptyState(), update_fn)

"""Optimizers and schedules that match the PyTorch references, built from optax.

* `torch_sgd`: torch's SGD with momentum and L2 weight decay, preceded by
  global-norm clipping of the raw gradient (`clip_grad_norm` then
  `optimizer.step()`): clip -> add wd * w -> momentum trace -> scale by -lr.
* `torch_adam`: torch's Adam with L2 weight decay added to the gradient (not
  AdamW), as the DARTS architect uses on the alphas.
* `per_epoch`: a schedule over epochs evaluated per step, with the reference's
  offset: the PyTorch scheduler is stepped at the start of every epoch, so
  epoch e uses the schedule's value at e + 1 (DARTS epoch 0 runs at 0.024976,
  not 0.025, and the last epoch at lr_min).

Synopsis:

  lr = darts_cosine(0.025, 0.001, epochs=50, steps_per_epoch=390)
  w_tx = torch_sgd(lr, momentum=0.9, weight_decay=3e-4, clip_norm=5.)
  a_tx = torch_adam(3e-4, b1=0.5, b2=0.999, weight_decay=1e-3)
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
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
                 steps_per_epoch: int) -> optax.Schedule:
  """CosineAnnealingLR(T_max=epochs, eta_min=lr_min) stepped at epoch start."""
  if lr <= 0 or lr_min < 0 or lr_min > lr:
    raise ValueError(f'need 0 <= lr_min <= lr and lr > 0, got {lr}, {lr_min}')
  cosine = optax.cosine_decay_schedule(lr, decay_steps=max(epochs, 1),
                                       alpha=lr_min / lr)
  return per_epoch(cosine, steps_per_epoch)


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
               weight_decay: float = 0.,
               eps: float = 1e-8) -> optax.GradientTransformation:
  """torch.optim.Adam with L2 weight decay added to the gradient."""
  parts = []
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
                      arch_lr: float, arch_betas, arch_weight_decay: float):
  """DARTS' pair of optimizers, shared by the methods built on it.

  Returns (lr schedule, weight SGD with the cosine schedule stepped per
  epoch, architecture Adam).
  """
  schedule = darts_cosine(lr, lr_min, epochs, steps_per_epoch)
  w_tx = torch_sgd(schedule, momentum=momentum, weight_decay=weight_decay,
                   clip_norm=grad_clip, nesterov=nesterov)
  a_tx = torch_adam(arch_lr, b1=arch_betas[0], b2=arch_betas[1],
                    weight_decay=arch_weight_decay)
  return schedule, w_tx, a_tx

"""Architecture gradients: first order and DARTS' second-order approximation.

All functions take a loss of the common form

  loss_fn(params, arch, batch_stats, batch) -> (loss, (new_batch_stats, aux))

and return the gradient with respect to `arch` (a pytree shaped like `arch`).

Second order (Liu et al. 2019, Eq. 7; quark0/darts `cnn/architect.py`):

  w' = w - xi * (mu * m + dL_trn/dw + wd * w)     (virtual SGD step: real
                                                   momentum buffer m, weight
                                                   decay, no clipping)
  g  = dL_val(w', a)/da - xi * H v,   v = dL_val(w', a)/dw',
  H v = d/dw [dL_trn(w, a)/da] . v    (mixed second derivative at the real w)

`unrolled_fd` estimates H v by central finite differences with
R = r / ||v|| as the reference does; `unrolled_exact` computes it exactly by
forward-over-reverse autodiff (`jax.jvp` of `jax.grad`).

Under pmap / shard_map the weight gradients of the virtual step and v are
averaged over devices inside; the returned arch gradient is this device's
(the caller averages it, as `jaxnas.methods.base.apply_arch_grads` does).
"""

from typing import Any, Callable, Tuple

import jax
import optax

from jaxnas import parallel

PyTree = Any
LossFn = Callable[..., Tuple[jax.Array, Tuple[PyTree, PyTree]]]

# The reference's finite-difference scale (`_hessian_vector_product(r=1e-2)`).
DARTS_FD_R = 1e-2


def first_order(loss_fn: LossFn, params: PyTree, arch: PyTree,
                batch_stats: PyTree, val_batch: Any):
  """dL_val(w, a)/da. Returns (grad, loss, (new_batch_stats, aux))."""
  (loss, aux), g = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
      params, arch, batch_stats, val_batch)
  return g, loss, aux


def virtual_step(params: PyTree, grads: PyTree, momentum_buf: PyTree, *,
                 lr: jax.Array, momentum: float,
                 weight_decay: float) -> PyTree:
  """w - lr * (momentum * m + g + weight_decay * w), as torch SGD would step."""
  return jax.tree.map(
      lambda w, g, m: w - lr * (momentum * m + g + weight_decay * w),
      params, grads, momentum_buf)


def _unrolled(loss_fn, params, arch, batch_stats, train_batch, val_batch, *,
              lr, momentum_buf, momentum, weight_decay, hvp_fn):
  # Weight gradients are averaged over devices (as the real weight step's
  # are), so that every device takes the same virtual step and the same v, and
  # a mapped step computes what one device would on the whole batch. The arch
  # gradient and H v are linear in the per-device losses: the caller averages.
  grad_w = jax.grad(lambda w: loss_fn(w, arch, batch_stats, train_batch)[0])
  w_virtual = virtual_step(params, parallel.pmean(grad_w(params)),
                           momentum_buf, lr=lr, momentum=momentum,
                           weight_decay=weight_decay)
  (loss, aux), (g_arch, v) = jax.value_and_grad(
      loss_fn, argnums=(1, 0), has_aux=True)(w_virtual, arch, batch_stats,
                                             val_batch)
  v = parallel.pmean(v)

  def grad_arch_train(w):
    return jax.grad(lambda a: loss_fn(w, a, batch_stats, train_batch)[0])(arch)

  hvp = hvp_fn(grad_arch_train, params, v)
  return unrolled_grad(g_arch, hvp, lr), loss, aux


def unrolled_grad(g_arch: PyTree, hvp: PyTree, lr: jax.Array) -> PyTree:
  """g = dL_val(w', a)/da - xi * H v."""
  return jax.tree.map(lambda ga, h: ga - lr * h, g_arch, hvp)


def fd_scale(v: PyTree, r: float = DARTS_FD_R) -> jax.Array:
  """The finite differences' step R = r / ||v||."""
  return r / optax.tree.norm(v)


def perturb(params: PyTree, v: PyTree, eps: jax.Array) -> PyTree:
  """w + eps * v."""
  return jax.tree.map(lambda w, d: w + eps * d, params, v)


def fd_difference(plus: PyTree, minus: PyTree, eps: jax.Array) -> PyTree:
  """H v ~ (dL_trn(w + R v)/da - dL_trn(w - R v)/da) / (2 R)."""
  return jax.tree.map(lambda p, m: (p - m) / (2 * eps), plus, minus)


def _fd_hvp(r):

  def hvp(grad_arch_train, params, v):
    eps = fd_scale(v, r)
    plus = grad_arch_train(perturb(params, v, eps))
    minus = grad_arch_train(perturb(params, v, -eps))
    return fd_difference(plus, minus, eps)

  return hvp


def _exact_hvp(grad_arch_train, params, v):
  return jax.jvp(grad_arch_train, (params,), (v,))[1]


def unrolled_fd(loss_fn: LossFn, params: PyTree, arch: PyTree,
                batch_stats: PyTree, train_batch: Any, val_batch: Any, *,
                lr: jax.Array, momentum_buf: PyTree, momentum: float,
                weight_decay: float, r: float = DARTS_FD_R):
  """Second-order arch gradient with the reference's finite differences.

  Args:
    loss_fn: see the module docstring.
    params: network weights w.
    arch: architecture parameters a.
    batch_stats: BatchNorm statistics (passed through to `loss_fn`).
    train_batch: batch of the weights' split (for the virtual step and H v).
    val_batch: batch of the architecture's split.
    lr: xi, the current weight learning rate.
    momentum_buf: the weight optimizer's momentum buffer (zeros before the
      first step).
    momentum: SGD momentum.
    weight_decay: SGD weight decay (L2 added to the gradient).
    r: finite-difference scale; the step is R = r / ||v||.

  Returns:
    (grad wrt arch, validation loss at w', (batch_stats, aux) at w').
  """
  return _unrolled(loss_fn, params, arch, batch_stats, train_batch, val_batch,
                   lr=lr, momentum_buf=momentum_buf, momentum=momentum,
                   weight_decay=weight_decay, hvp_fn=_fd_hvp(r))


def unrolled_exact(loss_fn: LossFn, params: PyTree, arch: PyTree,
                   batch_stats: PyTree, train_batch: Any, val_batch: Any, *,
                   lr: jax.Array, momentum_buf: PyTree, momentum: float,
                   weight_decay: float):
  """As `unrolled_fd`, with H v computed exactly (forward over reverse)."""
  return _unrolled(loss_fn, params, arch, batch_stats, train_batch, val_batch,
                   lr=lr, momentum_buf=momentum_buf, momentum=momentum,
                   weight_decay=weight_decay, hvp_fn=_exact_hvp)

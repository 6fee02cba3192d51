"""DARTS (Liu, Simonyan, Yang, ICLR 2019): bilevel search with softmax mixtures.

Each step does, as quark0/darts `train_search.py` does:
  1. an architecture step on the validation batch (first order, second order
     with the reference's finite-difference Hessian-vector product, or second
     order with the exact one), Adam on the alphas;
  2. a weight step on the training batch, SGD on the weights.

Synopsis:

  net = SearchNetwork(C=16, num_classes=10, layers=8)
  method = darts.make(net, order='first', steps_per_epoch=390)
  state = method.init(jax.random.key(2), images[:1])
  step = jax.jit(method.step, donate_argnums=0)
  state, metrics = step(state, {'train': batch_w, 'val': batch_a})
  print(method.derive(state))

or, for use inside other JAX code, the module-level pure functions
`arch_step`, `search_step` and `jaxnas.methods.base.weight_step` with their
dependencies bound by `functools.partial`.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnas import arch as arch_lib
from jaxnas import hypergrad
from jaxnas import ops
from jaxnas import optim
from jaxnas import parallel
from jaxnas.methods import base

ORDERS = ('first', 'second', 'exact')

# The default float (float64 under `jax.enable_x64`): the shared steps'
# metrics and finite-difference scale.
_FLOAT = lambda: jnp.result_type(float)


def arch_step(state: base.SearchState, train_batch, val_batch, *, loss_fn,
              a_tx, order: str = 'first',
              lr_schedule: Optional[optax.Schedule] = None,
              momentum: float = 0.9, weight_decay: float = 3e-4,
              fd_r: float = hypergrad.DARTS_FD_R):
  """One architecture update; the weights are left untouched.

  Args:
    state: current state.
    train_batch: the weights' batch (used by second order only).
    val_batch: the architecture's batch.
    loss_fn: `(params, arch, batch_stats, batch) -> (loss, (stats, logits))`.
    a_tx: optax transformation of the architecture.
    order: 'first', 'second' (finite differences, as the reference) or
      'exact' (exact Hessian-vector product).
    lr_schedule: the weights' learning-rate schedule (xi of the virtual step).
    momentum: SGD momentum of the virtual step.
    weight_decay: SGD weight decay of the virtual step.
    fd_r: finite-difference scale of order 'second'.

  Returns:
    (new state, metrics). BatchNorm running statistics are updated by the
    first-order validation forward pass, as in the reference; the second-order
    passes run at virtual or perturbed weights and leave them as they were (the
    reference updates them from its perturbed passes too, which only adds
    noise to statistics used at evaluation time).
  """
  if order == 'first':
    g, loss, (stats, logits) = hypergrad.first_order(
        loss_fn, state.params, state.arch, state.batch_stats, val_batch)
    state = state.replace(batch_stats=base.sync_batch_stats(stats))
  elif order in ('second', 'exact'):
    if lr_schedule is None:
      raise ValueError('second-order DARTS needs the weight lr_schedule')
    kw = dict(lr=lr_schedule(state.step),
              momentum_buf=optim.momentum_buffer(state.w_opt_state,
                                                 state.params),
              momentum=momentum, weight_decay=weight_decay)
    if order == 'second':
      g, loss, (_, logits) = hypergrad.unrolled_fd(
          loss_fn, state.params, state.arch, state.batch_stats, train_batch,
          val_batch, r=fd_r, **kw)
    else:
      g, loss, (_, logits) = hypergrad.unrolled_exact(
          loss_fn, state.params, state.arch, state.batch_stats, train_batch,
          val_batch, **kw)
  else:
    raise ValueError(f'order must be one of {ORDERS}, got {order!r}')
  state = base.apply_arch_grads(state, g, a_tx=a_tx)
  return state, {'val_loss': loss,
                 'val_acc': base.accuracy(logits, val_batch['label'])}


def search_step(state: base.SearchState, batch, *, loss_fn, w_tx, a_tx,
                order: str = 'first',
                lr_schedule: Optional[optax.Schedule] = None,
                momentum: float = 0.9, weight_decay: float = 3e-4,
                fd_r: float = hypergrad.DARTS_FD_R):
  """Architecture step on `batch['val']`, then weight step on `batch['train']`.

  Returns (state with `step + 1`, metrics averaged over devices). Donate the
  state (`donate_argnums=0`) when jitting.
  """
  state, a_metrics = arch_step(
      state, batch['train'], batch['val'], loss_fn=loss_fn, a_tx=a_tx,
      order=order, lr_schedule=lr_schedule, momentum=momentum,
      weight_decay=weight_decay, fd_r=fd_r)
  state, w_metrics = base.weight_step(state, batch['train'], loss_fn=loss_fn,
                                      w_tx=w_tx)
  metrics = {**a_metrics, **w_metrics}
  if lr_schedule is not None:
    metrics['lr'] = lr_schedule(state.step)
  metrics = parallel.pmean(metrics)
  return state.replace(step=state.step + 1), metrics


def shared_first_order_step(state: base.SearchState, batch, *, loss_fn,
                            w_tx, a_tx,
                            lr_schedule: Optional[optax.Schedule] = None,
                            arch_active: Any = True):
  """First-order `search_step` with one compiled forward/backward pass.

  The architecture phase (validation batch) and the weight phase (training
  batch) run as two iterations of one `lax.scan` whose body takes gradients
  with respect to both weights and alphas and applies the phase's update, so
  XLA compiles the supernet's forward and backward once instead of twice.
  The convolutions get `jaxnas.ops.conv2d`'s loop-friendly gradients (JAX's
  own ran 16x slower in the loop body on XLA:CPU), and the architecture
  phase skips their kernel gradients, which it would discard. On XLA:CPU:
  compile 40-43% shorter than `search_step`'s at the same step time
  (BENCHMARKS.md). Same updates and metrics as `search_step` with
  order='first'; it needs both batches to have the same shapes.

  `arch_active`: a bool or traced boolean scalar; where False the
  architecture phase is skipped (the loop starts at the weight phase: no
  forward/backward, state unchanged, its loss and accuracy 0), as in
  P-DARTS' warm-up epochs.
  """
  require_one_shape(batch, 'first-order')
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

  def run_phase(state, phase_batch, is_arch):
    # The architecture phase discards the weights' gradients: its
    # convolutions skip their kernel gradients.
    with ops.convolutions_in_loop_body(kernel_grads=~is_arch):
      (loss, (stats, logits)), (g_params, g_arch) = grad_fn(
          state.params, state.arch, state.batch_stats, phase_batch)

    def arch_update(state):
      return base.apply_arch_grads(state, g_arch, a_tx=a_tx), jnp.zeros(())

    def weight_update(state):
      return base.apply_weight_grads(state, g_params, w_tx=w_tx)

    state, grad_norm = jax.lax.cond(is_arch, arch_update, weight_update,
                                    state)
    state = state.replace(batch_stats=base.sync_batch_stats(stats))
    return state, (loss, base.accuracy(logits, phase_batch['label']),
                   grad_norm)

  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), batch['val'],
                         batch['train'])

  def phase(i, carry):  # i = 0: architecture, 1: weights
    state, out = carry
    state, m = run_phase(state, jax.tree.map(lambda x: x[i], stacked),
                         i == 0)
    return state, out.at[i].set(jnp.stack(m))

  # A skipped architecture phase starts the loop at the weight phase (a
  # while loop; a `lax.cond` around the phase raised XLA:CPU's peak memory
  # by 28%).
  first = 0 if arch_active is True else jnp.where(arch_active, 0, 1)
  state, out = jax.lax.fori_loop(first, 2, phase,
                                 (state, jnp.zeros((2, 3), _FLOAT())))
  (val_loss, val_acc, _), (loss, acc, grad_norm) = out
  metrics = {'val_loss': val_loss, 'val_acc': val_acc, 'train_loss': loss,
             'train_acc': acc, 'grad_norm': grad_norm}
  if lr_schedule is not None:
    metrics['lr'] = lr_schedule(state.step)
  metrics = parallel.pmean(metrics)
  return state.replace(step=state.step + 1), metrics


def shared_second_order_step(state: base.SearchState, batch, *, loss_fn,
                             w_tx, a_tx, lr_schedule: optax.Schedule,
                             momentum: float = 0.9,
                             weight_decay: float = 3e-4,
                             fd_r: float = hypergrad.DARTS_FD_R):
  """Second-order `search_step` with one compiled forward/backward pass.

  The step's five gradients of the loss -- the virtual step's (training
  batch, weights w), the validation gradient at the virtual weights w', the
  finite differences' two at w +- R v (training batch), and the weight
  step's (training batch, w, the updated alphas) -- run as the five
  iterations of one loop whose body differentiates the loss with respect
  to weights and alphas, then does what its pass does with the gradients
  (`lax.switch`). XLA compiles the supernet's forward and backward once
  instead of five times. The finite differences' passes skip the
  convolutions' kernel gradients (`jaxnas.ops.conv2d`). Same maths
  (`jaxnas.hypergrad.unrolled_fd`), updates and metrics as `search_step`
  with order='second'; both batches must have one shape.
  """
  require_one_shape(batch, 'second-order')
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
  lr = lr_schedule(state.step)
  momentum_buf = optim.momentum_buffer(state.w_opt_state, state.params)
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), batch['train'],
                         batch['val'])
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  # val_loss, val_acc, train_loss, train_acc, grad_norm
  carry = {'state': state, 'w': state.params, 'v': zeros(state.params),
           'eps': jnp.zeros((), _FLOAT()), 'g_val': zeros(state.arch),
           'plus': zeros(state.arch), 'metrics': jnp.zeros(5, _FLOAT())}

  def body(i, c):
    state = c['state']
    pass_batch = jax.tree.map(lambda x: x[(i == 1).astype(jnp.int32)],
                              stacked)
    with ops.convolutions_in_loop_body(kernel_grads=(i != 2) & (i != 3)):
      (loss, (stats, logits)), (g_w, g_a) = grad_fn(
          c['w'], state.arch, state.batch_stats, pass_batch)
    acc = base.accuracy(logits, pass_batch['label'])

    def virtual(c):  # w' = w - xi (mu m + dL_trn/dw + wd w)
      w = hypergrad.virtual_step(state.params, parallel.pmean(g_w),
                                 momentum_buf, lr=lr, momentum=momentum,
                                 weight_decay=weight_decay)
      return {**c, 'w': w}

    def validation(c):  # v = dL_val(w')/dw', the arch gradient at w'
      v = parallel.pmean(g_w)
      eps = hypergrad.fd_scale(v, fd_r)
      return {**c, 'v': v, 'eps': eps, 'g_val': g_a,
              'w': hypergrad.perturb(state.params, v, eps),
              'metrics': c['metrics'].at[:2].set(jnp.stack([loss, acc]))}

    def plus(c):
      return {**c, 'plus': g_a,
              'w': hypergrad.perturb(state.params, c['v'], -c['eps'])}

    def minus(c):  # the architecture update; then the weights at w
      hvp = hypergrad.fd_difference(c['plus'], g_a, c['eps'])
      state_ = base.apply_arch_grads(
          state, hypergrad.unrolled_grad(c['g_val'], hvp, lr), a_tx=a_tx)
      return {**c, 'state': state_, 'w': state.params}

    def weights(c):
      state_, grad_norm = base.apply_weight_grads(state, g_w, w_tx=w_tx)
      state_ = state_.replace(batch_stats=base.sync_batch_stats(stats))
      return {**c, 'state': state_, 'metrics': c['metrics'].at[2:].set(
          jnp.stack([loss, acc, grad_norm]))}

    return jax.lax.switch(i, (virtual, validation, plus, minus, weights), c)

  out = jax.lax.fori_loop(0, 5, body, carry)
  state = out['state']
  metrics = dict(zip(('val_loss', 'val_acc', 'train_loss', 'train_acc',
                      'grad_norm'), out['metrics']))
  metrics['lr'] = lr
  metrics = parallel.pmean(metrics)
  return state.replace(step=state.step + 1), metrics


def _phase_shapes(batch):
  """The shapes of the training and of the validation batch (pytrees)."""
  return tuple(jax.tree.map(jnp.shape, batch[k]) for k in ('train', 'val'))


def require_one_shape(batch, order: str):
  """Raises unless the training and validation batches have one shape, as
  a shared step needs."""
  train_shapes, val_shapes = _phase_shapes(batch)
  if train_shapes != val_shapes:
    raise ValueError(f'the shared {order} step needs training and '
                     f'validation batches of one shape, got {train_shapes} '
                     f'and {val_shapes}; use share_backward=False')


def _shared_if_one_shape(state, batch, *, shared, two_phase):
  """`share_backward=None`'s step: `shared` where the training and
  validation batches have one shape (decided at trace time), else
  `two_phase`."""
  train_shapes, val_shapes = _phase_shapes(batch)
  return (shared if train_shapes == val_shapes else two_phase)(state, batch)


def choose_step(share_backward: Optional[bool], order: str, *, shared,
                two_phase):
  """The step `share_backward` asks for, from a method's two forms of it.

  `shared` runs both phases through one forward/backward
  (`shared_first_order_step`), `two_phase` one after the other; both take
  `(state, batch)`. True: `shared` (orders 'first' and 'second'); False:
  `two_phase`; None: `shared` on CPU, where it compiles 40% (first order)
  to 70% (second order) faster at the same or a shorter step time
  (BENCHMARKS.md), for
  batches whose two halves have one shape (decided at trace time), else
  `two_phase`; `two_phase` for order 'exact' and on accelerators, where it
  is not measured.
  """
  if order not in ORDERS:
    raise ValueError(f'order must be one of {ORDERS}, got {order!r}')
  if share_backward and order == 'exact':
    raise ValueError("share_backward needs order 'first' or 'second': the "
                     "exact Hessian-vector product needs forward-mode "
                     "autodiff, which the loop's convolutions do not have")
  if share_backward is None:
    if order == 'exact' or jax.default_backend() != 'cpu':
      return two_phase
    return functools.partial(_shared_if_one_shape, shared=shared,
                             two_phase=two_phase)
  return shared if share_backward else two_phase


def init(key: jax.Array, sample_images: jax.Array, *, net: nn.Module, w_tx,
         a_tx, init_scale: float = arch_lib.DARTS_INIT_SCALE,
         arch_param: arch_lib.Parametrisation = arch_lib.LOGITS
         ) -> base.SearchState:
  """Initial state: weights, alphas (DARTS: 1e-3 * N(0, 1)), fresh optimizer
  states."""
  k_params, k_arch, k_state = jax.random.split(key, 3)
  arch = arch_param.init(k_arch, net.arch_shapes(), init_scale)
  params, batch_stats = base.init_variables(
      net, k_params, sample_images, arch_param.weights(arch))
  return base.SearchState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      arch=arch, w_opt_state=w_tx.init(params), a_opt_state=a_tx.init(arch),
      key=k_state)


def derive(state: base.SearchState, *, derive_fn: base.DeriveFn,
           weights_fn=arch_lib.softmax_weights):
  """The genotype of the current alphas: `derive_fn` of their mixing
  weights (DARTS: their softmax)."""
  return derive_fn(jax.tree.map(np.asarray, weights_fn(state.arch)))


def make(net: nn.Module, *, steps_per_epoch: int, epochs: int = 50,
         order: str = 'first', lr: float = 0.025, lr_min: float = 0.001,
         momentum: float = 0.9, weight_decay: float = 3e-4,
         grad_clip: float = 5., arch_lr: float = 3e-4,
         arch_betas=(0.5, 0.999), arch_weight_decay: float = 1e-3,
         arch_init_scale: float = arch_lib.DARTS_INIT_SCALE,
         fd_r: float = hypergrad.DARTS_FD_R,
         share_backward: Optional[bool] = None, nesterov: bool = False,
         schedule_epochs: Optional[int] = None, schedule_offset: int = 1,
         arch_param: arch_lib.Parametrisation = arch_lib.LOGITS,
         a_tx: Optional[optax.GradientTransformation] = None,
         derive_fn: Optional[base.DeriveFn] = None) -> base.Method:
  """DARTS with the reference's optimizers; defaults are the paper's search.

  Args:
    net: the search network (e.g. `jaxnas.spaces.darts.SearchNetwork`).
    steps_per_epoch: weight-split batches per epoch (the lr is stepped per
      epoch, at epoch start, as the reference does).
    epochs: search epochs (the cosine schedule's length).
    order: 'first', 'second' or 'exact'; see `arch_step`.
    lr, lr_min, momentum, weight_decay, grad_clip: weight SGD.
    arch_lr, arch_betas, arch_weight_decay: alpha Adam.
    arch_init_scale: alphas start at `arch_init_scale * N(0, 1)`.
    fd_r: finite-difference scale of second order.
    share_backward: compile one forward/backward for all of the step's
      passes (`shared_first_order_step`, `shared_second_order_step`; not
      for order 'exact'); None: automatic, see `choose_step`.
    nesterov: Nesterov momentum in the weight SGD (AutoDL-Projects' DARTS on
      NAS-Bench-201); the second-order virtual step stays plain momentum.
    schedule_epochs, schedule_offset: see `optim.search_optimizers`.
    arch_param: how the architecture variables mix the ops
      (`arch_lib.LOGITS`: softmax of logits; `arch_lib.SIMPLEX`: the
      probabilities themselves, GAEA).
    a_tx: the architecture optimizer instead of Adam (GAEA: exponentiated
      gradient); `arch_lr`, `arch_betas`, `arch_weight_decay` are then unused.
    derive_fn: mixing weights -> genotype; default the space's own rule
      (`base.space_derive(net)`).

  Returns:
    The method's pure functions.
  """
  if order not in ORDERS:
    raise ValueError(f'order must be one of {ORDERS}, got {order!r}')
  if order == 'exact' and getattr(net, 'depthwise_impl', None) == 'dense_loop':
    raise ValueError("order='exact' needs forward-mode autodiff, which "
                     "depthwise_impl='dense_loop' does not support; use "
                     "'dense' or 'grouped'")
  schedule, w_tx, a_tx = optim.search_optimizers(
      lr=lr, lr_min=lr_min, epochs=epochs, steps_per_epoch=steps_per_epoch,
      momentum=momentum, weight_decay=weight_decay, grad_clip=grad_clip,
      nesterov=nesterov, arch_lr=arch_lr, arch_betas=arch_betas,
      arch_weight_decay=arch_weight_decay, schedule_epochs=schedule_epochs,
      schedule_offset=schedule_offset, a_tx=a_tx)
  loss_fn = functools.partial(base.classification_loss, net=net,
                              weights_fn=arch_param.weights)
  two_phase = functools.partial(
      search_step, loss_fn=loss_fn, w_tx=w_tx, a_tx=a_tx, order=order,
      lr_schedule=schedule, momentum=momentum, weight_decay=weight_decay,
      fd_r=fd_r)
  if order == 'second':
    shared = functools.partial(
        shared_second_order_step, loss_fn=loss_fn, w_tx=w_tx, a_tx=a_tx,
        lr_schedule=schedule, momentum=momentum, weight_decay=weight_decay,
        fd_r=fd_r)
  else:
    shared = functools.partial(shared_first_order_step, loss_fn=loss_fn,
                               w_tx=w_tx, a_tx=a_tx, lr_schedule=schedule)
  step = choose_step(share_backward, order, two_phase=two_phase,
                     shared=shared)
  return base.Method(
      init=functools.partial(init, net=net, w_tx=w_tx, a_tx=a_tx,
                             init_scale=arch_init_scale,
                             arch_param=arch_param),
      step=step,
      eval_step=functools.partial(base.eval_step, net=net,
                                  weights_fn=arch_param.weights),
      derive=functools.partial(
          derive, derive_fn=derive_fn or base.space_derive(net),
          weights_fn=arch_param.derive_weights),
      mixing=arch_param.mixing)

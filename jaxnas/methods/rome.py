"""ROME and GDAS: single-path search with Gumbel sampling.

GDAS (Dong & Yang, CVPR 2019; AutoDL-Projects): every step samples one op per
edge by Gumbel-max from the op logits and trains only that sub-network; the
straight-through gates give the logits their gradient.

ROME (Wang, Chu et al., ICCV 2023; ../shared/methods/rome.md) adds:
  * topology disentanglement: separate topology logits choose exactly two
    incoming edges per node (v2: Gumbel-Top2 over per-edge logits, the
    default; v1: Gumbel-max over per-pair logits), so a sampled cell has the
    8 edges of an evaluated cell, and derivation takes edges from them;
  * gradient accumulation: per step, K sub-networks for the architecture
    update (gradients averaged, Eq. 11) and K other ones for the weight update
    (summed, Eq. 12; mean as an option), all on the same two batches.

Only the sampled ops run (`jaxnas.edges.switch`), and the K samples run one
after another in a loop, so memory is one sub-network's, whatever K
(`search_step`: one loop per update; `shared_search_step`: both updates'
samples in one loop, which compiles the network once).
ROME has no public code; what the paper leaves open is a documented choice
here (and a `make` argument): the temperature schedule (GDAS': linear
10 -> 0.1 over the epochs), the straight-through form (GDAS': the chosen op's
gate `hard - sg(soft) + soft`), the order within a step (the paper's Alg. 1:
architecture first), and the optimizers' unstated settings (DARTS').

Synopsis:

  net = SearchNetwork(C=16, layers=8, primitives=ops.DARTS_PRIMITIVES[1:],
                      single_path=True)
  method = rome.make(net, steps_per_epoch=390, num_samples=7)
  state = method.init(jax.random.key(0), images[:1])
  state, metrics = jax.jit(method.step)(state, {'train': bw, 'val': ba})
  print(method.derive(state))
"""

import functools
from typing import Callable, Optional

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

TOPOLOGIES = ('none', 'v1', 'v2')
REDUCTIONS = ('sum', 'mean')
# GDAS' temperature range (AutoDL-Projects); ROME's paper gives none.
TAU_MAX, TAU_MIN = 10., 0.1

SampleFn = Callable[..., dict]


def linear_tau(tau_max: float, tau_min: float, epochs: int,
               steps_per_epoch: int, warmup_epochs: int = 0
               ) -> optax.Schedule:
  """GDAS' temperature: linear in the epoch from `tau_max` to `tau_min`.

  `tau = tau_max - (tau_max - tau_min) * max(epoch - warmup, 0) /
  (epochs - 1)`, constant within an epoch (GAEA's EGDAS holds tau_max over
  `warmup_epochs` and keeps the divisor, so it ends above tau_min); a traced
  function of the step (no recompilation).
  """
  def schedule(step):
    epoch = jnp.minimum(step // steps_per_epoch, epochs - 1)
    done = jnp.maximum(epoch - warmup_epochs, 0)
    return tau_max - (tau_max - tau_min) * done / max(epochs - 1, 1)
  return schedule


def accumulate(grad_fn, keys: jax.Array, batch_stats, zeros,
               kernel_grads: bool = True):
  """Sums the gradients of `grad_fn` over `keys`, one key at a time.

  Args:
    grad_fn: `(key, batch_stats) -> ((loss, (batch_stats, logits)), grads)`.
    keys: [K] PRNG keys, one per sample.
    batch_stats: BN running statistics, threaded through the samples in
      order (each forward updates them, as K PyTorch forwards would).
    zeros: zeros shaped like the gradients.
    kernel_grads: whether `grad_fn` needs the convolutions' kernel gradients
      (False when it differentiates the architecture only). The loop body's
      convolutions use `jaxnas.ops.conv2d`'s loop-friendly gradients.

  Returns:
    (summed gradients, batch_stats after the K samples, [K] losses,
    [K, B, classes] logits). A `lax.scan`: the K samples' activations are not
    held at once.
  """
  def body(carry, key):
    g_sum, stats = carry
    with ops.convolutions_in_loop_body(kernel_grads):
      (loss, (stats, logits)), g = grad_fn(key, stats)
    return (jax.tree.map(jnp.add, g_sum, g), stats), (loss, logits)

  (g_sum, stats), (losses, logits) = jax.lax.scan(
      body, (zeros, batch_stats), keys)
  return g_sum, stats, losses, logits


def _sample_loss(params, arch, batch_stats, batch, key, tau, *, net,
                 sample_fn):
  weights_fn = lambda a: sample_fn(key, a, tau)
  return base.classification_loss(params, arch, batch_stats, batch, net=net,
                                  weights_fn=weights_fn)


def _mean_accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels[None])


def _sample_keys(state: base.SearchState, arch_samples: int,
                 weight_samples: int, per_device_samples: bool):
  """The step's sample keys: {'arch': [K_arch], 'weights': [K_weights]}."""
  key = jax.random.fold_in(state.key, state.step)
  if per_device_samples:
    key = parallel.device_key(key)
  k_arch, k_weights = jax.random.split(key)
  return {'arch': jax.random.split(k_arch, arch_samples),
          'weights': jax.random.split(k_weights, weight_samples)}


def _updates(*, w_tx, a_tx, arch_samples: int, weight_samples: int,
             weight_reduce: str):
  """The two updates from their phases' summed gradients, each
  `(state, g_sum) -> (state, grad_norm)` (the architecture's norm is 0)."""
  if weight_reduce not in REDUCTIONS:
    raise ValueError(f'weight_reduce must be one of {REDUCTIONS}, got '
                     f'{weight_reduce!r}')

  def arch(state, g_sum):
    g = jax.tree.map(lambda x: x / arch_samples, g_sum)
    return base.apply_arch_grads(state, g, a_tx=a_tx), jnp.zeros(())

  def weights(state, g_sum):
    if weight_reduce == 'mean':
      g_sum = jax.tree.map(lambda x: x / weight_samples, g_sum)
    return base.apply_weight_grads(state, g_sum, w_tx=w_tx)

  return {'arch': arch, 'weights': weights}


def _finish(state: base.SearchState, metrics: dict, tau, lr_schedule):
  """The step's last part: tau and lr metrics, averaged over devices."""
  metrics['tau'] = tau
  if lr_schedule is not None:
    metrics['lr'] = lr_schedule(state.step)
  return state.replace(step=state.step + 1), parallel.pmean(metrics)


def search_step(state: base.SearchState, batch, *, net: nn.Module,
                sample_fn: SampleFn, w_tx, a_tx, tau_fn: optax.Schedule,
                lr_schedule: Optional[optax.Schedule] = None,
                arch_samples: int = 7, weight_samples: int = 7,
                weight_reduce: str = 'sum', per_device_samples: bool = False,
                weights_first: bool = False):
  """One ROME / GDAS step: K-sample architecture and weight updates.

  Args:
    state: current state; `arch` is {'ops': ..., 'edges': ...}.
    batch: {'train': weights' batch, 'val': architecture's batch}.
    net: a single-path search network.
    sample_fn: `(key, arch, tau) -> {cell type: SinglePath}`.
    w_tx, a_tx: optax transformations of the weights and the architecture.
    tau_fn: step -> temperature.
    lr_schedule: reported as the `lr` metric.
    arch_samples: K of the architecture update (gradients averaged).
    weight_samples: K of the weight update.
    weight_reduce: 'sum' (the paper's Eq. 12) or 'mean' of the K weight
      gradients.
    per_device_samples: draw other samples on each device (more samples per
      step); by default every device draws the same ones, so N devices give
      the single-device step on the whole batch. With per-device samples the
      devices run different branches: keep SyncBN off (its collectives would
      sit inside those branches).
    weights_first: weight update before the architecture update (GDAS'
      order); ROME's Alg. 1 updates the architecture first.

  Returns:
    (state with `step + 1`, metrics averaged over devices).
  """
  updates = _updates(w_tx=w_tx, a_tx=a_tx, arch_samples=arch_samples,
                     weight_samples=weight_samples,
                     weight_reduce=weight_reduce)
  keys = _sample_keys(state, arch_samples, weight_samples,
                      per_device_samples)
  tau = tau_fn(state.step)
  loss = functools.partial(_sample_loss, net=net, sample_fn=sample_fn)
  metrics = {}

  def arch_update(state):
    grad_fn = lambda k, stats: jax.value_and_grad(
        loss, argnums=1, has_aux=True)(state.params, state.arch, stats,
                                       batch['val'], k, tau)
    g, stats, losses, logits = accumulate(
        grad_fn, keys['arch'], state.batch_stats,
        jax.tree.map(jnp.zeros_like, state.arch), kernel_grads=False)
    state, _ = updates['arch'](state, g)
    metrics.update(val_loss=jnp.mean(losses),
                   val_acc=_mean_accuracy(logits, batch['val']['label']))
    return state.replace(batch_stats=base.sync_batch_stats(stats))

  def weight_update(state):
    grad_fn = lambda k, stats: jax.value_and_grad(
        loss, argnums=0, has_aux=True)(state.params, state.arch, stats,
                                       batch['train'], k, tau)
    g, stats, losses, logits = accumulate(
        grad_fn, keys['weights'], state.batch_stats,
        jax.tree.map(jnp.zeros_like, state.params))
    state, grad_norm = updates['weights'](state, g)
    metrics.update(train_loss=jnp.mean(losses),
                   train_acc=_mean_accuracy(logits, batch['train']['label']),
                   grad_norm=grad_norm)
    return state.replace(batch_stats=base.sync_batch_stats(stats))

  for update in ((weight_update, arch_update) if weights_first else
                 (arch_update, weight_update)):
    state = update(state)
  return _finish(state, metrics, tau, lr_schedule)


def shared_search_step(state: base.SearchState, batch, *, net: nn.Module,
                       sample_fn: SampleFn, w_tx, a_tx,
                       tau_fn: optax.Schedule,
                       lr_schedule: Optional[optax.Schedule] = None,
                       arch_samples: int = 7, weight_samples: int = 7,
                       weight_reduce: str = 'sum',
                       per_device_samples: bool = False,
                       weights_first: bool = False):
  """`search_step` with one compiled forward/backward pass for both updates.

  The architecture update's K samples and the weight update's run as
  `arch_samples + weight_samples` iterations of one loop, whose body takes
  the gradients with respect to weights and architecture, adds its phase's
  to that phase's sum, and at a phase's last sample applies its update. So
  XLA compiles the single-path network's forward and backward once instead
  of twice (`search_step` runs two `accumulate` loops). The architecture's
  samples skip the convolutions' kernel gradients, as there. The same keys,
  batches, updates and metrics as `search_step`. The BN running statistics
  are averaged over devices after every sample instead of after each phase:
  the same values, as the running average is linear in them. Both batches
  must have one shape. Arguments: see `search_step`.
  """
  updates = _updates(w_tx=w_tx, a_tx=a_tx, arch_samples=arch_samples,
                     weight_samples=weight_samples,
                     weight_reduce=weight_reduce)
  darts.require_one_shape(batch, 'ROME / GDAS')
  keys = _sample_keys(state, arch_samples, weight_samples,
                      per_device_samples)
  tau = tau_fn(state.step)
  loss = functools.partial(_sample_loss, net=net, sample_fn=sample_fn)
  grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

  # The phases in the order they run (ROME's Alg. 1: the architecture's
  # first), their samples one after the other.
  order = ('weights', 'arch') if weights_first else ('arch', 'weights')
  arch_phase = order.index('arch')
  counts = [len(keys[p]) for p in order]
  total = sum(counts)
  keys = jnp.concatenate([keys[p] for p in order])
  phase_batches = {'arch': batch['val'], 'weights': batch['train']}
  stacked = jax.tree.map(lambda *b: jnp.stack(b),
                         *[phase_batches[p] for p in order])

  def sample(i, carry):
    state, g_params, g_arch, out, grad_norm = carry
    phase = (i >= counts[0]).astype(jnp.int32)
    is_arch = phase == arch_phase
    phase_batch = jax.tree.map(lambda x: x[phase], stacked)
    with ops.convolutions_in_loop_body(kernel_grads=~is_arch):
      (loss_value, (stats, logits)), (gp, ga) = grad_fn(
          state.params, state.arch, state.batch_stats, phase_batch, keys[i],
          tau)
    add = lambda where: (lambda s, g: s + jnp.where(where, g, 0.))
    g_params = jax.tree.map(add(~is_arch), g_params, gp)
    g_arch = jax.tree.map(add(is_arch), g_arch, ga)
    state = state.replace(batch_stats=base.sync_batch_stats(stats))
    acc = base.accuracy(logits, phase_batch['label'])
    out = out.at[i].set(jnp.stack([loss_value, acc]))
    # At a phase's last sample, its update: 0 none, 1 arch, 2 weights.
    last = (i == counts[0] - 1) | (i == total - 1)
    which = jnp.where(last, jnp.where(is_arch, 1, 2), 0)
    state, norm = jax.lax.switch(
        which, (lambda s: (s, jnp.zeros(())),
                lambda s: updates['arch'](s, g_arch),
                lambda s: updates['weights'](s, g_params)), state)
    return state, g_params, g_arch, out, jnp.where(which == 2, norm,
                                                   grad_norm)

  zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
  state, _, _, out, grad_norm = jax.lax.fori_loop(
      0, total, sample, (state, zeros(state.params), zeros(state.arch),
                         jnp.zeros((total, 2), jnp.result_type(float)),
                         jnp.zeros((), jnp.result_type(float))))
  means = [jnp.mean(out[:counts[0]], 0), jnp.mean(out[counts[0]:], 0)]
  (val_loss, val_acc), (train_loss, train_acc) = (
      means[arch_phase], means[1 - arch_phase])
  return _finish(state, {'val_loss': val_loss, 'val_acc': val_acc,
                         'train_loss': train_loss, 'train_acc': train_acc,
                         'grad_norm': grad_norm}, tau, lr_schedule)


def init(key: jax.Array, sample_images: jax.Array, *, net: nn.Module, w_tx,
         a_tx, topology: str, init_scale: float,
         arch_param: arch_lib.Parametrisation = arch_lib.LOGITS
         ) -> base.SearchState:
  """Weights; op variables by `arch_param` (logits `init_scale * N(0, 1)`)
  and topology logits `init_scale * N(0, 1)`."""
  k_params, k_ops, k_edges, k_state = jax.random.split(key, 4)
  arch = {'ops': arch_param.init(k_ops, net.arch_shapes(), init_scale)}
  if topology != 'none':
    shape = arch_lib.topology_shape(net.steps, topology)
    arch['edges'] = arch_lib.init_logits(
        k_edges, {t: shape for t in arch['ops']}, init_scale)
  params, batch_stats = base.init_variables(
      net, k_params, sample_images,
      arch_lib.mode_single_path(arch, steps=getattr(net, 'steps', 4),
                                topology=topology))
  return base.SearchState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      arch=arch, w_opt_state=w_tx.init(params), a_opt_state=a_tx.init(arch),
      key=k_state)


def mixing(arch, arch_param: arch_lib.Parametrisation = arch_lib.LOGITS
           ) -> dict:
  """Per cell type, [E, K] op probabilities (for pictures and logs)."""
  return arch_param.mixing(arch['ops'])


def derive(state: base.SearchState, *, derive_fn: base.DeriveFn,
           steps: int, topology: str,
           arch_param: arch_lib.Parametrisation = arch_lib.LOGITS):
  """The genotype: ops by their probabilities; with a topology, each node's
  two edges by the topology's (not by the ops', as DARTS)."""
  arch = jax.tree.map(np.asarray, jax.device_get(state.arch))
  weights = jax.tree.map(np.asarray, mixing(arch, arch_param))
  if topology == 'none':
    return derive_fn(weights)
  edge_scores = {t: np.asarray(arch_lib.edge_probabilities(
      b, steps, topology)) for t, b in arch['edges'].items()}
  return derive_fn(weights, edge_scores=edge_scores)


def make(net: nn.Module, *, steps_per_epoch: int, epochs: int = 50,
         topology: str = 'v2', num_samples: int = 7,
         weight_samples: Optional[int] = None, weight_reduce: str = 'sum',
         lr: float = 0.05, lr_min: float = 0.001, momentum: float = 0.9,
         weight_decay: float = 3e-4, grad_clip: float = 5.,
         nesterov: bool = False, arch_lr: float = 3e-4,
         arch_betas=(0.5, 0.999), arch_weight_decay: float = 1e-3,
         arch_init_scale: float = arch_lib.DARTS_INIT_SCALE,
         tau_max: float = TAU_MAX, tau_min: float = TAU_MIN,
         zero_terms: bool = False, per_device_samples: bool = False,
         weights_first: bool = False, warmup_epochs: int = 0,
         schedule_epochs: Optional[int] = None, schedule_offset: int = 1,
         arch_param: arch_lib.Parametrisation = arch_lib.LOGITS,
         a_tx: Optional[optax.GradientTransformation] = None,
         share_backward: Optional[bool] = None,
         derive_fn: Optional[base.DeriveFn] = None) -> base.Method:
  """ROME (defaults: the paper's CIFAR search) or, with topology='none' and
  num_samples=1, GDAS.

  Args:
    net: a single-path search network (`single_path=True`); for ROME 'none'
      should not be among its ops (the paper removes it).
    steps_per_epoch: weight-split batches per epoch.
    epochs: search epochs (schedules' length).
    topology: 'v2' (per-edge logits, Gumbel-Top2), 'v1' (per-pair logits) or
      'none' (every edge runs: GDAS, and NAS-Bench-201's fixed topology).
    num_samples: K of the architecture update, and of the weight update
      unless `weight_samples` is given.
    weight_reduce: 'sum' (Eq. 12) or 'mean' of the K weight gradients.
    lr, lr_min, momentum, weight_decay, grad_clip, nesterov: weight SGD,
      cosine from `lr` to `lr_min` stepped per epoch (the paper gives only
      lr 0.05; the rest are DARTS').
    arch_lr, arch_betas, arch_weight_decay: Adam of all architecture logits
      (the paper gives lr 3e-4; betas and decay are DARTS').
    arch_init_scale: logits start at `arch_init_scale * N(0, 1)`.
    tau_max, tau_min: the linear temperature schedule (`linear_tau`).
    zero_terms: see `jaxnas.arch.sample_single_path` (GDAS on NB-201).
    per_device_samples, weights_first: see `search_step`.
    warmup_epochs: tau stays at `tau_max` this long (see `linear_tau`); the
      architecture optimizer should then hold still too (GAEA's EGDAS: an
      `a_tx` whose rate is 0 in those epochs).
    schedule_epochs, schedule_offset: see `optim.search_optimizers`.
    arch_param: how the op variables become probabilities (logits, or
      GAEA's simplex points, sampled from their log).
    a_tx: the architecture optimizer instead of Adam.
    share_backward: True: `shared_search_step` (both updates' samples in
      one loop: one compiled forward/backward); False: `search_step`; None:
      as `jaxnas.methods.darts.choose_step` decides (the shared step on CPU
      when both batches have one shape).
    derive_fn: weights (and `edge_scores=`) -> genotype; default the space's
      rule (`base.space_derive`).

  Returns:
    The method's pure functions.
  """
  if topology not in TOPOLOGIES:
    raise ValueError(f'topology must be one of {TOPOLOGIES}, got '
                     f'{topology!r}')
  if not getattr(net, 'single_path', False):
    raise ValueError('ROME / GDAS need a single-path network: build it with '
                     'single_path=True')
  if topology != 'none' and not hasattr(net, 'steps'):
    raise ValueError('topology sampling needs the DARTS space (nodes with '
                     'several candidate inputs); use topology="none" on '
                     'NAS-Bench-201, whose cell topology is fixed')
  if per_device_samples and getattr(net, 'bn_axis_name', None):
    raise ValueError('per_device_samples runs different ops on different '
                     'devices: SyncBN (bn_axis_name) cannot synchronise them; '
                     'build the network with bn_axis_name=None')
  for name, k in (('num_samples', num_samples),
                  ('weight_samples', weight_samples)):
    if k is not None and (not isinstance(k, int) or k < 1):
      raise ValueError(f'{name} must be a positive integer, got {k!r}')
  steps = getattr(net, 'steps', 4)
  schedule, w_tx, a_tx = optim.search_optimizers(
      lr=lr, lr_min=lr_min, epochs=epochs, steps_per_epoch=steps_per_epoch,
      momentum=momentum, weight_decay=weight_decay, grad_clip=grad_clip,
      nesterov=nesterov, arch_lr=arch_lr, arch_betas=arch_betas,
      arch_weight_decay=arch_weight_decay, schedule_epochs=schedule_epochs,
      schedule_offset=schedule_offset, a_tx=a_tx)

  def sample_fn(key, arch, tau):
    arch = {**arch, 'ops': jax.tree.map(arch_param.logits, arch['ops'])}
    return arch_lib.sample_single_path(key, arch, tau, steps=steps,
                                       topology=topology,
                                       zero_terms=zero_terms)

  mode_fn = functools.partial(arch_lib.mode_single_path, steps=steps,
                              topology=topology)
  step_args = dict(
      net=net, sample_fn=sample_fn, w_tx=w_tx, a_tx=a_tx,
      tau_fn=linear_tau(tau_max, tau_min, epochs, steps_per_epoch,
                        warmup_epochs),
      lr_schedule=schedule, arch_samples=num_samples,
      weight_samples=weight_samples or num_samples,
      weight_reduce=weight_reduce, per_device_samples=per_device_samples,
      weights_first=weights_first)
  return base.Method(
      init=functools.partial(init, net=net, w_tx=w_tx, a_tx=a_tx,
                             topology=topology, init_scale=arch_init_scale,
                             arch_param=arch_param),
      step=darts.choose_step(
          share_backward, 'first',
          shared=functools.partial(shared_search_step, **step_args),
          two_phase=functools.partial(search_step, **step_args)),
      eval_step=functools.partial(base.eval_step, net=net,
                                  weights_fn=mode_fn),
      derive=functools.partial(
          derive, derive_fn=derive_fn or base.space_derive(net), steps=steps,
          topology=topology, arch_param=arch_param),
      mixing=functools.partial(mixing, arch_param=arch_param))

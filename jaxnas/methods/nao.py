"""NAO-V2's one-shot supernet: its training step and pool scoring, pure.

renqianluo/NAO_pytorch `NAO_V2/train_search.py` (../shared/methods/nao_v2.md):

* `step`: one SGD step of the supernet (`jaxnas.spaces.nao_supernet`) on the
  architecture in `batch['arch']` (sampled on the host in proportion to its
  stand-alone size, `jaxnas.spaces.nao.sample_index`), with drop path at the
  phase's progress `(step % phase_steps + 1) / phase_steps`: the reference's
  step counter restarts every supernet phase. The architecture is an array
  argument, so a new architecture does not recompile.
* `pool_correct`: each architecture's correct count on its own batch of
  validation images, BNs as `child_valid` has them (batch statistics but
  for the stem's and the reductions' `fac_k`, see `nao_supernet`), for a
  whole pool in one call: `lax.map` over architectures (only the chosen ops
  run), optionally vmapped in chunks (`chunk`: on accelerators, where a
  vmapped switch computes all ops but in parallel).

The state is `jaxnas.methods.base.SearchState` with an empty `arch` (NAO has
no architecture parameters: its controller is `jaxnas.epd`, trained between
phases on the pool's scores); its `batch_stats` are the running averages of
the few BNs that keep them. Both run under `jit`, `pmap` and `shard_map` (`jaxnas.parallel`);
under `pmap` the pool's architectures are split over the devices, each
scoring its own whole (BN statistics must not mix architectures, so
`pool_correct` uses `net` without a BN axis).
"""

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import optax

from jaxnas import parallel
from jaxnas.methods import base
from jaxnas.spaces import nao_supernet


def init(key: jax.Array, image_shape, *, net: nao_supernet.NASWSNetwork,
         w_tx: optax.GradientTransformation) -> base.SearchState:
  """A fresh state: Kaiming-normal weights (`nao_supernet.init`)."""
  init_key, key = jax.random.split(key)
  params, batch_stats = nao_supernet.init(net, init_key, image_shape)
  return base.SearchState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=batch_stats, arch={},
                          w_opt_state=w_tx.init(params), a_opt_state=(),
                          key=key)


def step(state: base.SearchState, batch, *, net: nn.Module,
         w_tx: optax.GradientTransformation, phase_steps: int,
         schedule: Optional[optax.Schedule] = None):
  """One supernet step on `batch` = {'image', 'label', 'arch'}.

  `arch` is [2, nodes, 4], or [B, 2, nodes, 4] with every row the same (the
  form a data-parallel batch takes: it shards over devices with the images).

  Cross-entropy (no auxiliary head: `child_use_aux_head` is off in the
  search), gradients averaged over devices, `w_tx` (SGD 0.025 cosine,
  momentum 0.9, wd 3e-4, clip 5). Momentum and weight decay act on every
  weight each step, also those the architecture did not use (their gradient
  is zero): PyTorch 1.x's behaviour once a weight has had a gradient.
  """
  progress = ((state.step % phase_steps) + 1).astype(jnp.float32) / phase_steps
  key = parallel.device_key(jax.random.fold_in(state.key, state.step))

  def loss_fn(params, arch, batch_stats, b):
    del arch
    sampled = b['arch'] if b['arch'].ndim == 3 else b['arch'][0]
    logits, updates = net.apply(
        {'params': params, 'batch_stats': batch_stats}, b['image'], sampled,
        train=True, progress=progress, rngs={'drop_path': key},
        mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, b['label']).mean()
    return loss, (updates['batch_stats'], logits)

  state, metrics = base.weight_step(state, batch, loss_fn=loss_fn, w_tx=w_tx)
  metrics = {k: parallel.pmean(v) for k, v in metrics.items()}
  if schedule is not None:
    metrics['lr'] = schedule(state.step)
  return state.replace(step=state.step + 1), metrics


def pool_correct(variables, images: jax.Array, labels: jax.Array,
                 archs: jax.Array, indices: jax.Array, *,
                 net: nao_supernet.NASWSNetwork, chunk: int = 1
                 ) -> jax.Array:
  """Correct predictions of each architecture on its batch.

  Args:
    variables: {'params', 'batch_stats'} of the supernet (`state_variables`).
    images, labels: the validation split [N, H, W, C], [N].
    archs: [P, 2, nodes, 4] ints.
    indices: [P, n] rows of the split each architecture is scored on.
    net: the supernet (its BN axis is dropped: each architecture's batch
      is normalised by its own statistics).
    chunk: architectures vmapped together (1: one at a time).

  Returns:
    [P] int32 counts (of n each).
  """
  net = net.clone(bn_axis_name=None)

  def one(args):
    arch, idx = args
    logits = net.apply(variables, images[idx], arch, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == labels[idx]).astype(jnp.int32)

  return lax.map(one, (archs, indices),
                 batch_size=chunk if chunk > 1 else None)


def state_variables(state: base.SearchState):
  """The supernet's variables in `state`, as `pool_correct` takes them."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


def make(net: nao_supernet.NASWSNetwork, w_tx: optax.GradientTransformation,
         *, phase_steps: int, schedule: Optional[optax.Schedule] = None):
  """(init, step, pool_correct) bound to `net` and `w_tx`."""
  if phase_steps < 1:
    raise ValueError(f'phase_steps must be >= 1, got {phase_steps}')
  return (functools.partial(init, net=net, w_tx=w_tx),
          functools.partial(step, net=net, w_tx=w_tx, phase_steps=phase_steps,
                            schedule=schedule),
          functools.partial(pool_correct, net=net))

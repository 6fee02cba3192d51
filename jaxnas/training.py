"""Training a found architecture from scratch: pure, jittable steps.

The evaluation stage of every paper in this family (quark0/darts
`cnn/train.py`, `cnn/train_imagenet.py`): plain supervised training of a
network with no architecture parameters. The network is any module called as
`net.apply(variables, images, train, drop_path=rate)` returning
`(logits, aux_logits)` (`jaxnas.spaces.darts_eval.EvalNetwork`,
`jaxnas.spaces.nb201.InferNetwork`).

* Loss: cross-entropy with optional label smoothing (ImageNet: 0.1, the
  reference's CrossEntropyLabelSmooth, i.e. `optax.smooth_labels`), plus
  `aux_weight` times the auxiliary head's loss when the network returns one.
* Drop path rate at step t: `drop_path_prob * epoch / epochs` with
  epoch = t // steps_per_epoch (the reference sets it at each epoch's start,
  0 in epoch 0); computed inside the step, so no recompilation.
* Gradients and BatchNorm running statistics are averaged over devices where
  the step is mapped (`jaxnas.parallel`); each device draws its own drop-path
  masks from the state's key folded with the step and the device index.

Synopsis:

  trainer = training.make(net, tx, steps_per_epoch=500, epochs=600,
                          drop_path_prob=0.2, aux_weight=0.4)
  state = trainer.init(key, (1, 32, 32, 3))
  state, metrics = jax.jit(trainer.step)(state, batch)
  sums = jax.jit(trainer.eval_step)(state, batch)   # loss_sum, correct, ...
"""

from typing import Any, Callable, Mapping, NamedTuple, Sequence, Tuple

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxnas import parallel
from jaxnas.spaces import darts_eval

PyTree = Any
Batch = Mapping[str, jax.Array]


class TrainState(struct.PyTreeNode):
  """Step count, weights, BatchNorm statistics, optimizer state, PRNG key."""
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  key: jax.Array


class Trainer(NamedTuple):
  """`init(key, image_shape) -> TrainState`, `step(state, batch) ->
  (state, metrics)` and `eval_step(state, batch) -> sums`, the last two
  pure and jittable."""
  init: Callable[..., TrainState]
  step: Callable[..., Tuple[TrainState, Mapping[str, jax.Array]]]
  eval_step: Callable[..., Mapping[str, jax.Array]]
  drop_path_rate: Callable[[jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.) -> jax.Array:
  """Per-example cross-entropy against (optionally smoothed) labels."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(
      jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
      label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def eval_sums(logits: jax.Array, labels: jax.Array, top5: bool = True
              ) -> Mapping[str, jax.Array]:
  """Sums over a batch's real rows (`label >= 0`; -1 marks padding):
  `loss_sum` (cross-entropy), `correct` (top-1), `correct5` (top-5, with
  `top5`), `count`; summed over devices where the step is mapped."""
  valid = labels >= 0
  safe = jnp.maximum(labels, 0)
  losses = cross_entropy(logits, safe)
  sums = {'loss_sum': jnp.sum(jnp.where(valid, losses, 0.)),
          'correct': jnp.sum(valid & (jnp.argmax(logits, -1) == labels)),
          'count': jnp.sum(valid)}
  if top5:
    k = min(5, logits.shape[-1])
    hit = jnp.any(jax.lax.top_k(logits, k)[1] == safe[:, None], axis=-1)
    sums['correct5'] = jnp.sum(valid & hit)
  return parallel.psum(sums)


def make(net: nn.Module, tx: optax.GradientTransformation, *,
         steps_per_epoch: int, epochs: int, drop_path_prob: float = 0.,
         aux_weight: float = 0.4, label_smoothing: float = 0.) -> Trainer:
  """The training functions of `net` under optimizer `tx`.

  Args:
    net: the network (see the module docstring).
    tx: optax transformation of the weights (e.g. `jaxnas.optim.torch_sgd`
      with a cosine schedule and gradient clipping).
    steps_per_epoch: steps in one epoch (for the drop-path ramp).
    epochs: epochs of the whole run (for the drop-path ramp).
    drop_path_prob: the final drop-path rate (DARTS 0.2; P-DARTS, GAEA 0.3).
    aux_weight: weight of the auxiliary head's loss (0.4).
    label_smoothing: ImageNet 0.1.
  """
  if steps_per_epoch < 1 or epochs < 1:
    raise ValueError(f'steps_per_epoch and epochs must be >= 1, got '
                     f'{steps_per_epoch}, {epochs}')
  if not 0. <= drop_path_prob < 1.:
    raise ValueError(f'drop_path_prob must be in [0, 1), got {drop_path_prob}')

  def drop_path_rate(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    return drop_path_prob * epoch.astype(jnp.float32) / epochs

  def init(key: jax.Array, image_shape: Sequence[int]) -> TrainState:
    init_key, key = jax.random.split(key)
    params, batch_stats = darts_eval.init(net, init_key, image_shape)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=batch_stats, opt_state=tx.init(params),
                      key=key)

  def loss_fn(params, batch_stats, batch, key, rate):
    (logits, aux), updates = net.apply(
        {'params': params, 'batch_stats': batch_stats}, batch['image'],
        train=True, drop_path=rate if drop_path_prob else None,
        rngs={'drop_path': key}, mutable=['batch_stats'])
    loss = cross_entropy(logits, batch['label'], label_smoothing).mean()
    total = loss
    if aux is not None and aux_weight:
      total = total + aux_weight * cross_entropy(
          aux, batch['label'], label_smoothing).mean()
    return total, (updates['batch_stats'], logits, loss)

  def step(state: TrainState, batch: Batch):
    key = parallel.device_key(jax.random.fold_in(state.key, state.step))
    rate = drop_path_rate(state.step)
    (total, (stats, logits, loss)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params, state.batch_stats, batch, key,
                               rate)
    grads = parallel.pmean(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = parallel.pmean({
        'train_loss': loss, 'train_total_loss': total,
        'train_acc': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
        'grad_norm': optax.tree.norm(grads), 'drop_path': rate})
    return state.replace(step=state.step + 1,
                         params=optax.apply_updates(state.params, updates),
                         batch_stats=parallel.pmean(stats),
                         opt_state=opt_state), metrics

  def eval_step(state: TrainState, batch: Batch):
    logits, _ = net.apply(
        {'params': state.params, 'batch_stats': state.batch_stats},
        batch['image'], train=False)
    return eval_sums(logits, batch['label'])

  return Trainer(init, step, eval_step, drop_path_rate)

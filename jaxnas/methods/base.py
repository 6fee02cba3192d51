"""Pieces every search method shares: the state, the loss, the weight step.

A method is a few pure functions over a `SearchState` (optax style): weights
(`params`, `batch_stats`) and architecture (`arch`) are separate pytrees with
separate optimizer states; optimizers and the network are bound with
`functools.partial`, never stored in the state, so the state is plain data that
checkpoints, replicates and donates cleanly.

Batches are dicts `{'image': [B, H, W, C] float, 'label': [B] int}`; a search
step receives `{'train': batch, 'val': batch}`.

The only cross-device code is `parallel.pmean` / `psum` over `parallel.AXIS`
(and SyncBN's, in the network), the identity when that axis is not bound, so
every step here runs unchanged under `jax.jit`, `jax.pmap(axis_name=AXIS)` and
`jax.shard_map(..., check_vma=False)` (see `jaxnas.parallel`).
"""

import functools
from typing import Any, Callable, Mapping, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxnas import arch as arch_lib
from jaxnas import ops
from jaxnas import parallel
from jaxnas import training

PyTree = Any
Batch = Mapping[str, jax.Array]
WeightsFn = Callable[[PyTree], Mapping[str, jax.Array]]
# Mixing weights ({cell type: [edges, ops]} numpy) -> a discrete genotype.
DeriveFn = Callable[[Mapping[str, Any]], Any]


class SearchState(struct.PyTreeNode):
  """Everything a search carries from step to step.

  Attributes:
    step: number of completed search steps.
    params: network weights.
    batch_stats: BatchNorm running statistics.
    arch: architecture parameters (e.g. {'normal': (14, 8), 'reduce': ...}).
    w_opt_state: optimizer state of `params`.
    a_opt_state: optimizer state of `arch`.
    key: PRNG key for methods that sample (unused by DARTS).
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  arch: PyTree
  w_opt_state: optax.OptState
  a_opt_state: optax.OptState
  key: jax.Array


class Method(NamedTuple):
  """A search method as pure functions (all jittable except `init`, `derive`).

  Attributes:
    init: `(key, sample_images) -> SearchState`.
    step: `(state, {'train': batch, 'val': batch}) -> (state, metrics)`.
    eval_step: `(state, batch) -> metrics` with running BN statistics.
    derive: `(state) -> Genotype`.
    mixing: `(arch) -> {cell type: [edges, ops]}` op weights to draw and log
      (DARTS: the softmax of the alphas).
  """
  init: Callable[..., SearchState]
  step: Callable[..., Tuple[SearchState, Mapping[str, jax.Array]]]
  eval_step: Callable[..., Mapping[str, jax.Array]]
  derive: Callable[..., Any]
  mixing: Callable[[PyTree], Mapping[str, jax.Array]] = (
      arch_lib.softmax_weights)


def classification_loss(params: PyTree, arch: PyTree, batch_stats: PyTree,
                        batch: Batch, *, net: nn.Module,
                        weights_fn: WeightsFn):
  """Mean cross-entropy of the search network in training mode.

  Returns `(loss, (new_batch_stats, logits))`, the form `jaxnas.hypergrad`
  expects. `weights_fn` maps the architecture pytree to mixing weights.
  Optional batch entries: 'net_kwargs', more keyword arguments of the
  network (P-DARTS' `skip_dropout` rate), and 'rngs', its PRNG keys.
  """
  logits, updates = net.apply(
      {'params': params, 'batch_stats': batch_stats}, batch['image'],
      weights_fn(arch), train=True, mutable=['batch_stats'],
      rngs=batch.get('rngs'), **batch.get('net_kwargs', {}))
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['label']).mean()
  return loss, (updates['batch_stats'], logits)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def sync_batch_stats(batch_stats: PyTree) -> PyTree:
  """Averages BN running statistics over devices, keeping them replicated.

  Whether the *batch* statistics of the forward pass are synchronised
  (SyncBN) is the network's choice: `bn_axis_name=parallel.AXIS`. Without it
  each device normalises by its own part of the batch, and only the running
  statistics are averaged here.
  """
  return parallel.pmean(batch_stats)


def weight_step(state: SearchState, batch: Batch, *, loss_fn, w_tx):
  """One optimizer step on the weights; the architecture is left untouched.

  Args:
    state: current state.
    batch: the weights' batch.
    loss_fn: `(params, arch, batch_stats, batch) -> (loss, (stats, logits))`.
    w_tx: optax transformation of the weights.

  Returns:
    (new state with `step` unchanged, metrics).
  """
  (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.arch, state.batch_stats, batch)
  state, grad_norm = apply_weight_grads(state, grads, w_tx=w_tx)
  metrics = {'train_loss': loss,
             'train_acc': accuracy(logits, batch['label']),
             'grad_norm': grad_norm}
  return state.replace(batch_stats=sync_batch_stats(stats)), metrics


def apply_weight_grads(state: SearchState, grads: PyTree, *, w_tx):
  """Averages weight gradients across devices and applies `w_tx`.

  Returns (new state, global norm of the averaged gradients).
  """
  grads = parallel.pmean(grads)
  updates, w_opt_state = w_tx.update(grads, state.w_opt_state, state.params)
  return state.replace(params=optax.apply_updates(state.params, updates),
                       w_opt_state=w_opt_state), optax.tree.norm(grads)


def apply_arch_grads(state: SearchState, grads: PyTree, *,
                     a_tx) -> SearchState:
  """Averages arch gradients across devices and applies `a_tx`."""
  grads = parallel.pmean(grads)
  updates, a_opt_state = a_tx.update(grads, state.a_opt_state, state.arch)
  return state.replace(arch=optax.apply_updates(state.arch, updates),
                       a_opt_state=a_opt_state)


def eval_step(state: SearchState, batch: Batch, *, net: nn.Module,
              weights_fn: WeightsFn) -> Mapping[str, jax.Array]:
  """Loss and accuracy with BN running statistics (the reference's `infer`).

  Entries of `batch` with `label < 0` are padding and are not counted, so a
  split of any size can be evaluated in fixed-shape batches. Returns sums
  (`loss_sum`, `correct`, `count`), summed over devices when mapped.
  """
  logits = net.apply({'params': state.params, 'batch_stats': state.batch_stats},
                     batch['image'], weights_fn(state.arch), train=False)
  return training.eval_sums(logits, batch['label'], top5=False)


def init_variables(net: nn.Module, key: jax.Array, sample_images: jax.Array,
                   mixing: Mapping[str, jax.Array]) -> Tuple[PyTree, PyTree]:
  """Initialises (params, batch_stats) of `net` without running it
  (`jaxnas.ops.lazy_init`)."""
  abstract = jax.ShapeDtypeStruct(sample_images.shape, sample_images.dtype)
  variables = ops.lazy_init(net, key, abstract, mixing, train=False)
  return variables['params'], variables.get('batch_stats', {})


def space_derive(net: nn.Module, *, exclude: Tuple[str, ...] = ()
                 ) -> DeriveFn:
  """The derivation rule of `net`'s search space, as its reference has it.

  DARTS space: per node the top-2 incoming edges by their strongest non-'none'
  op (`jaxnas.spaces.genotype.derive`). NAS-Bench-201: per edge the argmax op
  over the ops not in `exclude` (AutoDL-Projects' `genotype()` excludes
  nothing, so 'none' can win an edge; GAEA excludes 'none').
  """
  # Imported here: the spaces import ops, which must not import methods.
  from jaxnas.spaces import genotype as genotype_lib  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import nb201  # pylint: disable=g-import-not-at-top
  if isinstance(net, nb201.SearchNetwork):
    if net.cell_ops is None:
      return functools.partial(nb201.derive, primitives=net.primitives,
                               exclude=exclude)
    # Per-edge op subsets (P-DARTS): spread each edge's weights over all
    # primitives, -1 where an op is off, so only the edge's own ops can win.
    primitives = tuple(net.primitives)
    rows = [[primitives.index(o) for o in e] for e in net.cell_ops]

    def derive_subsets(weights):
      w = np.asarray(weights['cell'] if isinstance(weights, Mapping)
                     else weights)
      full = -np.ones((len(rows), len(primitives)), w.dtype)
      for e, cols in enumerate(rows):
        full[e, cols] = w[e]
      return nb201.derive(full, primitives=primitives, exclude=exclude)
    return derive_subsets
  if exclude:
    raise ValueError('the DARTS rule always excludes "none"; exclude is for '
                     'NAS-Bench-201')
  edge_ops = {t: net.edge_ops(t) for t in ('normal', 'reduce')}
  return functools.partial(genotype_lib.derive, edge_ops=edge_ops,
                           steps=net.steps, multiplier=net.multiplier)

"""P-DARTS: progressive depth, op pruning, skip-connect dropout and cap.

P-DARTS (Chen et al., ICCV 2019; chenxin061/pdarts;
../shared/methods/pdarts.md) searches in stages of growing depth (5, 11, 17
cells); each stage trains a fresh network over the ops still switched on per
edge (8, then 5, then 3), and prunes the weakest ops by their softmax weight
after it. This module holds the stage-independent maths:

* `search_step`: first-order DARTS (architecture step on the validation
  batch, then weight step), no architecture step in the warm-up epochs, the
  alphas' gradient clipped (norm 5), and dropout after every stride-1
  skip-connect at the rate `dropout_rate` gives for the step's epoch,
  computed inside the step (a new rate never recompiles).
* `prune`: the switches after a stage, the reference's `get_min_k` /
  `get_min_k_no_zero` ('none' forced out at the last stage).
* `derive_final`: the genotype after the last stage, and the normal cell
  restricted to at most M skip-connects for M = 8 ... 0 (the reference's
  `delete_min_sk_prob` / `keep_1_on` / `keep_2_branches` loop).

Switches are [edges, len(primitives)] bool arrays over the full op list, as
the reference keeps them; `edge_ops` turns them into the network's per-edge
op subsets. The stage driver is `experiments/search.py` (method 'pdarts').

Synopsis:

  net = SearchNetwork(C=16, layers=5, normal_ops=edge_ops(sw_n, PRIMS), ...)
  method = pdarts.make(net, steps_per_epoch=260, epochs=25,
                       initial_dropout=0.1)
  state, metrics = jax.jit(method.step)(state, {'train': ..., 'val': ...})
"""

import functools
from typing import Dict, Mapping, Optional, Sequence, Tuple

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
from jaxnas.spaces import genotype as genotype_lib

# train_search.py: ops kept after each stage, cells added per stage.
NUM_TO_KEEP = (5, 3, 1)
ADD_LAYERS = (0, 6, 12)
# Skip dropout's initial rate per stage: the README's CIFAR-10 command
# (`--dropout_rate 0.1 0.4 0.7`; the paper and issue #29 say 0.0 for stage
# 1), and CIFAR-100's as secondary sources give them (unconfirmed).
DROPOUT_CIFAR10 = (0.1, 0.4, 0.7)
DROPOUT_CIFAR100 = (0.1, 0.2, 0.3)
# p = r * exp(-(epoch - warm-up) * DECAY) after the warm-up (scale_factor).
DECAY = 0.2
WARMUP_EPOCHS = 10               # eps_no_archs
SKIP = 'skip_connect'
NONE = 'none'


def dropout_rate(epoch, initial: float, *, epochs: int = 25,
                 warmup_epochs: int = WARMUP_EPOCHS, decay: float = DECAY):
  """The skip dropout rate of `epoch` (an int or a traced integer).

  Warm-up epochs: `initial * (epochs - epoch - 1) / epochs`; after them
  `initial * exp(-(epoch - warmup_epochs) * decay)` (train_search.py: the
  rate jumps back to `initial` when the architecture starts to learn).
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  warm = initial * (epochs - epoch - 1) / epochs
  after = initial * jnp.exp(-(epoch - warmup_epochs) * decay)
  return jnp.where(epoch < warmup_epochs, warm, after)


def edge_ops(switches: np.ndarray, primitives: Sequence[str]
             ) -> Tuple[Tuple[str, ...], ...]:
  """The per-edge op subsets switched on, in `primitives` order."""
  switches = np.asarray(switches, bool)
  if switches.shape[-1] != len(primitives):
    raise ValueError(f'switches have {switches.shape[-1]} columns for '
                     f'{len(primitives)} primitives')
  return tuple(tuple(p for p, on in zip(primitives, row) if on)
               for row in switches)


def full_weights(weights: Mapping[str, jax.Array],
                 switches: Mapping[str, np.ndarray]) -> Dict[str, jax.Array]:
  """[edges, ops on] weights spread over all ops (0 where switched off), so
  every stage's mixtures are drawn and logged over the same columns."""
  out = {}
  for t, w in weights.items():
    sw = np.asarray(switches[t], bool)
    rows, cols = np.nonzero(sw)
    out[t] = jnp.zeros(sw.shape, w.dtype).at[rows, cols].set(
        jnp.reshape(w, (-1,)))
  return out


def _min_k(w: np.ndarray, k: int) -> list:
  """get_min_k: k times the first argmin, each then set to 1."""
  w = np.array(w, np.float64)
  out = []
  for _ in range(k):
    i = int(np.argmin(w))
    out.append(i)
    w[i] = 1.
  return out


def _min_k_no_none(w: np.ndarray, on: Sequence[int], k: int,
                   none_index: Optional[int]) -> list:
  """get_min_k_no_zero: 'none' first if it is on, then the k-1 (or k)
  weakest of the others; indices into the ops switched on (`on`)."""
  if none_index is None or none_index not in on:
    return _min_k(w, k)
  pos = list(on).index(none_index)
  rest = [i for i in range(len(on)) if i != pos]
  return [pos] + [rest[i] for i in _min_k(np.asarray(w)[rest], k - 1)]


def prune(probs: np.ndarray, switches: np.ndarray, num_drop: int,
          primitives: Sequence[str], *, drop_none: bool) -> np.ndarray:
  """Switches off each edge's `num_drop` weakest ops.

  Args:
    probs: [edges, ops on] softmax weights of the stage's alphas.
    switches: [edges, len(primitives)] bool, the stage's switches.
    num_drop: ops to switch off per edge.
    primitives: the full op list.
    drop_none: the last stage's rule: 'none', if still on, goes first.

  Returns:
    The new switches (a copy).
  """
  switches = np.array(switches, bool)
  probs = np.asarray(probs)
  none_index = primitives.index(NONE) if NONE in primitives else None
  for e, row in enumerate(switches):
    on = np.flatnonzero(row)
    if probs[e].shape != on.shape:
      raise ValueError(f'edge {e}: {probs[e].shape[0]} weights for '
                       f'{len(on)} ops switched on')
    if num_drop >= len(on):
      raise ValueError(f'edge {e}: cannot drop {num_drop} of {len(on)} ops')
    drop = (_min_k_no_none(probs[e], on, num_drop, none_index) if drop_none
            else _min_k(probs[e], num_drop))
    switches[e, on[drop]] = False
  return switches


def _node_edges(steps: int):
  """(first edge, number of inputs) of each node."""
  start, out = 0, []
  for i in range(steps):
    out.append((start, 2 + i))
    start += 2 + i
  return out


def _keep_two(switches: np.ndarray, strength: np.ndarray,
              steps: int) -> np.ndarray:
  """keep_2_branches: node 0 keeps both its edges; every later node its two
  strongest (ties: the later edge, as the reference's stable sort)."""
  switches = np.array(switches, bool)
  keep = set()
  for start, n in _node_edges(steps):
    order = np.argsort(strength[start:start + n], kind='stable')
    keep.update(start + int(i) for i in order[-2:])
  for e in range(len(switches)):
    if e not in keep:
      switches[e] = False
  return switches


def _parse(switches: np.ndarray, primitives: Sequence[str], steps: int):
  """parse_network: (op, input) of every edge still switched on."""
  gene = []
  for start, n in _node_edges(steps):
    for e in range(start, start + n):
      gene.extend((primitives[k], e - start) for k in np.flatnonzero(
          switches[e]))
  return gene


def _keep_one(switches_before: np.ndarray, probs: np.ndarray,
              none_index: Optional[int]) -> np.ndarray:
  """keep_1_on: each edge keeps one op of the last stage's ('none' out)."""
  switches = np.array(switches_before, bool)
  for e, row in enumerate(switches):
    on = np.flatnonzero(row)
    drop = _min_k_no_none(probs[e], on, len(on) - 1, none_index)
    switches[e, on[drop]] = False
  return switches


def derive_final(probs: Mapping[str, np.ndarray],
                 switches_last: Mapping[str, np.ndarray],
                 switches_final: Mapping[str, np.ndarray],
                 primitives: Sequence[str], *, steps: int = 4,
                 max_skips: Sequence[int] = range(8, -1, -1)
                 ) -> Tuple[genotype_lib.Genotype,
                            Dict[int, genotype_lib.Genotype]]:
  """The genotype after the last stage, and its skip-restricted versions.

  Args:
    probs: {'normal', 'reduce'}: [edges, ops on] softmax weights of the last
      stage's alphas.
    switches_last: the switches the last stage searched over.
    switches_final: the switches after the last pruning (one op per edge).
    primitives: the full op list.
    steps: intermediate nodes per cell.
    max_skips: the caps M to apply, in decreasing order (each continues from
      the previous one, as the reference's loop).

  Returns:
    (the unrestricted genotype, {M: genotype with at most M skip-connects in
    the normal cell}). Only the normal cell is restricted. An edge whose
    last stage left it only 'none' and skip keeps its skip, so a cap below
    the number of such edges is not met (the genotype has as few as can be).
  """
  none_index = primitives.index(NONE) if NONE in primitives else None
  skip_index = primitives.index(SKIP)
  concat = list(range(2, 2 + steps))
  probs = {t: np.array(p, np.float64) for t, p in probs.items()}
  final = {}
  for t in ('normal', 'reduce'):
    last = np.asarray(switches_last[t], bool)
    if none_index is not None:  # 'none' never wins an edge
      for e in range(len(last)):
        if last[e, none_index]:
          probs[t][e, list(np.flatnonzero(last[e])).index(none_index)] = 0.
    final[t] = _keep_two(switches_final[t], probs[t].max(-1), steps)
  genotype = genotype_lib.Genotype(
      _parse(final['normal'], primitives, steps), concat,
      _parse(final['reduce'], primitives, steps), concat)
  last_normal = np.asarray(switches_last['normal'], bool)
  normal, p = final['normal'], probs['normal']
  restricted = {}
  for m in max_skips:
    while int(normal[:, skip_index].sum()) > m:
      # delete_min_sk_prob: zero the weakest skip among the edges using it.
      sk = np.ones(len(normal))
      col = {}
      for e in np.flatnonzero(normal[:, skip_index]):
        col[e] = list(np.flatnonzero(last_normal[e])).index(skip_index)
        sk[e] = p[e, col[e]] if p[e, col[e]] > 0 else np.inf
      if not np.isfinite(sk[list(col)]).any():
        # Every edge left with a skip has no other op than 'none' to fall
        # back on (the reference loops forever here): the cap cannot be
        # met; keep the fewest skips there are.
        break
      e = int(np.argmin(sk))
      p[e, col[e]] = 0.
      normal = _keep_two(_keep_one(last_normal, p, none_index), p.max(-1),
                         steps)
    restricted[m] = genotype_lib.Genotype(
        _parse(normal, primitives, steps), concat, genotype.reduce, concat)
  return genotype, restricted


def search_step(state: base.SearchState, batch, *, loss_fn, w_tx, a_tx,
                steps_per_epoch: int, epochs: int, initial_dropout: float,
                warmup_epochs: int, decay: float,
                lr_schedule: Optional[optax.Schedule] = None,
                shared: bool = False):
  """One P-DARTS iteration: (after the warm-up) a first-order architecture
  step on `batch['val']`, then a weight step on `batch['train']`, both with
  the epoch's skip dropout. Returns (state with `step + 1`, metrics
  averaged over devices); `val_loss` / `val_acc` are 0 in the warm-up.

  `shared`: both phases through one compiled forward/backward
  (`darts.shared_first_order_step`, which skips the architecture phase in
  the warm-up); the same updates, masks and metrics."""
  epoch = state.step // steps_per_epoch
  rate = dropout_rate(epoch, initial_dropout, epochs=epochs,
                      warmup_epochs=warmup_epochs, decay=decay)
  # Each device drops its own examples' entries.
  key = jax.random.fold_in(jax.random.fold_in(state.key, state.step),
                           parallel.device_index())
  k_arch, k_weights = jax.random.split(key)

  def with_dropout(b, k):
    return {**b, 'net_kwargs': {'skip_dropout': rate},
            'rngs': {'dropout': k}}

  if shared:
    state, metrics = darts.shared_first_order_step(
        state, {'val': with_dropout(batch['val'], k_arch),
                'train': with_dropout(batch['train'], k_weights)},
        loss_fn=loss_fn, w_tx=w_tx, a_tx=a_tx, lr_schedule=lr_schedule,
        arch_active=epoch >= warmup_epochs)
    return state, {**metrics, 'skip_dropout': rate}

  # A conditional's branch: on XLA:CPU JAX's gradient convolutions run
  # there as slowly as in a loop body (the step took 3.2x as long). The
  # architecture step discards the kernel gradients.
  @functools.partial(ops.in_conditional_branch, kernel_grads=False)
  def arch_update(state):
    return darts.arch_step(state, None, with_dropout(batch['val'], k_arch),
                           loss_fn=loss_fn, a_tx=a_tx, order='first')

  def warmup(state):
    return state, {'val_loss': jnp.zeros(()), 'val_acc': jnp.zeros(())}

  state, a_metrics = jax.lax.cond(epoch >= warmup_epochs, arch_update,
                                  warmup, state)
  state, w_metrics = base.weight_step(
      state, with_dropout(batch['train'], k_weights), loss_fn=loss_fn,
      w_tx=w_tx)
  metrics = {**a_metrics, **w_metrics, 'skip_dropout': rate}
  if lr_schedule is not None:
    metrics['lr'] = lr_schedule(state.step)
  return state.replace(step=state.step + 1), parallel.pmean(metrics)


def make(net: nn.Module, *, steps_per_epoch: int, epochs: int = 25,
         initial_dropout: float = 0., warmup_epochs: int = WARMUP_EPOCHS,
         decay: float = DECAY, lr: float = 0.025, lr_min: float = 0.,
         momentum: float = 0.9, weight_decay: float = 3e-4,
         grad_clip: float = 5., arch_lr: float = 6e-4,
         arch_betas=(0.5, 0.999), arch_weight_decay: float = 1e-3,
         arch_grad_clip: float = 5.,
         arch_init_scale: float = arch_lib.DARTS_INIT_SCALE,
         switches: Optional[Mapping[str, np.ndarray]] = None,
         share_backward: Optional[bool] = False,
         derive_fn: Optional[base.DeriveFn] = None) -> base.Method:
  """One P-DARTS stage with the reference's settings (defaults).

  Args:
    net: the stage's search network (its per-edge op subsets).
    steps_per_epoch, epochs: the stage's length (the cosine restarts per
      stage).
    initial_dropout: the stage's skip dropout rate r (`DROPOUT_CIFAR10`).
    warmup_epochs: epochs that train the weights only.
    decay: the rate's exponential decay per epoch after the warm-up.
    lr, lr_min, momentum, weight_decay, grad_clip: weight SGD.
    arch_lr, arch_betas, arch_weight_decay, arch_grad_clip: alpha Adam,
      after clipping the alphas' gradient norm.
    arch_init_scale: alphas start at `arch_init_scale * N(0, 1)`.
    switches: the stage's switches, to log mixtures over all ops.
    share_backward: both phases through one compiled forward/backward
      (`search_step`'s `shared`); None: automatic, as DARTS'
      (`darts.choose_step`). Off by default: on CPU at C=8 it compiled 32%
      faster but stepped 8% slower (BENCHMARKS.md), and a search's steps
      outweigh its compile.
    derive_fn: softmax weights -> genotype of the stage (for logging; the
      final genotype is `derive_final`'s).
  """
  if not 0 <= initial_dropout < 1:
    raise ValueError(f'initial_dropout must be in [0, 1), got '
                     f'{initial_dropout}')
  if not 0 <= warmup_epochs <= epochs:
    raise ValueError(f'warmup_epochs must be in [0, epochs={epochs}], got '
                     f'{warmup_epochs}')
  schedule, w_tx, a_tx = optim.search_optimizers(
      lr=lr, lr_min=lr_min, epochs=epochs, steps_per_epoch=steps_per_epoch,
      momentum=momentum, weight_decay=weight_decay, grad_clip=grad_clip,
      nesterov=False, arch_lr=arch_lr, arch_betas=arch_betas,
      arch_weight_decay=arch_weight_decay, arch_grad_clip=arch_grad_clip)
  loss_fn = functools.partial(base.classification_loss, net=net,
                              weights_fn=arch_lib.softmax_weights)
  step = functools.partial(
      search_step, loss_fn=loss_fn, w_tx=w_tx, a_tx=a_tx,
      steps_per_epoch=steps_per_epoch, epochs=epochs,
      initial_dropout=initial_dropout, warmup_epochs=warmup_epochs,
      decay=decay, lr_schedule=schedule)
  return base.Method(
      init=functools.partial(darts.init, net=net, w_tx=w_tx, a_tx=a_tx,
                             init_scale=arch_init_scale),
      step=darts.choose_step(share_backward, 'first',
                             shared=functools.partial(step, shared=True),
                             two_phase=step),
      eval_step=functools.partial(base.eval_step, net=net,
                                  weights_fn=arch_lib.softmax_weights),
      derive=functools.partial(
          darts.derive, derive_fn=derive_fn or base.space_derive(net)),
      mixing=arch_lib.softmax_weights if switches is None else (
          lambda arch: full_weights(arch_lib.softmax_weights(arch),
                                    switches)))

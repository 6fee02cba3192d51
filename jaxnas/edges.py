"""How the edges of a search cell combine the outputs of their candidate ops.

An edge holds a list of candidate operations and receives one mixing weight per
candidate from the caller (the network never owns architecture parameters).
Methods differ only in the weights they feed:

* DARTS, P-DARTS, GAEA: dense weights (softmax of logits, or simplex points).
* DropNAS: weights that are exactly zero on dropped ops.
* GDAS, ROME: a `SinglePath` sample instead of weights: one op per edge (and,
  with ROME's topology, some edges not at all), run alone through
  `switch` so that unchosen ops cost no compute and no activation memory.

The search cell evaluates each op for several edges at once (see
`jaxnas.spaces.darts.SourceGroup`), so mixtures are formed here for a group of
edges: `mix` sums `w[e, o] * op_o(x_e)` over the ops each edge offers.
'none' is never computed: its output is zero, so it adds nothing to the value
and nothing to any gradient except through the coupling of the weights
themselves, which the caller's weight function already carries.
"""

from typing import Callable, NamedTuple, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnas import ops

ZERO_OPS = ('none',)

Term = Tuple[Sequence[int], jax.Array, jax.Array]


def mix(terms: Sequence[Term], num_edges: int) -> jax.Array:
  """Sums weighted op outputs into one mixture per edge.

  The op outputs are stacked to [E, K, ...] and contracted with the [E, K]
  weights by one `dot_general` (`_weighted_sum`). A chain of `w * y` adds
  would be fused by XLA into every consumer of the mixture, forward and
  backward, each recomputing all K ops' normalisations; on XLA:CPU that made
  the `small` DARTS step 35% slower and its compile 23% longer
  (BENCHMARKS.md, "the mixture as one contraction"; accelerators
  unmeasured).

  Args:
    terms: (rows, w, y) per op: the op's output `y` [len(rows), ...] on the
      group's edges `rows` (distinct indices), weighted per row by `w`
      [len(rows)]. The result has the promoted dtype of the outputs.
    num_edges: edges in the group.

  Returns:
    [num_edges, ...] mixtures.

  Raises:
    ValueError: if no edge has a non-zero op.
  """
  if not terms:
    raise ValueError('edges whose only candidate is "none" have no output '
                     'shape; keep at least one other op')
  dtype = jnp.result_type(*(y for _, _, y in terms))
  # The weights stay in (at least) float32 under low-precision outputs, so
  # that their gradient is accumulated in float32 (`_weighted_sum`).
  w_dtype = jnp.promote_types(
      jnp.result_type(*(w for _, w, _ in terms)), jnp.float32)
  shape = (num_edges,) + terms[0][2].shape[1:]
  ys, ws = [], []
  for rows, w, y in terms:
    rows = [int(r) for r in rows]
    if len(set(rows)) != len(rows):
      raise ValueError(f'repeated rows {rows} in a mixture term')
    w, y = jnp.asarray(w, w_dtype), y.astype(dtype)
    if rows != list(range(num_edges)):  # only some edges offer this op
      index = jnp.asarray(rows)
      y = jnp.zeros(shape, dtype).at[index].set(y)
      w = jnp.zeros((num_edges,), w_dtype).at[index].set(w)
    ys.append(y.reshape(num_edges, -1))
    ws.append(w)
  return _weighted_sum(jnp.stack(ws, 1), jnp.stack(ys, 1)).reshape(shape)


@jax.custom_jvp
def _weighted_sum(w: jax.Array, ys: jax.Array) -> jax.Array:
  """sum_k w[e, k] * ys[e, k, n]: w [E, K], ys [E, K, N] -> [E, N].

  The result has the dtype of `ys`; `w` is cast to it. `w` may be wider
  (float32 weights on bfloat16 outputs): its tangent's contraction, and so
  its gradient, is then computed at `w`'s precision. HIGHEST precision: K
  is small, and at the default an accelerator may round float32 operands
  (TF32, one bf16 pass), which the tangent below would not.
  """
  return _contract(w.astype(ys.dtype), ys)


def _contract(w: jax.Array, ys: jax.Array) -> jax.Array:
  return jax.lax.dot_general(w[:, None, :], ys,
                             (((2,), (1,)), ((0,), (0,))),
                             precision=jax.lax.Precision.HIGHEST)[:, 0]


@_weighted_sum.defjvp
def _weighted_sum_jvp(primals, tangents):
  # The weights' tangent is the same contraction, so their gradient (its
  # transpose) is one dot over N = B*H*W*C per edge: float32 error 2e-6
  # relative to float64 on 262k terms, like every other contraction of the
  # backward pass, and 30x faster on XLA:CPU at the first cell's shapes than
  # the product-then-reduce it replaced (BENCHMARKS.md). The outputs'
  # tangent is products and a sum over K, so its transpose is a broadcast
  # multiply rather than a degenerate dot. A custom_jvp, not a custom_vjp, so
  # the exact hypergradient (forward-over-reverse) still works.
  w, ys = primals
  w_dot, ys_dot = tangents
  w_term = _contract(w_dot, ys.astype(w_dot.dtype)).astype(ys.dtype)
  return _weighted_sum(w, ys), (
      w_term + jnp.sum(w.astype(ys.dtype)[:, :, None] * ys_dot, axis=1))


class EdgeWeighted(NamedTuple):
  """Mixing weights with a weight per edge (PC-DARTS' edge normalisation).

  A node sums `edges[e] * edge_e(x)` over its incoming edges, where edge_e
  mixes its ops by `ops[e]` (GAEA PC-DARTS: both on simplices).

  Attributes:
    ops: [E, K] op weights.
    edges: [E] edge weights.
  """
  ops: jax.Array
  edges: jax.Array


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """PC-DARTS' channel shuffle of NHWC `x` (channels as [groups, C/groups],
  transposed), the same permutation as the reference's NCHW one."""
  *lead, c = x.shape
  if c % groups:
    raise ValueError(f'{c} channels do not split into {groups} groups')
  x = x.reshape(*lead, groups, c // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*lead, c)


class SinglePath(NamedTuple):
  """One sampled sub-network of a cell type (see `jaxnas.arch`).

  Attributes:
    index: [E] int32: the op each edge runs (its position in the edge's op
      list), or -1 for an edge that is not computed (output zero).
    gate: [E] float: multiplies the op's output; value 1 on computed edges,
      with the straight-through gradient of the relaxed weights.
    offset: [E] float: added to the edge's output (value 0; a gradient path
      for the other ops' weights where a method wants one).
  """
  index: jax.Array
  gate: jax.Array
  offset: jax.Array


def switch(module: nn.Module, branches: Sequence[Callable], index: jax.Array,
           x: jax.Array, out_shape: Tuple[int, ...],
           remat: bool = False) -> jax.Array:
  """Runs branch `index` of `branches` (each `(module, x) -> y`) alone.

  `index` -1 gives zeros of `out_shape`. Under `jax.grad` only the chosen
  branch's backward runs, and JAX shares the residual buffers of branches
  of the same shapes, so memory is that of the largest single op. Under
  `vmap` with a batched index, XLA computes every branch and selects
  (correct, not frugal). At initialisation every branch runs, without a
  switch, so that all ops' variables exist.

  With `remat` each branch is rematerialised inside the switch: the
  conditional then passes no residuals to the backward pass (the chosen op
  runs again there). Without it every conditional materialises all the
  residuals JAX linearises its largest op into, since XLA cannot fuse or
  recompute across a conditional's boundary, and does so for edges that take
  the zero branch too: on XLA:CPU a mid-sized ROME step then needs 2.6x the
  temporaries (593 against 230 MB; BENCHMARKS.md, "ROME single-path
  memory").

  On CPU the branches' convolutions take `jaxnas.ops.conv2d`'s
  loop-friendly gradients (`ops.in_conditional_branch`): reverse mode only.
  """
  if module.is_initializing():  # create every op's variables, no switch
    return sum(b(module, x) for b in branches)
  zero = lambda m, x: jnp.zeros(out_shape, x.dtype)
  if remat:
    branches = [nn.remat(b) for b in branches]
  branches = [ops.in_conditional_branch(b) for b in branches]
  return nn.switch(index + 1, [zero, *branches], module, x)


def scale(y: jax.Array, gate: jax.Array, offset=0.) -> jax.Array:
  """`gate * y + offset` in `y`'s dtype, computed in at least float32.

  With bfloat16 `y` and float32 `gate` (single-path gates, PC-DARTS edge
  weights), the gate's gradient, a sum over all of `y`, is then
  accumulated in float32. For float32 `y` this is `gate * y + offset`.
  """
  f = jnp.promote_types(y.dtype, jnp.float32)
  return (gate.astype(f) * y.astype(f) + jnp.asarray(offset, f)).astype(
      y.dtype)


def dropout(x: jax.Array, rate: jax.Array, key: jax.Array) -> jax.Array:
  """Inverted dropout at a traced `rate` in [0, 1): kept entries scaled by
  1 / (1 - rate), as torch's `nn.Dropout` (P-DARTS' skip-connect dropout)."""
  rate = jnp.asarray(rate, x.dtype)
  keep = jax.random.uniform(key, x.shape) >= rate
  return jnp.where(keep, x / (1 - rate), jnp.zeros((), x.dtype))

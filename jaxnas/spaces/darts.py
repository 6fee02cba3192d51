"""The DARTS search space: 14-edge search cells and the search network.

Follows quark0/darts `cnn/model_search.py` (../shared/methods/darts.md):

* A cell has two inputs (the outputs of the two previous cells), preprocessed
  by ReLU-Conv1x1-BN, or by FactorizedReduce when the previous cell reduced;
  `steps` intermediate nodes, node i summing one mixed edge from every earlier
  node (2 + 3 + 4 + 5 = 14 edges for 4 steps); output = channel concat of the
  last `multiplier` nodes. In a reduction cell the edges leaving the two input
  nodes have stride 2.
* Within the search mixture every pooling op is followed by a BatchNorm without
  affine parameters; all cell BatchNorms are non-affine; the stem's is affine.
* The network: stem conv 3x3 to `stem_multiplier * C` channels + BN, `layers`
  cells with reductions at `layers // 3` and `2 * layers // 3` (channels double
  there), global average pool, linear classifier.

Architecture parameters are not Flax params: `__call__` takes the per-edge
mixing weights for each cell type, so any method can feed softmax weights,
simplex points, masked or sampled weights through the same network.

With `single_path=True` the network takes a `jaxnas.edges.SinglePath` per
cell type instead (GDAS, ROME): each edge runs only its sampled op (an edge
with index -1 runs nothing), times its straight-through gate. Its weights are
laid out per edge (`cell{i}/edge{e}/{op}`), not stacked per source node.

Synopsis:

  net = SearchNetwork(C=16, num_classes=10, layers=8)
  weights = {'normal': jnp.full((14, 8), 1 / 8), 'reduce': ...}
  variables = net.init(key, images, weights, train=False)
  logits, updates = net.apply(variables, images, weights, train=True,
                              mutable=['batch_stats'])
"""

from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import edges
from jaxnas import ops
from jaxnas import stacked_ops

CELL_TYPES = ('normal', 'reduce')

EdgeOps = Tuple[Tuple[str, ...], ...]


def num_edges(steps: int = 4) -> int:
  """Number of edges of a cell with `steps` intermediate nodes."""
  return sum(2 + i for i in range(steps))


def edge_inputs(steps: int = 4) -> Tuple[int, ...]:
  """The input node of each edge, in edge order (nodes 0, 1 are the inputs)."""
  return tuple(j for _, j in _edge_index(steps))


def reduction_layers(layers: int) -> Tuple[int, ...]:
  """Indices of the reduction cells in a network of `layers` cells."""
  return tuple(sorted({layers // 3, 2 * layers // 3}))


def uniform_edge_ops(primitives: Sequence[str], steps: int = 4) -> EdgeOps:
  """Every edge offers all of `primitives`."""
  return (tuple(primitives),) * num_edges(steps)


def _edge_index(steps: int):
  """{(node, input): edge} in the reference's edge order."""
  index, e = {}, 0
  for i in range(steps):
    for j in range(2 + i):
      index[(i, j)] = e
      e += 1
  return index


class SourceGroup(nn.Module):
  """All edges leaving `sources`, each op computed once for all of them.

  Parametric ops run stacked over the edges that offer them (one compiled op
  per source group instead of one per edge), their first convolution once
  per source for all of that source's edges (`jaxnas.stacked_ops`).
  Parameter-free ops (pools with their non-affine BN, identity) give
  identical outputs on every edge leaving the same source, so they are
  computed once per source and shared. The
  result is each edge's mixture `sum_o w[e, o] * op_o(x)`, exactly as the
  reference's per-edge MixedOp computes it.

  Attributes:
    channels: channel count of every edge.
    stride: stride of every edge of the group.
    edges: (edge id, source position in `sources`) of each member edge.
    edge_ops: the cell's per-edge op names, indexed by edge id.
  """
  channels: int
  stride: int
  edges: Tuple[Tuple[int, int], ...]
  edge_ops: EdgeOps
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, sources: jax.Array, weights: jax.Array, train: bool,
               skip_dropout: Optional[jax.Array] = None) -> jax.Array:
    """sources: [S, B, H, W, C]; weights: the cell's (E, K) mixing weights.

    `skip_dropout` (P-DARTS): the rate of element-wise (inverted) dropout
    after every stride-1 skip-connect in training, each edge with its own
    mask from the 'dropout' rng. Traced, so changing it does not recompile.

    Returns [len(edges), B, H', W', C], one mixture per member edge.
    """
    edge_ids = [e for e, _ in self.edges]
    src_pos = np.array([p for _, p in self.edges])
    names = []  # every op offered by some member edge, in first-seen order
    for e in edge_ids:
      names.extend(n for n in self.edge_ops[e] if n not in names)
    terms = []  # (member rows, weights of those rows, outputs of those rows)
    for name in names:
      if name in edges.ZERO_OPS:
        continue
      rows = [m for m, e in enumerate(edge_ids) if name in self.edge_ops[e]]
      w = weights[np.array([edge_ids[m] for m in rows]),
                  np.array([self.edge_ops[edge_ids[m]].index(name)
                            for m in rows])]
      if stacked_ops.is_parametric(name, self.stride):
        y = stacked_ops.make_stacked_op(
            name, self.channels, self.stride,
            depthwise_impl=self.depthwise_impl,
            bn_axis_name=self.bn_axis_name)(
                sources, train, tuple(int(src_pos[m]) for m in rows))
      else:
        used = sorted({int(src_pos[m]) for m in rows})
        y = self._shared(name, sources[np.array(used)], train)
        y = y[np.array([used.index(int(src_pos[m])) for m in rows])]
        if (name == 'skip_connect' and skip_dropout is not None and train
            and self.stride == 1):
          y = edges.dropout(y, skip_dropout, self.make_rng('dropout'))
      terms.append((rows, w, y))
    return edges.mix(terms, len(edge_ids))

  def _shared(self, name, x, train):
    """A parameter-free op on each source: x [S, B, H, W, C]."""
    if name == 'skip_connect':
      return x
    s, b = x.shape[:2]
    y = ops.Pool(name[:3], self.stride)(x.reshape((s * b,) + x.shape[2:]),
                                       train)
    y = y.reshape((s, b) + y.shape[1:])
    return stacked_ops.stacked_batch_norm(train, self.bn_axis_name,
                                          name=f'{name}_bn')(y)


class PoolBN(nn.Module):
  """A search-mixture pool: 3x3 pool then non-affine BN (model_search.py)."""
  kind: str
  stride: int
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = ops.Pool(self.kind, self.stride)(x, train)
    return ops.batch_norm(train, False, self.bn_axis_name, name='bn')(y)


class SinglePathEdge(nn.Module):
  """One edge that runs only its sampled op (`jaxnas.edges.switch`).

  The ops are those of the search mixture (pools followed by a non-affine
  BN, all BNs non-affine), so a single-path and a mixture network search the
  same space. 'none' gives zeros. `remat`: see `jaxnas.edges.switch`.
  """
  channels: int
  stride: int
  names: Tuple[str, ...]
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None
  remat: bool = True

  def setup(self):
    mods = []
    for n in self.names:
      if n == 'none':
        continue
      if n.endswith('pool_3x3'):
        mods.append(PoolBN(n[:3], self.stride, self.bn_axis_name, name=n))
      else:
        mods.append(ops.make_op(n, self.channels, self.stride, False,
                                depthwise_impl=self.depthwise_impl,
                                bn_axis_name=self.bn_axis_name,
                                module_name=n))
    self.ops = mods

  def __call__(self, x: jax.Array, index: jax.Array, gate: jax.Array,
               offset: jax.Array, train: bool) -> jax.Array:
    b, h, w, _ = x.shape
    out_shape = (b, -(-h // self.stride), -(-w // self.stride),
                 self.channels)
    branches, k = [], 0
    for n in self.names:
      if n == 'none':
        branches.append(lambda m, x: jnp.zeros(out_shape, x.dtype))
      else:
        branches.append(lambda m, x, k=k: m.ops[k](x, train))
        k += 1
    y = edges.switch(self, branches, index, x, out_shape, self.remat)
    return edges.scale(y, gate, offset)


class SearchCell(nn.Module):
  """A DARTS search cell; `edge_ops[e]` lists edge e's candidate ops."""
  channels: int
  reduction: bool
  reduction_prev: bool
  edge_ops: EdgeOps
  steps: int = 4
  multiplier: int = 4
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None
  single_path: bool = False
  partial_channels: int = 1
  single_path_remat: bool = True

  @nn.compact
  def __call__(self, s0: jax.Array, s1: jax.Array, weights: jax.Array,
               train: bool, skip_dropout: Optional[jax.Array] = None
               ) -> jax.Array:
    c, bn_axis = self.channels, self.bn_axis_name
    if self.reduction_prev:
      s0 = ops.FactorizedReduce(c, affine=False, bn_axis_name=bn_axis,
                                name='preprocess0')(s0, train)
    else:
      s0 = ops.ReLUConvBN(c, affine=False, bn_axis_name=bn_axis,
                          name='preprocess0')(s0, train)
    s1 = ops.ReLUConvBN(c, affine=False, bn_axis_name=bn_axis,
                        name='preprocess1')(s1, train)
    index = _edge_index(self.steps)
    states = [s0, s1]
    if self.single_path:
      for i in range(self.steps):
        node = None
        for j in range(2 + i):
          e = index[(i, j)]
          y = SinglePathEdge(
              c, 2 if self.reduction and j < 2 else 1, self.edge_ops[e],
              self.depthwise_impl, bn_axis, self.single_path_remat,
              name=f'edge{e}')(
                  states[j], weights.index[e], weights.gate[e],
                  weights.offset[e], train)
          node = y if node is None else node + y
        states.append(node)
      return jnp.concatenate(states[-self.multiplier:], axis=-1)
    outputs = {}  # edge id -> mixture output
    edge_w = None
    if isinstance(weights, edges.EdgeWeighted):
      weights, edge_w = weights.ops, weights.edges
    k = self.partial_channels
    if c % k:
      raise ValueError(f'partial_channels={k} does not divide the {c} '
                       'channels of a cell')

    def run_group(sources, name):
      # Edges leaving `sources` (state indices) towards every later node.
      members = [(index[(i, j)], sources.index(j))
                 for i in range(self.steps) for j in sources
                 if (i, j) in index]
      stride = 2 if self.reduction and sources[0] < 2 else 1
      x = jnp.stack([states[j] for j in sources])
      y = SourceGroup(c // k, stride, tuple(members), self.edge_ops,
                      self.depthwise_impl, bn_axis, name=name)(
                          x[..., :c // k], weights, train, skip_dropout)
      if k > 1:  # PC-DARTS: the other channels bypass the ops
        rest = x[..., c // k:]
        if stride == 2:
          s_, b_ = rest.shape[:2]
          rest = nn.max_pool(rest.reshape((s_ * b_,) + rest.shape[2:]),
                             (2, 2), strides=(2, 2))
          rest = rest.reshape((s_, b_) + rest.shape[1:])
        rest = rest[np.array([p for _, p in members])]
        y = edges.channel_shuffle(jnp.concatenate([y, rest], -1), k)
      # One unstack, whose transpose is one stack. Indexing y[m] per edge
      # transposed to a zero-padded copy of the whole stack per edge,
      # summed, and XLA fused that sum into the backward of every op of the
      # group: the `small` first-order step took 5.6 s against 4.8 s
      # (BENCHMARKS.md, "Unstacking a group's mixtures").
      for (e, _), y_e in zip(members, jnp.unstack(y)):
        outputs[e] = y_e if edge_w is None else edges.scale(y_e, edge_w[e])

    run_group([0, 1], 'inputs')
    for i in range(self.steps):
      node = outputs[index[(i, 0)]]
      for j in range(1, 2 + i):
        node = node + outputs[index[(i, j)]]
      states.append(node)
      if i < self.steps - 1:
        run_group([2 + i], f'node{i}')
    return jnp.concatenate(states[-self.multiplier:], axis=-1)


class SearchNetwork(nn.Module):
  """The DARTS search network.

  Attributes:
    C: initial channel count (16 in the paper's search).
    num_classes: classifier outputs.
    layers: number of cells (8 in the paper's search).
    steps: intermediate nodes per cell.
    multiplier: nodes concatenated into the cell output.
    stem_multiplier: stem width is `stem_multiplier * C`.
    primitives: candidate ops on every edge, unless `normal_ops` /
      `reduce_ops` give per-edge subsets (as P-DARTS prunes them).
    normal_ops: optional per-edge op subsets of normal cells.
    reduce_ops: optional per-edge op subsets of reduction cells.
    depthwise_impl: see `jaxnas.ops.DEPTHWISE_IMPLS`.
    bn_axis_name: if set, BatchNorm statistics are averaged over this axis.
    single_path: take `jaxnas.edges.SinglePath` samples instead of mixing
      weights (see the module docstring).
    partial_channels: PC-DARTS' K: each edge's ops see the first C/K
      channels; the others bypass them (max-pooled 2x2 on stride-2 edges)
      and the two parts are concatenated and channel-shuffled (K groups).
      Mixing weights may then also be `jaxnas.edges.EdgeWeighted`.
    single_path_remat: single-path edges run their op again in the backward
      pass instead of keeping its residuals (`jaxnas.edges.switch`): 0.39x
      the XLA temporaries of a mid-sized ROME step on CPU, step time
      unchanged within one run's noise.
    cell_remat: rematerialise every cell (`flax.linen.remat`): the backward
      pass runs each cell's forward again instead of keeping its residuals,
      so a step holds one cell's activations at a time plus the cells'
      outputs. For configs that do not fit in accelerator memory otherwise;
      about one more forward pass of compute. Same variables and values.
      XLA:CPU removes the optimization barriers and merges the recomputation
      back into the forward pass: no saving there (`small` DARTS: XLA peak
      1.20 -> 1.29 GB). Not yet measured on an accelerator.
    compute_dtype: the dtype of the activations and of the convolutions
      and mixtures (e.g. `jnp.bfloat16` on GPU/TPU); None keeps the
      images' dtype. Parameters, BatchNorm statistics and the logits stay
      float32: kernels are cast where they are used, BatchNorm reduces in
      float32, and the classifier runs in float32 on the pooled features.
      The gradients of the mixing weights, single-path gates and PC-DARTS
      edge weights are sums over bfloat16 activations accumulated in
      float32 (`edges.mix`, `edges.scale`). Second-order DARTS by finite
      differences does not work at bfloat16 precision (the perturbation is
      below the weights' rounding); the search entry point refuses it.
  """
  C: int = 16
  num_classes: int = 10
  layers: int = 8
  steps: int = 4
  multiplier: int = 4
  stem_multiplier: int = 3
  primitives: Tuple[str, ...] = ops.DARTS_PRIMITIVES
  normal_ops: Optional[EdgeOps] = None
  reduce_ops: Optional[EdgeOps] = None
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None
  single_path: bool = False
  partial_channels: int = 1
  single_path_remat: bool = True
  cell_remat: bool = False
  compute_dtype: Optional[Any] = None

  def edge_ops(self, cell_type: str) -> EdgeOps:
    """Per-edge candidate ops of `cell_type` ('normal' or 'reduce')."""
    given = self.normal_ops if cell_type == 'normal' else self.reduce_ops
    if given is None:
      return uniform_edge_ops(self.primitives, self.steps)
    return tuple(tuple(e) for e in given)

  def arch_shapes(self) -> Mapping[str, Tuple[int, int]]:
    """Shape of the mixing weights the network expects per cell type."""
    shapes = {}
    for t in CELL_TYPES:
      counts = {len(e) for e in self.edge_ops(t)}
      if len(counts) != 1:
        raise ValueError(f'{t} edges must all have the same number of '
                         f'candidate ops, got {sorted(counts)}')
      shapes[t] = (num_edges(self.steps), counts.pop())
    return shapes

  def _validate(self, x: jax.Array, weights: Mapping[str, jax.Array]):
    if self.layers < 1 or self.C < 1 or self.steps < 1:
      raise ValueError('layers, C and steps must be positive')
    if not 1 <= self.multiplier <= self.steps:
      raise ValueError(f'multiplier must be in [1, steps={self.steps}]')
    if x.ndim != 4:
      raise ValueError(f'expected NHWC images, got shape {x.shape}')
    for t, shape in self.arch_shapes().items():
      ops_ = self.edge_ops(t)
      if len(ops_) != shape[0]:
        raise ValueError(f'{t}: {len(ops_)} edge op lists for {shape[0]} '
                         'edges')
      for e in ops_:
        ops.check_primitives(e)
      if t not in weights:
        raise ValueError(f'missing mixing weights for {t!r} cells; got keys '
                         f'{sorted(weights)}')
      if self.single_path:
        w = weights[t]
        if not isinstance(w, edges.SinglePath) or w.index.shape != shape[:1]:
          raise ValueError(
              f'a single-path network takes a jaxnas.edges.SinglePath with '
              f'{shape[0]} edges per cell type; got {w!r:.200}')
      else:
        w = weights[t]
        if isinstance(w, edges.EdgeWeighted):
          if tuple(w.edges.shape) != shape[:1]:
            raise ValueError(f'{t} edge weights must have shape '
                             f'{shape[:1]}, got {tuple(w.edges.shape)}')
          w = w.ops
        if tuple(w.shape) != shape:
          raise ValueError(f'{t} mixing weights must have shape {shape}, '
                           f'got {tuple(w.shape)}')

  @nn.compact
  def __call__(self, x: jax.Array, weights: Mapping[str, jax.Array],
               train: bool, skip_dropout: Optional[jax.Array] = None
               ) -> jax.Array:
    """Logits of images `x` [B, H, W, C] under the cells' mixing `weights`.

    `skip_dropout`: P-DARTS' dropout rate after stride-1 skip-connects in
    training (a traced scalar; needs a 'dropout' rng); None: no dropout.
    """
    self._validate(x, weights)
    if skip_dropout is not None and self.single_path:
      raise ValueError('skip_dropout applies to mixture networks only')
    c_curr = self.stem_multiplier * self.C
    if self.compute_dtype is not None:
      x = x.astype(self.compute_dtype)
    s = ops.Conv(c_curr, 3, padding=1, name='stem_conv')(x)
    # The affine BN's float32 scale would promote its output to float32.
    s = ops.batch_norm(train, True, self.bn_axis_name, name='stem_bn')(s)
    s0 = s1 = s.astype(x.dtype)
    c_curr = self.C
    reduction_prev = False
    reductions = reduction_layers(self.layers)
    # `train` (argument 4, counting the module) is a Python bool.
    cell_cls = (nn.remat(SearchCell, static_argnums=(4,)) if self.cell_remat
                else SearchCell)
    for i in range(self.layers):
      reduction = i in reductions
      if reduction:
        c_curr *= 2
      cell_type = 'reduce' if reduction else 'normal'
      cell = cell_cls(c_curr, reduction, reduction_prev,
                        self.edge_ops(cell_type), self.steps, self.multiplier,
                        self.depthwise_impl, self.bn_axis_name,
                        self.single_path, self.partial_channels,
                        self.single_path_remat, name=f'cell{i}')
      s0, s1 = s1, cell(s0, s1, weights[cell_type], train, skip_dropout)
      reduction_prev = reduction
    out = jnp.mean(s1.astype(jnp.promote_types(s1.dtype, jnp.float32)),
                   axis=(1, 2))
    return nn.Dense(
        self.num_classes,
        kernel_init=ops.torch_kernel_init,
        bias_init=ops.torch_bias_init(out.shape[-1]),
        name='classifier')(out)

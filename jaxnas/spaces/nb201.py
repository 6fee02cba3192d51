"""The NAS-Bench-201 search space: 6-edge cells, arch strings, search network.

Follows the benchmark's authors (D-X-Y/AutoDL-Projects
`lib/models/cell_searchs/search_cells.py` NAS201SearchCell,
`search_model_darts.py` TinyNetworkDarts, `lib/models/cell_operations.py`) and
GAEA's copy of it (liamcli/gaea_release `cnn/search_spaces/nasbench_201/
model_search.py`; see ../shared/methods/gaea.md):

* A cell has 4 nodes: node 0 is the cell input, node i (1..3) sums one mixed
  edge from every earlier node j, 6 edges in the official order
  1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2 (AutoDL sorts the 'i<-j' keys); the cell
  output is node 3. Every edge is stride 1 with equal input and output
  channels, and offers `NB201_PRIMITIVES` (`jaxnas.ops.make_nb201_op`).
* The network: stem conv 3x3 -> C + BN; N cells at C, a ResNet basic block
  (stride 2) to 2C, N cells at 2C, a block to 4C, N cells at 4C; BN -> ReLU
  -> global average pool -> linear. The stem, the ResNet blocks and the last
  BN are affine and track running statistics whatever the cells use.
* One cell type, 'cell': every search cell shares one (6, num_ops) weight
  matrix, so `arch_shapes()` is `{'cell': (6, num_ops)}`.

BatchNorm in the cells (`affine`, `track_running_stats`, as AutoDL's flags):
search networks use `affine=False`. `track_running_stats=True` (the default;
GAEA's `NASBENCH201Network` and the commands of AutoDL's NAS-Bench-201 docs,
`DARTS-V1.sh cifar10 1 -1`) keeps running averages and uses them in
evaluation. `track_running_stats=False` (AutoDL scripts' BN argument 0) keeps
none: evaluation normalises every cell BN with the statistics of the batch
being evaluated, exactly as training does (`jaxnas.ops.BatchStatsNorm`), so an
example's logits then depend on the rest of its batch.

One deliberate difference: AutoDL since July 2020 (commit b9a5d28) gives the
cell convolutions a bias when `affine=False` (`bias=not affine`); the code of
the NB-201 paper's era and GAEA's fork (liamcli/AutoDL-Projects) have none.
A bias right before a BatchNorm is cancelled by its mean subtraction and gets
a zero gradient, so the convolutions here are bias-free, as in that code.

Architecture strings are NAS-Bench-201's
`|op~0|+|op~0|op~1|+|op~0|op~1|op~2|` (node i lists its inputs 0..i-1);
`Arch` holds the 6 op names in edge order and converts to and from them.

Synopsis:

  net = SearchNetwork(C=16, N=5, num_classes=10)
  weights = {'cell': jnp.full((6, 5), 1 / 5)}
  variables = net.init(key, images, weights, train=False)
  logits, updates = net.apply(variables, images, weights, train=True,
                              mutable=['batch_stats'])
  arch = derive({'cell': np.asarray(weights['cell'])})   # 'none' excluded
  arch.to_string()   # '|nor_conv_3x3~0|+|...|'
"""

import dataclasses
import itertools
import json
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import edges
from jaxnas import ops

NB201_PRIMITIVES = ops.NB201_PRIMITIVES
NUM_NODES = 4
# (to, from) of each edge in the official order (AutoDL's sorted 'i<-j').
EDGES = tuple((i, j) for i in range(1, NUM_NODES) for j in range(i))
NUM_EDGES = len(EDGES)  # 6
EDGE_KEYS = tuple(f'{i}<-{j}' for i, j in EDGES)
CELL_TYPES = ('cell',)

EdgeOps = Tuple[Tuple[str, ...], ...]
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Arch:
  """A NAS-Bench-201 cell: one op name per edge, in `EDGES` order.

  Immutable and hashable; validated on construction.

  Attributes:
    ops: 6 op names from `NB201_PRIMITIVES`; `ops[e]` sits on edge
      `EDGES[e]` = (to, from).
  """
  ops: Tuple[str, ...]

  def __post_init__(self):
    if isinstance(self.ops, str):
      raise ValueError('Arch takes a sequence of 6 op names; parse a string '
                       'with Arch.from_string')
    names = tuple(self.ops)
    object.__setattr__(self, 'ops', names)
    if len(names) != NUM_EDGES:
      raise ValueError(f'an NB-201 cell has {NUM_EDGES} edges, got '
                       f'{len(names)} ops: {names}')
    unknown = [n for n in names if n not in NB201_PRIMITIVES]
    if unknown:
      raise ValueError(f'unknown operations {unknown}; known: '
                       f'{NB201_PRIMITIVES}')

  @classmethod
  def from_string(cls, text: str) -> 'Arch':
    """Parses `|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`.

    Strict: exactly 3 nodes, node i lists inputs 0..i-1 in that order, known
    op names, no spaces inside (surrounding whitespace is ignored).

    Raises:
      ValueError: naming what is wrong with `text`.
    """
    if not isinstance(text, str):
      raise ValueError(f'expected an arch string, got {type(text).__name__}')
    text = text.strip()
    nodes = text.split('+')
    if len(nodes) != NUM_NODES - 1:
      raise ValueError(f'expected {NUM_NODES - 1} nodes separated by "+", got '
                       f'{len(nodes)} in {text!r}')
    names = []
    for i, node in enumerate(nodes, start=1):
      if len(node) < 2 or node[0] != '|' or node[-1] != '|':
        raise ValueError(f'node {i} must be written |op~j|...|, got {node!r}')
      entries = node[1:-1].split('|')
      if len(entries) != i:
        raise ValueError(f'node {i} needs {i} inputs, got {len(entries)} in '
                         f'{node!r}')
      for j, entry in enumerate(entries):
        op, sep, src = entry.partition('~')
        if not sep or '~' in src:
          raise ValueError(f'node {i}: expected op~input, got {entry!r}')
        if src != str(j):
          raise ValueError(f'node {i}: input {j} expected at position {j}, '
                           f'got {entry!r}')
        if op not in NB201_PRIMITIVES:
          raise ValueError(f'node {i}: unknown operation {op!r}; known: '
                           f'{NB201_PRIMITIVES}')
        names.append(op)
    return cls(tuple(names))

  def to_string(self) -> str:
    """The benchmark's string, e.g. `|nor_conv_3x3~0|+|...~0|...~1|+|...|`."""
    nodes, e = [], 0
    for i in range(1, NUM_NODES):
      nodes.append('|' + '|'.join(f'{self.ops[e + j]}~{j}' for j in range(i))
                   + '|')
      e += i
    return '+'.join(nodes)

  def __str__(self) -> str:
    return self.to_string()

  def edges(self) -> Tuple[Tuple[int, int, str], ...]:
    """(to, from, op) of each edge in edge order."""
    return tuple((i, j, op) for (i, j), op in zip(EDGES, self.ops))

  def to_dict(self) -> dict:
    """`{'arch': string, 'edges': {'1<-0': op, ...}}` (JSON-ready)."""
    return {'arch': self.to_string(), 'edges': dict(zip(EDGE_KEYS, self.ops))}

  @classmethod
  def from_dict(cls, d: Mapping) -> 'Arch':
    """Inverse of `to_dict`; either key suffices, both must then agree."""
    if not isinstance(d, Mapping) or not ({'arch', 'edges'} & set(d)):
      raise ValueError('an NB-201 arch dict needs "arch" (string) or "edges" '
                       f'({{"1<-0": op, ...}}), got {d!r}')
    from_edges = None
    if 'edges' in d:
      edges_ = d['edges']
      if not isinstance(edges_, Mapping) or set(edges_) != set(EDGE_KEYS):
        raise ValueError(f'"edges" must map exactly {EDGE_KEYS} to op names, '
                         f'got {edges_!r}')
      from_edges = cls(tuple(edges_[k] for k in EDGE_KEYS))
    if 'arch' in d:
      arch = cls.from_string(d['arch'])
      if from_edges is not None and from_edges != arch:
        raise ValueError(f'"arch" {arch} and "edges" {from_edges} disagree')
      return arch
    return from_edges

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def from_json(cls, text: str) -> 'Arch':
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f'not an NB-201 arch JSON document: {e}') from e
    return cls.from_dict(d)


def all_archs() -> Iterator[Arch]:
  """All 5^6 = 15,625 cells, edge 0 varying slowest over `NB201_PRIMITIVES`.

  This is NOT the benchmark's index order; that order is the table's (see
  `jaxnas.benchmarks.nb201.Table.index`).
  """
  for names in itertools.product(NB201_PRIMITIVES, repeat=NUM_EDGES):
    yield Arch(names)


def derive(weights: Union[Mapping[str, np.ndarray], np.ndarray],
           primitives: Sequence[str] = NB201_PRIMITIVES,
           *,
           exclude: Sequence[str] = ('none',)) -> Arch:
  """Per edge, the op of largest weight among those not in `exclude`.

  AutoDL's `TinyNetworkDarts.genotype()` takes the argmax over all ops,
  'none' included: that is `exclude=()`. GAEA's `exclude_zero=True` removes
  'none' from the search space itself (`primitives=NB201_PRIMITIVES[1:]`, 4
  columns); `exclude=('none',)` (the default) derives the same from 5
  columns. Ties keep the earlier op, as `torch.argmax` does. Any monotone
  transform of the weights (logits or their softmax) derives the same cell.

  Args:
    weights: `{'cell': (6, K)}` scores (or the (6, K) array itself).
    primitives: the K op names of the columns.
    exclude: ops never chosen.

  Returns:
    The derived `Arch`.

  Raises:
    ValueError: on a shape mismatch, NaN weights, ops outside NB-201, or when
      `exclude` leaves nothing to choose.
  """
  w = weights['cell'] if isinstance(weights, Mapping) else weights
  w = np.asarray(w, dtype=np.float64)
  primitives = tuple(primitives)
  ops.check_primitives(primitives, NB201_PRIMITIVES)
  if w.shape != (NUM_EDGES, len(primitives)):
    raise ValueError(f'expected weights of shape {(NUM_EDGES, len(primitives))}'
                     f' for primitives {primitives}, got {w.shape}')
  if np.isnan(w).any():
    raise ValueError(f'weights contain NaN: {w}')
  allowed = np.array([p not in exclude for p in primitives])
  if not allowed.any():
    raise ValueError(f'exclude={tuple(exclude)} leaves none of {primitives}')
  masked = np.where(allowed[None, :], w, -np.inf)
  return Arch(tuple(primitives[k] for k in np.argmax(masked, axis=1)))


def count_params(params: PyTree) -> int:
  """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


class MixedEdge(nn.Module):
  """One edge: `sum_k w[k] * op_k(x)` over `primitives`.

  'none' is never computed: it adds zero, and its weight gets a zero
  gradient, as with the reference's `x.mul(0.)`. Given a
  `jaxnas.edges.SinglePath` row instead of weights, the edge runs only the
  sampled op (GDAS): `gate * op_index(x) + offset`, rematerialised in the
  backward pass if `remat` (see `jaxnas.edges.switch`).
  """
  channels: int
  primitives: Tuple[str, ...] = NB201_PRIMITIVES
  affine: bool = False
  track_running_stats: bool = True
  bn_axis_name: Optional[str] = None
  remat: bool = True

  def setup(self):
    self.ops = [ops.make_nb201_op(
        op, self.channels, self.affine,
        track_running_stats=self.track_running_stats,
        bn_axis_name=self.bn_axis_name, module_name=op)
                for op in self.primitives if op != 'none']

  def __call__(self, x: jax.Array, w, train: bool,
               skip_dropout: Optional[jax.Array] = None) -> jax.Array:
    """`skip_dropout`: P-DARTS' dropout rate after the skip-connect in
    training (traced; needs a 'dropout' rng); None: no dropout."""
    branches, k = [], 0
    for op in self.primitives:
      if op == 'none':
        branches.append(lambda m, x: jnp.zeros_like(x))
      else:
        branches.append(lambda m, x, k=k: m.ops[k](x, train))
        k += 1
    if isinstance(w, edges.SinglePath):
      y = edges.switch(self, branches, w.index, x, x.shape, self.remat)
      return w.gate.astype(y.dtype) * y + w.offset.astype(y.dtype)
    w = jnp.asarray(w)
    terms = []  # one edge: rows [0]
    for k, op in enumerate(self.primitives):
      if op != 'none':
        y = branches[k](self, x)
        if op == 'skip_connect' and skip_dropout is not None and train:
          y = edges.dropout(y, skip_dropout, self.make_rng('dropout'))
        terms.append(([0], w[k:k + 1], y[None]))
    if not terms:  # only 'none'
      return jnp.zeros_like(x)
    return edges.mix(terms, 1)[0]


class SearchCell(nn.Module):
  """An NB-201 search cell (AutoDL's NAS201SearchCell, stride 1).

  Node i = sum over j < i of edge i<-j (module `edge_{i}_{j}`) applied to node
  j; returns node 3. `weights` is (6, K), rows in `EDGES` order.

  Attributes:
    channels: input and output channels of every edge.
    primitives: candidate ops on every edge, unless `cell_ops` gives each
      edge its own (in `EDGES` order; P-DARTS' pruned switches).
    affine: BN scale and bias in the conv ops.
    track_running_stats: see the module docstring.
    bn_axis_name: if set, BN statistics are averaged over this axis.
    cell_ops: optional per-edge op subsets.
    single_path_remat: see `MixedEdge.remat`.
  """
  channels: int
  primitives: Tuple[str, ...] = NB201_PRIMITIVES
  affine: bool = False
  track_running_stats: bool = True
  bn_axis_name: Optional[str] = None
  cell_ops: Optional[EdgeOps] = None
  single_path_remat: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, weights: jax.Array, train: bool,
               skip_dropout: Optional[jax.Array] = None) -> jax.Array:
    if x.shape[-1] != self.channels:
      raise ValueError(f'cell of {self.channels} channels got input of shape '
                       f'{x.shape}')
    nodes = [x]
    for i in range(1, NUM_NODES):
      node = None
      for j in range(i):
        e = EDGES.index((i, j))
        prims = (self.cell_ops[e] if self.cell_ops is not None else
                 self.primitives)
        y = MixedEdge(self.channels, tuple(prims), self.affine,
                      self.track_running_stats, self.bn_axis_name,
                      self.single_path_remat, name=f'edge_{i}_{j}')(
                          nodes[j], jax.tree.map(lambda a, e=e: a[e],
                                                 weights), train,
                          skip_dropout)
        node = y if node is None else node + y
      nodes.append(node)
    return nodes[-1]


class ResNetBasicBlock(nn.Module):
  """AutoDL's ResNetBasicblock: ReLUConvBN 3x3 (stride) -> ReLUConvBN 3x3,
  plus a shortcut: 2x2 average pool + bias-free 1x1 conv at stride 2, a
  ReLUConvBN 1x1 when only the width changes, else the identity. BNs are
  affine and track running statistics (TinyNetworkDarts' defaults)."""
  features: int
  stride: int = 2
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.stride not in (1, 2):
      raise ValueError(f'stride must be 1 or 2, got {self.stride}')
    f, axis = self.features, self.bn_axis_name
    y = ops.ReLUConvBN(f, 3, self.stride, 1, True, axis, name='conv_a')(
        x, train)
    y = ops.ReLUConvBN(f, 3, 1, 1, True, axis, name='conv_b')(y, train)
    if self.stride == 2:
      shortcut = nn.avg_pool(x, (2, 2), (2, 2))
      shortcut = ops.Conv(f, 1, name='downsample')(shortcut)
    elif x.shape[-1] != f:
      shortcut = ops.ReLUConvBN(f, 1, 1, 0, True, axis, name='downsample')(
          x, train)
    else:
      shortcut = x
    return shortcut + y


class SearchNetwork(nn.Module):
  """The NAS-Bench-201 search network (AutoDL's TinyNetworkDarts).

  Layers are numbered as AutoDL's `cells`: `cell{i}` are search cells,
  `resblock{N}` and `resblock{2N+1}` the reductions.

  Attributes:
    C: channels of the first stage (16 in NB-201; GAEA searches with 24).
    N: search cells per stage (5).
    num_classes: classifier outputs.
    primitives: candidate ops on every edge (GAEA's `exclude_zero` space is
      `NB201_PRIMITIVES[1:]`).
    affine: BN scale and bias inside the cells (False in search networks).
    track_running_stats: cell BNs keep running averages for evaluation (True)
      or always use batch statistics (False); see the module docstring.
    bn_axis_name: if set, BatchNorm statistics are averaged over this axis.
    single_path: take a `jaxnas.edges.SinglePath` sample (GDAS, ROME)
      instead of mixing weights; the weights' layout is the same.
    cell_ops: optional per-edge op subsets (P-DARTS' switches), each in
      `primitives` order, all of one length.
    single_path_remat: single-path edges run their op again in the backward
      pass instead of keeping its residuals (`jaxnas.edges.switch`).
  """
  C: int = 16
  N: int = 5
  num_classes: int = 10
  primitives: Tuple[str, ...] = NB201_PRIMITIVES
  affine: bool = False
  track_running_stats: bool = True
  bn_axis_name: Optional[str] = None
  single_path: bool = False
  cell_ops: Optional[EdgeOps] = None
  single_path_remat: bool = True

  def edge_ops(self, cell_type: str = 'cell') -> EdgeOps:
    """Per-edge candidate ops of `cell_type` (only 'cell')."""
    if cell_type not in CELL_TYPES:
      raise ValueError(f'NB-201 has one cell type {CELL_TYPES}, got '
                       f'{cell_type!r}')
    if self.cell_ops is not None:
      return tuple(tuple(e) for e in self.cell_ops)
    return (tuple(self.primitives),) * NUM_EDGES

  def arch_shapes(self) -> Mapping[str, Tuple[int, int]]:
    """Shape of the mixing weights the network expects per cell type."""
    counts = {len(e) for e in self.edge_ops()}
    if len(counts) != 1 or len(self.edge_ops()) != NUM_EDGES:
      raise ValueError(f'cell_ops must give {NUM_EDGES} edges with the same '
                       f'number of ops, got {self.cell_ops}')
    return {'cell': (NUM_EDGES, counts.pop())}

  def _validate(self, x: jax.Array, weights: Mapping[str, jax.Array]):
    if self.C < 1 or self.N < 1 or self.num_classes < 1:
      raise ValueError('C, N and num_classes must be positive')
    ops.check_primitives(self.primitives, NB201_PRIMITIVES)
    for e in self.edge_ops():
      ops.check_primitives(e, NB201_PRIMITIVES)
    if x.ndim != 4:
      raise ValueError(f'expected NHWC images, got shape {x.shape}')
    if x.shape[1] % 4 or x.shape[2] % 4:
      hint = (' (it looks like NCHW; the network takes NHWC)'
              if x.shape[1] in (1, 3) else '')
      raise ValueError('image height and width must be multiples of 4 (two '
                       f'stride-2 reductions), got shape {x.shape}{hint}')
    if not isinstance(weights, Mapping) or 'cell' not in weights:
      got = sorted(weights) if isinstance(weights, Mapping) else type(weights)
      raise ValueError(f"missing mixing weights for 'cell'; got {got}")
    shape = self.arch_shapes()['cell']
    if self.single_path:
      w = weights['cell']
      if not isinstance(w, edges.SinglePath) or w.index.shape != shape[:1]:
        raise ValueError('a single-path network takes a '
                         f'jaxnas.edges.SinglePath of {shape[0]} edges; got '
                         f'{w!r:.200}')
    elif tuple(weights['cell'].shape) != shape:
      raise ValueError(f'cell mixing weights must have shape {shape} (edges '
                       f'{EDGE_KEYS} x ops per edge), got '
                       f'{tuple(weights["cell"].shape)}')

  @nn.compact
  def __call__(self, x: jax.Array, weights: Mapping[str, jax.Array],
               train: bool, skip_dropout: Optional[jax.Array] = None
               ) -> jax.Array:
    """Logits of images `x` under the cell's mixing `weights`;
    `skip_dropout` as `SearchCell`'s."""
    self._validate(x, weights)
    if skip_dropout is not None and self.single_path:
      raise ValueError('skip_dropout applies to mixture networks only')
    axis = self.bn_axis_name
    s = ops.Conv(self.C, 3, padding=1, name='stem_conv')(x)
    s = ops.batch_norm(train, True, axis, name='stem_bn')(s)
    channels = ([self.C] * self.N + [2 * self.C] * (self.N + 1) +
                [4 * self.C] * (self.N + 1))
    for i, c in enumerate(channels):
      if i in (self.N, 2 * self.N + 1):
        s = ResNetBasicBlock(c, 2, axis, name=f'resblock{i}')(s, train)
      else:
        s = SearchCell(c, tuple(self.primitives), self.affine,
                       self.track_running_stats, axis, self.cell_ops,
                       self.single_path_remat, name=f'cell{i}')(
                           s, weights['cell'], train, skip_dropout)
    s = nn.relu(ops.batch_norm(train, True, axis, name='lastact_bn')(s))
    out = jnp.mean(s, axis=(1, 2))
    return nn.Dense(
        self.num_classes,
        kernel_init=ops.torch_kernel_init,
        bias_init=ops.torch_bias_init(out.shape[-1]),
        name='classifier')(out)


class InferNetwork(nn.Module):
  """The network NAS-Bench-201 trained for one architecture string (AutoDL's
  TinyNetwork with InferCells): `SearchNetwork`'s skeleton with one op per
  edge and affine BatchNorms that track running statistics.

  Called as `net.apply(variables, images, train)`, returning
  `(logits, None)` like the DARTS evaluation networks (no auxiliary head).
  NB-201's training has no drop path: `drop_path` is accepted for the same
  signature and ignored. Parameters live under 'network'.

  Attributes:
    arch: an architecture string `|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`.
    C, N, num_classes: as `SearchNetwork` (NB-201 trains C=16, N=5).
    bn_axis_name: if set, BatchNorm statistics are averaged over this axis.
  """
  arch: str
  C: int = 16
  N: int = 5
  num_classes: int = 10
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               drop_path: Optional[jax.Array] = None):
    del drop_path
    arch = Arch.from_string(self.arch)
    net = SearchNetwork(self.C, self.N, self.num_classes, affine=True,
                        track_running_stats=True,
                        bn_axis_name=self.bn_axis_name,
                        cell_ops=tuple((op,) for op in arch.ops),
                        name='network')
    return net(x, {'cell': jnp.ones((NUM_EDGES, 1), x.dtype)}, train), None


def encoding():
  """NB-201 cells as `jaxnas.epd` token sequences: 6 op tokens in `EDGES`
  order, op k of `NB201_PRIMITIVES` as token k + 1 (0 is SOS)."""
  from jaxnas.spaces import nao  # pylint: disable=g-import-not-at-top
  allowed = np.zeros((NUM_EDGES, 1 + len(NB201_PRIMITIVES)), bool)
  allowed[:, 1:] = True
  return nao.Encoding(1 + len(NB201_PRIMITIVES), NUM_EDGES, allowed)


def to_tokens(arch: 'Arch') -> np.ndarray:
  """The token sequence of `arch` (see `encoding`)."""
  return np.asarray([NB201_PRIMITIVES.index(op) + 1 for op in arch.ops])


def from_tokens(tokens) -> 'Arch':
  """The Arch of a token sequence (see `encoding`); ValueError if invalid."""
  tokens = [int(t) for t in tokens]
  if len(tokens) != NUM_EDGES or not all(
      1 <= t <= len(NB201_PRIMITIVES) for t in tokens):
    raise ValueError(f'not an NB-201 token sequence: {tokens}')
  return Arch(tuple(NB201_PRIMITIVES[t - 1] for t in tokens))

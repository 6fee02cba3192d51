"""The NAO-V2 search space: architectures, their token sequences, sampling.

As renqianluo/NAO_pytorch `NAO_V2/utils.py` and `operations.py`
(../shared/methods/nao_v2.md):

* Ops (`OPERATIONS_search_small`): 0 sep_conv 3x3, 1 sep_conv 5x5,
  2 avg_pool 3x3, 3 max_pool 3x3, 4 identity.
* A cell has B = 5 nodes; node i takes two inputs from {0, ..., i + 1}
  (0 and 1 are the cell's inputs) and an op for each: `[in1, op1, in2, op2]`.
  An architecture is a normal and a reduction cell, 2 x 20 integers.
* Token sequence (`parse_arch_to_seq`): input j -> token j + 1 (1..B+1),
  op k -> token k + B + 2 (7..11 for B = 5); token 0 is SOS. Vocabulary
  1 + (B + 1) + 5 = 12, length 40.
* Random architectures (`generate_arch`): every input and op uniform.
* The EPD's swap augmentation: exchanging the two (input, op) pairs of one
  node gives the same cell (a node sums its two branches).

`param_count` gives the parameters of an architecture's stand-alone network
(`NASNetwork`, NAO_V2/model.py NASNetworkCIFAR) from its ints alone, which
NAO-V2's balanced sampling weighs architectures by (`sample_probabilities`,
`sample_index`).

`Encoding` describes a token sequence for `jaxnas.epd`: its vocabulary, its
length and which tokens each position allows (the reference's constrained
greedy decoding); `encoding()` is this space's. NAS-Bench-201 has its own
(`jaxnas.spaces.nb201.encoding`).
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxnas import ops

OPS = ('sep_conv_3x3', 'sep_conv_5x5', 'avg_pool_3x3', 'max_pool_3x3',
       'identity')
NODES = 5
SOS = 0


class Encoding(NamedTuple):
  """A token sequence family: `allowed[p, t]` says whether position p may
  hold token t (token 0 is SOS and is never allowed)."""
  vocab_size: int
  length: int
  allowed: np.ndarray

  def valid(self, tokens) -> bool:
    tokens = np.asarray(tokens)
    return (tokens.shape == (self.length,) and
            bool(np.all(self.allowed[np.arange(self.length), tokens])))


def encoding(nodes: int = NODES, num_ops: int = len(OPS)) -> Encoding:
  """The NAO token sequence of two cells of `nodes` nodes."""
  vocab = 1 + (nodes + 1) + num_ops
  length = 2 * 4 * nodes
  allowed = np.zeros((length, vocab), bool)
  for p in range(length):
    if p % 2 == 0:  # an input of node (p // 4) % nodes: 0 .. node + 1
      node = (p // 2) % (2 * nodes) // 2
      allowed[p, 1:node + 3] = True
    else:
      allowed[p, nodes + 2:] = True
  return Encoding(vocab, length, allowed)


def to_tokens(arch, nodes: int = NODES) -> np.ndarray:
  """[normal (4B ints), reduce (4B ints)] -> the 8B-token sequence."""
  arch = np.asarray(arch, np.int64).reshape(2, nodes, 2, 2)
  tokens = arch.copy()
  tokens[..., 0] += 1
  tokens[..., 1] += nodes + 2
  return tokens.reshape(-1)


def from_tokens(tokens, nodes: int = NODES) -> np.ndarray:
  """The 8B-token sequence -> [2, 4B] ints; ValueError if invalid."""
  tokens = np.asarray(tokens, np.int64)
  if not encoding(nodes).valid(tokens):
    raise ValueError(f'not a valid NAO token sequence: {tokens.tolist()}')
  arch = tokens.reshape(2, nodes, 2, 2).copy()
  arch[..., 0] -= 1
  arch[..., 1] -= nodes + 2
  return arch.reshape(2, 4 * nodes)


def random_archs(n: int, rng: np.random.Generator, nodes: int = NODES,
                 num_ops: int = len(OPS)) -> np.ndarray:
  """`n` uniformly random architectures, [n, 2, 4B] ints."""
  archs = np.empty((n, 2, nodes, 2, 2), np.int64)
  for i in range(nodes):
    archs[:, :, i, :, 0] = rng.integers(0, i + 2, (n, 2, 2))
    archs[:, :, i, :, 1] = rng.integers(0, num_ops, (n, 2, 2))
  return archs.reshape(n, 2, 4 * nodes)


def swap_augment(tokens: np.ndarray, copies: int, rng: np.random.Generator,
                 nodes: int = NODES) -> np.ndarray:
  """The reference's `controller_expand`: `copies` variants of each sequence
  [n, 8B], each with the two (input, op) pairs of one random node of the
  normal cell and of one of the reduction cell exchanged. Returns
  [n * copies, 8B], variant c of sequence i at row c * n + i."""
  tokens = np.asarray(tokens)
  n = len(tokens)
  out = np.repeat(tokens[None], copies, 0).reshape(copies, n, 2, nodes, 2, 2)
  node = rng.integers(0, nodes, (copies, n, 2))
  c, i, cell = np.meshgrid(np.arange(copies), np.arange(n), np.arange(2),
                           indexing='ij')
  pairs = out[c, i, cell, node].copy()            # [copies, n, 2, 2, 2]
  out[c, i, cell, node] = pairs[..., ::-1, :]
  return out.reshape(copies * n, -1)



# ----------------------------------------------------------------------------
# The stand-alone network of an architecture (NAO_V2/model.py
# NASNetworkCIFAR) and its parameter count without building it.


def _cell_plan(cell, nodes: int, reduction: bool):
  """(concat, factorized-reduced concat inputs) of one cell's ints."""
  cell = np.asarray(cell).reshape(nodes, 4)
  used = np.zeros(nodes + 2, int)
  for x_id, _, y_id, _ in cell:
    used[x_id] += 1
    used[y_id] += 1
  concat = [i for i in range(nodes + 2) if not used[i]]
  # In a reduction cell every node is at half size: unused inputs 0 and 1
  # are factorized-reduced before the concat (FinalCombine).
  reduced = [i for i in concat if reduction and i < 2]
  return concat, reduced


def param_count(arch, *, layers: int = 3, nodes: int = NODES,
                channels: int = 20, classes: int = 10,
                stem_multiplier: int = 3, in_channels: int = 3) -> int:
  """Parameters of NASNetworkCIFAR(arch) (no auxiliary head), from the
  architecture's ints alone: what NAO-V2's balanced sampling weighs each
  architecture by (`layers` = N, 3N + 2 cells; search size N=3, C=20)."""
  arch = np.asarray(arch).reshape(2, nodes, 4)
  sep = lambda c, k: 2 * (k * k * c + c * c + 2 * c)
  fr = lambda c_in, c: c_in * c + 2 * c          # two 1x1 halves + BN
  c0 = stem_multiplier * channels
  total = 9 * in_channels * c0 + 2 * c0           # stem conv + BN
  prev = [(32, c0), (32, c0)]                     # (size, channels)
  c = channels
  pools = (layers, 2 * layers + 1)
  for i in range(3 * layers + 2):
    reduction = i in pools
    if reduction:
      c *= 2
    cell = arch[1 if reduction else 0]
    (hw0, ch0), (hw1, ch1) = prev
    if hw0 != hw1:
      total += fr(ch0, c)
    elif ch0 != c:
      total += ch0 * c + 2 * c                    # ReLUConvBN 1x1
    if ch1 != c:
      total += ch1 * c + 2 * c
    for x_id, x_op, y_id, y_op in cell:
      for j, op in ((x_id, x_op), (y_id, y_op)):
        stride = 2 if reduction and j < 2 else 1
        if op in (0, 1):
          total += sep(c, 3 if op == 0 else 5)
        elif op == 4 and stride == 2:
          total += fr(c, c)
    concat, reduced = _cell_plan(cell, nodes, reduction)
    total += len(reduced) * fr(c, c)
    hw = hw1 // 2 if reduction else hw1
    prev = [prev[1], (hw, c * len(concat))]
  return int(total + prev[1][1] * classes + classes)


def sample_probabilities(archs, **kwargs) -> np.ndarray:
  """NAO-V2's balanced sampling: each architecture with probability
  proportional to its stand-alone parameter count (`param_count`)."""
  counts = np.asarray([param_count(a, **kwargs) for a in archs], np.float64)
  return counts / counts.sum()


def sample_index(probs: np.ndarray, seed: int, step: int) -> int:
  """The architecture trained at `step`: drawn from `probs` with a
  generator seeded by (seed, step), so a resumed run draws the same ones."""
  return int(np.random.default_rng([seed, 4, step]).choice(len(probs),
                                                           p=probs))


def _op(index: int, channels: int, stride: int, bn_axis_name, name: str):
  """NAO's op `index` (`OPERATIONS_small`) at `stride`."""
  kw = dict(bn_axis_name=bn_axis_name)
  if index in (0, 1):
    k = 3 if index == 0 else 5
    return ops.SepConv(channels, k, stride, k // 2, name=name, **kw)
  if index in (2, 3):
    return ops.Pool('avg' if index == 2 else 'max', stride, name=name)
  if index == 4:
    if stride == 1:
      return ops.Identity(name=name)
    return ops.FactorizedReduce(channels, relu=False, name=name, **kw)
  raise ValueError(f'NAO op index must be in 0..{len(OPS) - 1}, got {index}')


def network(arch, **kwargs) -> 'NASNetwork':
  """The stand-alone network of `arch` ([2, 4B] ints or a token-free flat
  list of 8B ints), hashable for jit."""
  arch = np.asarray(arch, np.int64).reshape(2, -1)
  return NASNetwork(tuple(int(x) for x in arch[0]),
                    tuple(int(x) for x in arch[1]), **kwargs)


class Cell(nn.Module):
  """A cell of NAO_V2/model.py: calibrate the two inputs to `channels`
  (FactorizedReduce after a reduction, else ReLU-Conv1x1-BN where the
  width differs), node i = op(in1) + op(in2), output = concat of the
  states no node reads (inputs 0 and 1 factorized-reduced in a
  reduction cell)."""
  cell: tuple
  channels: int
  reduction: bool
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, s0, s1, train: bool):
    c, axis, nodes = self.channels, self.bn_axis_name, len(self.cell) // 4
    if s0.shape[1] != s1.shape[1]:
      s0 = ops.FactorizedReduce(c, bn_axis_name=axis, name='calibrate_x')(
          s0, train)
    elif s0.shape[-1] != c:
      s0 = ops.ReLUConvBN(c, bn_axis_name=axis, name='calibrate_x')(
          s0, train)
    if s1.shape[-1] != c:
      s1 = ops.ReLUConvBN(c, bn_axis_name=axis, name='calibrate_y')(
          s1, train)
    states = [s0, s1]
    for i in range(nodes):
      x_id, x_op, y_id, y_op = self.cell[4 * i:4 * i + 4]
      node = 0.
      for branch, (j, op) in (('x', (x_id, x_op)), ('y', (y_id, y_op))):
        stride = 2 if self.reduction and j < 2 else 1
        node = node + _op(op, c, stride, axis, f'node{i}_{branch}')(
            states[j], train)
      states.append(node)
    concat, reduced = _cell_plan(self.cell, nodes, self.reduction)
    for j in reduced:
      states[j] = ops.FactorizedReduce(c, relu=False, bn_axis_name=axis,
                                       name=f'combine{j}')(states[j], train)
    return jnp.concatenate([states[j] for j in concat], -1)


class NASNetwork(nn.Module):
  """NAO_V2/model.py NASNetworkCIFAR without auxiliary head or drop path:
  stem Conv3x3 to 3C + BN, 3N + 2 cells with reductions at N and 2N + 1,
  global average pool, linear. Search size N=3, C=20; final N=6, C=36."""
  normal: tuple
  reduce: tuple
  layers: int = 3
  channels: int = 20
  num_classes: int = 10
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    c = self.channels
    s = ops.Conv(3 * c, 3, padding=1, name='stem')(x)
    s0 = s1 = ops.batch_norm(train, True, self.bn_axis_name,
                             name='stem_bn')(s)
    pools = (self.layers, 2 * self.layers + 1)
    for i in range(3 * self.layers + 2):
      reduction = i in pools
      if reduction:
        c *= 2
      cell = Cell(self.reduce if reduction else self.normal, c, reduction,
                  self.bn_axis_name, name=f'cell{i}')
      s0, s1 = s1, cell(s0, s1, train)
    out = jnp.mean(s1, axis=(1, 2))
    return nn.Dense(self.num_classes, name='classifier')(out)


class Trainable(nn.Module):
  """`net` in `jaxnas.training`'s interface: `(x, train, drop_path)` ->
  `(logits, None)`. Drop path is not applied (the stand-alone network has
  none yet), nor an auxiliary head."""
  net: NASNetwork

  @nn.compact
  def __call__(self, x, train: bool, drop_path=None):
    del drop_path
    return self.net(x, train), None

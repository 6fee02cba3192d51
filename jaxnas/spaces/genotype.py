"""Genotypes of the DARTS space: derivation, printed form and JSON.

A `Genotype` lists, for each intermediate node of a cell, its two chosen
(op, input) pairs, in the reference's format (quark0/darts
`cnn/genotypes.py`): input 0 and 1 are the cell's two inputs, input j >= 2 is
intermediate node j - 2. Its printed form is the reference's:

  Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=[2, 3, 4, 5],
           reduce=[...], reduce_concat=[2, 3, 4, 5])

Synopsis:

  g = derive(softmax_weights(arch))          # the DARTS rule
  text = g.to_json(); g == Genotype.from_json(text)
  g == Genotype.from_string(str(g))
"""

import ast
import json
from typing import List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from jaxnas import ops

Gene = List[Tuple[str, int]]


class Genotype(NamedTuple):
  """A discrete cell pair; field order and printed form as the reference."""
  normal: Gene
  normal_concat: List[int]
  reduce: Gene
  reduce_concat: List[int]

  def to_dict(self) -> dict:
    return {
        'normal': [[op, int(j)] for op, j in self.normal],
        'normal_concat': [int(i) for i in self.normal_concat],
        'reduce': [[op, int(j)] for op, j in self.reduce],
        'reduce_concat': [int(i) for i in self.reduce_concat],
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def from_dict(cls, d: Mapping) -> 'Genotype':
    missing = {'normal', 'normal_concat', 'reduce', 'reduce_concat'} - set(d)
    if missing:
      raise ValueError(f'genotype is missing fields {sorted(missing)}')
    d = dict(d, normal=_flat_pairs(d['normal']),
             reduce=_flat_pairs(d['reduce']))
    g = cls(
        normal=[(str(op), int(j)) for op, j in d['normal']],
        normal_concat=[int(i) for i in d['normal_concat']],
        reduce=[(str(op), int(j)) for op, j in d['reduce']],
        reduce_concat=[int(i) for i in d['reduce_concat']])
    g.validate()
    return g

  @classmethod
  def from_json(cls, text: str) -> 'Genotype':
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f'not a genotype JSON document: {e}') from e
    return cls.from_dict(d)

  @classmethod
  def from_string(cls, text: str) -> 'Genotype':
    """Parses the printed form `Genotype(normal=[...], ...)`."""
    text = text.strip()
    if not (text.startswith('Genotype(') and text.endswith(')')):
      raise ValueError(f'not a printed Genotype: {text[:60]!r}')
    try:
      call = ast.parse(text, mode='eval').body
      fields = {kw.arg: _literal(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as e:
      raise ValueError(f'cannot parse genotype {text[:60]!r}: {e}') from e
    return cls.from_dict(fields)

  def validate(self, primitives: Sequence[str] = ops.DARTS_PRIMITIVES) -> None:
    """Raises ValueError unless every pair names a known op and valid input."""
    for cell, concat in ((self.normal, self.normal_concat),
                         (self.reduce, self.reduce_concat)):
      if len(cell) % 2:
        raise ValueError(f'a cell needs two (op, input) pairs per node: {cell}')
      for i, (op, j) in enumerate(cell):
        if op not in primitives:
          raise ValueError(f'unknown op {op!r} in genotype')
        if not 0 <= j < 2 + i // 2:
          raise ValueError(f'node {i // 2} cannot read input {j}')
      nodes = 2 + len(cell) // 2
      if any(not 0 <= c < nodes for c in concat):
        raise ValueError(f'concat {concat} outside the cell\'s {nodes} nodes')


def _flat_pairs(cell) -> list:
  """(op, input) pairs, flattening pt.darts' per-node lists (DropNAS prints
  `normal=[[('sep_conv_3x3', 1), ('skip_connect', 0)], ...]`)."""
  out = []
  for item in cell:
    if (isinstance(item, (list, tuple)) and item and
        all(isinstance(p, (list, tuple)) for p in item)):
      out.extend(item)
    else:
      out.append(item)
  for pair in out:
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or
        not isinstance(pair[0], str)):
      raise ValueError(f'expected (op, input) pairs, got {pair!r}')
  return out


def _literal(node: ast.AST):
  """A Python literal, or `range(a, b)` as the reference prints concat."""
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and
      node.func.id == 'range' and not node.keywords):
    return list(range(*[ast.literal_eval(a) for a in node.args]))
  return ast.literal_eval(node)


def derive(weights: Mapping[str, np.ndarray],
           edge_ops: Optional[Mapping[str, Sequence[Sequence[str]]]] = None,
           *,
           primitives: Sequence[str] = ops.DARTS_PRIMITIVES,
           steps: int = 4,
           multiplier: int = 4,
           exclude: Sequence[str] = ('none',),
           edge_scores: Optional[Mapping[str, np.ndarray]] = None
           ) -> Genotype:
  """The DARTS derivation rule (quark0/darts `Network.genotype`).

  For each node, keep the two incoming edges whose strongest op outside
  `exclude` is largest (ties keep the lower input index, as Python's stable
  sort in the reference does); on each kept edge choose that strongest op
  (ties keep the earlier op). Pairs are listed strongest edge first.

  Args:
    weights: per cell type, (num_edges, K) scores, e.g. softmax(alpha) over all
      ops ('none' included in the normalisation, as the reference does).
    edge_ops: per cell type, each edge's op names; defaults to `primitives`
      on every edge.
    primitives: op names when `edge_ops` is not given.
    steps: intermediate nodes per cell.
    multiplier: the cell output concatenates the last `multiplier` nodes.
    exclude: ops never chosen.
    edge_scores: per cell type, [num_edges] scores that choose each node's two
      edges instead of their strongest op's weight (ROME's topology
      probabilities); ops are still chosen by `weights`.

  Returns:
    The genotype.

  Raises:
    ValueError: on shape mismatches or an edge with nothing left to choose.
  """
  cells = {}
  for cell_type in ('normal', 'reduce'):
    w = np.asarray(weights[cell_type], dtype=np.float64)
    n_edges = sum(2 + i for i in range(steps))
    names = (edge_ops[cell_type] if edge_ops is not None
             else [tuple(primitives)] * n_edges)
    if w.ndim != 2 or w.shape[0] != n_edges or len(names) != n_edges:
      raise ValueError(f'{cell_type}: expected {n_edges} edges, got weights '
                       f'{w.shape} and {len(names)} op lists')
    best = []  # (score, op) of each edge's strongest allowed op
    for e in range(n_edges):
      if len(names[e]) != w.shape[1]:
        raise ValueError(f'{cell_type} edge {e}: {len(names[e])} op names for '
                         f'{w.shape[1]} weights')
      allowed = [k for k, n in enumerate(names[e]) if n not in exclude]
      if not allowed:
        raise ValueError(f'{cell_type} edge {e} has only excluded ops '
                         f'{tuple(names[e])}')
      k_best = allowed[0]
      for k in allowed[1:]:
        if w[e, k] > w[e, k_best]:
          k_best = k
      best.append((w[e, k_best], names[e][k_best]))
    if edge_scores is not None:
      scores = np.asarray(edge_scores[cell_type], dtype=np.float64)
      if scores.shape != (n_edges,):
        raise ValueError(f'{cell_type}: edge_scores must have shape '
                         f'({n_edges},), got {scores.shape}')
      best = [(scores[e], op) for e, (_, op) in enumerate(best)]
    gene, start = [], 0
    for i in range(steps):
      n_in = 2 + i
      order = sorted(range(n_in), key=lambda j: -best[start + j][0])
      gene.extend((best[start + j][1], j) for j in order[:2])
      start += n_in
    cells[cell_type] = gene
  concat = list(range(2 + steps - multiplier, steps + 2))
  return Genotype(normal=cells['normal'], normal_concat=concat,
                  reduce=cells['reduce'], reduce_concat=list(concat))


def derive_top_pairs(weights: Mapping[str, np.ndarray], *,
                     primitives: Sequence[str] = ops.DARTS_PRIMITIVES,
                     steps: int = 4, multiplier: int = 4,
                     exclude: Sequence[str] = ('none',)) -> Genotype:
  """GDAS' NASNet-space rule (AutoDL-Projects `NASNetworkGDAS.genotype`).

  For each node, the two strongest (op, input) pairs among all of its
  incoming edges' ops outside `exclude`, strongest first (so, unlike DARTS'
  rule, both may come from one input). Ties keep the earlier edge and op.
  """
  cells = {}
  for cell_type in ('normal', 'reduce'):
    w = np.asarray(weights[cell_type], dtype=np.float64)
    n_edges = sum(2 + i for i in range(steps))
    if w.shape != (n_edges, len(primitives)):
      raise ValueError(f'{cell_type}: expected weights of shape '
                       f'({n_edges}, {len(primitives)}), got {w.shape}')
    gene, start = [], 0
    for i in range(steps):
      pairs = [(w[start + j, k], op, j) for j in range(2 + i)
               for k, op in enumerate(primitives) if op not in exclude]
      pairs.sort(key=lambda t: -t[0])  # stable: ties keep the earlier pair
      gene.extend((op, j) for _, op, j in pairs[:2])
      start += 2 + i
    cells[cell_type] = gene
  concat = list(range(2 + steps - multiplier, steps + 2))
  return Genotype(normal=cells['normal'], normal_concat=concat,
                  reduce=cells['reduce'], reduce_concat=list(concat))


def _chosen(g, cell):
  """(edge 'j->i', op) pairs of a DARTS Genotype's or NB-201 Arch's cell."""
  if hasattr(g, 'normal'):
    return [(f'{j}->{2 + k // 2}', op)
            for k, (op, j) in enumerate(getattr(g, cell))]
  return [(f'{j}->{i}', op) for i, j, op in g.edges()]


def choice_counts(genotypes: Sequence[Genotype]) -> dict:
  """How often each op, edge and (edge, op) was chosen over `genotypes`.

  For the spread of several searches (seeds): per cell type, `ops` counts
  chosen ops, `edges` counts chosen edges 'j->i' (DARTS: nodes numbered as in
  the reference, 0 and 1 the cell inputs, 2.. the intermediate nodes) and
  `edge_ops` counts 'j->i op'. Keys are sorted by decreasing count. NB-201
  archs (`jaxnas.spaces.nb201.Arch`, one cell type 'cell', every edge
  present) are counted the same way.
  """
  def ranked(counter):
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))

  out = {'genotypes': len(genotypes)}
  cells = (('normal', 'reduce') if not genotypes or
           hasattr(genotypes[0], 'normal') else ('cell',))
  for cell in cells:
    ops_, edges, edge_ops = {}, {}, {}
    for g in genotypes:
      for edge, op in _chosen(g, cell):
        ops_[op] = ops_.get(op, 0) + 1
        edges[edge] = edges.get(edge, 0) + 1
        edge_ops[f'{edge} {op}'] = edge_ops.get(f'{edge} {op}', 0) + 1
    out[cell] = {'ops': ranked(ops_), 'edges': ranked(edges),
                 'edge_ops': ranked(edge_ops)}
  return out


def format_counts(counts: Mapping) -> str:
  """A few readable lines of `choice_counts`' ops and edges."""
  n = counts['genotypes']
  lines = []
  for cell in [k for k in counts if k != 'genotypes']:
    for what in ('ops', 'edges'):
      items = ', '.join(f'{k} {v}/{n}' for k, v in counts[cell][what].items())
      lines.append(f'  {cell} {what}: {items}')
  return '\n'.join(lines)


# Published cells, as their reference code ships them (searched on CIFAR-10),
# read from the repositories at the commits ../shared/methods/ cites.
PUBLISHED = {
    # quark0/darts cnn/genotypes.py: first- and second-order DARTS (the paper's
    # 3.00% and 2.76% CIFAR-10 results; DARTS = DARTS_V2).
    'DARTS_V1': Genotype(
        normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0),
                ('skip_connect', 0), ('sep_conv_3x3', 1),
                ('skip_connect', 0), ('sep_conv_3x3', 1),
                ('sep_conv_3x3', 0), ('skip_connect', 2)],
        normal_concat=[2, 3, 4, 5],
        reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1),
                ('skip_connect', 2), ('max_pool_3x3', 0),
                ('max_pool_3x3', 0), ('skip_connect', 2),
                ('skip_connect', 2), ('avg_pool_3x3', 0)],
        reduce_concat=[2, 3, 4, 5]),
    'DARTS_V2': Genotype(
        normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
                ('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
                ('sep_conv_3x3', 1), ('skip_connect', 0),
                ('skip_connect', 0), ('dil_conv_3x3', 2)],
        normal_concat=[2, 3, 4, 5],
        reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1),
                ('skip_connect', 2), ('max_pool_3x3', 1),
                ('max_pool_3x3', 0), ('skip_connect', 2),
                ('skip_connect', 2), ('max_pool_3x3', 1)],
        reduce_concat=[2, 3, 4, 5]),
    # chenxin061/pdarts genotypes.py PDARTS (2.50% CIFAR-10, 24.4% ImageNet).
    'PDARTS': Genotype(
        normal=[('skip_connect', 0), ('dil_conv_3x3', 1),
                ('skip_connect', 0), ('sep_conv_3x3', 1),
                ('sep_conv_3x3', 1), ('sep_conv_3x3', 3),
                ('sep_conv_3x3', 0), ('dil_conv_5x5', 4)],
        normal_concat=[2, 3, 4, 5],
        reduce=[('avg_pool_3x3', 0), ('sep_conv_5x5', 1),
                ('sep_conv_3x3', 0), ('dil_conv_5x5', 2),
                ('max_pool_3x3', 0), ('dil_conv_3x3', 1),
                ('dil_conv_3x3', 1), ('dil_conv_5x5', 3)],
        reduce_concat=[2, 3, 4, 5]),
    # wiljohnhong/DropNAS README.md, "Augment": "the genotype we found on
    # CIFAR10" (pt.darts' per-node lists, flattened in order).
    'DROPNAS': Genotype(
        normal=[('sep_conv_3x3', 1), ('skip_connect', 0),
                ('sep_conv_3x3', 1), ('sep_conv_3x3', 0),
                ('sep_conv_3x3', 1), ('sep_conv_3x3', 0),
                ('dil_conv_5x5', 4), ('dil_conv_3x3', 1)],
        normal_concat=[2, 3, 4, 5],
        reduce=[('max_pool_3x3', 0), ('sep_conv_5x5', 1),
                ('dil_conv_5x5', 2), ('sep_conv_5x5', 1),
                ('dil_conv_5x5', 3), ('dil_conv_5x5', 2),
                ('dil_conv_5x5', 3), ('dil_conv_5x5', 4)],
        reduce_concat=[2, 3, 4, 5]),
    # GAEA (liamcli/gaea_release) ships no cell labelled as its result; ROME
    # has no public code; NAO-V2's cells are of another space.
}
PUBLISHED['DARTS'] = PUBLISHED['DARTS_V2']


def named(name: str) -> Genotype:
  """A published genotype by name (`PUBLISHED`'s keys)."""
  if name not in PUBLISHED:
    raise ValueError(f'no published genotype {name!r}; known: '
                     f'{sorted(PUBLISHED)}')
  return PUBLISHED[name]


def load(path_or_name: str) -> Genotype:
  """A genotype from a published name, 'random:SEED' (`random_genotype`
  seeded by SEED: the random baseline), a genotype.json file (as searches
  write it) or a file holding the printed form `Genotype(normal=...)`."""
  if path_or_name in PUBLISHED:
    return PUBLISHED[path_or_name]
  if path_or_name.startswith('random:'):
    seed = path_or_name[len('random:'):]
    if not seed.isdigit():
      raise ValueError(f"'random:SEED' needs an integer seed, got {seed!r}")
    return random_genotype(np.random.default_rng(int(seed)))
  try:
    with open(path_or_name) as f:
      text = f.read()
  except OSError as e:
    raise ValueError(
        f'{path_or_name!r} is neither a published genotype '
        f'({", ".join(sorted(PUBLISHED))}) nor a readable file: {e}') from e
  if text.lstrip().startswith('Genotype('):
    return Genotype.from_string(text)
  return Genotype.from_json(text)


def random_genotype(rng: np.random.Generator, steps: int = 4,
                    primitives: Sequence[str] = ops.DARTS_PRIMITIVES
                    ) -> Genotype:
  """A uniformly random cell pair: per node two distinct inputs and an op
  other than 'none' for each (the DARTS paper's random baseline samples
  cells this way)."""
  choices = [p for p in primitives if p != 'none']
  cells = {}
  for cell_type in ('normal', 'reduce'):
    gene = []
    for i in range(steps):
      for j in sorted(rng.choice(2 + i, 2, replace=False)):
        gene.append((choices[rng.integers(len(choices))], int(j)))
    cells[cell_type] = gene
  concat = list(range(2, 2 + steps))
  return Genotype(cells['normal'], concat, cells['reduce'], list(concat))

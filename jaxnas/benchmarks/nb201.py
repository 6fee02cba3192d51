"""NAS-Bench-201 ground truth as a small in-memory table.

Reads the compact CSV `nb201_hp200_mean_acc.csv` (one row per architecture,
all 15,625, columns `index`, `arch`, then accuracies in percent; see
../shared/data/README.md) with the csv module and numpy, in well under a
second. Indices are the benchmark's own (the CSV's `index` column, the order
of NAS-Bench-201's `api.arch(i)`); they are not a formula of the ops.

Metrics are the CSV's accuracy columns (200-epoch seed means):
`cifar10_valid`, `cifar10_valid_test`, `cifar10_test`, `cifar100_valid`,
`cifar100_test`, `imagenet16_valid`, `imagenet16_test`, `cifar10_train`,
`cifar100_train`, `imagenet16_train`, `nats_cifar100_test`,
`nats_imagenet16_test`. Friendly aliases (case-insensitive), the numbers
papers quote:

  'cifar10'        -> 'cifar10_test'    (trained on train+valid, ori-test)
  'cifar10-valid'  -> 'cifar10_valid'   (trained on train, x-valid)
  'cifar100'       -> 'cifar100_test'   (x-test)
  'imagenet16-120', 'imagenet16' -> 'imagenet16_test'   (x-test)

Ranks are "competition" ranks: 1 + the number of architectures strictly
better, so tied architectures share the best of their ranks (two cells tie
for the best `cifar10_test`, 94.3733, at indices 6111 and 13714: both rank
1). Ties are ties at the CSV's 4-decimal precision. `best` returns the lowest
index among the tied.

Synopsis:

  table = Table.load('../shared/data/nb201/nb201_hp200_mean_acc.csv')
  arch = Arch.from_string('|nor_conv_3x3~0|+|...|')
  table.index(arch); table.lookup(arch)['cifar10_test']
  table.rank(arch, 'cifar100'); table.regret(arch, 'cifar10')
  index, best_arch, acc = table.best('cifar10')
"""

import csv
import os
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from jaxnas.spaces.nb201 import Arch

CSV_NAME = 'nb201_hp200_mean_acc.csv'
ALIASES = {
    'cifar10': 'cifar10_test',
    'cifar10-valid': 'cifar10_valid',
    'cifar100': 'cifar100_test',
    'imagenet16-120': 'imagenet16_test',
    'imagenet16': 'imagenet16_test',
}
# What papers' NB-201 tables report.
PAPER_METRICS = ('cifar10_test', 'cifar100_test', 'imagenet16_test')
# Datasets of the NATS-Bench API behind each column of `from_nats_bench`:
# column -> (dataset, key of `get_more_info`).
_NATS_COLUMNS = {
    'cifar10_valid': ('cifar10-valid', 'valid-accuracy'),
    'cifar10_valid_test': ('cifar10-valid', 'test-accuracy'),
    'cifar10_test': ('cifar10', 'test-accuracy'),
    'cifar100_valid': ('cifar100', 'valid-accuracy'),
    'cifar100_test': ('cifar100', 'test-accuracy'),
    'imagenet16_valid': ('ImageNet16-120', 'valid-accuracy'),
    'imagenet16_test': ('ImageNet16-120', 'test-accuracy'),
    'cifar10_train': ('cifar10-valid', 'train-accuracy'),
    'cifar100_train': ('cifar100', 'train-accuracy'),
    'imagenet16_train': ('ImageNet16-120', 'train-accuracy'),
}

ArchLike = Union[Arch, str, int]


class Table:
  """Accuracies of every NAS-Bench-201 architecture, by benchmark index.

  Architectures are given as an `Arch`, an arch string or a benchmark index.
  """

  def __init__(self, archs: Sequence[Union[Arch, str]],
               values: Mapping[str, Sequence[float]]):
    """Builds a table; row i is the architecture of benchmark index i.

    Args:
      archs: the architecture of each index.
      values: metric name -> accuracy of each index.

    Raises:
      ValueError: on malformed or repeated architectures or ragged columns.
    """
    self._archs = tuple(a if isinstance(a, Arch) else Arch.from_string(a)
                        for a in archs)
    self._index = {a: i for i, a in enumerate(self._archs)}
    if len(self._index) != len(self._archs):
      first = {}
      for i, a in enumerate(self._archs):
        if first.setdefault(a, i) != i:
          raise ValueError(f'architecture {a} appears at indices {first[a]} '
                           f'and {i}')
    self._values = {}
    for name, column in values.items():
      column = np.asarray(column, dtype=np.float64)
      if column.shape != (len(self._archs),):
        raise ValueError(f'metric {name!r} has {column.shape} values for '
                         f'{len(self._archs)} architectures')
      column.setflags(write=False)
      self._values[name] = column
    if not self._values:
      raise ValueError('a table needs at least one metric')

  @classmethod
  def load(cls, path: Union[str, os.PathLike]) -> 'Table':
    """Reads the compact CSV (or a folder holding `CSV_NAME`).

    Raises:
      FileNotFoundError: if there is no such file.
      ValueError: if the file is not such a table.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, CSV_NAME)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f'no NAS-Bench-201 table at {path!r}: pass the path of {CSV_NAME} '
          '(columns index, arch, accuracies; in this project under '
          '../shared/data/nb201/), or build one from the official benchmark '
          'with Table.from_nats_bench')
    with open(path, newline='') as f:
      reader = csv.reader(f)
      header = next(reader, None)
      rows = [r for r in reader if r]
    if not header or header[:2] != ['index', 'arch'] or len(header) < 3:
      raise ValueError(f'{path}: expected a header "index,arch,<metrics>", '
                       f'got {header}')
    width = len(header)
    for line, r in enumerate(rows, start=2):
      if len(r) != width:
        raise ValueError(f'{path}:{line}: {len(r)} fields, expected {width}')
    try:
      indices = np.array([int(r[0]) for r in rows])
      data = np.array([[float(x) for x in r[2:]] for r in rows],
                      dtype=np.float64).reshape(len(rows), width - 2)
    except ValueError as e:
      raise ValueError(f'{path}: non-numeric index or accuracy: {e}') from e
    order = np.argsort(indices)
    if not np.array_equal(indices[order], np.arange(len(rows))):
      raise ValueError(f'{path}: the index column must hold 0..{len(rows) - 1}'
                       ' once each')
    archs = [rows[i][1] for i in order]
    try:
      return cls(archs, {name: data[order, k]
                         for k, name in enumerate(header[2:])})
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from e

  @classmethod
  def from_nats_bench(cls, path: Optional[str], hp: str = '200') -> 'Table':
    """Builds the table from the official NATS-Bench topology API (slow).

    Queries every architecture's seed-mean accuracy (`is_random=False`) of
    `hp` epochs with `nats_bench` (not a jaxnas dependency). The columns are
    those of `_NATS_COLUMNS` (the compact CSV's, without its `nats_*`
    duplicates: here every column comes from NATS-Bench).

    Args:
      path: the NATS-tss benchmark file or folder (e.g.
        NATS-tss-v1_0-3ffb9-simple), or None for nats_bench's default under
        $TORCH_HOME.
      hp: training epochs, '12' or '200'.

    Raises:
      ImportError: if nats_bench is not installed.
    """
    try:
      import nats_bench  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          'Table.from_nats_bench needs the nats_bench package (pip install '
          'nats_bench) and the NATS-tss benchmark files (see '
          'github.com/D-X-Y/NATS-Bench); Table.load reads the compact CSV '
          'without them') from e
    api = nats_bench.create(path, 'tss', fast_mode=True, verbose=False)
    archs, values = [], {name: [] for name in _NATS_COLUMNS}
    for i in range(len(api)):
      archs.append(api.arch(i))
      infos = {}
      for name, (dataset, key) in _NATS_COLUMNS.items():
        if dataset not in infos:
          infos[dataset] = api.get_more_info(i, dataset, hp=hp,
                                             is_random=False)
        values[name].append(infos[dataset][key])
    return cls(archs, values)

  def __len__(self) -> int:
    return len(self._archs)

  def __contains__(self, arch: Union[Arch, str]) -> bool:
    try:
      self._row(arch)
    except (KeyError, ValueError, IndexError):
      return False
    return True

  @property
  def metrics(self) -> Tuple[str, ...]:
    """The metric (column) names."""
    return tuple(self._values)

  def metric(self, name: str) -> str:
    """The column `name` or its alias (see the module docstring) stands for.

    Raises:
      ValueError: for an unknown name.
    """
    if name in self._values:
      return name
    column = ALIASES.get(name.lower()) if isinstance(name, str) else None
    if column in self._values:
      return column
    raise ValueError(f'unknown metric {name!r}; columns: {self.metrics}; '
                     f'aliases: {ALIASES}')

  def values(self, metric: str = 'cifar10_test') -> np.ndarray:
    """The metric of every architecture, by index (read-only)."""
    return self._values[self.metric(metric)]

  def index(self, arch: ArchLike) -> int:
    """The benchmark index of `arch` (an `Arch` or an arch string).

    Raises:
      ValueError: for a malformed arch string.
      KeyError: for an architecture the table does not hold.
    """
    return self._row(arch)

  def arch(self, index: int) -> Arch:
    """The architecture of benchmark index `index`."""
    return self._archs[self._row(index)]

  def lookup(self, arch: ArchLike) -> Dict[str, float]:
    """Every metric of `arch`: {column: accuracy in percent}."""
    row = self._row(arch)
    return {name: float(v[row]) for name, v in self._values.items()}

  def accuracy(self, arch: ArchLike, metric: str = 'cifar10_test') -> float:
    """One metric of `arch`."""
    return float(self.values(metric)[self._row(arch)])

  def rank(self, arch: ArchLike, metric: str = 'cifar10_test') -> int:
    """1 + the number of architectures strictly better on `metric`."""
    v = self.values(metric)
    return 1 + int(np.sum(v > v[self._row(arch)]))

  def regret(self, arch: ArchLike, metric: str = 'cifar10_test') -> float:
    """Best accuracy on `metric` minus that of `arch` (>= 0)."""
    v = self.values(metric)
    return float(v.max() - v[self._row(arch)])

  def best(self, metric: str = 'cifar10_test') -> Tuple[int, Arch, float]:
    """(index, architecture, accuracy) of the best; ties: lowest index."""
    v = self.values(metric)
    i = int(np.argmax(v))
    return i, self._archs[i], float(v[i])

  def random_stats(self, metric: str = 'cifar10_test', n: Optional[int] = None,
                   seed: int = 0) -> Dict[str, float]:
    """Mean and (population) std of `metric` over all architectures.

    Args:
      metric: column or alias.
      n: if given, over `n` distinct architectures drawn uniformly with
        `numpy.random.default_rng(seed)` instead.
      seed: the draw's seed.

    Returns:
      {'mean': ..., 'std': ..., 'n': number of architectures}.
    """
    v = self.values(metric)
    if n is not None:
      if not 1 <= n <= len(v):
        raise ValueError(f'n must be in [1, {len(v)}], got {n}')
      v = v[np.random.default_rng(seed).choice(len(v), n, replace=False)]
    return {'mean': float(v.mean()), 'std': float(v.std()), 'n': len(v)}

  def report(self, arch: ArchLike,
             metrics: Sequence[str] = PAPER_METRICS) -> Dict[str, object]:
    """Index, arch string, and accuracy / rank / regret per metric."""
    row = self._row(arch)
    out = {'index': row, 'arch': self._archs[row].to_string()}
    for m in metrics:
      column = self.metric(m)
      out[column] = {'accuracy': self.accuracy(row, column),
                     'rank': self.rank(row, column),
                     'regret': self.regret(row, column)}
    return out

  def _row(self, arch: ArchLike) -> int:
    if isinstance(arch, (int, np.integer)) and not isinstance(arch, bool):
      if not 0 <= arch < len(self._archs):
        raise IndexError(f'index {arch} outside [0, {len(self._archs)})')
      return int(arch)
    if isinstance(arch, str):
      arch = Arch.from_string(arch)
    if not isinstance(arch, Arch):
      raise ValueError(f'expected an Arch, an arch string or an index, got '
                       f'{type(arch).__name__}')
    try:
      return self._index[arch]
    except KeyError:
      raise KeyError(f'{arch} is not in this table') from None

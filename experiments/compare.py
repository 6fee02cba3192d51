r"""Draws several searches' architecture curves in one picture each.

Reads the per-epoch alphas every search writes (`WORKDIR/alphas/epoch_*.npz`)
and draws, over the epochs all runs have:

* `entropy.png`: each run's mean mixture entropy per edge, per cell type;
* `group_alphas.png`: each run's mean raw alpha of the parametric and the
  parameter-free ops per cell type (DropNAS' picture of the Matthew
  effect), when every run has raw alphas over all its primitives.

Usage:

  python -m experiments.compare --out /tmp/cmp \
      --run darts=/tmp/exp/cmp_darts --run dropnas=/tmp/exp/cmp_dropnas
"""

import glob
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

from absl import app
from absl import flags
import numpy as np

from experiments import common

_RUNS = flags.DEFINE_multi_string(
    'run', None, 'LABEL=WORKDIR of a search (repeat for each run).')
_OUT = flags.DEFINE_string('out', None, 'Directory for the pictures.')


def load_run(workdir: str) -> Tuple[List[Dict[str, np.ndarray]],
                                    List[Dict[str, np.ndarray]], Sequence[str]]:
  """(per-epoch mixing weights, per-epoch raw alphas or [], primitives)."""
  if not glob.glob(os.path.join(workdir, 'alphas', 'epoch_*.npz')):
    raise FileNotFoundError(f'{workdir}: no alphas/epoch_*.npz (is it a '
                            'search workdir with a finished epoch?)')
  with open(os.path.join(workdir, 'config.json')) as f:
    primitives = tuple(json.load(f)['primitives'])
  weights, alphas = common.read_alpha_history(workdir, primitives)
  return weights, alphas, primitives


def compare(runs: Dict[str, str], out: str) -> List[str]:
  """Writes the pictures of `runs` ({label: workdir}) to `out`; returns
  their paths."""
  from jaxnas import ops  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import viz  # pylint: disable=g-import-not-at-top
  loaded = {label: load_run(wd) for label, wd in runs.items()}
  epochs = min(len(w) for w, _, _ in loaded.values())
  os.makedirs(out, exist_ok=True)
  def name(label, cell, cells):   # plot_entropy appends ' cell'
    return label if len(cells) == 1 else f'{label} {cell}'

  merged = [{name(label, c, ws[e]): w for label, (ws, _, _) in loaded.items()
             for c, w in ws[e].items()} for e in range(epochs)]
  written = [viz.plot_entropy(merged, os.path.join(out, 'entropy.png'))]
  if all(a for _, a, _ in loaded.values()):
    prims = {p for _, _, p in loaded.values()}
    if len(prims) == 1:
      conv = ops.parametric_mask(prims.pop())
      merged = [{f'{label} {c}': a for label, (_, alphas, _) in
                 loaded.items() for c, a in alphas[e].items()}
                for e in range(epochs)]
      written.append(viz.plot_group_means(
          merged, {'parametric': conv, 'parameter-free': ~conv},
          os.path.join(out, 'group_alphas.png')))
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  runs = {}
  for item in _RUNS.value or []:
    label, sep, wd = item.partition('=')
    if not sep or not label or not wd:
      sys.exit(f'error: --run takes LABEL=WORKDIR, got {item!r}')
    runs[label] = wd
  if not runs or not _OUT.value:
    sys.exit('error: give --out and at least one --run LABEL=WORKDIR')
  try:
    for path in compare(runs, _OUT.value):
      print(path)
  except FileNotFoundError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)

"""Pictures (PNG) of genotype cells and architecture weights, with matplotlib.

Genotype cells: the two cell inputs c_{k-2}, c_{k-1} on the left, intermediate
nodes 0..n-1 in the middle, the output c_{k} on the right; each chosen edge is
an arrow labelled with its op.

Architecture weights (`plot_alpha_heatmap`, `plot_alpha_trajectories`): one
row / panel per edge, labelled 'j→i' with the nodes numbered as the reference
numbers states: 0 and 1 are the cell inputs c_{k-2}, c_{k-1}, 2.. the
intermediate nodes (so '1→3' is c_{k-1} into the second intermediate node).
"""

from typing import Dict, List, Mapping, Optional, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from jaxnas.spaces.genotype import Genotype

_OP_COLOURS = {
    'max_pool_3x3': '#1f77b4', 'avg_pool_3x3': '#17becf',
    'skip_connect': '#7f7f7f', 'sep_conv_3x3': '#d62728',
    'sep_conv_5x5': '#ff7f0e', 'dil_conv_3x3': '#2ca02c',
    'dil_conv_5x5': '#9467bd', 'none': '#000000',
}


def plot_cell(gene, concat, title: str, path: str) -> None:
  """Draws one cell (a list of (op, input) pairs) to a PNG at `path`."""
  steps = len(gene) // 2
  pos = {0: (0., 1.5), 1: (0., -1.5)}
  for i in range(steps):
    pos[2 + i] = (2. + 1.6 * i, 2.2 - 4.4 * i / max(steps - 1, 1))
  out = (3. + 1.6 * steps, 0.)
  fig, ax = plt.subplots(figsize=(2.2 + 1.6 * steps, 4.5))
  for k, (op, j) in enumerate(gene):
    (x0, y0), (x1, y1) = pos[j], pos[2 + k // 2]
    colour = _OP_COLOURS.get(op, '#333333')
    ax.annotate('', xy=(x1, y1), xytext=(x0, y0),
                arrowprops=dict(arrowstyle='->', color=colour, lw=1.6,
                                shrinkA=14, shrinkB=14,
                                connectionstyle='arc3,rad=0.12'))
    ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12 * (1 - 2 * (k % 2)), op,
            fontsize=7, color=colour, ha='center', va='center',
            bbox=dict(fc='white', ec='none', alpha=0.8, pad=0.5))
  for i in concat:
    (x0, y0) = pos[i]
    ax.annotate('', xy=out, xytext=(x0, y0),
                arrowprops=dict(arrowstyle='->', color='#bbbbbb', lw=1,
                                shrinkA=14, shrinkB=16, ls='--'))
  labels = {0: 'c_{k-2}', 1: 'c_{k-1}'}
  for n, (x, y) in pos.items():
    face = '#a6cee3' if n < 2 else '#fdbf6f'
    ax.text(x, y, labels.get(n, str(n - 2)), ha='center', va='center',
            fontsize=9, bbox=dict(boxstyle='circle,pad=0.4', fc=face,
                                  ec='black'))
  ax.text(*out, 'c_{k}', ha='center', va='center', fontsize=9,
          bbox=dict(boxstyle='round,pad=0.4', fc='#b2df8a', ec='black'))
  ax.set_title(title)
  ax.set_xlim(-0.8, out[0] + 0.8)
  ax.set_ylim(-3.2, 3.2)
  ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_genotype(genotype: Genotype, prefix: str) -> list:
  """Writes `{prefix}normal.png` and `{prefix}reduce.png`; returns the paths."""
  paths = []
  for cell in ('normal', 'reduce'):
    path = f'{prefix}{cell}.png'
    plot_cell(getattr(genotype, cell), getattr(genotype, f'{cell}_concat'),
              f'{cell} cell', path)
    paths.append(path)
  return paths


def _op_colours(primitives: Sequence[str]) -> Dict[str, str]:
  """`_OP_COLOURS`, with tab10 colours for ops it does not name."""
  spare = iter(plt.get_cmap('tab10').colors * 3)
  out = {}
  for op in primitives:
    out[op] = _OP_COLOURS.get(op) or matplotlib.colors.to_hex(next(spare))
  return out


def default_edge_labels(num_edges: int) -> List[str]:
  """'j→i' for each edge in the reference's order (node i's inputs j < i).

  Nodes 0, 1 are the cell inputs and 2.. the intermediate nodes; a count that
  is no cell's edge count gets 'edge 0', 'edge 1', ...
  """
  labels, node = [], 2
  while len(labels) < num_edges:
    labels += [f'{j}\u2192{node}' for j in range(node)]
    node += 1
  if len(labels) != num_edges:
    return [f'edge {e}' for e in range(num_edges)]
  return labels


def _edge_labels(edge_labels, cell: str, num_edges: int) -> List[str]:
  labels = (edge_labels or {}).get(cell)
  if labels is None:
    return default_edge_labels(num_edges)
  if len(labels) != num_edges:
    raise ValueError(f'{len(labels)} edge labels for the {num_edges} edges of '
                     f'the {cell} cell')
  return list(labels)


def _check_weights(cell: str, w: np.ndarray, primitives: Sequence[str]):
  if w.ndim != 2 or w.shape[1] != len(primitives):
    raise ValueError(f'{cell} weights must be [edges, {len(primitives)} ops] '
                     f'for primitives {list(primitives)}, got {w.shape}')


def plot_alpha_heatmap(weights: Mapping[str, np.ndarray],
                       edge_labels: Optional[Mapping[str, Sequence[str]]],
                       primitives: Sequence[str], path: str) -> str:
  """Draws each cell type's edge x op weights as an annotated heatmap.

  Args:
    weights: {cell type ('normal', 'reduce'): [edges, ops] weights}, e.g. the
      softmax of the architecture parameters; one subplot per entry, in
      order, all on one colour scale from 0 to the largest weight.
    edge_labels: {cell type: one label per edge}, or None (or a missing cell
      type) for 'j→i' labels (see `default_edge_labels`).
    primitives: the op names of the columns.
    path: the PNG to write.

  Returns:
    `path`.
  """
  cells = list(weights)
  arrays = {c: np.asarray(weights[c], np.float64) for c in cells}
  for c in cells:
    _check_weights(c, arrays[c], primitives)
  rows = max(a.shape[0] for a in arrays.values())
  vmax = max(max(float(a.max()) for a in arrays.values()), 1e-12)
  fig, axes = plt.subplots(
      1, len(cells), squeeze=False,
      figsize=(len(cells) * (1.8 + 0.75 * len(primitives)),
               1.6 + 0.36 * rows))
  for ax, cell in zip(axes[0], cells):
    w = arrays[cell]
    im = ax.imshow(w, cmap='viridis', aspect='auto', vmin=0., vmax=vmax)
    threshold = 0.5 * (im.norm.vmin + im.norm.vmax)
    for e in range(w.shape[0]):
      for o in range(w.shape[1]):
        ax.text(o, e, f'{w[e, o]:.2f}', ha='center', va='center',
                fontsize=7,
                color='black' if w[e, o] > threshold else 'white')
    ax.set_xticks(range(len(primitives)))
    ax.set_xticklabels(primitives, rotation=45, ha='right', fontsize=8)
    ax.set_yticks(range(w.shape[0]))
    ax.set_yticklabels(_edge_labels(edge_labels, cell, w.shape[0]),
                       fontsize=8)
    ax.set_ylabel('edge (input\u2192node)')
    ax.set_title(f'{cell} cell')
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_alpha_trajectories(
    history: Sequence[Mapping[str, np.ndarray]], primitives: Sequence[str],
    path: str,
    edge_labels: Optional[Mapping[str, Sequence[str]]] = None) -> str:
  """Draws how each edge's op weights moved over the epochs of a search.

  Per cell type a grid of small panels, one per edge, each with one line per
  op (coloured as in the genotype pictures) over epochs; one legend for all.

  Args:
    history: one entry per epoch, each {cell type: [edges, ops] weights}.
    primitives: the op names, in the weights' column order.
    path: the PNG to write.
    edge_labels: as in `plot_alpha_heatmap`.

  Returns:
    `path`.
  """
  if not history:
    raise ValueError('history is empty: nothing to plot')
  cells = list(history[0])
  series = {}
  for cell in cells:
    series[cell] = np.stack([np.asarray(h[cell], np.float64)
                             for h in history])  # [epochs, edges, ops]
    _check_weights(cell, series[cell][0], primitives)
  colours = _op_colours(primitives)
  epochs = np.arange(len(history))
  cols = 4
  grid_rows = {c: -(-series[c].shape[1] // cols) for c in cells}
  legend_rows = -(-len(primitives) // 4)
  heights = [1.7 * grid_rows[c] + 0.7 for c in cells] + [0.25 * legend_rows
                                                          + 0.2]
  fig = plt.figure(figsize=(2.6 * cols, sum(heights)), layout='constrained')
  subfigs = fig.subfigures(len(cells) + 1, 1, squeeze=False,
                           height_ratios=heights)
  marker = 'o' if len(history) < 3 else None
  for subfig, cell in zip(subfigs[:-1, 0], cells):
    s = series[cell]
    labels = _edge_labels(edge_labels, cell, s.shape[1])
    axes = subfig.subplots(grid_rows[cell], cols, squeeze=False,
                           sharex=True, sharey=True)
    for e, ax in enumerate(axes.flat):
      if e >= s.shape[1]:
        ax.axis('off')
        continue
      if e + cols >= s.shape[1]:  # nothing below: show its epoch ticks
        ax.xaxis.set_tick_params(labelbottom=True)
      for o, op in enumerate(primitives):
        ax.plot(epochs, s[:, e, o], color=colours[op], lw=1.2,
                marker=marker, ms=3, label=op)
      ax.set_title(labels[e], fontsize=8, pad=2)
      ax.tick_params(labelsize=6)
      ax.margins(y=0.1)  # autoscaled: early moves are small
      ax.grid(alpha=0.3)
    subfig.suptitle(f'{cell} cell', fontsize=10)
    subfig.supxlabel('epoch', fontsize=8)
    subfig.supylabel('weight', fontsize=8)
  handles = [matplotlib.lines.Line2D([], [], color=colours[op], lw=2,
                                     label=op) for op in primitives]
  subfigs[-1, 0].legend(handles=handles, loc='center',
                        ncol=min(len(primitives), 4), fontsize=8,
                        frameon=False)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def mixture_entropy(weights: np.ndarray) -> float:
  """Mean over edges of the entropy (nats) of each edge's op weights.

  log(K) for uniform rows of K ops, 0 for one-hot rows (0 log 0 = 0).
  """
  w = np.asarray(weights, np.float64)
  terms = np.where(w > 0, -w * np.log(np.where(w > 0, w, 1.)), 0.)
  return float(np.mean(np.sum(terms, axis=-1)))


def plot_entropy(history: Sequence[Mapping[str, np.ndarray]],
                 path: str) -> str:
  """Draws each cell type's mean mixture entropy (`mixture_entropy`) over
  the epochs of a search, with the uniform mixture's log K for reference.

  Args:
    history: one entry per epoch, each {cell type: [edges, ops] weights}.
    path: the PNG to write.

  Returns:
    `path`.
  """
  if not history:
    raise ValueError('history is empty: nothing to plot')
  fig, ax = plt.subplots(figsize=(5, 3.2), layout='constrained')
  epochs = np.arange(len(history))
  marker = 'o' if len(history) < 3 else None
  for cell in history[0]:
    ax.plot(epochs, [mixture_entropy(h[cell]) for h in history],
            marker=marker, label=f'{cell} cell')
  for k in sorted({np.shape(w)[-1] for w in history[0].values()}):
    ax.axhline(np.log(k), color='grey', ls='--', lw=1,
               label=f'uniform (log {k})')
  ax.set_xlabel('epoch')
  ax.set_ylabel('mean entropy per edge (nats)')
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def group_means(weights: np.ndarray, members: np.ndarray) -> float:
  """Mean of `weights` [edges, ops] over the ops where `members` [ops]."""
  return float(np.mean(np.asarray(weights)[..., np.asarray(members, bool)]))


def plot_group_means(history: Sequence[Mapping[str, np.ndarray]],
                     groups: Mapping[str, Sequence[bool]], path: str,
                     ylabel: str = 'mean alpha') -> str:
  """Draws, per cell type, each op group's mean value over the epochs.

  DropNAS' picture of the Matthew effect: with `history` the raw alphas and
  `groups` {'parametric': [K] bool, 'parameter-free': [K] bool}.

  Args:
    history: one entry per epoch, each {cell type: [edges, ops] array}.
    groups: {label: [ops] membership}; each group needs at least one op.
    path: the PNG to write.
    ylabel: what the arrays are.

  Returns:
    `path`.
  """
  if not history:
    raise ValueError('history is empty: nothing to plot')
  for label, members in groups.items():
    if not np.any(members):
      raise ValueError(f'group {label!r} has no ops')
  cells = list(history[0])
  fig, axes = plt.subplots(1, len(cells), figsize=(4.5 * len(cells), 3.2),
                           layout='constrained', squeeze=False)
  epochs = np.arange(len(history))
  marker = 'o' if len(history) < 3 else None
  for ax, cell in zip(axes[0], cells):
    for label, members in groups.items():
      ax.plot(epochs, [group_means(h[cell], members) for h in history],
              marker=marker, label=label)
    ax.set_title(f'{cell} cell')
    ax.set_xlabel('epoch')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_switches(history: Sequence[Mapping[str, np.ndarray]],
                  primitives: Sequence[str], path: str) -> str:
  """Draws P-DARTS' op switches after each stage: one panel per stage and
  cell type, edges down, ops across, switched-on ops filled.

  Args:
    history: per stage, {cell type: [edges, len(primitives)] bool}.
    primitives: the column names.
    path: the PNG to write.

  Returns:
    `path`.
  """
  if not history:
    raise ValueError('history is empty: nothing to plot')
  cells = list(history[0])
  for stage in history:
    for cell in cells:
      if np.shape(stage[cell])[-1] != len(primitives):
        raise ValueError(f'{cell} switches have {np.shape(stage[cell])[-1]} '
                         f'columns for {len(primitives)} primitives')
  edges = np.shape(history[0][cells[0]])[0]
  fig, axes = plt.subplots(
      len(cells), len(history), squeeze=False, layout='constrained',
      figsize=(1.2 + 0.35 * len(primitives) * len(history),
               0.8 + 0.3 * edges * len(cells)))
  for s, stage in enumerate(history):
    for c, cell in enumerate(cells):
      ax = axes[c, s]
      ax.imshow(np.asarray(stage[cell], float), cmap='Greens', vmin=0,
                vmax=1.3, aspect='auto')
      ax.set_title(f'after stage {s + 1}: {cell}', fontsize=9)
      ax.set_xticks(range(len(primitives)))
      ax.set_xticklabels(primitives, rotation=90, fontsize=7)
      ax.set_yticks(range(edges))
      ax.set_yticklabels(default_edge_labels(edges), fontsize=6)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path

"""Pictures of genotype cells (PNG), drawn with matplotlib.

Nodes: the two cell inputs c_{k-2}, c_{k-1} on the left, intermediate nodes
0..n-1 in the middle, the output c_{k} on the right; each chosen edge is an
arrow labelled with its op.
"""

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

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

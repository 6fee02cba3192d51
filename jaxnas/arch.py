"""Architecture parametrisations: pytrees kept apart from the network weights.

An architecture is a dict `{'normal': (E, K), 'reduce': (E, K)}` (one row per
edge, one column per candidate op). A parametrisation is a pair of pure
functions: `init(key, shapes)` makes the pytree and `weights(arch)` turns it
into the per-edge mixing weights the search network consumes.

* `softmax`: DARTS logits, initialised 1e-3 * N(0, 1) as the reference code
  does (the paper says zeros; `scale=0.` gives that).

Synopsis:

  arch = init_logits(key, {'normal': (14, 8), 'reduce': (14, 8)})
  mixing = softmax_weights(arch)     # rows sum to one
"""

from typing import Mapping, Tuple

import jax
import jax.numpy as jnp

Arch = Mapping[str, jax.Array]

# The reference's scale of the alpha initialisation (`1e-3 * randn`).
DARTS_INIT_SCALE = 1e-3


def init_logits(key: jax.Array, shapes: Mapping[str, Tuple[int, int]],
                scale: float = DARTS_INIT_SCALE) -> dict:
  """Gaussian logits `scale * N(0, 1)` for each cell type, in sorted order."""
  names = sorted(shapes)
  keys = jax.random.split(key, len(names))
  return {n: scale * jax.random.normal(k, shapes[n], jnp.float32)
          for n, k in zip(names, keys)}


def softmax_weights(arch: Arch) -> dict:
  """Row-wise softmax over each edge's candidate ops."""
  return {n: jax.nn.softmax(a, axis=-1) for n, a in arch.items()}

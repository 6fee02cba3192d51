"""Small shared pieces of the method tests: random batches, tree changes."""

import jax
import jax.numpy as jnp
import numpy as np


def random_batch(seed: int, n: int, size: int, channels: int = 1,
                 classes: int = 10) -> dict:
  """`n` Gaussian images `size`x`size`x`channels` with uniform labels."""
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.normal(size=(n, size, size, channels)),
                               jnp.float32),
          'label': jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


def changed(a, b) -> bool:
  """Whether any leaf of pytree `a` differs from `b`'s."""
  return any(not np.array_equal(x, y)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

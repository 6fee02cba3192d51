"""Data-parallel helpers: the one named axis, guarded reductions, replication.

Step functions reduce across devices only through `pmean`, which is a no-op
when the step runs without a bound `AXIS` (plain `jit` on one device), so the
same function runs under `jax.jit`, `jax.pmap(axis_name=AXIS)` and
`jax.shard_map` over a mesh axis named `AXIS`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

AXIS = 'batch'


def pmean(tree: Any, axis_name: str = AXIS) -> Any:
  """`lax.pmean` over `axis_name` if it is bound, else the identity."""
  try:
    return lax.pmean(tree, axis_name)
  except NameError:
    return tree


def psum(tree: Any, axis_name: str = AXIS) -> Any:
  """`lax.psum` over `axis_name` if it is bound, else the identity."""
  try:
    return lax.psum(tree, axis_name)
  except NameError:
    return tree


def axis_index(axis_name: str = AXIS) -> jax.Array:
  """This device's index along `axis_name`, or 0 when it is not bound."""
  try:
    return lax.axis_index(axis_name)
  except NameError:
    return np.int32(0)


def replicate(tree: Any, num_devices: int | None = None) -> Any:
  """Stacks `num_devices` copies of every leaf (default: local devices)."""
  n = num_devices or jax.local_device_count()
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated tree."""
  return jax.tree.map(lambda x: x[0], tree)


def shard(batch: Any, num_devices: int) -> Any:
  """Reshapes leading batch axis B to [num_devices, B // num_devices, ...]."""

  def f(x):
    if x.shape[0] % num_devices:
      raise ValueError(f'batch of {x.shape[0]} does not split over '
                       f'{num_devices} devices')
    return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])

  return jax.tree.map(f, batch)

"""Data-parallel helpers: the one named axis and guarded reductions.

Step functions reduce across devices only through `pmean`, which is a no-op
when the step runs without a bound `AXIS` (plain `jit` on one device), so the
same function runs under `jax.jit`, `jax.pmap(axis_name=AXIS)` and
`jax.shard_map` over a mesh axis named `AXIS`.
"""

from typing import Any

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

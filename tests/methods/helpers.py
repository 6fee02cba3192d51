"""Small shared pieces of the method tests: random batches, tree changes."""

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

from jaxnas import parallel


def random_batch(seed: int, n: int, size: int, channels: int = 1,
                 classes: int = 10) -> dict:
  """`n` Gaussian images `size`x`size`x`channels` with uniform labels."""
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.normal(size=(n, size, size, channels)),
                               jnp.float32),
          'label': jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


def pmap_steps(step_fn, state, batches, num_devices: int = 8):
  """Runs `step_fn` over `batches` data-parallel on `num_devices` devices
  (pmap); returns (the final state on the host, the last step's metrics,
  one copy per device)."""
  par = parallel.DataParallel('pmap', num_devices)
  step = par.step(step_fn)
  state = par.put_state(state)
  for b in batches:
    state, metrics = step(state, par.put_batch(b))
  return par.get_state(state), metrics


def changed(a, b) -> bool:
  """Whether any leaf of pytree `a` differs from `b`'s."""
  return any(not np.array_equal(x, y)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def all_eqns(jaxpr):
  """The equations of `jaxpr` and of the jaxprs inside them (loop bodies,
  custom VJPs), depth first."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax_core.jaxprs_in_params(eqn.params):
      yield from all_eqns(sub)


def conv_layouts(fn, *args) -> set:
  """The dimension numbers of every convolution in `fn(*args)`'s jaxpr."""
  return {q.params['dimension_numbers']
          for q in all_eqns(jax.make_jaxpr(fn)(*args).jaxpr)
          if q.primitive.name == 'conv_general_dilated'}

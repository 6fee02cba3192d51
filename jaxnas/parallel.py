"""Data parallelism: the one named axis, guarded collectives, device placement.

Step functions reduce across devices only through `pmean` / `psum`, which are
the identity when no `AXIS` is bound (plain `jit` on one device), so the same
function runs under `jax.jit`, `jax.pmap(axis_name=AXIS)` and
`jax.shard_map(..., check_vma=False)` over a mesh axis named `AXIS`. (With
shard_map's default `check_vma=True`, `jax.grad` of replicated weights is
already summed over devices, so the step's `pmean` would leave gradients N
times too large: `DataParallel` sets it off.) `DataParallel` wraps a step for one of those
three and moves states and batches to the matching layout:

  par = DataParallel('pmap')            # or 'shard_map', or 'jit'
  p_step = par.step(method.step)        # (state, batch) -> (state, metrics)
  state = par.put_state(method.init(key, images[:1]))
  state, metrics = p_step(state, par.put_batch(host_batch))
  host_state = par.get_state(state)     # one copy, e.g. for `derive`

With several processes (`jax.distributed.initialize()`), pmap and shard_map
span every process's devices; each process passes its own slice of the global
batch (`jaxnas.data.host_slice`) and gets the same replicated state back.
`to_global` / `restore_target` give Orbax the globally replicated arrays its
multi-host checkpointing expects.
"""

import functools
from typing import Any, Callable, Optional, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
AXIS = 'batch'
MODES = ('jit', 'pmap', 'shard_map')


def axis_bound(axis_name: str = AXIS) -> bool:
  """Whether `axis_name` is bound here (inside pmap / shard_map over it)."""
  try:
    lax.axis_index(axis_name)
  except NameError:
    return False
  return True


def pmean(tree: Any, axis_name: str = AXIS) -> Any:
  """`lax.pmean` over `axis_name` if it is bound, else the identity."""
  return lax.pmean(tree, axis_name) if axis_bound(axis_name) else tree


def psum(tree: Any, axis_name: str = AXIS) -> Any:
  """`lax.psum` over `axis_name` if it is bound, else the identity."""
  return lax.psum(tree, axis_name) if axis_bound(axis_name) else tree


def device_index(axis_name: str = AXIS) -> jax.Array:
  """This device's index along `axis_name`; 0 when it is not bound."""
  if axis_bound(axis_name):
    return lax.axis_index(axis_name)
  return jnp.zeros((), jnp.int32)


def device_key(key: jax.Array, axis_name: str = AXIS) -> jax.Array:
  """A PRNG stream of this device: `key` folded with `device_index`.

  Use it where each device should draw its own samples (e.g. per-example
  Gumbel noise); use `key` itself where all devices must draw the same (e.g.
  one DropNAS mask per step). One device under `jit` gets the stream of
  device 0 under `pmap`.
  """
  return jax.random.fold_in(key, device_index(axis_name))


def shard(batch: PyTree, num_devices: int) -> PyTree:
  """Reshapes every leaf [B, ...] to [num_devices, B // num_devices, ...].

  Device d gets rows [d * B / num_devices, (d + 1) * B / num_devices), the
  layout `jax.pmap` expects and the order in which `shard_map` splits a
  [B, ...] array over a mesh axis.
  """
  if num_devices < 1:
    raise ValueError(f'num_devices must be >= 1, got {num_devices}')

  def reshape(x):
    x = x if hasattr(x, 'reshape') else np.asarray(x)
    if not np.ndim(x):
      raise ValueError('cannot shard a scalar leaf over devices')
    if x.shape[0] % num_devices:
      raise ValueError(f'batch size {x.shape[0]} is not divisible by '
                       f'{num_devices} devices')
    return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])

  return jax.tree.map(reshape, batch)


def _is_key(x) -> bool:
  return (isinstance(x, jax.Array) and
          jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def _placed(put: Callable[[np.ndarray], jax.Array], x) -> jax.Array:
  """`put` of a leaf's host value; typed PRNG keys travel as their data."""
  if _is_key(x):
    return jax.random.wrap_key_data(
        put(np.asarray(jax.random.key_data(x))), impl=jax.random.key_impl(x))
  return put(np.asarray(x))


def replicate(tree: PyTree, devices: Optional[Sequence[jax.Device]] = None
              ) -> PyTree:
  """One copy of every leaf per device: leaves [devices, ...] for pmap.

  `devices` None means every local device, for a pmap over all devices of all
  processes; give the same `devices` as the pmap that will read the copies.
  """
  n = len(devices) if devices else jax.local_device_count()
  # Through pmap itself, so the copies carry the sharding pmap gives its
  # outputs: a step fed its own output state then does not compile again.
  identity = _pmap_identity(tuple(devices) if devices else None)
  return jax.tree.map(
      lambda x: _placed(lambda v: identity(
          np.broadcast_to(v, (n,) + v.shape)), x), tree)


@functools.lru_cache(maxsize=None)
def _pmap_identity(devices):
  return jax.pmap(lambda x: x, axis_name=AXIS,
                  devices=list(devices) if devices else None)


def unreplicate(tree: PyTree) -> PyTree:
  """The first local device's copy of a replicated tree (no cross-device
  copy: a one-device array, or numpy for host leaves)."""
  def first(x):
    if isinstance(x, jax.Array):
      return x.addressable_data(0)[0]
    return np.asarray(x)[0]
  return jax.tree.map(first, tree)


class DataParallel:
  """A step function mapped over devices, and its data layout.

  Modes:
    'jit': one device, plain `jax.jit`; batches stay [B, ...].
    'pmap': `jax.pmap` over this process's devices (and, with several
      processes, every process's); state leaves [local devices, ...],
      batches [local devices, B_local / local devices, ...].
    'shard_map': `jax.jit` of `jax.shard_map` over a 1-D mesh of all devices
      named `AXIS`; state is replicated over the mesh, batches are global
      [B, ...] arrays split along their first dimension.

  Args:
    mode: one of `MODES`.
    num_devices: use the first `num_devices` devices (one process only);
      None for all of them.
  """

  def __init__(self, mode: str = 'pmap', num_devices: Optional[int] = None):
    if mode not in MODES:
      raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    local = jax.local_devices()
    if mode == 'jit' and jax.process_count() > 1:
      raise ValueError("mode 'jit' runs on one device of one process; with "
                       f'{jax.process_count()} processes use pmap or '
                       'shard_map, or every process would train alone')
    if mode == 'jit':
      if num_devices not in (None, 1):
        raise ValueError(f"mode 'jit' runs on one device, got num_devices="
                         f'{num_devices}')
      local = local[:1]
    elif num_devices is not None:
      if jax.process_count() > 1:
        raise ValueError('num_devices cannot be set with several processes: '
                         'every process uses all of its devices')
      if not 1 <= num_devices <= len(local):
        raise ValueError(f'num_devices must be in [1, {len(local)}] (the '
                         f'local device count), got {num_devices}')
      local = local[:num_devices]
    self.mode = mode
    self.local_devices = local
    if mode == 'jit' or num_devices is not None:
      all_devices = local
      self._pmap_devices = local
    else:
      # pmap(devices=None) spans every process's devices; naming the local
      # ones would give each process a separate, unsynchronised pmap.
      all_devices = jax.devices()
      self._pmap_devices = None
    self.mesh = Mesh(np.array(all_devices), (AXIS,))
    self._replicated = NamedSharding(self.mesh, P())
    self._split = NamedSharding(self.mesh, P(AXIS))

  @property
  def num_devices(self) -> int:
    """Devices over all processes that a step spans."""
    return self.mesh.size

  @property
  def num_local_devices(self) -> int:
    return len(self.local_devices)

  def step(self, fn: Callable[..., Any], *, donate: bool = True
           ) -> Callable[..., Any]:
    """`fn(state, batch) -> outputs` mapped over the devices.

    `fn` must return device-invariant outputs (reduced with `pmean`/`psum`);
    they come back replicated (pmap: one copy per local device). With
    `donate` the input state's buffers are reused.
    """
    donate_argnums = (0,) if donate else ()
    if self.mode == 'jit':
      return jax.jit(fn, donate_argnums=donate_argnums)
    if self.mode == 'pmap':
      return jax.pmap(fn, axis_name=AXIS, devices=self._pmap_devices,
                      donate_argnums=donate_argnums)
    # check_vma=False: with it, `jax.grad` inside the step would already sum
    # the gradients of replicated weights over devices (its transpose of the
    # implicit broadcast), and the step's own `pmean` would then not average
    # them. Without it, collectives mean what they mean under pmap.
    mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), P(AXIS)),
                           out_specs=P(), check_vma=False)
    return jax.jit(mapped, donate_argnums=donate_argnums)

  def put_state(self, state: PyTree) -> PyTree:
    """A state (host or one-device arrays, the same on every process) placed
    for `step`."""
    if self.mode == 'jit':
      return jax.device_put(state, self.local_devices[0])
    if self.mode == 'pmap':
      return replicate(state, self._pmap_devices)
    return jax.tree.map(lambda x: _placed(
        lambda v: jax.make_array_from_process_local_data(self._replicated, v),
        x), state)

  def get_state(self, state: PyTree) -> PyTree:
    """One device's copy of a placed state (or of replicated outputs).

    Under 'jit' and 'shard_map' the copy shares buffers with `state`: read it
    (e.g. `jax.device_get`) before the next step donates them.
    """
    if self.mode == 'jit':
      return state
    if self.mode == 'pmap':
      return unreplicate(state)
    return jax.tree.map(lambda x: x.addressable_data(0), state)

  def put_batch(self, batch: PyTree) -> PyTree:
    """This process's part of a global batch, [B_local, ...], placed for
    `step`; B_local must divide by the local device count."""
    if self.mode == 'jit':
      return batch
    if self.mode == 'pmap':
      return shard(batch, self.num_local_devices)
    shard(batch, self.num_local_devices)  # The same check and message.
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self._split, x),
        batch)

  def to_global(self, state: PyTree) -> PyTree:
    """Globally replicated jax.Arrays of a placed state (for Orbax)."""
    if self.mode == 'shard_map':
      return state
    host = jax.device_get(self.get_state(state))
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            self._replicated, np.asarray(x)), host)

  def restore_target(self, abstract: PyTree) -> PyTree:
    """`abstract` (ShapeDtypeStructs) with the sharding `to_global` gives."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=self._replicated), abstract)

  def from_global(self, state: PyTree) -> PyTree:
    """The inverse of `to_global`: a restored state placed for `step`."""
    if self.mode == 'shard_map':
      return state
    return self.put_state(
        jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state))


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """`jax.distributed.initialize`, once, before anything uses a device.

  On Cloud TPU pods (and SLURM / Open MPI clusters) call it with no arguments:
  JAX finds the coordinator itself. For several processes on one machine
  pass all three (e.g. 'localhost:12345', 2, i); CPU collectives then go
  through gloo.
  """
  if jax.distributed.is_initialized():
    return
  if jax.config.jax_cpu_collectives_implementation in (None, 'none', ''):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id)

"""Checkpoints of a search: the state pytree and JSON metadata, via Orbax.

Each step directory `<directory>/<step>/` holds 'state' (any pytree of arrays,
e.g. a `SearchState`, via Orbax's `StandardSave`) and 'meta' (a JSON dict).
`restore` fills the structure of a target state (NamedTuples of optax states
included) and raises `CheckpointError`, never returns fresh state, when the
checkpoint is missing, unreadable, or of another configuration.

Typical resume:

  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'))
  fp = config_fingerprint(config.to_dict())
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state, expect={'config_fingerprint': fp})
  ...
  ckpt.save(step, state, {'config_fingerprint': fp, 'epoch': epoch})
  ckpt.close()

Multi-host: Orbax coordinates the processes; every process must call `save`,
`restore`, `wait` and `close` with the same arguments.
"""

import hashlib
import json
import os
from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

# Config fields that never change what a saved state means.
DEFAULT_IGNORE = ('workdir', 'data_dir', 'log_every_steps', 'eval_batch_size')
_MAX_LISTED = 10


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or does not match the caller's."""


def config_fingerprint(config: Mapping[str, Any],
                       ignore: Sequence[str] = DEFAULT_IGNORE) -> str:
  """sha256 (hex) of the canonical JSON of `config` without `ignore`d fields.

  Nested dicts are compared field by field: `ignore` holds top-level names or
  dotted paths ('data.dir'). Tuples and lists hash alike; values JSON cannot
  represent are hashed by `repr`.
  """
  def strip(d, prefix):
    return {k: strip(v, f'{prefix}{k}.') if isinstance(v, Mapping) else v
            for k, v in d.items() if f'{prefix}{k}' not in ignore}
  text = json.dumps(strip(config, ''), sort_keys=True, separators=(',', ':'),
                    default=repr)
  return hashlib.sha256(text.encode()).hexdigest()


def _flat(tree: PyTree) -> dict:
  """{'params.w': leaf}: NamedTuple fields match Orbax's dict keys."""
  def name(k):
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'.'.join(name(k) for k in path): leaf for path, leaf in leaves}


def _describe(leaf) -> str:
  """'float32[3, 4]' for arrays and their metadata, 'int[]' for scalars."""
  dtype = getattr(leaf, 'dtype', None)
  kind = type(leaf).__name__ if dtype is None else str(dtype)
  return f'{kind}{list(np.shape(leaf) if dtype is None else leaf.shape)}'


def _meta_diffs(meta: Mapping[str, Any], expect: Mapping[str, Any]) -> list:
  """Entries of `expect` whose JSON differs from that in `meta`."""
  canon = lambda v: json.dumps(v, sort_keys=True)
  return [f'meta[{k!r}]: checkpoint {canon(meta.get(k, "<missing>"))}, '
          f'expected {canon(v)}' for k, v in expect.items()
          if canon(meta.get(k, '<missing>')) != canon(v)]


def _tree_diffs(saved: PyTree, target: PyTree) -> list:
  """Differences between Orbax's saved-array metadata and the target tree."""
  saved, target = _flat(saved), _flat(target)
  diffs = [f'{k}: only in the checkpoint ({_describe(saved[k])})'
           for k in saved if k not in target]
  diffs += [f'{k}: not in the checkpoint (target {_describe(target[k])})'
            for k in target if k not in saved]
  for k in saved.keys() & target.keys():
    s, t = saved[k], target[k]
    same = tuple(s.shape) == tuple(np.shape(t)) and (
        not hasattr(t, 'dtype') or str(s.dtype) == str(t.dtype))
    if not same:
      diffs.append(f'{k}: checkpoint {_describe(s)}, target {_describe(t)}')
  return sorted(diffs)


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of a run in `directory`.

  Saves are asynchronous: `save` returns once the arrays are copied off the
  devices (the state may then be donated or changed); `wait` or `close` blocks
  until the files are committed. Usable as a context manager (closes on exit).
  """

  def __init__(self, directory: str, max_to_keep: int = 3, **options):
    """Opens `directory` (made absolute; created if needed).

    Args:
      directory: where the step directories live.
      max_to_keep: how many of the latest checkpoints to keep (None: all).
      **options: further `ocp.CheckpointManagerOptions` fields.
    """
    if '://' not in directory:
      directory = os.path.abspath(directory)
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, **options),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: PyTree, meta: Mapping[str, Any], *,
           force: bool = False) -> bool:
    """Starts writing `state` and the JSON dict `meta` as checkpoint `step`.

    Returns whether a checkpoint was started: Orbax skips a `step` that is
    not newer than the latest one (and, with a save interval option, steps off
    the interval unless `force`).
    """
    json.dumps(meta)  # A TypeError here, not later in a background thread.
    return self._manager.save(
        step, force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(dict(meta))))

  def restore(self, target: PyTree, step: Optional[int] = None, *,
              expect: Optional[Mapping[str, Any]] = None
              ) -> Tuple[PyTree, dict]:
    """Reads checkpoint `step` (default: the latest) into `target`'s structure.

    Args:
      target: the state to overwrite, or its tree of `jax.ShapeDtypeStruct`;
        its structure, shapes, dtypes and shardings are those restored.
      step: which checkpoint; None for the latest.
      expect: metadata entries that must equal the saved ones, e.g.
        `{'config_fingerprint': fp}` (compared as JSON, so tuple == list).

    Returns:
      (state, meta).

    Raises:
      CheckpointError: no checkpoint (or no `step`); `expect` or the tree
        structure, a shape or a dtype differs; or the files are unreadable.
    """
    steps = self.all_steps()
    step = steps[-1] if step is None and steps else step
    where = f'checkpoint {self.directory} step {step}'
    if step is None or step not in steps:
      raise CheckpointError(
          f'No {where if steps else "checkpoint in " + self.directory}'
          f' (steps there: {steps}). Check the workdir; call latest_step() '
          'to decide whether to start afresh.')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
      saved_tree = getattr(self._manager.item_metadata(step)['state'],
                           'tree', None)
      if saved_tree is None:
        raise FileNotFoundError("the state's metadata is missing")
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(where, e) from e
    problems = _meta_diffs(meta, expect or {})
    problems += _tree_diffs(saved_tree, abstract)
    if problems:
      listed = '\n  '.join(problems[:_MAX_LISTED])
      more = len(problems) - _MAX_LISTED
      raise CheckpointError(
          f'The {where} does not match this run ({len(problems)} '
          f'difference(s)):\n  {listed}' + (f'\n  ... {more} more' if more > 0
                                             else '') +
          '\nIt was written by another configuration. Use a new workdir; '
          'nothing was deleted.')
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract))).state
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(where, e) from e
    return state, meta

  def _corrupt(self, where: str, e: Exception) -> CheckpointError:
    return CheckpointError(
        f'The {where} is unreadable (corrupt or incomplete): '
        f'{type(e).__name__}: {str(e)[:300]}\nNothing was deleted. Restore an '
        f'earlier step (available: {self.all_steps()}) or use a new workdir.')

  def latest_step(self) -> Optional[int]:
    """The newest committed step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list:
    """Committed steps, ascending."""
    return sorted(self._manager.all_steps())

  def wait(self):
    """Blocks until pending saves are committed."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

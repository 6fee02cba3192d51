"""Pieces every entry point shares: logging, progress, signals, XLA cache.

Only process 0 writes logs (JSON lines, TensorBoard events) and pictures; every
process runs the same loop and takes part in checkpoints.
"""

import glob
import json
import os
import signal
import sys
import time
from typing import Any, Dict, Mapping, Optional

import numpy as np


def is_chief() -> bool:
  """Whether this is process 0 (the one that writes logs and pictures)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def atomic_write(path: str, text: str) -> None:
  """Writes `text` to `path` so that readers never see half a file."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def enable_compilation_cache() -> None:
  """Uses JAX's persistent compilation cache (JAXNAS_CACHE_DIR moves it;
  an empty value turns it off)."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.environ.get('JAXNAS_CACHE_DIR',
                        os.path.expanduser('~/.cache/jaxnas/xla'))
  if path:
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 2.0)


# XLA:CPU's YNNPACK convolution fusions off: on a 2-core AVX2 host (AMD
# EPYC, 2026-11-25), at the DARTS `small` first-order step, XLA's peak
# memory fell from 1.15 to 0.86 GB and the process's RSS by 0.3 GB; the step
# time moved by a few percent either way, within the run-to-run spread
# (BENCHMARKS.md, "YNNPACK fusions off"). AVX-512 hosts are unmeasured.
YNN_OFF = '--xla_cpu_experimental_ynn_fusion_type='


def xla_flags(environ: Mapping[str, str] = os.environ) -> str:
  """XLA_FLAGS for the entry points: the user's, plus `YNN_OFF` unless they
  set the YNN fusion type themselves or JAXNAS_YNN=1 keeps XLA's default."""
  flags = environ.get('XLA_FLAGS', '')
  if (environ.get('JAXNAS_YNN', '0') == '1'
      or 'xla_cpu_experimental_ynn_fusion_type' in flags):
    return flags
  return f'{flags} {YNN_OFF}'.strip()


def use_xla_flags() -> None:
  """Sets `xla_flags()` in XLA_FLAGS; call before JAX starts its backend
  (`start_process` does)."""
  os.environ['XLA_FLAGS'] = xla_flags()


HUGEPAGE_TUNABLE = 'glibc.malloc.hugetlb=1'


def hugepages_wanted(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether `use_hugepages` would re-execute this process (see there)."""
  if sys.platform != 'linux' or environ.get('JAXNAS_HUGEPAGES', '1') == '0':
    return False
  if 'glibc.malloc.hugetlb' in environ.get('GLIBC_TUNABLES', ''):
    return False  # set already (by us before the exec, or by the user)
  import platform  # pylint: disable=g-import-not-at-top
  lib, version = platform.libc_ver()
  try:
    if lib != 'glibc' or tuple(map(int, version.split('.')[:2])) < (2, 35):
      return False  # the tunable appeared in glibc 2.35
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return '[madvise]' in f.read()  # 'always' needs no advice, 'never' none
  except (OSError, ValueError):
    return False


def use_hugepages() -> None:
  """Re-executes this process with glibc's malloc using huge pages.

  XLA:CPU allocates a step's temporaries afresh on every execution, and
  glibc serves such large blocks by mmap, so every step first-touches them
  page by page: 300k page faults per step for the 1.2 GB of DARTS `small`,
  15% of its step time (BENCHMARKS.md). With the glibc tunable
  `glibc.malloc.hugetlb=1` malloc advises those mappings MADV_HUGEPAGE and
  the faults drop to ~2k. Tunables are read when the process starts, so the
  entry points call this first thing and, where it helps (Linux, glibc >=
  2.35, transparent huge pages in 'madvise' mode), exec themselves again
  with it added to GLIBC_TUNABLES. JAXNAS_HUGEPAGES=0 turns this off; it
  does nothing when the tunable is set already.
  """
  if not hugepages_wanted():
    return
  env = dict(os.environ)
  env['GLIBC_TUNABLES'] = ':'.join(
      t for t in (env.get('GLIBC_TUNABLES'), HUGEPAGE_TUNABLE) if t)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def start_process() -> None:
  """What every entry point's `main` does first, before JAX starts:
  `use_xla_flags`, then `use_hugepages` (whose re-exec inherits the flags;
  it may exec this process again, once)."""
  use_xla_flags()
  use_hugepages()


class MetricLog:
  """Metrics to `<workdir>/metrics.jsonl` and TensorBoard (process 0 only).

  Every record carries the global `step` it describes. On resume from step s,
  `truncate(s)` drops the lines a killed run wrote after its last checkpoint,
  so the file reads as one uninterrupted run.
  """

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = is_chief()
    self._tb = None
    if self.enabled and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                               flush_secs=30)

  def truncate(self, step: int, drop=None) -> None:
    """Keeps only the records of steps <= `step`, and of those only the
    ones `drop(record)` is false for (if given)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f
              if line.strip() and json.loads(line).get('step', 0) <= step and
              not (drop and drop(json.loads(line)))]
    atomic_write(self.path, ''.join(kept))

  def write(self, step: int, record: Mapping[str, Any],
            prefix: str = '') -> None:
    """Appends `record` (JSON-serialisable) with its step; scalars to TB."""
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **record}) + '\n')
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float, np.floating, np.integer)) and k != 'epoch':
          self._tb.add_scalar(prefix + k, float(v), step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Progress:
  """A progress bar with ETA over the run's steps (tqdm, on stderr)."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True,
               desc: str = 'search'):
    self._bar = None
    if enabled and is_chief():
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc,
                            unit='step', file=sys.stderr, dynamic_ncols=True,
                            smoothing=0.1)

  def update(self, n: int = 1, **postfix) -> None:
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)

  def write(self, text: str) -> None:
    """Prints `text` (process 0) without breaking the bar."""
    if self._bar is not None:
      self._bar.write(text)
    elif is_chief():
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class StopSignals:
  """Catches SIGTERM / SIGINT so the loop can checkpoint and exit cleanly.

  Inside the `with` block a signal only sets `received`; the loop checks it
  after each step. A second SIGINT interrupts at once.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: Optional[int] = None
    self._old: Dict[int, Any] = {}

  def _handle(self, signum, frame):
    if self.received == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signum
    print(f'\nreceived {signal.Signals(signum).name}: saving a checkpoint '
          'after the current step', file=sys.stderr, flush=True)
    del frame

  def __enter__(self):
    for s in self.SIGNALS:
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


class Interrupted(Exception):
  """The run stopped on a signal after saving its checkpoint."""

  def __init__(self, signum: int, step: int):
    self.signum, self.step = signum, step
    super().__init__(f'stopped by {signal.Signals(signum).name} at step '
                     f'{step}; the checkpoint is saved: run the same command '
                     'again to resume')


class Timer:
  def __init__(self):
    self.start = time.time()

  def __call__(self) -> float:
    return time.time() - self.start


def read_alpha_history(workdir: str, primitives, epochs: Optional[int] = None):
  """A search workdir's per-epoch architecture arrays (`alphas/epoch_*.npz`).

  Args:
    workdir: the search's workdir.
    primitives: its op names.
    epochs: read epochs 0 .. epochs - 1; None: every epoch file there is.

  Returns:
    (per epoch {cell type: mixing weights}, per epoch {cell type: raw
    alphas}, or [] unless every epoch has raw alphas over all `primitives`).
  """
  if epochs is None:
    paths = sorted(glob.glob(os.path.join(workdir, 'alphas', 'epoch_*.npz')))
  else:
    paths = [os.path.join(workdir, 'alphas', f'epoch_{e:03d}.npz')
             for e in range(epochs)]
  weights, alphas = [], []
  for path in paths:
    with np.load(path, allow_pickle=False) as f:
      cells = [k[len('weights_'):] for k in f.files
               if k.startswith('weights_')]
      weights.append({c: f[f'weights_{c}'] for c in cells})
      raw = {c: f[f'alpha_{c}'] for c in cells if f'alpha_{c}' in f.files}
      if len(raw) == len(cells) and all(
          a.shape[-1] == len(primitives) for a in raw.values()):
        alphas.append(raw)
  return weights, (alphas if len(alphas) == len(weights) else [])


def all_processes(value: int) -> list:
  """`value` of every process, in process order (all must call it)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(
      multihost_utils.process_allgather(np.int32(value))).ravel().tolist()


def any_process(flag: int) -> int:
  """The largest `flag` over all processes (every process must call it)."""
  return max(all_processes(flag))


def check_local_workdir(workdir: str) -> None:
  """Raises ValueError for a URL workdir (logs use local file I/O)."""
  if '://' in workdir:
    raise ValueError(
        f'workdir {workdir!r}: logs, genotypes and pictures are written with '
        'local file I/O; use a local or mounted path (on a pod, shared storage '
        'such as NFS or a gcsfuse mount of the bucket)')


class PendingMetrics:
  """Step metrics left on the devices until a log point, then fetched in one
  host sync, checked for non-finite values and summed for the epoch.

  Args:
    get: maps a step's (possibly replicated) metrics to one copy.
    advice: `() -> str`, what the error tells the user (e.g. the last
      checkpoint).
    steps_per_epoch: to name a bad step's epoch too.
  """

  def __init__(self, get, advice, steps_per_epoch: int):
    self._get, self._advice = get, advice
    self._steps_per_epoch = steps_per_epoch
    self.pending = []
    self.sums: Dict[str, Any] = {}
    self.count = 0

  def append(self, step: int, metrics) -> None:
    self.pending.append((step, metrics))

  def flush(self):
    """Fetches and sums the pending metrics; returns the last step's (or
    None). Raises FloatingPointError on a non-finite value."""
    import jax  # pylint: disable=g-import-not-at-top
    fetched = jax.device_get([self._get(m) for _, m in self.pending])
    for (s, _), m in zip(self.pending, fetched):
      bad = {k: np.asarray(v).tolist() for k, v in m.items()
             if not np.all(np.isfinite(v))}
      if bad:
        raise FloatingPointError(
            f'non-finite metrics at step {s} (epoch '
            f'{s // self._steps_per_epoch}): {bad}. {self._advice()}')
      for k, v in m.items():
        self.sums[k] = self.sums.get(k, 0.) + np.asarray(v, np.float64)
      self.count += 1
    last = fetched[-1] if fetched else None
    self.pending.clear()
    return last

  def means(self) -> Dict[str, Any]:
    return {k: v / self.count for k, v in self.sums.items()}

  def reset(self) -> None:
    self.sums, self.count = {}, 0


def evaluate(eval_fn, state, batches, put_batch, get) -> Dict[str, Any]:
  """Sums `eval_fn(state, batch)` over `batches` (host float64 arrays)."""
  import jax  # pylint: disable=g-import-not-at-top
  totals = {}
  for b in batches:
    out = jax.device_get(get(eval_fn(state, put_batch(b))))
    for k, v in out.items():
      totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
  return totals


def exit_on_error(fn, *args, errors=()):
  """Runs an entry point's `fn(*args)` for the command line.

  `Interrupted` exits with 128 + its signal after printing its message;
  FileNotFoundError, FloatingPointError, `jaxnas.checkpoint.CheckpointError`
  (an unreadable checkpoint or one of another config) and `errors` exit with
  `error: <message>`; anything else propagates with its traceback.
  """
  from jaxnas import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    return fn(*args)
  except Interrupted as e:
    print(e, file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except (FileNotFoundError, FloatingPointError, checkpoint.CheckpointError,
          *errors) as e:
    sys.exit(f'error: {e}')


def data_parallel(config):
  """Starts `jax.distributed` if the config asks, and returns its
  `jaxnas.parallel.DataParallel`. Raises ValueError for a mode, device
  count or batch size that cannot work."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxnas import parallel  # pylint: disable=g-import-not-at-top
  if config.get('distributed', False):
    parallel.initialize_distributed(config.get('coordinator_address'),
                                    config.get('num_processes'),
                                    config.get('process_id'))
  par = parallel.DataParallel(config.get('parallel', 'pmap'),
                              config.get('num_devices'))
  if config.batch_size % par.num_devices:
    raise ValueError(
        f'batch_size={config.batch_size} is not divisible by the '
        f'{par.num_devices} devices ({jax.process_count()} process(es)); set '
        '--config.batch_size or --config.num_devices')
  return par


def round_up(n: int, k: int) -> int:
  """The smallest multiple of `k` that is >= `n`."""
  return -(-n // k) * k


class RunCheckpoints:
  """A run's checkpoints in `<workdir>/checkpoints`, with what resuming
  needs besides the state: the config's fingerprint (a checkpoint of
  another config is refused) and the epoch's running metric sums
  (`pending`, the run's `PendingMetrics`), so a run resumed mid-epoch logs
  the same epoch means.

  Every process calls every method; they must see the same checkpoints.

  Args:
    workdir: the run's workdir.
    fingerprint: `jaxnas.checkpoint.config_fingerprint` of the config.
    par: the run's `DataParallel`.
    keep: checkpoints kept.
    steps_per_epoch: to name a non-finite step's epoch.
    advice: the first words of the non-finite error's advice (the last good
      checkpoint follows).
  """

  def __init__(self, workdir: str, fingerprint: str, par, keep: int,
               steps_per_epoch: int,
               advice: str = 'Lower the learning rates or check the data.'):
    from jaxnas import checkpoint  # pylint: disable=g-import-not-at-top
    self.dir = os.path.join(workdir, 'checkpoints')
    self.ckpt = checkpoint.Checkpointer(self.dir, max_to_keep=keep)
    self.fingerprint, self.par = fingerprint, par
    self.pending = PendingMetrics(par.get_state, lambda: (
        f'{advice} The last good checkpoint is step {self.latest_step()} in '
        f'{workdir} (nothing after it was saved).'), steps_per_epoch)
    self.start = self.ckpt.latest_step()
    if len(set(all_processes(-1 if self.start is None else self.start))) > 1:
      raise checkpoint.CheckpointError(
          f'the processes see different checkpoints in {workdir}: the '
          'workdir must be storage shared by all of them')
    self.saved = self.start or 0

  def latest_step(self) -> Optional[int]:
    return self.ckpt.latest_step()

  def restore(self, abstract_state):
    """The state (placed on the devices) and running sums of `start`."""
    state, meta = self.ckpt.restore(
        self.par.restore_target(abstract_state), self.start,
        expect={'config_fingerprint': self.fingerprint})
    self.pending.sums = {k: np.asarray(v)
                         for k, v in meta['epoch_sums'].items()}
    self.pending.count = meta['epoch_count']
    return self.par.from_global(state)

  def save(self, step: int, state) -> None:
    """Saves `state` as `step` (once per step), after fetching pending
    metrics (so a non-finite loss is never saved)."""
    self.pending.flush()
    if self.saved == step:
      return
    self.saved = step
    self.ckpt.save(step, self.par.to_global(state), {
        'config_fingerprint': self.fingerprint, 'step': step,
        'epoch_sums': {k: np.asarray(v).tolist()
                       for k, v in self.pending.sums.items()},
        'epoch_count': self.pending.count}, force=True)

  def stop_if_signalled(self, signals: 'StopSignals', step: int, state,
                        synced: bool) -> None:
    """Saves and raises `Interrupted` when any process got a signal.

    The processes agree at points every process reaches (`synced`: a host
    round trip, so not after every step on a pod); one process alone checks
    after every step.
    """
    import jax  # pylint: disable=g-import-not-at-top
    if not (synced or jax.process_count() == 1):
      return
    signum = any_process(signals.received or 0)
    if signum:
      self.save(step, state)
      self.ckpt.wait()
      raise Interrupted(signum, step)

  def close(self) -> None:
    self.ckpt.close()

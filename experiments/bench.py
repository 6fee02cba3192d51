r"""Benchmarks one search step: compile time, step time, peak memory.

  python -m experiments.bench --method darts --size small --order first

prints one JSON object:

* `compile_s`: lowering plus XLA compilation of the jitted step (the
  persistent compilation cache is off unless `--cache`);
* `step_s`: median wall time of `--steps` steady-state steps (each waited
  for), after one untimed warm-up step; `step_times_s` lists them all;
* `peak_bytes`: XLA's compiled memory analysis of the step (arguments +
  outputs + temporaries - donated aliases): the device memory the step needs;
* `peak_rss_bytes` (CPU): the process's peak resident memory while running
  steps (after compilation the freed heap is returned to the OS and the
  high-water mark is reset, so compiler memory is not counted),
  `peak_rss_total_bytes` the peak including compilation;
* `device_peak_bytes` (GPU, TPU): the device allocator's peak bytes in use
  over the whole run, init and warm-up included (`Device.memory_stats`);
* `hugepages`: whether glibc's malloc used transparent huge pages
  (`experiments.common.use_hugepages`, on by default on Linux;
  `JAXNAS_HUGEPAGES=0` for the plain 4 KiB pages);
* `xla_flags`: the XLA_FLAGS it ran with (`experiments.common.xla_flags`:
  YNNPACK convolution fusions off unless `JAXNAS_YNN=1`).

`--parallel pmap --devices N` splits the batch over N devices (forced CPU
devices: `XLA_FLAGS=--xla_force_host_platform_device_count=8`).

Sizes: `small` is C=8, 5 cells, batch 32 on 32x32 images; `mid` (not for
NAO) C=16, batch 64, 3 cells of 2 nodes; `paper` is the
method's search setting from its config (DARTS, ROME: C=16, 8 cells, batch
64; NAO-V2: its supernet, C=20, 11 cells of 5 nodes, batch 64, one random
architecture per step). `--samples K` sets ROME's / GDAS' samples per update
and `--nosingle_path_remat` keeps their ops' residuals instead of rerunning
the ops; `--compile_only` skips running (compile time and XLA memory only).
Inputs are random 32x32x3 images with 10 classes, as in the PyTorch numbers
quoted in BENCHMARKS.md.
"""

import ctypes
import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags

from experiments import common

_METHOD = flags.DEFINE_enum('method', 'darts',
                            ['darts', 'pdarts', 'dropnas', 'gaea', 'rome',
                             'gdas', 'nao'],
                            'Search method.')
_SIZE = flags.DEFINE_enum('size', 'small', ['small', 'mid', 'paper'],
                          'small: C=8, 5 cells, batch 32; mid (DARTS, ROME, '
                          'GDAS): C=16, batch 64, 3 cells of 2 nodes; paper: '
                          "the method's search config.")
_ORDER = flags.DEFINE_enum('order', 'first',
                           ['first', 'second', 'exact', '1', '2'],
                           'DARTS hypergradient order (1 = first, 2 = second).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps (median reported).')
_DEPTHWISE = flags.DEFINE_string('depthwise_impl', None,
                                 'Override the config\'s depthwise_impl.')
_BATCH = flags.DEFINE_integer('batch_size', None, 'Override the batch size.')
_SHARE = flags.DEFINE_bool('share_backward', None,
                           'Override the config\'s share_backward.')
_SAMPLES = flags.DEFINE_integer('samples', None,
                                'ROME / GDAS: override K (num_samples).')
_REMAT = flags.DEFINE_bool(
    'single_path_remat', None, "ROME / GDAS: override the config's "
    'single_path_remat (rerun the sampled ops in the backward pass).')
_CELL_REMAT = flags.DEFINE_bool(
    'cell_remat', None, "Override the config's cell_remat (DARTS space: "
    'rerun each cell in the backward pass).')
_DTYPE = flags.DEFINE_enum(
    'compute_dtype', None, ['float32', 'bfloat16'],
    "Override the config's compute_dtype (DARTS space: the activations' "
    'dtype).')
_OP_SELECT = flags.DEFINE_enum(
    'op_select', None, ['auto', 'switch', 'mask'],
    "NAO: override the config's op_select (how a supernet branch runs its "
    'chosen op).')
_POOL = flags.DEFINE_integer(
    'pool', 0, 'NAO: also time scoring this many random architectures with '
    "the supernet, each on its own batch of the config's eval_batch_size "
    '(500) images (`pool_s`, `pool_per_arch_s`, `pool_compile_s`).')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'Report compile time and XLA memory analysis '
    'without running steps.')
_DEPTHWISE_TABLE = flags.DEFINE_bool(
    'depthwise_table', False,
    'Instead of a step: forward + backward time (ms, median of --steps) of '
    'every depthwise formulation on 4 stacked edges at the DARTS search '
    'shapes, one JSON object per shape.')
_CACHE = flags.DEFINE_bool('cache', False,
                           'Use the persistent compilation cache.')
_PARALLEL = flags.DEFINE_enum('parallel', 'jit', ['jit', 'pmap', 'shard_map'],
                              'How the step is mapped over devices.')
_DEVICES = flags.DEFINE_integer(
    'devices', None, 'Devices to split the (global) batch over (pmap / '
    'shard_map; default all local devices).')

SIZES = {
    'small': dict(init_channels=8, layers=5, batch_size=32),
    # The paper's width and batch on a net that compiles in about a minute.
    'mid': dict(init_channels=16, layers=3, batch_size=64, steps=2,
                multiplier=2),
    'paper': {},
}
# NAO's config names the width `channels` and counts N (3N + 2 cells).
NAO_SIZES = {
    'small': dict(channels=8, layers=1, batch_size=32),
    'paper': {},
}


def _config(method: str, size: str):
  """The method's search config with the size's overrides."""
  import importlib  # pylint: disable=g-import-not-at-top
  c = importlib.import_module(f'experiments.configs.{method}').get_config(
      'cifar10')
  sizes = NAO_SIZES if method == 'nao' else SIZES
  if size not in sizes:
    raise app.UsageError(f'--size={size} is not defined for {method}; '
                         f'sizes: {sorted(sizes)}')
  for k, v in sizes[size].items():
    c[k] = v
  return c


def _nao(config, num_classes: int, image_size: int, rng):
  """NAO-V2's supernet step as a (init, step) pair of the bench's form, and
  two batches, each with its own random architecture."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxnas import optim  # pylint: disable=g-import-not-at-top
  from jaxnas import parallel  # pylint: disable=g-import-not-at-top
  from jaxnas.methods import nao as nao_method  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import nao  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import nao_supernet  # pylint: disable=g-import-not-at-top
  net = nao_supernet.NASWSNetwork(
      layers=config.layers, nodes=config.nodes, channels=config.channels,
      num_classes=num_classes, drop_path_keep=config.drop_path_keep,
      depthwise_impl=config.depthwise_impl, op_select=config.op_select,
      bn_axis_name=parallel.AXIS if config.sync_bn else None)
  tx = optim.torch_sgd(config.lr, momentum=config.momentum,
                       weight_decay=config.weight_decay,
                       clip_norm=config.grad_clip)
  init, step, pool = nao_method.make(net, tx, phase_steps=100)
  archs = nao.random_archs(2, rng, config.nodes).reshape(2, 2, config.nodes,
                                                         4)
  batches = [{'image': rng.standard_normal(
      (config.batch_size, image_size, image_size, 3), np.float32),
              'label': rng.integers(0, num_classes, config.batch_size,
                                    dtype=np.int32),
              'arch': np.broadcast_to(a.astype(np.int32),
                                      (config.batch_size,) + a.shape)}
             for a in archs]
  return (lambda key, sample: init(key, sample.shape)), step, batches, pool


def _time_pool(pool, variables, config, size: int, image_size: int, rng):
  """Compile and run time of scoring `size` random architectures in one
  call (`jaxnas.methods.nao.pool_correct`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import nao  # pylint: disable=g-import-not-at-top
  n = config.eval_batch_size
  images = rng.standard_normal((2 * n, image_size, image_size, 3), np.float32)
  labels = rng.integers(0, 10, 2 * n, dtype=np.int32)
  archs = nao.random_archs(size, rng, config.nodes).reshape(
      size, 2, config.nodes, 4).astype(np.int32)
  idx = np.stack([rng.choice(2 * n, n, replace=False) for _ in range(size)])
  fn = jax.jit(lambda *a: pool(*a, chunk=config.pool_chunk))
  t = time.perf_counter()
  compiled = fn.lower(variables, images, labels, archs, idx).compile()
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  jax.block_until_ready(compiled(variables, images, labels, archs, idx))
  run_s = time.perf_counter() - t
  return {'pool_size': size, 'pool_images': n,
          'pool_compile_s': round(compile_s, 2), 'pool_s': round(run_s, 2),
          'pool_per_arch_s': round(run_s / size, 4)}


def _rss_bytes(field: str) -> int:
  """VmHWM / VmRSS of this process from /proc (0 where unavailable)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _release_free_heap() -> None:
  """Returns the heap the compiler freed to the OS (glibc `malloc_trim`), so
  that the RSS measured while stepping does not include it."""
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux `clear_refs` 5)."""
  _release_free_heap()
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def _cpu_s() -> float:
  t = os.times()
  return t.user + t.system


def run(method_name: str, size: str, order: str = 'first', steps: int = 5,
        depthwise_impl=None, batch_size=None, share_backward=None,
        parallel_mode: str = 'jit', devices=None, samples=None,
        compile_only: bool = False, pool: int = 0,
        single_path_remat=None, cell_remat=None,
        compute_dtype=None, op_select=None) -> dict:
  """Benchmarks one step of `method_name` at `size`; returns the results.

  `pool` (NAO only): also times scoring that many architectures.

  `parallel_mode` and `devices` choose `jaxnas.parallel.DataParallel`; the
  config's batch size is the global batch, split over the devices.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments import search  # pylint: disable=g-import-not-at-top
  from jaxnas import parallel  # pylint: disable=g-import-not-at-top

  order = {'1': 'first', '2': 'second'}.get(order, order)
  config = _config(method_name, size)
  if method_name == 'pdarts':
    # Time the steps after the warm-up (architecture and weight phases);
    # warm-up steps run the weight phase only.
    config.warmup_epochs = 0
  width = config.get('init_channels', config.get('channels'))
  if method_name == 'darts':
    config.order = order
  else:
    order = None
  if samples is not None:
    config.num_samples = samples
  if single_path_remat is not None:
    config.single_path_remat = single_path_remat
  if cell_remat is not None:
    config.cell_remat = cell_remat
  if depthwise_impl is not None:
    config.depthwise_impl = depthwise_impl
  if compute_dtype is not None:
    if method_name == 'nao' and compute_dtype != 'float32':
      raise ValueError('--compute_dtype applies to the DARTS-space search '
                       'networks, not NAO')
    config.compute_dtype = compute_dtype
  if op_select is not None:
    if method_name != 'nao':
      raise ValueError('--op_select applies to NAO only')
    config.op_select = op_select
  if batch_size is not None:
    config.batch_size = batch_size
  if share_backward is not None:
    config.share_backward = 'on' if share_backward else 'off'
  num_classes, image_size = 10, 32
  rng = np.random.default_rng(0)
  if method_name == 'nao':
    init_fn, step_fn, batches, pool_fn = _nao(config, num_classes,
                                              image_size, rng)
    sample = batches[0]['image'][:1]
  else:
    _, method = search.build(config, num_classes, steps_per_epoch=100)
    init_fn, step_fn = method.init, method.step

    def half():
      return {'image': rng.standard_normal(
          (config.batch_size, image_size, image_size, 3), np.float32),
              'label': rng.integers(0, num_classes, config.batch_size,
                                    dtype=np.int32)}

    batches = [{'train': half(), 'val': half()} for _ in range(2)]
    sample = batches[0]['train']['image'][:1]

  t = time.perf_counter()
  state = init_fn(jax.random.PRNGKey(0), sample)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t
  jax.clear_caches()  # the initialisers' executables, as experiments.search

  par = parallel.DataParallel(parallel_mode, devices)
  state = par.put_state(state)
  batches = [par.put_batch(b) for b in batches]
  step = par.step(step_fn)
  t = time.perf_counter()
  lowered = step.lower(state, batches[0])
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_only_s = time.perf_counter() - t

  mem = compiled.memory_analysis()
  peak_bytes = None
  if mem is not None:
    peak_bytes = int(mem.argument_size_in_bytes + mem.output_size_in_bytes +
                     mem.temp_size_in_bytes - mem.alias_size_in_bytes)

  rss_total = _rss_bytes('VmHWM')
  info = {
      'method': method_name, 'size': size, 'order': order,
      'num_samples': config.get('num_samples'),
      'single_path_remat': (config.get('single_path_remat')
                            if search._single_path(config) else None),  # pylint: disable=protected-access
      'init_channels': width, 'layers': config.layers,
      'cells': (3 * config.layers + 2 if method_name == 'nao'
                else config.layers),
      'batch_size': config.batch_size,
      'depthwise_impl': config.depthwise_impl,
      'share_backward': config.get('share_backward'),
      'cell_remat': config.get('cell_remat'),
      'compute_dtype': config.get('compute_dtype'),
      'op_select': config.get('op_select'),
      'warmup_epochs': config.get('warmup_epochs'),
      'compile_s': round(lower_s + compile_only_s, 2),
      'lower_s': round(lower_s, 2),
      'peak_bytes': peak_bytes,
      'temp_bytes': None if mem is None else int(mem.temp_size_in_bytes),
      'init_s': round(init_s, 2),
      'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
      'parallel': parallel_mode, 'num_devices': par.num_devices,
      'local_device_count': jax.local_device_count(),
      'cpu_count': os.cpu_count(), 'python': platform.python_version(),
      'jax': jax.__version__,
      'hugepages': common.HUGEPAGE_TUNABLE in os.environ.get(
          'GLIBC_TUNABLES', ''),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  if compile_only:
    return {**info, 'peak_rss_total_bytes': rss_total}
  reset = _reset_peak_rss()
  state, metrics = compiled(state, batches[0])  # warm-up
  jax.block_until_ready(metrics)
  times, cpu_times = [], []
  for i in range(steps):
    t, c = time.perf_counter(), _cpu_s()
    state, metrics = compiled(state, batches[i % 2])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
    cpu_times.append(_cpu_s() - c)
  loss = float(np.mean(jax.device_get(metrics['train_loss'])))
  rss_steps = _rss_bytes('VmHWM') if reset else None
  # Accelerators: the allocator's high-water mark since the process began
  # (init and the warm-up included); None on CPU.
  stats = jax.devices()[0].memory_stats() or {}

  if method_name == 'nao' and pool:
    from jaxnas.methods import nao as nao_method  # pylint: disable=g-import-not-at-top
    info.update(_time_pool(pool_fn, nao_method.state_variables(
        par.get_state(state)), config, pool, image_size, rng))
  return {**info,
          'step_s': round(statistics.median(times), 4),
          'step_times_s': [round(x, 4) for x in times],
          'step_cores': round(sum(cpu_times) / sum(times), 2),
          'peak_rss_bytes': rss_steps,
          'device_peak_bytes': stats.get('peak_bytes_in_use'),
          'peak_rss_total_bytes': max(rss_total, _rss_bytes('VmHWM')),
          'final_train_loss': loss}


# (batch, spatial size, channels): `small` and `paper` cells' shapes.
DEPTHWISE_SHAPES = ((32, 32, 8), (32, 16, 16), (32, 8, 32),
                    (64, 32, 16), (64, 16, 32), (64, 8, 64))


def depthwise_table(steps: int):
  """Yields, per shape and kernel (3x3, dilated 5x5), each formulation's
  forward + backward time in ms (`jaxnas.ops.depthwise`, stride 1)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxnas import ops  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for b, hw, c in DEPTHWISE_SHAPES:
    for k, dilation in ((3, 1), (5, 2)):
      x = rng.standard_normal((4, b, hw, hw, c)).astype(np.float32)
      kernel = rng.standard_normal((4, k, k, 1, c)).astype(np.float32)
      row = {'batch': b, 'size': hw, 'channels': c, 'kernel': k,
             'dilation': dilation, 'backend': jax.default_backend()}
      for impl in (i for i in ops.DEPTHWISE_IMPLS if i != 'auto'):
        grad = jax.jit(jax.grad(lambda x, w, impl=impl: jnp.sum(jnp.sin(
            ops.depthwise(x, w, stride=1, padding=dilation * (k - 1) // 2,
                          dilation=dilation, impl=impl))), (0, 1)))
        jax.block_until_ready(grad(x, kernel))
        times = []
        for _ in range(steps):
          t = time.perf_counter()
          jax.block_until_ready(grad(x, kernel))
          times.append(time.perf_counter() - t)
        row[impl + '_ms'] = round(1e3 * statistics.median(times), 2)
      yield row


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.start_process()  # may exec this process again, once
  if _DEPTHWISE_TABLE.value:
    for row in depthwise_table(_STEPS.value):
      print(json.dumps(row), flush=True)
    return
  if _CACHE.value:
    common.enable_compilation_cache()
  result = run(_METHOD.value, _SIZE.value, _ORDER.value, _STEPS.value,
               _DEPTHWISE.value, _BATCH.value, _SHARE.value,
               _PARALLEL.value, _DEVICES.value, _SAMPLES.value,
               _COMPILE_ONLY.value, _POOL.value, _REMAT.value,
               _CELL_REMAT.value, _DTYPE.value, _OP_SELECT.value)
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)

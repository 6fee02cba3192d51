r"""Runs an architecture search and writes the genotype into the workdir.

With no arguments this runs the `digits` DARTS search (real data shipped with
scikit-learn, a few minutes on a 2-core CPU):

  python -m experiments.search

Otherwise:

  python -m experiments.search --config experiments/configs/darts.py:cifar10 \
      --workdir runs/darts-cifar10 [--config.order=second ...]

The workdir receives `genotype.json` (and its printed form `genotype.txt`),
`normal.png` / `reduce.png`, `alphas.npz` and `metrics.jsonl` (one line per
epoch); the genotype files are rewritten after every epoch.
"""

import json
import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), 'configs',
                               'darts.py') + ':digits'

_CONFIG = config_flags.DEFINE_config_file(
    'config', _DEFAULT_CONFIG, 'Search config file and variant.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory (default: runs/<method>-<variant>).')


def build(config, num_classes: int, steps_per_epoch: int):
  """The search network and method of `config`."""
  # Imported here so that `--help` answers without starting JAX.
  from jaxnas.methods import darts  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import darts as darts_space  # pylint: disable=g-import-not-at-top
  if config.method != 'darts':
    raise ValueError(f'unknown method {config.method!r}; known: darts')
  net = darts_space.SearchNetwork(
      C=config.init_channels, num_classes=num_classes, layers=config.layers,
      steps=config.steps, multiplier=config.multiplier,
      stem_multiplier=config.stem_multiplier,
      depthwise_impl=config.depthwise_impl)
  method = darts.make(
      net, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
      order=config.order, lr=config.lr, lr_min=config.lr_min,
      momentum=config.momentum, weight_decay=config.weight_decay,
      grad_clip=config.grad_clip, arch_lr=config.arch_lr,
      arch_betas=(config.arch_b1, config.arch_b2),
      arch_weight_decay=config.arch_weight_decay,
      arch_init_scale=config.arch_init_scale, fd_r=config.fd_r)
  return net, method


def _write_outputs(workdir, state, genotype):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jaxnas import arch as arch_lib  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import viz  # pylint: disable=g-import-not-at-top
  _atomic_write(os.path.join(workdir, 'genotype.json'), genotype.to_json())
  _atomic_write(os.path.join(workdir, 'genotype.txt'), str(genotype) + '\n')
  weights = arch_lib.softmax_weights(state.arch)
  np.savez(os.path.join(workdir, 'alphas.npz'),
           **{f'alpha_{k}': np.asarray(jax.device_get(v))
              for k, v in state.arch.items()},
           **{f'weights_{k}': np.asarray(jax.device_get(v))
              for k, v in weights.items()})
  viz.plot_genotype(genotype, os.path.join(workdir, ''))


def _atomic_write(path, text):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def search(config, workdir: str):
  """Runs the search of `config`, writing into `workdir`.

  Returns:
    (final SearchState, Genotype).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxnas import data  # pylint: disable=g-import-not-at-top

  os.makedirs(workdir, exist_ok=True)
  ds = data.load(config.dataset, config.data_dir)
  weights_half, arch_half = data.split(ds.train, config.train_portion)
  augment = (data.Augment(config.crop_padding, config.flip)
             if config.crop_padding or config.flip else None)
  batches = data.SearchBatches(
      weights_half, arch_half, batch_size=config.batch_size, seed=config.seed,
      augment=augment, mean=ds.mean, std=ds.std)
  steps_per_epoch = batches.steps_per_epoch
  if config.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  net, method = build(config, ds.num_classes, steps_per_epoch)
  print(f'{config.method} search on {config.dataset}: '
        f'{len(weights_half)} weight / {len(arch_half)} architecture '
        f'examples, {config.epochs} epochs x {steps_per_epoch} steps of '
        f'{config.batch_size}, C={config.init_channels}, '
        f'{config.layers} cells, order={config.order}', flush=True)

  t0 = time.time()
  sample = batches.batch(0)
  state = method.init(jax.random.PRNGKey(config.seed),
                      sample['train']['image'][:1])
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f'initialised {n_params:,} weights in {time.time() - t0:.1f}s; '
        'compiling the step...', flush=True)
  step_fn = jax.jit(method.step, donate_argnums=0)
  eval_fn = jax.jit(method.eval_step)

  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  genotype = method.derive(state)
  for epoch in range(config.epochs):
    t_epoch = time.time()
    sums = {}
    for i in range(steps_per_epoch):
      step = epoch * steps_per_epoch + i
      state, metrics = step_fn(state, batches.batch(step))
      if i == 0 and epoch == 0:
        jax.block_until_ready(metrics)
        print(f'compiled and ran the first step in '
              f'{time.time() - t_epoch:.1f}s', flush=True)
      metrics = jax.device_get(metrics)
      if not all(np.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(
            f'non-finite metrics at step {step}: {metrics}. Lower the learning '
            'rates or check the data; the last genotype is in '
            f'{workdir}/genotype.json.')
      for k, v in metrics.items():
        sums[k] = sums.get(k, 0.) + float(v)
      if config.log_every_steps and (i + 1) % config.log_every_steps == 0:
        print(f'  epoch {epoch} step {i + 1}/{steps_per_epoch} '
              f"train loss {metrics['train_loss']:.4f} "
              f"acc {metrics['train_acc']:.3f}", flush=True)
    record = {k: v / steps_per_epoch for k, v in sums.items()}
    totals = {}
    for b in data.eval_batches(arch_half, config.eval_batch_size, ds.mean,
                               ds.std):
      for k, v in jax.device_get(eval_fn(state, b)).items():
        totals[k] = totals.get(k, 0) + float(v)
    record.update(epoch=epoch, seconds=time.time() - t_epoch,
                  valid_loss=totals['loss_sum'] / totals['count'],
                  valid_acc=totals['correct'] / totals['count'])
    genotype = method.derive(state)
    record['genotype'] = genotype.to_dict()
    print(f"epoch {epoch}: lr {record['lr']:.6f} | train loss "
          f"{record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
          f"valid loss {record['valid_loss']:.4f} acc "
          f"{record['valid_acc']:.4f} | {record['seconds']:.1f}s", flush=True)
    print(f'genotype = {genotype}', flush=True)
    with open(metrics_path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    _write_outputs(workdir, state, genotype)
  print(f'final genotype written to {workdir}/genotype.json', flush=True)
  print(genotype, flush=True)
  return state, genotype


def enable_compilation_cache():
  """Uses JAX's persistent compilation cache (JAXNAS_CACHE_DIR to move it)."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.environ.get('JAXNAS_CACHE_DIR',
                        os.path.expanduser('~/.cache/jaxnas/xla'))
  if path:
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 2.0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
      'runs', f'{config.method}-{config.variant}')
  enable_compilation_cache()
  search(config, workdir)


if __name__ == '__main__':
  app.run(main)

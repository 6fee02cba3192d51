r"""NAO's encoder-predictor-decoder on NAS-Bench-201's ground truth.

No supernet: the EPD is trained on the table's accuracies of random
architectures, as NAO-V2 trains it on supernet accuracies, then

* ranks held-out architectures (Kendall tau against the table), and
* runs one generation round from the top 100 of its training pool (step
  sizes 1, 2, ... until `--new` new architectures) and compares the new
  architectures' true accuracy with the pool's.

  python -m experiments.nao_nb201 \
      --table ../shared/data/nb201/nb201_hp200_mean_acc.csv --out nao.json

Targets are min-max normalised over the training pool (the reference's
`(acc - min) / (max - min)`); the EPD hyperparameters are the reference's
(emb 32, hidden 64, Adam 1e-3, clip 5, batch 100, trade-off 0.8).
"""

import json
import time

from absl import app
from absl import flags
import numpy as np

_TABLE = flags.DEFINE_string('table', None, 'NB-201 table (CSV).',
                             required=True)
_TRAIN = flags.DEFINE_integer('train', 1000, 'Training architectures.')
_HELDOUT = flags.DEFINE_integer('heldout', 1000, 'Held-out architectures.')
_EPOCHS = flags.DEFINE_integer('epochs', 1000, 'EPD training epochs.')
_TOP = flags.DEFINE_integer('top', 100, 'Seeds of the generation round.')
_NEW = flags.DEFINE_integer('new', 300, 'New architectures to generate.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the split and the EPD.')
_METRIC = flags.DEFINE_string('metric', 'cifar10_valid',
                              'Table metric the EPD learns.')
_OUT = flags.DEFINE_string('out', None, 'Write the results here (JSON).')


def run(table, *, train: int, heldout: int, epochs: int, top: int, new: int,
        seed: int, metric: str = 'cifar10_valid', log=print) -> dict:
  """Trains the EPD on `train` random archs and evaluates it (see above)."""
  import jax  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  from jaxnas import epd  # pylint: disable=g-import-not-at-top
  from jaxnas.spaces import nb201  # pylint: disable=g-import-not-at-top

  if train + heldout > len(table):
    raise ValueError(f'{train} + {heldout} archs exceed the table\'s '
                     f'{len(table)}')
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(table))
  train_idx, held_idx = order[:train], order[train:train + heldout]
  tokens = np.stack([nb201.to_tokens(table.arch(i)) for i in range(
      len(table))])
  acc = table.values(metric)
  test = table.values('cifar10_test')
  lo, hi = acc[train_idx].min(), acc[train_idx].max()
  targets = (acc[train_idx] - lo) / (hi - lo)

  enc = nb201.encoding()
  model = epd.EPD(enc.vocab_size, enc.length)
  key = jax.random.PRNGKey(seed)
  params = model.init(key, tokens[:1])['params']
  start = time.time()

  def progress(e, m):
    if (e + 1) % max(1, epochs // 10) == 0:
      log(f"epoch {e + 1}/{epochs}: loss {m['loss']:.4f} mse {m['mse']:.4f} "
          f"nll {m['nll']:.4f} ({time.time() - start:.0f}s)")

  params, history = epd.fit(model, params, tokens[train_idx], targets,
                            epochs=epochs, key=jax.random.fold_in(key, 1),
                            callback=progress)
  fit_s = time.time() - start
  pred = epd.predict(model, params, tokens[held_idx])
  tau = stats.kendalltau(pred, acc[held_idx]).statistic
  tau_train = stats.kendalltau(epd.predict(model, params, tokens[train_idx]),
                               acc[train_idx]).statistic
  seeds = train_idx[np.argsort(-acc[train_idx], kind='stable')[:top]]
  generated, step_size = epd.generate(
      model, params, tokens[seeds], enc.allowed, new,
      exclude=tokens[train_idx])
  rows = np.asarray([table.index(nb201.from_tokens(t)) for t in generated])
  result = {
      'metric': metric, 'train': train, 'heldout': heldout, 'epochs': epochs,
      'seed': seed, 'fit_seconds': round(fit_s, 1),
      'final_loss': history[-1],
      'kendall_tau_heldout': float(tau), 'kendall_tau_train': float(tau_train),
      'generated': len(rows), 'last_step_size': step_size,
      'pool_mean': {metric: float(acc[train_idx].mean()),
                    'cifar10_test': float(test[train_idx].mean())},
      'top_seeds_mean': {metric: float(acc[seeds].mean()),
                         'cifar10_test': float(test[seeds].mean())},
      'generated_mean': {metric: float(acc[rows].mean()),
                         'cifar10_test': float(test[rows].mean())},
      'generated_best': {'index': int(rows[np.argmax(acc[rows])]),
                         metric: float(acc[rows].max()),
                         'cifar10_test': float(test[rows[np.argmax(
                             acc[rows])]])},
  }
  return result


def main(argv):
  del argv
  from jaxnas.benchmarks import nb201 as nb201_bench  # pylint: disable=g-import-not-at-top
  table = nb201_bench.Table.load(_TABLE.value)
  result = run(table, train=_TRAIN.value, heldout=_HELDOUT.value,
               epochs=_EPOCHS.value, top=_TOP.value, new=_NEW.value,
               seed=_SEED.value, metric=_METRIC.value)
  text = json.dumps(result, indent=1)
  print(text)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  app.run(main)

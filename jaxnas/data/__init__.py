"""Datasets as in-memory arrays, and search batches as pure functions of step.

Synopsis:

  ds = load('digits')             # or 'cifar10' via tfds, 'folder:/path'
  weights_half, arch_half = split(ds.train, 0.5)
  batches = SearchBatches(weights_half, arch_half, batch_size=64, seed=2,
                          augment=Augment(crop_padding=4, flip=True))
  batch = batches.batch(step)    # {'train': {...}, 'val': {...}}
  mine = host_slice(batch, jax.process_index(), jax.process_count())
  per_device = jaxnas.parallel.shard(mine, jax.local_device_count())
"""

from jaxnas.data.pipeline import Augment
from jaxnas.data.pipeline import cutout_mask
from jaxnas.data.pipeline import Dataset
from jaxnas.data.pipeline import eval_batches
from jaxnas.data.pipeline import host_slice
from jaxnas.data.pipeline import normalise
from jaxnas.data.pipeline import SearchBatches
from jaxnas.data.pipeline import Split
from jaxnas.data.pipeline import split
from jaxnas.data.pipeline import TrainBatches
from jaxnas.data.sources import image_folder
from jaxnas.data.sources import load
from jaxnas.data.sources import SOURCES

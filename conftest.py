"""Root pytest configuration: 8 CPU devices, set before JAX starts.

pmap and shard_map paths are tested on fake CPU devices, which must be
requested before the JAX backend initialises, i.e. before any test module
imports jax.

The tests' networks are tiny, so their time is XLA compile time, not
execution: LLVM's backend optimisations are turned off (about 30% less
compile time; put --xla_backend_optimization_level in XLA_FLAGS to choose
otherwise), and pytest-xdist runs test classes on two workers (XLA:CPU
compiles on about one core).
"""

import os

from tests import fixtures

os.environ['XLA_FLAGS'] = fixtures.xla_flags(
    8, os.environ.get('XLA_FLAGS', ''))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (setup.cfg): 2 workers, 1 on a 1-core machine.

  More would not help on the 2-core machines CI runs on, and each worker
  holds its own XLA programs in memory.
  """
  del config
  return max(1, min(2, os.cpu_count() or 1))


def pytest_configure(config):
  """One persistent XLA compilation cache for the session (a fresh folder
  unless JAXNAS_TEST_CACHE_DIR names one; an empty value turns it off).

  Tests that run the same tiny search twice in one process (resume, seeds
  vmapped against single runs, P-DARTS' killed stage) then compile it once.
  """
  del config
  import tempfile  # pylint: disable=g-import-not-at-top
  path = os.environ.get('JAXNAS_TEST_CACHE_DIR')
  if path is None:
    path = tempfile.mkdtemp(prefix='jaxnas-test-xla-')
  if path:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)

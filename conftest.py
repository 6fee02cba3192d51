"""Root pytest configuration: 8 CPU devices, set before JAX starts.

pmap and shard_map paths are tested on fake CPU devices, which must be
requested before the JAX backend initialises, i.e. before any test module
imports jax.
"""

import os

_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (
      _flags + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


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

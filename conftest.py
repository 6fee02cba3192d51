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

"""Real data shared by tests, found under ../shared/data/ and prepared once.

The data is never part of the project (see ../shared/data/README.md): each
helper returns None where it is absent, and the caller skips with a message.
"""

import atexit
import os
import shutil
import tarfile
import tempfile
import threading
import time
from typing import Optional



def xla_flags(devices: int, flags: str = '') -> str:
  """XLA_FLAGS for a test process: `devices` fake CPU devices and a cheap
  LLVM backend (the tests' programs are compile-bound), on top of `flags`
  (a device count or optimisation level already there is kept)."""
  flags = flags.split()
  if not any(f.startswith('--xla_force_host_platform_device_count')
             for f in flags):
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  if not any(f.startswith('--xla_backend_optimization_level') for f in flags):
    flags.append('--xla_backend_optimization_level=0')
  return ' '.join(flags)


SHARED_DATA = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data'))
CIFAR10_TARBALL = os.path.join(SHARED_DATA, 'cifar10',
                               'cifar10_jpeg_q75.tar.gz')

_lock = threading.Lock()
_cifar10_root: Optional[str] = None
# Seconds the extraction took (None until it ran in this process).
cifar10_extract_seconds: Optional[float] = None


def _extract_plain(tar: tarfile.TarFile, dest: str) -> None:
  """Extracts a tarball of plain files and folders with relative names.

  Checks the members itself and then extracts them unfiltered: tarfile's
  'data' filter resolves every path and took 44 s for the 60,000 CIFAR-10
  files where this takes ~7 s.
  """
  members = tar.getmembers()
  for m in members:
    parts = m.name.replace('\\', '/').split('/')
    if (not (m.isfile() or m.isdir()) or os.path.isabs(m.name)
        or '..' in parts):
      raise ValueError(f'unexpected tar member {m.name!r} in {tar.name}')
  try:
    tar.extractall(dest, members=members, filter='fully_trusted')
  except TypeError:  # a Python without extraction filters
    tar.extractall(dest, members=members)


def cifar10_folder() -> Optional[str]:
  """The CIFAR-10 JPEG image folder, unpacked once per process, or None.

  Unpacks ../shared/data/cifar10/cifar10_jpeg_q75.tar.gz (60,000 JPEGs) into
  a temporary folder the first time it is called and returns that folder's
  path (holding train/<class>/*.jpg and test/<class>/*.jpg) on every call;
  the folder is removed when the process exits. Returns None where the
  tarball is absent: skip then, e.g.
  `pytest.skip(f'needs {fixtures.CIFAR10_TARBALL}')`.
  """
  global _cifar10_root, cifar10_extract_seconds
  with _lock:
    if _cifar10_root is not None:
      return _cifar10_root
    if not os.path.exists(CIFAR10_TARBALL):
      return None
    dest = tempfile.mkdtemp(prefix='jaxnas_cifar10_')
    atexit.register(shutil.rmtree, dest, True)
    start = time.perf_counter()
    with tarfile.open(CIFAR10_TARBALL) as tar:
      _extract_plain(tar, dest)
    cifar10_extract_seconds = time.perf_counter() - start
    _cifar10_root = dest
    return dest

"""The parametric DARTS ops evaluated for E edges at once.

A search cell applies the same candidate op on many edges, each edge with its
own weights. Compiling one op per edge makes XLA compile time grow with the
number of edges (about a second per edge's gradient on a CPU), so the search
cell evaluates each op once per *source node*, stacked over that source's
outgoing edges: inputs are [E, B, H, W, C] and every parameter has a leading
edge axis E. Edge e of a stacked op computes exactly what `jaxnas.ops` computes
with that edge's slice of the parameters (tests check this).

Depthwise convolutions have three formulations (`DEPTHWISE_IMPLS`):

* 'grouped': the E edges folded into channels, one depthwise convolution with
  E * C groups. One op to compile; slow on XLA:CPU.
* 'dense': each edge's depthwise kernel multiplied into a block-diagonal dense
  kernel and run as a dense convolution, one per edge. Fastest on XLA:CPU
  (about 6x 'grouped'), compile grows with E.
* 'shift': the sum over kernel taps of shifted inputs times per-channel
  weights; element-wise only.

'auto' means 'grouped' everywhere: the search networks of tests and of the
CPU default search are compile-bound, and accelerators run grouped
convolutions natively. Pick 'dense' for long CPU runs.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxnas import ops

DEPTHWISE_IMPLS = ('auto', 'grouped', 'dense', 'shift')

# PyTorch's default init per edge: fan-in excludes the leading edge axis.
stacked_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform', batch_axis=(0,))

_DN = ('NHWC', 'HWIO', 'NHWC')


def resolve_depthwise_impl(impl: str) -> str:
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(
        f'depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}')
  return 'grouped' if impl == 'auto' else impl


def stacked_batch_norm(train: bool, axis_name: Optional[str] = None,
                       name: Optional[str] = None) -> nn.BatchNorm:
  """Non-affine BN of [E, B, H, W, C] with statistics per (edge, channel)."""
  return nn.BatchNorm(use_running_average=not train, axis=(0, 4),
                      momentum=0.9, epsilon=1e-5, use_bias=False,
                      use_scale=False, axis_name=axis_name, name=name)


def depthwise(x: jax.Array, kernel: jax.Array, *, stride: int, padding: int,
              dilation: int, impl: str) -> jax.Array:
  """Per-edge depthwise conv: x [E, B, H, W, C], kernel [E, k, k, 1, C]."""
  e, b, h, w, c = x.shape
  k = kernel.shape[1]
  pad = ((padding, padding),) * 2
  impl = resolve_depthwise_impl(impl)
  if impl == 'grouped':
    xf = jnp.moveaxis(x, 0, 3).reshape(b, h, w, e * c)
    kf = jnp.moveaxis(kernel, 0, 3).reshape(k, k, 1, e * c)
    y = lax.conv_general_dilated(xf, kf, (stride, stride), pad,
                                 rhs_dilation=(dilation, dilation),
                                 dimension_numbers=_DN,
                                 feature_group_count=e * c)
    return jnp.moveaxis(y.reshape(y.shape[:3] + (e, c)), 3, 0)
  if impl == 'dense':
    eye = jnp.eye(c, dtype=x.dtype)
    return jnp.stack([
        lax.conv_general_dilated(x[i], kernel[i] * eye, (stride, stride), pad,
                                 rhs_dilation=(dilation, dilation),
                                 dimension_numbers=_DN) for i in range(e)])
  # 'shift': sum over taps of strided slices of the padded input.
  xp = jnp.pad(x, ((0, 0), (0, 0)) + pad + ((0, 0),))
  h_out = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  w_out = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  out = None
  for i in range(k):
    for j in range(k):
      tap = lax.slice(
          xp, (0, 0, i * dilation, j * dilation, 0),
          (e, b, i * dilation + (h_out - 1) * stride + 1,
           j * dilation + (w_out - 1) * stride + 1, c),
          (1, 1, stride, stride, 1))
      term = tap * kernel[:, i, j, 0][:, None, None, None, :]
      out = term if out is None else out + term
  return out


class StackedConv1x1(nn.Module):
  """Per-edge bias-free 1x1 conv; kernel [E, 1, 1, C, F] like `ops.Conv`."""
  features: int
  stride: int = 1
  offset: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', stacked_kernel_init,
                        (x.shape[0], 1, 1, x.shape[-1], self.features))
    if self.stride > 1 or self.offset:
      x = x[:, :, self.offset::self.stride, self.offset::self.stride, :]
    return jnp.einsum('ebhwc,ecf->ebhwf', x, kernel[:, 0, 0].astype(x.dtype))


class StackedDilConv(nn.Module):
  """Stacked `ops.DilConv`: ReLU -> depthwise -> pointwise -> BN."""
  features: int
  kernel_size: int
  stride: int
  padding: int
  dilation: int
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param('depthwise_kernel', stacked_kernel_init,
                        (x.shape[0], k, k, 1, c))
    x = depthwise(nn.relu(x), kernel.astype(x.dtype), stride=self.stride,
                  padding=self.padding, dilation=self.dilation,
                  impl=self.depthwise_impl)
    x = StackedConv1x1(self.features, name='pointwise')(x)
    return stacked_batch_norm(train, self.bn_axis_name, name='bn')(x)


class StackedSepConv(nn.Module):
  """Stacked `ops.SepConv`: two DilConv blocks with dilation 1."""
  features: int
  kernel_size: int
  stride: int
  padding: int
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(depthwise_impl=self.depthwise_impl,
              bn_axis_name=self.bn_axis_name)
    x = StackedDilConv(x.shape[-1], self.kernel_size, self.stride,
                       self.padding, 1, name='block0', **kw)(x, train)
    return StackedDilConv(self.features, self.kernel_size, 1, self.padding, 1,
                          name='block1', **kw)(x, train)


class StackedFactorizedReduce(nn.Module):
  """Stacked `ops.FactorizedReduce` (skip_connect at stride 2)."""
  features: int
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.features % 2 or x.shape[2] % 2 or x.shape[3] % 2:
      raise ValueError('FactorizedReduce needs even channels and spatial '
                       f'sizes, got {self.features} and {x.shape[2:4]}')
    x = nn.relu(x)
    a = StackedConv1x1(self.features // 2, stride=2, name='conv0')(x)
    b = StackedConv1x1(self.features // 2, stride=2, offset=1,
                       name='conv1')(x)
    return stacked_batch_norm(train, self.bn_axis_name, name='bn')(
        jnp.concatenate([a, b], axis=-1))


def make_stacked_op(name: str, channels: int, stride: int, *,
                    depthwise_impl: str = 'auto',
                    bn_axis_name: Optional[str] = None) -> nn.Module:
  """The stacked form of parametric op `name` (see `ops.make_op`)."""
  kw = dict(bn_axis_name=bn_axis_name, name=name)
  conv_kw = dict(kw, depthwise_impl=depthwise_impl)
  if name == 'skip_connect' and stride == 2:
    return StackedFactorizedReduce(channels, **kw)
  if name in ('sep_conv_3x3', 'sep_conv_5x5'):
    k = int(name[-1])
    return StackedSepConv(channels, k, stride, k // 2, **conv_kw)
  if name in ('dil_conv_3x3', 'dil_conv_5x5'):
    k = int(name[-1])
    return StackedDilConv(channels, k, stride, k - 1, 2, **conv_kw)
  raise ValueError(f'{name!r} at stride {stride} has no parameters; known '
                   f'ops: {ops.DARTS_PRIMITIVES}')


def is_parametric(name: str, stride: int) -> bool:
  """Whether op `name` at `stride` has per-edge weights."""
  return name in ops.PARAMETRIC_OPS or (name == 'skip_connect' and stride == 2)

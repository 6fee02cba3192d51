"""The parametric DARTS ops evaluated for E edges at once.

A search cell applies the same candidate op on many edges, each edge with its
own weights. Compiling one op per edge makes XLA compile time grow with the
number of edges (about a second per edge's gradient on a CPU), so the search
cell evaluates each op once per *source node*, stacked over that source's
outgoing edges: inputs are [E, B, H, W, C] and every parameter has a leading
edge axis E. Edge e of a stacked op computes exactly what `jaxnas.ops` computes
with that edge's slice of the parameters (tests check this).

Called with `sources`, an op takes the cell's states [S, B, H, W, C] instead
and edge e reads state `sources[e]`: the first linear map of every edge that
reads one state then runs as one convolution or contraction over that state
(`jaxnas.ops.per_source`), instead of one per edge on copies of it.

Depthwise convolutions and the 1x1 convolutions after them run through
`jaxnas.ops.depthwise_pointwise`, whose formulations
(`jaxnas.ops.DEPTHWISE_IMPLS`) trade compile time against run time.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxnas import ops

# PyTorch's default init per edge: fan-in excludes the leading edge axis.
stacked_kernel_init = nn.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform', batch_axis=(0,))


def stacked_batch_norm(train: bool, axis_name: Optional[str] = None,
                       name: Optional[str] = None) -> nn.BatchNorm:
  """Non-affine BN of [E, B, H, W, C] with statistics per (edge, channel)."""
  return nn.BatchNorm(use_running_average=not train, axis=(0, 4),
                      momentum=0.9, epsilon=1e-5, use_bias=False,
                      use_scale=False,
                      axis_name=ops.bound_axis(axis_name), name=name)


class StackedConv1x1(nn.Module):
  """Per-edge bias-free 1x1 conv; kernel [E, 1, 1, C, F] like `ops.Conv`.

  With `kernel_only`, returns the kernel as [E, C, F] without applying it
  (for `ops.depthwise_pointwise`, which folds it into the depthwise conv); the
  parameter is the same either way.
  """
  features: int
  stride: int = 1
  offset: int = 0
  kernel_only: bool = False

  @nn.compact
  def __call__(self, x: jax.Array,
               sources: Optional[Sequence[int]] = None) -> jax.Array:
    kernel = self.param('kernel', stacked_kernel_init,
                        (_num_edges(x, sources), 1, 1, x.shape[-1],
                         self.features))
    if self.kernel_only:
      return kernel[:, 0, 0]
    if self.stride > 1 or self.offset:
      x = x[:, :, self.offset::self.stride, self.offset::self.stride, :]
    kernel = kernel[:, 0, 0].astype(x.dtype)
    if sources is None:
      return jnp.einsum('ebhwc,ecf->ebhwf', x, kernel)
    return ops.per_source(
        x, kernel, sources,
        lambda state, k: jnp.einsum('bhwc,ecf->ebhwf', state, k))


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
  def __call__(self, x: jax.Array, train: bool,
               sources: Optional[Sequence[int]] = None) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param('depthwise_kernel', stacked_kernel_init,
                        (_num_edges(x, sources), k, k, 1, c))
    pointwise = StackedConv1x1(self.features, kernel_only=True,
                               name='pointwise')(x, sources)
    x = ops.depthwise_pointwise(nn.relu(x), kernel, pointwise,
                                stride=self.stride, padding=self.padding,
                                dilation=self.dilation,
                                impl=self.depthwise_impl, sources=sources)
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
  def __call__(self, x: jax.Array, train: bool,
               sources: Optional[Sequence[int]] = None) -> jax.Array:
    kw = dict(depthwise_impl=self.depthwise_impl,
              bn_axis_name=self.bn_axis_name)
    x = StackedDilConv(x.shape[-1], self.kernel_size, self.stride,
                       self.padding, 1, name='block0', **kw)(x, train,
                                                              sources)
    return StackedDilConv(self.features, self.kernel_size, 1, self.padding, 1,
                          name='block1', **kw)(x, train)


class StackedFactorizedReduce(nn.Module):
  """Stacked `ops.FactorizedReduce` (skip_connect at stride 2)."""
  features: int
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               sources: Optional[Sequence[int]] = None) -> jax.Array:
    if self.features % 2 or x.shape[2] % 2 or x.shape[3] % 2:
      raise ValueError('FactorizedReduce needs even channels and spatial '
                       f'sizes, got {self.features} and {x.shape[2:4]}')
    x = nn.relu(x)
    a = StackedConv1x1(self.features // 2, stride=2, name='conv0')(x, sources)
    b = StackedConv1x1(self.features // 2, stride=2, offset=1,
                       name='conv1')(x, sources)
    return stacked_batch_norm(train, self.bn_axis_name, name='bn')(
        jnp.concatenate([a, b], axis=-1))


def _num_edges(x: jax.Array, sources: Optional[Sequence[int]]) -> int:
  if sources is None:
    return x.shape[0]
  if not sources or max(sources) >= x.shape[0] or min(sources) < 0:
    raise ValueError(f'sources {tuple(sources)} do not index the '
                     f'{x.shape[0]} inputs')
  return len(sources)


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

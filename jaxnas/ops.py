"""Candidate operations of the DARTS and NAS-Bench-201 spaces, as linen modules.

Semantics follow the reference implementation (quark0/darts `cnn/operations.py`,
see ../shared/methods/darts.md): every convolution is bias-free, `sep_conv` is
two stacked ReLU -> depthwise -> pointwise -> BN blocks, `dil_conv` is one such
block with dilation 2, `skip_connect` at stride 2 is a FactorizedReduce, average
pooling does not count padding, and `none` is the zero op.

Tensors are NHWC. Padding is explicit and symmetric, as in PyTorch, so output
shapes match the reference for every stride.

Weights are initialised like PyTorch's defaults (kaiming-uniform with a=sqrt(5),
i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))), because that is what the reference's
numbers were obtained with; Flax's lecun-normal default is a different prior.

NAS-Bench-201's five ops (D-X-Y/AutoDL-Projects `lib/models/cell_operations.py`,
built by `make_nb201_op`) reuse these modules: `nor_conv_kxk` is ReLU -> conv
-> BN, `avg_pool_3x3` is a bare pool (no BN), `skip_connect` the identity.

Synopsis:

  op = make_op('sep_conv_3x3', channels=16, stride=2, affine=False)
  variables = op.init(key, x, train=False)
  y = op.apply(variables, x, train=True, mutable=['batch_stats'])
"""

import contextlib
import contextvars
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jaxnas import parallel

# The reference's op order (quark0/darts `cnn/genotypes.py` PRIMITIVES).
# Indices into architecture parameters follow this order.
DARTS_PRIMITIVES = (
    'none',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5',
)

# NAS-Bench-201's op order (AutoDL-Projects `cell_operations.NAS_BENCH_201`,
# nats_bench `search_space_info`): indices of its architecture parameters and
# of the benchmark's arch strings follow this order.
NB201_PRIMITIVES = (
    'none',
    'skip_connect',
    'nor_conv_1x1',
    'nor_conv_3x3',
    'avg_pool_3x3',
)

POOL_OPS = ('max_pool_3x3', 'avg_pool_3x3')
# Ops with trainable weights (the "parametric" group of DropNAS), in both
# spaces.
PARAMETRIC_OPS = ('sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3',
                  'dil_conv_5x5', 'nor_conv_1x1', 'nor_conv_3x3')


def parametric_mask(primitives: Sequence[str]) -> np.ndarray:
  """[K] bool: which of `primitives` are in `PARAMETRIC_OPS`."""
  return np.array([p in PARAMETRIC_OPS for p in primitives], bool)

# PyTorch's default initialisation for conv and linear kernels.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in',
                                                     'uniform')

# How depthwise convolutions are computed (the parameters are the same in all):
# * 'grouped': one convolution with `feature_group_count` = channels (edges
#   folded into channels when stacked). One op to compile; slow on XLA:CPU.
# * 'dense': the (k, k, 1, C) kernel multiplied into a block-diagonal
#   (k, k, C, C) one and run as a dense convolution (one per edge when
#   stacked). About 6x faster than 'grouped' on XLA:CPU; compiles more.
#   Where a 1x1 convolution follows (DilConv, SepConv: `depthwise_pointwise`)
#   the two run as one dense convolution with their product kernel.
# * 'shift': the sum over kernel taps of shifted inputs times per-channel
#   weights; element-wise only.
# 'auto' means 'dense' on CPU and 'grouped' on accelerators, which run grouped
# convolutions natively (cuDNN). On XLA:CPU, at `small` (C=8, 5 cells, batch
# 32), the first-order DARTS step took 1.49 s dense against 7.41 s grouped,
# but its compile took 49 s against 35 s. The default `digits` search took 214 s
# against 278 s (BENCHMARKS.md). Compile-bound runs, such as the `tiny` configs
# of the tests, pick 'grouped'.
# * 'dense_loop': 'dense' with each group's per-edge convolutions run as one
#   `lax.scan` over the edges (two edges per iteration), so XLA compiles them
#   once per group instead of once per edge. On XLA:CPU, first-order DARTS
#   without `share_backward`: compile about 20% shorter, step 5-10% longer,
#   XLA peak memory 1.18 -> 1.61 GB at `small` and 7.5 -> 10.3 GB at `paper`
#   (the loop keeps each edge's input as a residual). With it (the CPU
#   default): compile 6-11% shorter, step 14-15% longer (BENCHMARKS.md). For
#   compile-bound runs. Reverse mode only: DARTS' order='exact' (forward over
#   reverse) cannot use it.
DEPTHWISE_IMPLS = ('auto', 'grouped', 'dense', 'dense_loop', 'shift')
_DENSE_IMPLS = ('dense', 'dense_loop')
# Edges per iteration of the 'dense_loop' scan. XLA:CPU runs independent ops
# of a program concurrently (two cores here) but the iterations of a loop one
# after another; two convolutions per iteration keep both cores busy: one
# edge per iteration made the `small` step 1.32x slower than the unrolled
# form (1.06x on one core), two edges 1.05-1.08x.
_EDGE_LOOP_UNROLL = 2

_DN = ('NHWC', 'HWIO', 'NHWC')


def resolve_depthwise_impl(impl: str) -> str:
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(
        f'depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}')
  if impl == 'auto':
    return 'dense' if jax.default_backend() == 'cpu' else 'grouped'
  return impl


def _lax_conv(x, kernel, stride, padding, dilation):
  return lax.conv_general_dilated(x, kernel, (stride, stride),
                                  ((padding, padding),) * 2,
                                  rhs_dilation=(dilation, dilation),
                                  dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _canonical_vjp_conv(x, kernel, kernel_grad, stride, padding, dilation):
  del kernel_grad
  return _lax_conv(x, kernel, stride, padding, dilation)


def _canonical_vjp_conv_fwd(x, kernel, kernel_grad, stride, padding,
                            dilation):
  return (_lax_conv(x, kernel, stride, padding, dilation),
          (x, kernel, kernel_grad))


def _canonical_vjp_conv_bwd(stride, padding, dilation, res, g):
  """The transpose rules' maths, written as NHWC x HWIO convolutions.

  Input gradient: g, dilated by the stride, convolved with the kernel
  flipped in space and with in/out features swapped. Kernel gradient: x
  seen as [C, H, W, B] (channels as the batch, the batch as features)
  convolved with g seen as [H', W', B, F] (a window the output's size,
  strided by the kernel's dilation, dilated by the stride), which gives
  [C, >=k, >=k, F]: sliced to k x k and moved to HWIO. Where the traced
  `kernel_grad` is False, the kernel gradient is zeros, not computed.
  """
  x, kernel, kernel_grad = res
  k, h, w = kernel.shape[0], x.shape[1], x.shape[2]
  ho, wo = g.shape[1], g.shape[2]
  lo = dilation * (k - 1) - padding
  dx = lax.conv_general_dilated(
      g, jnp.swapaxes(kernel[::-1, ::-1], 2, 3), (1, 1),
      ((lo, h - stride * (ho - 1) - 1 + padding),
       (lo, w - stride * (wo - 1) - 1 + padding)),
      lhs_dilation=(stride, stride), rhs_dilation=(dilation, dilation),
      dimension_numbers=_DN)

  def dk():
    d = lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)),
        (dilation, dilation), ((padding, padding),) * 2,
        rhs_dilation=(stride, stride), dimension_numbers=_DN)
    return jnp.transpose(d[:, :k, :k], (1, 2, 0, 3)).astype(kernel.dtype)

  return dx, lax.cond(kernel_grad, dk, lambda: jnp.zeros_like(kernel)), None


_canonical_vjp_conv.defvjp(_canonical_vjp_conv_fwd, _canonical_vjp_conv_bwd)


# Inside `convolutions_in_loop_body`: its `kernel_grads`; outside: None.
_LOOP_BODY = contextvars.ContextVar('jaxnas_conv_loop_body', default=None)


@contextlib.contextmanager
def convolutions_in_loop_body(kernel_grads: Any = True):
  """While tracing inside, `conv2d` uses its loop-friendly gradients.

  For code that runs a network inside `lax.scan` or a while loop, such as
  DARTS' `shared_first_order_step`. It acts at trace time only: enter it
  inside the function being traced (the loop body), not around a call of
  a jitted function, whose cached trace would not see it.
  `kernel_grads`: a bool, or a traced boolean scalar of the loop body;
  where False the convolutions' kernel gradients are zeros and are not
  computed (for an iteration that discards them).
  """
  token = _LOOP_BODY.set(kernel_grads)
  try:
    yield
  finally:
    _LOOP_BODY.reset(token)


def in_conditional_branch(fn: Callable, kernel_grads: bool = True
                          ) -> Callable:
  """`fn`, a branch of `lax.switch` / `lax.cond`, with `conv2d`'s
  loop-friendly gradients on CPU.

  XLA:CPU runs the gradient convolutions of a conditional's branch as slowly
  as those of a loop body (BENCHMARKS.md, "Convolutions in conditional
  branches"). `kernel_grads=False`: the branch discards the convolutions'
  kernel gradients, which are then not computed. Otherwise, inside a
  `convolutions_in_loop_body` already, the branch keeps its `kernel_grads`;
  elsewhere the kernel gradients are computed.
  """
  @functools.wraps(fn)
  def branch(*args, **kwargs):
    outer = _LOOP_BODY.get()
    inner = outer if kernel_grads and outer is not None else kernel_grads
    with convolutions_in_loop_body(inner):
      return fn(*args, **kwargs)
  return branch


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1,
           padding: int = 0, dilation: int = 1,
           in_loop: Optional[bool] = None) -> jax.Array:
  """NHWC x HWIO convolution with square stride, padding and dilation.

  `lax.conv_general_dilated`, except for the gradients of a convolution in a
  loop body on CPU (`in_loop`, or None: inside `convolutions_in_loop_body`).
  There XLA:CPU leaves the gradient convolutions that JAX's transpose rules
  emit in their transposed layouts and runs them through a slow generic
  loop, 16x slower than in the canonical layout; the entry computation
  converts them, loop bodies do not (BENCHMARKS.md). Such convolutions get a
  custom VJP with the same maths written as NHWC x HWIO convolutions: the
  same values and gradients, reverse mode only (a `custom_vjp` refuses
  `jax.jvp`, so forward-over-reverse Hessian-vector products cannot go
  through them). Unrolled and on accelerators JAX's own rules are used.
  Grouped convolutions (`depthwise_impl='grouped'`) do not go through
  here and keep JAX's rules in loop bodies too.
  """
  kernel_grads = _LOOP_BODY.get()
  if in_loop is None:
    in_loop = kernel_grads is not None
  if in_loop and jax.default_backend() == 'cpu':
    if kernel_grads is None:
      kernel_grads = True
    return _canonical_vjp_conv(x, kernel, jnp.asarray(kernel_grads, bool),
                               stride, padding, dilation)
  return _lax_conv(x, kernel, stride, padding, dilation)


def _per_edge_conv(x: jax.Array, kernels: Sequence[jax.Array], *,
                   stride: int, padding: int, dilation: int,
                   loop: bool = False) -> jax.Array:
  """x [E, B, H, W, C] and E dense (k, k, C, F) kernels -> [E, B, H', W', F],
  one convolution per edge, unrolled or (`loop`) as one scan over the edges.
  Unrolled, `unstack` splits the edges: its transpose is one `stack`, where
  indexing each edge would transpose to E zero-padded copies of the whole
  input (BENCHMARKS.md)."""
  loop = loop and len(kernels) > 1
  conv = functools.partial(conv2d, stride=stride, padding=padding,
                           dilation=dilation, in_loop=loop or None)
  if loop:
    return lax.scan(lambda _, xk: (None, conv(*xk)), None,
                    (x, jnp.stack(kernels)), unroll=_EDGE_LOOP_UNROLL)[1]
  return jnp.stack([conv(xi, ki) for xi, ki in zip(jnp.unstack(x), kernels)])


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
  if impl in _DENSE_IMPLS:
    eye = jnp.eye(c, dtype=x.dtype)
    return _per_edge_conv(x, [ki * eye for ki in jnp.unstack(kernel)],
                          stride=stride, padding=padding, dilation=dilation,
                          loop=impl == 'dense_loop')
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


def depthwise_pointwise(x: jax.Array, depthwise_kernel: jax.Array,
                        pointwise_kernel: jax.Array, *, stride: int,
                        padding: int, dilation: int, impl: str,
                        sources: Optional[Sequence[int]] = None) -> jax.Array:
  """Per-edge depthwise conv, then a 1x1 conv: `DilConv` without ReLU and BN.

  x [E, B, H, W, C], depthwise_kernel [E, k, k, 1, C], pointwise_kernel
  [E, C, F] -> [E, B, H', W', F]. Both are linear, so with impl 'dense' they
  run as one dense k x k convolution per edge whose kernel is their product,
  K[i, j, c, f] = depthwise[i, j, c] * pointwise[c, f]: the same FLOPs as the
  block-diagonal depthwise kernel alone, with no pointwise convolution and no
  intermediate activation (forward or backward). The kernels' gradients
  follow from K's by the chain rule. Other impls run `depthwise`, then the
  pointwise contraction. The product is formed at the kernels' precision and
  then cast to x's dtype.

  `sources`: x is [S, B, H, W, C] and edge e reads x[sources[e]] (the edges
  of a search cell leaving the same node). With 'dense', the edges that read
  one source run as one convolution whose output channels are theirs side by
  side ([k, k, C, n * F]): the same FLOPs in wider, faster convolutions, fewer
  of them to compile, and the input kept once for the backward pass
  (`source_conv`). Other impls index x by `sources` first.
  """
  impl = resolve_depthwise_impl(impl)
  if impl in _DENSE_IMPLS:
    kernel = (depthwise_kernel[:, :, :, 0, :, None] *
              pointwise_kernel[:, None, None]).astype(x.dtype)
    if sources is not None and impl == 'dense':
      return source_conv(x, kernel, sources, stride=stride, padding=padding,
                         dilation=dilation)
    return _per_edge_conv(_gather(x, sources), jnp.unstack(kernel),
                          stride=stride, padding=padding, dilation=dilation,
                          loop=impl == 'dense_loop')
  y = depthwise(_gather(x, sources), depthwise_kernel.astype(x.dtype),
                stride=stride, padding=padding, dilation=dilation, impl=impl)
  return jnp.einsum('ebhwc,ecf->ebhwf', y, pointwise_kernel.astype(x.dtype))


def _gather(x: jax.Array, sources: Optional[Sequence[int]]) -> jax.Array:
  return x if sources is None else x[np.asarray(sources)]


def per_source(x: jax.Array, params: jax.Array, sources: Sequence[int],
               fn: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
  """Edge e's linear map of state x[sources[e]], once per state.

  x [S, ...] states, params [E, ...] per edge. `fn(state, params[edges])`
  maps one state with the parameters of the n edges reading it (in edge
  order) to [n, ...]. Returns [E, ...] in edge order.
  """
  edges: Dict[int, List[int]] = {}  # state -> edges reading it
  for e, s in enumerate(sources):
    edges.setdefault(int(s), []).append(e)
  xs = jnp.unstack(x)
  parts = [fn(xs[s], params[np.asarray(es)]) for s, es in edges.items()]
  y = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
  order = [e for es in edges.values() for e in es]
  return y if order == sorted(order) else y[np.argsort(order)]


def source_conv(x: jax.Array, kernel: jax.Array, sources: Sequence[int], *,
                stride: int, padding: int, dilation: int) -> jax.Array:
  """x [S, B, H, W, C], per-edge kernels [E, k, k, C, F] -> [E, B, H', W', F]
  with edge e convolving x[sources[e]]: one convolution per source, with the
  kernels of that source's n edges side by side as n * F output channels.
  Its input gradient sums the n edges' inside the convolution."""

  def conv(state, k):  # k [n, k, k, C, F] -> [k, k, C, n * F]
    n, f = k.shape[0], k.shape[-1]
    k = jnp.moveaxis(k, 0, 3).reshape(k.shape[1:4] + (n * f,))
    y = conv2d(state, k, stride=stride, padding=padding, dilation=dilation)
    return jnp.moveaxis(y.reshape(y.shape[:3] + (n, f)), 3, 0)

  return per_source(x, kernel, sources, conv)


def batch_norm(train: bool, affine: bool, axis_name: Optional[str] = None,
               name: Optional[str] = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1, eps 1e-5).

  With `axis_name` the batch statistics are averaged over that axis (SyncBN)
  where it is bound (in pmap / shard_map), and are per-device elsewhere, so
  the same network runs under plain `jit`.
  """
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      use_bias=affine,
      use_scale=affine,
      axis_name=bound_axis(axis_name),
      name=name)


def bound_axis(axis_name: Optional[str]) -> Optional[str]:
  """`axis_name` if it is bound here, else None (for BatchNorm's axis)."""
  return axis_name if axis_name and parallel.axis_bound(axis_name) else None


class BatchStatsNorm(nn.Module):
  """BatchNorm that always normalises with the current batch's statistics.

  PyTorch's `BatchNorm2d(track_running_stats=False)`: no running averages are
  kept (no 'batch_stats' variables), so training and evaluation mode compute
  the same thing, each batch normalised by its own mean and biased variance
  over (N, H, W). NAS-Bench-201's search cells offer this setting.

  Attributes:
    affine: learn a per-channel scale and bias (PyTorch's `affine`).
    epsilon: added to the variance.
    axis_name: if set, statistics are averaged over this axis where it is
      bound (as `batch_norm`).
  """
  affine: bool = True
  epsilon: float = 1e-5
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    stats = jnp.stack([jnp.mean(xf, axes), jnp.mean(xf * xf, axes)])
    axis_name = bound_axis(self.axis_name)
    if axis_name is not None:
      stats = lax.pmean(stats, axis_name)
    mean, mean2 = stats[0], stats[1]
    var = jnp.maximum(mean2 - mean * mean, 0.)
    y = (xf - mean) * lax.rsqrt(var + self.epsilon)
    if self.affine:
      c = x.shape[-1]
      y = y * self.param('scale', nn.initializers.ones, (c,))
      y = y + self.param('bias', nn.initializers.zeros, (c,))
    return y.astype(x.dtype)


def norm(train: bool, affine: bool, axis_name: Optional[str] = None, *,
         track_running_stats: bool = True,
         name: Optional[str] = None) -> nn.Module:
  """`batch_norm`, or `BatchStatsNorm` when not tracking running statistics."""
  if track_running_stats:
    return batch_norm(train, affine, axis_name, name=name)
  return BatchStatsNorm(affine, axis_name=axis_name, name=name)


class Conv(nn.Module):
  """Bias-free 2-D convolution with PyTorch-style symmetric padding.

  `kernel_only` returns the (k, k, C, F) kernel instead of applying it.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  kernel_only: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param('kernel', torch_kernel_init,
                        (k, k, x.shape[-1], self.features))
    if self.kernel_only:
      return kernel
    return conv2d(x, kernel.astype(x.dtype), stride=self.stride,
                  padding=self.padding, dilation=self.dilation)


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution; the kernel has shape (k, k, 1, C).

  `kernel_only` returns the kernel instead of applying it.
  """
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  impl: str = 'auto'
  kernel_only: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param('kernel', torch_kernel_init, (k, k, 1, c))
    if self.kernel_only:
      return kernel
    return depthwise(x[None], kernel[None].astype(x.dtype), stride=self.stride,
                     padding=self.padding, dilation=self.dilation,
                     impl=self.impl)[0]


class ReLUConvBN(nn.Module):
  """ReLU -> conv -> BN (the DARTS cell's input preprocessing; NB-201's
  `nor_conv_kxk`). `track_running_stats=False` normalises with batch
  statistics in evaluation too (see `BatchStatsNorm`)."""
  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: int = 0
  affine: bool = True
  bn_axis_name: Optional[str] = None
  track_running_stats: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv(self.features, self.kernel_size, self.stride, self.padding)(
        nn.relu(x))
    return norm(train, self.affine, self.bn_axis_name,
                track_running_stats=self.track_running_stats)(x)


class DilConv(nn.Module):
  """ReLU -> depthwise k x k (dilated) -> pointwise 1x1 -> BN."""
  features: int
  kernel_size: int
  stride: int
  padding: int
  dilation: int
  affine: bool = True
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # The parameters are those of DepthwiseConv_0 and a 1x1 Conv_0; the two
    # convolutions run as `depthwise_pointwise`.
    dw = DepthwiseConv(self.kernel_size, kernel_only=True)(x)
    pw = Conv(self.features, 1, kernel_only=True)(x)
    x = depthwise_pointwise(nn.relu(x)[None], dw[None], pw[None, 0, 0],
                            stride=self.stride, padding=self.padding,
                            dilation=self.dilation,
                            impl=self.depthwise_impl)[0]
    return batch_norm(train, self.affine, self.bn_axis_name)(x)


class SepConv(nn.Module):
  """Two stacked DilConv blocks with dilation 1; only the first is strided."""
  features: int
  kernel_size: int
  stride: int
  padding: int
  affine: bool = True
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c_in = x.shape[-1]
    x = DilConv(c_in, self.kernel_size, self.stride, self.padding, 1,
                self.affine, self.depthwise_impl, self.bn_axis_name)(x, train)
    return DilConv(self.features, self.kernel_size, 1, self.padding, 1,
                   self.affine, self.depthwise_impl, self.bn_axis_name)(
                       x, train)


class FactorizedReduce(nn.Module):
  """ReLU -> two 1x1 stride-2 convs (the second shifted by one pixel) -> BN.

  `relu=False` leaves out the ReLU (NAO's FactorizedReduce has none; its
  callers add one where they want it).
  """
  features: int
  affine: bool = True
  bn_axis_name: Optional[str] = None
  relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.features % 2:
      raise ValueError(
          f'FactorizedReduce needs an even channel count, got {self.features}')
    if x.shape[1] % 2 or x.shape[2] % 2:
      raise ValueError('FactorizedReduce needs even spatial sizes, got '
                       f'{x.shape[1]}x{x.shape[2]}')
    if self.relu:
      x = nn.relu(x)
    a = Conv(self.features // 2, 1, stride=2)(x)
    b = Conv(self.features // 2, 1, stride=2)(x[:, 1:, 1:, :])
    x = jnp.concatenate([a, b], axis=-1)
    return batch_norm(train, self.affine, self.bn_axis_name)(x)


class Identity(nn.Module):

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    return x


class Zero(nn.Module):
  """The 'none' op: zeros, spatially subsampled at stride 2."""
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    return jnp.zeros_like(x[:, ::self.stride, ::self.stride, :])


# How 3x3 max pooling (padding 1) is differentiated; the forward is the same:
# * 'xla': `lax.reduce_window`, whose gradient is XLA's select-and-scatter.
#   XLA:CPU expands that into a scatter with int32 indices of 4x the input's
#   size: 46 ms and 45 MB of temporaries for forward + backward at
#   64x32x32x16 on 2 vCPUs.
# * 'index': the forward also records, as int8, which of the 9 window
#   positions holds each window's first maximum (row-major, the tie-break of
#   select-and-scatter and of PyTorch), and the gradient routes through it
#   with slices and pads only: 7 ms and 9 MB at the same size. The int8 index
#   is all the backward keeps. A `custom_jvp`, so forward mode (the exact
#   hypergradient's Hessian-vector product), vmap and higher orders work.
# 'auto' = 'index' on CPU, 'xla' on accelerators (which run select-and-scatter
# natively; not measured there), decided by `jax.default_backend()` when the
# function is traced: CPU work placed by hand on a GPU host gets 'xla'. Both
# give the same values and gradients, except that a window whose maximum is
# NaN passes no gradient under 'index' (select-and-scatter routes it to one
# input; the loss is NaN either way).
MAX_POOL_IMPLS = ('auto', 'xla', 'index')
_POOL_PAD = ((0, 0), (1, 1), (1, 1), (0, 0))


def resolve_max_pool_impl(impl: str) -> str:
  if impl not in MAX_POOL_IMPLS:
    raise ValueError(
        f'max_pool_impl must be one of {MAX_POOL_IMPLS}, got {impl!r}')
  if impl == 'auto':
    return 'index' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def _pool_windows(x_padded: jax.Array, stride: int, out_hw):
  """The 9 [B, Ho, Wo, C] views of a 3x3 window, in row-major order."""
  b, _, _, c = x_padded.shape
  ho, wo = out_hw
  for di in range(3):
    for dj in range(3):
      yield lax.slice(x_padded, (0, di, dj, 0),
                      (b, di + stride * (ho - 1) + 1,
                       dj + stride * (wo - 1) + 1, c),
                      (1, stride, stride, 1))


def _max_window(x: jax.Array, stride: int) -> jax.Array:
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1),
                           (1, stride, stride, 1), _POOL_PAD)


def _route(index: jax.Array, t: jax.Array, stride: int) -> jax.Array:
  """Each window's tangent at its recorded maximum (linear in `t`)."""
  out = jnp.zeros(index.shape, t.dtype)
  for k, view in enumerate(_pool_windows(jnp.pad(t, _POOL_PAD), stride,
                                         index.shape[1:3])):
    out = out + jnp.where(index == k, view, jnp.zeros((), t.dtype))
  return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_pool_index(x: jax.Array, stride: int) -> jax.Array:
  return _max_window(x, stride)


@_max_pool_index.defjvp
def _max_pool_index_jvp(stride, primals, tangents):
  (x,), (t,) = primals, tangents
  # Through itself, so that second order (grad of grad, the exact
  # hypergradient's jvp of grad) routes through the index too.
  y = _max_pool_index(x, stride)
  xp = jnp.pad(x, _POOL_PAD, constant_values=-jnp.inf)
  # 9 (no position: a NaN window) routes nowhere.
  index = jnp.full(y.shape, 9, jnp.int8)
  views = list(_pool_windows(xp, stride, y.shape[1:3]))
  for k in reversed(range(9)):  # the first maximum wins
    index = jnp.where(views[k] == y, jnp.int8(k), index)
  # Under checkpoint the backward keeps the int8 index, not 9 masks.
  route = jax.checkpoint(_route, static_argnums=(2,))
  return y, route(lax.stop_gradient(index), t, stride)


def max_pool_3x3(x: jax.Array, stride: int, impl: str = 'auto') -> jax.Array:
  """3x3 max pooling with padding 1 on NHWC `x` (see `MAX_POOL_IMPLS`)."""
  if resolve_max_pool_impl(impl) == 'index':
    return _max_pool_index(x, stride)
  return _max_window(x, stride)


def pool_3x3(x: jax.Array, kind: str, stride: int) -> jax.Array:
  """3x3 'max' or 'avg' pooling with padding 1 on NHWC `x`; the average
  excludes the padding (PyTorch's count_include_pad=False)."""
  if kind == 'max':
    return max_pool_3x3(x, stride)
  # Flax divides by a float32 count, which would promote bfloat16 inputs.
  return nn.avg_pool(x, (3, 3), (stride, stride), ((1, 1), (1, 1)),
                     count_include_pad=False).astype(x.dtype)


class Pool(nn.Module):
  """3x3 max or average pooling (`pool_3x3`)."""
  kind: str
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    del train
    return pool_3x3(x, self.kind, self.stride)


def make_op(name: str, channels: int, stride: int, affine: bool, *,
            depthwise_impl: str = 'auto',
            bn_axis_name: Optional[str] = None,
            module_name: Optional[str] = None) -> nn.Module:
  """Builds candidate operation `name` mapping `channels` to `channels`.

  Args:
    name: one of `DARTS_PRIMITIVES`.
    channels: input and output channel count.
    stride: 1, or 2 on the input edges of a reduction cell.
    affine: whether BatchNorms have scale and bias (False in search networks).
    depthwise_impl: see `DEPTHWISE_IMPLS`.
    bn_axis_name: axis over which BatchNorm statistics are averaged, if any.
    module_name: Flax name of the returned module.

  Returns:
    A linen module called as `op(x, train)`.

  Raises:
    ValueError: for an unknown op name or a stride other than 1 or 2.
  """
  if stride not in (1, 2):
    raise ValueError(f'stride must be 1 or 2, got {stride}')
  kw = dict(affine=affine, bn_axis_name=bn_axis_name, name=module_name)
  conv_kw = dict(kw, depthwise_impl=depthwise_impl)
  if name == 'none':
    return Zero(stride, name=module_name)
  if name == 'max_pool_3x3':
    return Pool('max', stride, name=module_name)
  if name == 'avg_pool_3x3':
    return Pool('avg', stride, name=module_name)
  if name == 'skip_connect':
    if stride == 1:
      return Identity(name=module_name)
    return FactorizedReduce(channels, **kw)
  if name in ('sep_conv_3x3', 'sep_conv_5x5'):
    k = int(name[-1])
    return SepConv(channels, k, stride, k // 2, **conv_kw)
  if name in ('dil_conv_3x3', 'dil_conv_5x5'):
    k = int(name[-1])
    return DilConv(channels, k, stride, (k - 1), 2, **conv_kw)
  raise ValueError(f'unknown operation {name!r}; known: {DARTS_PRIMITIVES}')


def make_nb201_op(name: str, channels: int, affine: bool, *,
                  track_running_stats: bool = True,
                  bn_axis_name: Optional[str] = None,
                  module_name: Optional[str] = None) -> nn.Module:
  """Builds NAS-Bench-201 candidate op `name`, `channels` to `channels`.

  As AutoDL-Projects' `OPS` for a search-cell edge (stride 1, C_in == C_out):
  'none' is zeros, 'skip_connect' the identity, 'nor_conv_1x1' /
  'nor_conv_3x3' ReLU -> bias-free conv (padding 0 / 1) -> BN, and
  'avg_pool_3x3' a 3x3 average pool excluding padding with no BN after it.

  Args:
    name: one of `NB201_PRIMITIVES`.
    channels: input and output channel count.
    affine: whether BatchNorms have scale and bias (False in search networks).
    track_running_stats: False normalises with batch statistics in evaluation
      too (PyTorch's `track_running_stats=False`).
    bn_axis_name: axis over which BatchNorm statistics are averaged, if any.
    module_name: Flax name of the returned module.

  Returns:
    A linen module called as `op(x, train)`.

  Raises:
    ValueError: for an unknown op name.
  """
  if name == 'none':
    return Zero(1, name=module_name)
  if name == 'skip_connect':
    return Identity(name=module_name)
  if name == 'avg_pool_3x3':
    return Pool('avg', 1, name=module_name)
  if name in ('nor_conv_1x1', 'nor_conv_3x3'):
    k = int(name[-1])
    return ReLUConvBN(channels, k, 1, k // 2, affine, bn_axis_name,
                      track_running_stats, name=module_name)
  raise ValueError(f'unknown NAS-Bench-201 operation {name!r}; known: '
                   f'{NB201_PRIMITIVES}')


# The initialisers run once, so their program is compiled without LLVM's
# backend optimisations (`lazy_init`).
_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def lazy_init(module: nn.Module, key: jax.Array, *args,
              other_rngs: Sequence[str] = (), jit: bool = True,
              key_impl: str = 'unsafe_rbg', **kwargs):
  """`module`'s variables from argument shapes, without running it.

  `lazy_init` evaluates only the variable initialisers. Flax derives each
  parameter's key by folding the module path's names into the given key,
  and XLA compiles that derivation once per parameter: with JAX's default
  threefry keys, ~50 s for a 3-cell supernet on a CPU. The initialisers
  therefore draw from a `key_impl` key ('unsafe_rbg' or 'rbg') derived
  from `key`. 'rbg' draws with XLA's RngBitGenerator but still folds with
  threefry. The default, 'unsafe_rbg', also folds and splits with
  RngBitGenerator: JAX's fast key type, without threefry's guarantees for
  derived keys, and adequate for drawing initial weights. With it and the
  optimisation level below, the bench's `small` DARTS init took 28 s
  against 44-45 s with 'rbg' at the default level, `paper` 45 s against
  85 s (BENCHMARKS.md). The values are deterministic in `key` on one
  backend and XLA build. Training keys are not affected. `other_rngs`
  names more rng streams the call needs (given the same key).

  `jit` (default): the initialisers run as one compiled program. Run
  eagerly, flax also computes every value that depends on the parameters
  alone (the search cells' product kernels, their slices and transposes),
  and XLA compiles each of those ops and each initialiser once per shape:
  606 small compiles for the DARTS `small` supernet. Jitted, XLA drops the
  unused values. The program runs once, so it is compiled at
  `--xla_backend_optimization_level=0` (or within the caller's program,
  when `key` is traced). `jit=False` suits initialisers
  that draw on the host when their key is concrete
  (`jaxnas.spaces.nao_supernet`).
  """
  if key_impl not in ('unsafe_rbg', 'rbg'):
    raise ValueError(f"key_impl must be 'unsafe_rbg' or 'rbg', got "
                     f'{key_impl!r}')

  def init(key):
    init_key = jax.random.wrap_key_data(
        jax.random.bits(key, (4,), jnp.uint32), impl=key_impl)
    rngs = {'params': init_key, **{name: init_key for name in other_rngs}}
    return module.lazy_init(rngs, *args, **kwargs)

  if not jit:
    return init(key)
  if isinstance(key, jax.core.Tracer):  # inside eval_shape, vmap, jit...
    return jax.jit(init)(key)
  return jax.jit(init).lower(key).compile(_INIT_COMPILER_OPTIONS)(key)


def torch_bias_init(fan_in: int):
  """PyTorch's Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / jnp.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def check_primitives(primitives: Sequence[str],
                     known: Sequence[str] = DARTS_PRIMITIVES) -> None:
  """Raises ValueError if `primitives` has unknown or repeated names."""
  unknown = [p for p in primitives if p not in known]
  if unknown:
    raise ValueError(f'unknown operations {unknown}; known: {tuple(known)}')
  if len(set(primitives)) != len(primitives):
    raise ValueError(f'repeated operations in {tuple(primitives)}')
  if not primitives:
    raise ValueError('an edge needs at least one candidate operation')


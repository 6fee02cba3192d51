"""NAO-V2's weight-sharing supernet, with the architecture as an array.

renqianluo/NAO_pytorch `NAO_V2/model_search.py` (NASWSNetworkCIFAR) and the
`WS*` ops of `operations.py` (../shared/methods/nao_v2.md):

* Node i of a cell has an x- and a y-branch; each holds the 5 ops of
  `jaxnas.spaces.nao.OPS`, and each parametric op keeps **one set of weights
  per input index** j in 0..i+1 (`num_possible_inputs`): depthwise and
  pointwise kernels and the BN's affine (WSBN). Weights are shared only among
  architectures that use the same (node, branch, op, input).
* The identity at stride 2 (a reduction cell's node reading input 0 or 1)
  is a FactorizedReduce per input, without ReLU.
* The cell's output is the concat of the states no node reads, through one
  ReLU-1x1 conv-BN that keeps a C x C kernel per state
  (`WSReLUConvBN(nodes + 2)`); in a reduction cell unread inputs 0, 1 are
  FactorizedReduced first. So every cell outputs C channels.
* Inputs are calibrated as in the stand-alone network (`MaybeCalibrateSize`:
  ReLU + FactorizedReduce after a reduction, ReLU-1x1-BN where the width
  differs).
* Drop path on every branch with the reference's schedule
  (`drop_path_keep_prob`).
* Kaiming-normal (fan-in) init of every kernel, as `init_parameters`.

The architecture is an int array [2, nodes, 4] (normal, reduction;
`[x_id, x_op, y_id, y_op]` per node), a traced argument: each branch picks its
input by a dynamic index and runs its op through `lax.switch`, so one
compiled step serves every architecture and only the chosen op runs. A
concrete (numpy) architecture takes the same computation with Python
indexing instead (`static` below), which tests compare against.

Batch statistics: the supernet trains with every BN in batch-statistics
mode, and scores architectures (`child_valid`) with `model.eval()` and
`bn_train=True`, which puts back into batch mode only the BNs that receive
the flag. Two kinds never do: the stem's BN and the reduction cells'
FactorizedReduce of unread inputs 0 and 1 (`fac_1`, `fac_2`), so those
normalise with running averages when architectures are scored. Here the
same: those BNs (`RunningBatchNorm`) keep running averages (PyTorch's
momentum 0.1, unbiased variance), updated in training (`fac_k`'s only on
steps whose architecture leaves input k unread, when the reference calls
it) and read with `train=False`; every other BN always uses the batch's
statistics and keeps none (the reference's running averages of those are
never read).
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jaxnas import ops
from jaxnas.spaces import nao


def _host_init(fill):
  """An initializer that draws on the host when its key is concrete.

  `jaxnas.ops.lazy_init` runs initializers eagerly, and XLA compiles each
  random op once per distinct shape: the supernet's ~300 weight-shared
  shapes cost ~20 s of compiles at test size. Drawing with numpy, seeded by
  the key's bits, costs none; under a trace (e.g. `jax.jit(net.init)`) the
  same distribution is drawn with `jax.random`.
  """

  def init(key, shape, dtype=jnp.float32):
    if isinstance(key, jax.core.Tracer):
      return fill(None, key, shape).astype(dtype)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    rng = np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())
    return jnp.asarray(fill(rng, None, shape), dtype)

  return init


def kaiming_normal(leading: int = 0):
  """torch.nn.init.kaiming_normal_ (fan-in, gain sqrt(2), untruncated) of a
  kernel whose last axis is the output; `leading` axes (the input index of
  a weight-shared kernel) are not part of the fan-in."""

  def fill(rng, key, shape):
    std = np.sqrt(2. / max(1, int(np.prod(shape[leading:-1]))))
    if rng is None:
      return std * jax.random.normal(key, shape)
    return std * rng.standard_normal(shape)

  return _host_init(fill)


def _constant(value: float):
  return _host_init(lambda rng, key, shape: (
      jnp.full(shape, value) if rng is None else np.full(shape, value)))


KAIMING = kaiming_normal()
WS_KAIMING = kaiming_normal(1)
ONES, ZEROS = _constant(1.), _constant(0.)


def drop_path_keep_prob(keep_prob, layer_id: int, layers: int, progress):
  """The reference's `apply_drop_path` keep probability: scaled by depth,
  `1 - (layer_id + 1) / layers * (1 - keep_prob)`, then ramped with training
  progress `(step + 1) / steps` from 1 to that value."""
  kp = 1. - (layer_id + 1) / layers * (1. - keep_prob)
  return 1. - progress * (1. - kp)


OP_SELECT = ('auto', 'switch', 'mask')


def resolve_op_select(op_select: str) -> str:
  """'switch' or 'mask' for `op_select` ('auto' is 'switch' on every
  backend; see `Branch`)."""
  if op_select not in OP_SELECT:
    raise ValueError(f'op_select must be one of {OP_SELECT}, got '
                     f'{op_select!r}')
  return 'switch' if op_select == 'auto' else op_select


def _is_static(x) -> bool:
  return isinstance(x, (int, np.integer))


def _take(stack: jax.Array, j):
  """`stack[j]` for a Python or traced index."""
  if _is_static(j):
    return stack[j]
  return lax.dynamic_index_in_dim(stack, j, keepdims=False)


class WSBatchNorm(nn.Module):
  """WSBN: batch statistics, scale and bias per input index."""
  inputs: int
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, j) -> jax.Array:
    c = x.shape[-1]
    y = ops.BatchStatsNorm(affine=False, axis_name=self.bn_axis_name)(x)
    scale = self.param('scale', ONES, (self.inputs, c))
    bias = self.param('bias', ZEROS, (self.inputs, c))
    return y * _take(scale, j) + _take(bias, j)


class WSSepConv(nn.Module):
  """WSSepConv: twice ReLU -> depthwise k x k -> 1x1 -> WSBN, the first
  depthwise at `stride`; kernels per input index."""
  inputs: int
  kernel_size: int
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, j, stride: int) -> jax.Array:
    k, c = self.kernel_size, x.shape[-1]
    for t, s in ((1, stride), (2, 1)):
      dw = self.param(f'depthwise{t}', WS_KAIMING, (self.inputs, k, k, 1, c))
      pw = self.param(f'pointwise{t}', WS_KAIMING, (self.inputs, c, c))
      x = ops.depthwise_pointwise(nn.relu(x)[None], _take(dw, j)[None],
                                  _take(pw, j)[None], stride=s,
                                  padding=k // 2, dilation=1,
                                  impl=self.depthwise_impl)[0]
      x = WSBatchNorm(self.inputs, self.bn_axis_name, name=f'bn{t}')(x, j)
    return x


class RunningBatchNorm(nn.Module):
  """Affine BN with PyTorch's running averages (momentum 0.1, unbiased
  variance): with `train` it normalises by the batch and, where `update`
  (a traced bool), moves the averages; without, it uses the averages."""
  axis_name: Optional[str] = None
  epsilon: float = 1e-5
  momentum: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, update=True) -> jax.Array:
    c, axes = x.shape[-1], tuple(range(x.ndim - 1))
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,))
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,))
    if train:
      stats = jnp.stack([jnp.mean(x, axes), jnp.mean(x * x, axes)])
      axis_name = ops.bound_axis(self.axis_name)
      count = x.size // c
      if axis_name is not None:
        stats = lax.pmean(stats, axis_name)
        count = count * lax.psum(1, axis_name)
      mean, var = stats[0], jnp.maximum(stats[1] - stats[0] ** 2, 0.)
      if not self.is_initializing():
        m = self.momentum
        unbiased = var * count / max(count - 1, 1)
        ra_mean.value = jnp.where(update, (1 - m) * ra_mean.value + m * mean,
                                  ra_mean.value)
        ra_var.value = jnp.where(update, (1 - m) * ra_var.value + m * unbiased,
                                 ra_var.value)
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x - mean) * lax.rsqrt(var + self.epsilon)
    return (y * self.param('scale', nn.initializers.ones, (c,)) +
            self.param('bias', nn.initializers.zeros, (c,)))


class WSFactorizedReduce(nn.Module):
  """NAO's FactorizedReduce (no ReLU), one per input index: two 1x1 stride-2
  convs, the second shifted by a pixel, concatenated, BN (WSBN; with
  `running`, a single `RunningBatchNorm` instead)."""
  inputs: int
  channels: int
  bn_axis_name: Optional[str] = None
  running: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, j=0, train: bool = True,
               update=True) -> jax.Array:
    if self.channels % 2 or x.shape[1] % 2 or x.shape[2] % 2:
      raise ValueError('FactorizedReduce needs even channels and spatial '
                       f'sizes, got {self.channels} channels, '
                       f'{x.shape[1]}x{x.shape[2]}')
    half = (self.inputs, x.shape[-1], self.channels // 2)
    a = jnp.dot(x[:, ::2, ::2], _take(self.param('conv1', WS_KAIMING, half),
                                      j))
    b = jnp.dot(x[:, 1::2, 1::2], _take(self.param('conv2', WS_KAIMING, half),
                                        j))
    y = jnp.concatenate([a, b], -1)
    if self.running:
      return RunningBatchNorm(self.bn_axis_name, name='bn')(y, train, update)
    return WSBatchNorm(self.inputs, self.bn_axis_name, name='bn')(y, j)


class ReLUConv1x1BN(nn.Module):
  """ReLU -> 1x1 conv -> BN (batch statistics)."""
  channels: int
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param('kernel', KAIMING, (x.shape[-1], self.channels))
    return ops.BatchStatsNorm(axis_name=self.bn_axis_name)(
        jnp.dot(nn.relu(x), w))


class Branch(nn.Module):
  """The x- or y-branch of node `node`: its 5 weight-shared ops.

  `__call__(inputs, nodes, j, op)`: `inputs` [2, B, H, W, C] are the cell's
  calibrated inputs, `nodes` [i, B, H', W', C] the earlier nodes (None for
  node 0); j selects the state (0, 1: an input, read at the cell's stride;
  2..: node j - 2) and `op` the op. A normal cell's branch switches over its
  5 ops; a reduction cell's over 10 (each op at stride 2 on an input, or at
  stride 1 on a node).

  `op_select` (see `OP_SELECT`): 'switch' runs the chosen op alone
  (`lax.switch`); 'mask' runs every op and keeps the chosen one's output
  (`jnp.where`: the same values, and exactly zero gradients for the others);
  'auto' is 'switch' on every backend. On CPU the branches' convolutions
  take `jaxnas.ops.conv2d`'s loop-friendly gradients
  (`ops.in_conditional_branch`): with JAX's own, XLA:CPU ran the switched
  step's gradient convolutions slowly and masking was faster; with them the
  small supernet's step is 0.13 s switched against 0.55 s masked
  (BENCHMARKS.md, "Convolutions in conditional branches").

  `remat` (switch only): the separable convolutions are rematerialised in
  the backward pass. Under `jax.grad` a switch keeps the residuals of every
  branch (zeros for those not taken), so without it each step allocates and
  fills all ops' activations; with it a branch's residuals are its inputs.
  """
  node: int
  channels: int
  reduction: bool
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None
  remat: bool = True
  op_select: str = 'auto'

  def setup(self):
    n, kw = self.node + 2, dict(depthwise_impl=self.depthwise_impl,
                                bn_axis_name=self.bn_axis_name)
    remat = self.remat and resolve_op_select(self.op_select) == 'switch'
    sep = (nn.remat(WSSepConv, static_argnums=(3,)) if remat
           else WSSepConv)
    self.sep3 = sep(n, 3, **kw)
    self.sep5 = sep(n, 5, **kw)
    if self.reduction:
      self.reduce = WSFactorizedReduce(2, self.channels, self.bn_axis_name)

  def _op(self, op: int, x, j, stride: int):
    if op == 0:
      return self.sep3(x, j, stride)
    if op == 1:
      return self.sep5(x, j, stride)
    if op in (2, 3):
      return ops.pool_3x3(x, 'avg' if op == 2 else 'max', stride)
    if op == 4:
      return x if stride == 1 else self.reduce(x, j)
    raise ValueError(f'NAO op index must be in 0..{len(nao.OPS) - 1}, '
                     f'got {op}')

  def __call__(self, inputs, nodes, j, op):
    stride = 2 if self.reduction else 1
    num_ops = len(nao.OPS)
    if _is_static(j) and _is_static(op):  # a concrete architecture
      if j < 2:
        return self._op(int(op), inputs[j], j, stride)
      return self._op(int(op), nodes[j - 2], j, 1)
    if not self.reduction:
      # Every state has the same shape: one op per branch, on state j.
      states = inputs if nodes is None else jnp.concatenate([inputs, nodes])
      x = _take(states, j)
      branches = [lambda m, a, b, jj, k=k: m._op(k, a, jj, 1)
                  for k in range(num_ops)]
      x_in = x_node = x
      index = op
    else:
      # Branch b < num_ops: op b on input j (0 or 1) at stride 2;
      # num_ops + b: op b on node j - 2 at stride 1.
      x_in = _take(inputs, jnp.minimum(j, 1))
      branches = [lambda m, a, b, jj, k=k: m._op(k, a, jnp.minimum(jj, 1),
                                                  stride)
                  for k in range(num_ops)]
      index = op
      if nodes is not None:
        x_node = _take(nodes, jnp.maximum(j - 2, 0))
        branches += [lambda m, a, b, jj, k=k: m._op(k, b, jj, 1)
                     for k in range(num_ops)]
        index = op + num_ops * (j >= 2)
      else:
        x_node = x_in  # unused operand of node 0
    if self.is_initializing():  # create every op's variables
      outs = [b(self, x_in, x_node, j) for b in branches]
      return outs[0]
    if resolve_op_select(self.op_select) == 'mask':
      out = None
      for k, b in enumerate(branches):
        y = b(self, x_in, x_node, j)
        out = y if out is None else jnp.where(index == k, y, out)
      return out
    return nn.switch(index, [ops.in_conditional_branch(b) for b in branches],
                     self, x_in, x_node, j)


class WSCell(nn.Module):
  """A supernet cell (model_search.Cell); outputs `channels` channels."""
  nodes: int
  channels: int
  reduction: bool
  layer_id: int
  total_layers: int
  drop_path_keep: float = 0.9
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None
  remat: bool = True
  op_select: str = 'auto'

  @nn.compact
  def __call__(self, s0, s1, cell, *, train: bool, progress):
    c, axis = self.channels, self.bn_axis_name
    if s0.shape[1] != s1.shape[1]:
      s0 = WSFactorizedReduce(1, c, axis, name='calibrate_x')(nn.relu(s0))
    elif s0.shape[-1] != c:
      s0 = ReLUConv1x1BN(c, axis, name='calibrate_x')(s0)
    if s1.shape[-1] != c:
      s1 = ReLUConv1x1BN(c, axis, name='calibrate_y')(s1)
    inputs = jnp.stack([s0, s1])
    static = isinstance(cell, np.ndarray)
    keep = drop_path_keep_prob(self.drop_path_keep, self.layer_id,
                               self.total_layers, progress)
    nodes = []
    for i in range(self.nodes):
      node = 0.
      for b, name in ((0, 'x'), (1, 'y')):
        j, op = cell[i, 2 * b], cell[i, 2 * b + 1]
        if static:
          j, op = int(j), int(op)
        y = Branch(i, c, self.reduction, self.depthwise_impl, axis,
                   self.remat, self.op_select, name=f'node{i}_{name}')(
                       inputs, jnp.stack(nodes) if nodes else None, j, op)
        if train:
          y = _drop_path(y, keep, self.make_rng('drop_path'))
        node = node + y
      nodes.append(node)
    states = list(inputs) + nodes
    ids = jnp.asarray(cell)[:, ::2].reshape(-1)
    unused = jnp.zeros(self.nodes + 2).at[ids].add(1.) == 0
    if self.reduction:  # fac_1, fac_2: FactorizedReduce of unread inputs
      for k in (0, 1):
        states[k] = WSFactorizedReduce(1, c, axis, running=True,
                                       name=f'reduce_{k}')(
                                           states[k], 0, train, unused[k])
    w = self.param('combine', WS_KAIMING, (self.nodes + 2, c, c))
    x = jnp.concatenate([jnp.where(unused[k], nn.relu(s), 0.)
                         for k, s in enumerate(states)], -1)
    return ops.BatchStatsNorm(axis_name=axis, name='combine_bn')(
        jnp.dot(x, w.reshape(-1, c)))


def _drop_path(x: jax.Array, keep, key: jax.Array) -> jax.Array:
  """Zeros whole examples with probability 1 - keep, scales the rest by
  1 / keep (the reference's mask; keep = 1 is the identity)."""
  keep = jnp.asarray(keep, x.dtype)
  mask = jax.random.uniform(key, (x.shape[0], 1, 1, 1)) < keep
  return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))


class NASWSNetwork(nn.Module):
  """NASWSNetworkCIFAR without auxiliary head: stem conv 3x3 to 3C + BN,
  3N + 2 cells (reductions at N and 2N + 1), global pool, linear.

  `__call__(x, arch, train, progress)`: `arch` int [2, nodes, 4] (a traced
  array, or numpy for the concrete path); `train` enables drop path (needs
  the 'drop_path' rng) at `progress` = (step + 1) / steps of the phase and
  updates the running averages of the stem's and the `reduce_k` BNs
  (`mutable=['batch_stats']`); without it those BNs use their averages and
  the rest the batch's statistics, as the reference scores architectures
  (see the module docstring).
  """
  layers: int = 3
  nodes: int = nao.NODES
  channels: int = 20
  num_classes: int = 10
  drop_path_keep: float = 0.9
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None
  remat: bool = True
  op_select: str = 'auto'

  @nn.compact
  def __call__(self, x, arch, train: bool = False, progress=1.):
    if not isinstance(arch, np.ndarray):
      arch = jnp.asarray(arch)
    if arch.shape != (2, self.nodes, 4):
      arch = arch.reshape(2, self.nodes, 4)
    c = self.channels
    w = self.param('stem', KAIMING, (3, 3, x.shape[-1], 3 * c))
    s = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    s0 = s1 = RunningBatchNorm(self.bn_axis_name, name='stem_bn')(s, train)
    pools = (self.layers, 2 * self.layers + 1)
    total = 3 * self.layers + 2
    for i in range(total):
      reduction = i in pools
      if reduction:
        c *= 2
      cell = WSCell(self.nodes, c, reduction, i, total, self.drop_path_keep,
                    self.depthwise_impl, self.bn_axis_name, self.remat,
                    self.op_select, name=f'cell{i}')
      s0, s1 = s1, cell(s0, s1, arch[1 if reduction else 0], train=train,
                        progress=progress)
    out = jnp.mean(s1, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=KAIMING,
                    bias_init=ops.torch_bias_init(out.shape[-1]),
                    name='classifier')(out)


def init(net: NASWSNetwork, key: jax.Array, image_shape: Sequence[int]):
  """The supernet's (params, batch_stats) from shapes alone
  (`jaxnas.ops.lazy_init`)."""
  images = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)
  arch = jax.ShapeDtypeStruct((2, net.nodes, 4), jnp.int32)
  variables = ops.lazy_init(net, key, images, arch, train=False, jit=False)
  return variables['params'], variables['batch_stats']

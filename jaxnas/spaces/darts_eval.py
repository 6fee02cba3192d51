"""Evaluation networks of the DARTS space: a found cell trained from scratch.

Follows quark0/darts `cnn/model.py` and `cnn/utils.py` (see
../shared/methods/darts.md, "Evaluation network"):

* A cell built from a `Genotype`: its two inputs preprocessed by
  ReLU-Conv1x1-BN (FactorizedReduce after a reduction cell); intermediate node
  i sums two ops, `op(states[j])` for its two (op, j) pairs; the output is the
  channel concat of the genotype's `concat` nodes. Ops on the two input
  nodes of a reduction cell have stride 2. Every BatchNorm is affine; pools
  have no BatchNorm after them (unlike the search mixture).
* Drop path: in training, every op output except the identity (a stride-1
  skip-connect) is multiplied by a per-example Bernoulli(1 - p) mask and
  divided by 1 - p (`drop_path`). `p` is a traced argument, so a schedule that
  changes every epoch does not recompile.
* `CifarNetwork`: stem Conv3x3 to 3C + BN, `layers` cells with reductions at
  `layers // 3` and `2 * layers // 3`, global average pool, linear; the
  auxiliary head reads the output of cell `2 * layers // 3` in training.
* `ImageNetNetwork` (the mobile setting): a two-conv stride-4 stem (`stem0`)
  and a stride-2 conv (`stem1`), so the first cell sees a "reduced" previous
  input; the ImageNet auxiliary head, which has no BatchNorm after its second
  conv (the reference comments it out to match the paper's experiments).

Parameter counts exclude the auxiliary head (`count_params`), as the
reference's `count_parameters_in_MB` does: BatchNorm scales and biases count,
running statistics do not. `count_macs` counts the multiply-adds of
convolutions and dense layers in one forward pass of one image, the
"mult-adds" the papers report.

Synopsis:

  net = cifar_network(genotype.named('DARTS_V2'))
  params, batch_stats = init(net, key, (1, 32, 32, 3))
  logits, aux, updates = net.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True,
      drop_path=0.1, rngs={'drop_path': key}, mutable=['batch_stats'])
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

from jaxnas import ops
from jaxnas.spaces import genotype as genotype_lib

PyTree = Any
Pairs = Tuple[Tuple[str, int], ...]
# Auxiliary-head parameters live under this name (excluded from counts).
AUX_NAME = 'auxiliary_head'


def drop_path(x: jax.Array, rate: jax.Array, key: jax.Array) -> jax.Array:
  """Zeroes whole examples with probability `rate`, scales the rest by
  1 / (1 - rate) (the reference's `utils.drop_path`). `rate` may be traced;
  `rate` = 0 returns `x` unchanged."""
  keep = 1. - jnp.asarray(rate, x.dtype)
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))


def _freeze(cell: Sequence) -> Pairs:
  return tuple((str(op), int(j)) for op, j in cell)


class EvalCell(nn.Module):
  """One cell of a found genotype.

  Attributes:
    pairs: (op, input) pairs, two per intermediate node.
    concat: states concatenated into the output.
    channels: channels of every node.
    reduction: whether the input nodes' ops have stride 2.
    reduction_prev: whether the previous cell reduced (s0 is then twice the
      spatial size of s1).
    pool_bn: follow pooling ops with an affine BatchNorm (pt.darts' PoolBN,
      which DropNAS' augment network uses; quark0/darts has none).
    depthwise_impl: see `jaxnas.ops.DEPTHWISE_IMPLS`.
    bn_axis_name: if set, BatchNorm statistics are averaged over this axis.
  """
  pairs: Pairs
  concat: Tuple[int, ...]
  channels: int
  reduction: bool
  reduction_prev: bool
  pool_bn: bool = False
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, s0: jax.Array, s1: jax.Array, train: bool,
               drop_path_rate: Optional[jax.Array] = None) -> jax.Array:
    c, axis = self.channels, self.bn_axis_name
    if self.reduction_prev:
      s0 = ops.FactorizedReduce(c, bn_axis_name=axis, name='preprocess0')(
          s0, train)
    else:
      s0 = ops.ReLUConvBN(c, bn_axis_name=axis, name='preprocess0')(s0, train)
    s1 = ops.ReLUConvBN(c, bn_axis_name=axis, name='preprocess1')(s1, train)
    states = [s0, s1]
    for i in range(len(self.pairs) // 2):
      node = None
      for k in (2 * i, 2 * i + 1):
        name, j = self.pairs[k]
        stride = 2 if self.reduction and j < 2 else 1
        op = ops.make_op(name, c, stride, True,
                         depthwise_impl=self.depthwise_impl,
                         bn_axis_name=axis, module_name=f'op{k}')
        h = op(states[j], train)
        if self.pool_bn and isinstance(op, ops.Pool):
          h = ops.batch_norm(train, True, axis, name=f'op{k}_bn')(h)
        if (train and drop_path_rate is not None and
            not isinstance(op, ops.Identity)):
          h = drop_path(h, drop_path_rate, self.make_rng('drop_path'))
        node = h if node is None else node + h
      states.append(node)
    return jnp.concatenate([states[i] for i in self.concat], axis=-1)


class AuxiliaryHead(nn.Module):
  """ReLU -> AvgPool5 (no padding) -> Conv1x1 128 + BN + ReLU -> Conv2x2 768
  [+ BN] + ReLU -> linear. CIFAR: pool stride 3 on 8x8 inputs, BN after the
  second conv; ImageNet: stride 2 on 7x7 (at 224 pixels; the reference's
  comment says 14x14), no second BN."""
  num_classes: int
  pool_stride: int = 3
  second_bn: bool = True
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    pooled = (x.shape[1] - 5) // self.pool_stride + 1
    if x.shape[1] < 5 or x.shape[2] < 5 or pooled < 2:
      raise ValueError(
          f'the auxiliary head needs inputs of at least {5 + self.pool_stride}'
          f' pixels a side after the second reduction, got '
          f'{x.shape[1]}x{x.shape[2]}: use larger images or auxiliary=False')
    x = nn.avg_pool(nn.relu(x), (5, 5), (self.pool_stride,) * 2, 'VALID')
    x = ops.Conv(128, 1)(x)
    x = nn.relu(ops.batch_norm(train, True, self.bn_axis_name)(x))
    x = ops.Conv(768, 2)(x)
    if self.second_bn:
      x = ops.batch_norm(train, True, self.bn_axis_name)(x)
    x = nn.relu(x).reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, kernel_init=ops.torch_kernel_init,
                    bias_init=ops.torch_bias_init(x.shape[-1]))(x)


class EvalNetwork(nn.Module):
  """The CIFAR (`stem='cifar'`) or ImageNet mobile (`stem='imagenet'`)
  network of a genotype; build it with `cifar_network` / `imagenet_network`.

  Called as `net.apply(variables, images, train, drop_path=rate)`; returns
  `(logits, aux_logits)`, `aux_logits` None unless `auxiliary` and `train`.
  `drop_path` (a float or traced scalar; needs a 'drop_path' rng in training)
  is the rate of `drop_path` on the cells' non-identity ops.
  """
  normal: Pairs
  normal_concat: Tuple[int, ...]
  reduce: Pairs
  reduce_concat: Tuple[int, ...]
  C: int = 36
  num_classes: int = 10
  layers: int = 20
  auxiliary: bool = True
  stem: str = 'cifar'
  pool_bn: bool = False
  depthwise_impl: str = 'auto'
  bn_axis_name: Optional[str] = None

  @property
  def genotype(self) -> genotype_lib.Genotype:
    return genotype_lib.Genotype(list(self.normal), list(self.normal_concat),
                                 list(self.reduce), list(self.reduce_concat))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               drop_path: Optional[jax.Array] = None
               ) -> Tuple[jax.Array, Optional[jax.Array]]:
    if x.ndim != 4:
      raise ValueError(f'expected NHWC images, got shape {x.shape}')
    if self.layers < 3:
      raise ValueError(f'layers must be >= 3 (two reduction cells and a '
                       f'normal one), got {self.layers}')
    axis, c = self.bn_axis_name, self.C
    bn = lambda name: ops.batch_norm(train, True, axis, name=name)
    if self.stem == 'cifar':
      s0 = s1 = bn('stem_bn')(ops.Conv(3 * c, 3, padding=1, name='stem')(x))
      reduction_prev = False
    elif self.stem == 'imagenet':
      s0 = ops.Conv(c // 2, 3, stride=2, padding=1, name='stem0_conv0')(x)
      s0 = nn.relu(bn('stem0_bn0')(s0))
      s0 = bn('stem0_bn1')(ops.Conv(c, 3, stride=2, padding=1,
                                    name='stem0_conv1')(s0))
      s1 = bn('stem1_bn')(ops.Conv(c, 3, stride=2, padding=1,
                                   name='stem1_conv')(nn.relu(s0)))
      reduction_prev = True
    else:
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
    reductions = (self.layers // 3, 2 * self.layers // 3)
    aux_logits = None
    for i in range(self.layers):
      reduction = i in reductions
      if reduction:
        c *= 2
      pairs, concat = ((self.reduce, self.reduce_concat) if reduction
                       else (self.normal, self.normal_concat))
      cell = EvalCell(pairs, concat, c, reduction, reduction_prev,
                      self.pool_bn, self.depthwise_impl, axis,
                      name=f'cell{i}')
      s0, s1 = s1, cell(s0, s1, train, drop_path)
      reduction_prev = reduction
      if i == reductions[1] and self.auxiliary and train:
        aux_logits = AuxiliaryHead(
            self.num_classes, 3 if self.stem == 'cifar' else 2,
            self.stem == 'cifar', axis, name=AUX_NAME)(s1, train)
    out = jnp.mean(s1, axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=ops.torch_kernel_init,
                      bias_init=ops.torch_bias_init(out.shape[-1]),
                      name='classifier')(out)
    return logits, aux_logits


def _network(genotype: genotype_lib.Genotype, stem: str, **kwargs
             ) -> EvalNetwork:
  genotype.validate()
  return EvalNetwork(_freeze(genotype.normal), tuple(genotype.normal_concat),
                     _freeze(genotype.reduce), tuple(genotype.reduce_concat),
                     stem=stem, **kwargs)


def cifar_network(genotype: genotype_lib.Genotype, *, C: int = 36,
                  layers: int = 20, num_classes: int = 10,
                  auxiliary: bool = True, **kwargs) -> EvalNetwork:
  """The reference's NetworkCIFAR (paper setting: C=36, 20 cells)."""
  return _network(genotype, 'cifar', C=C, layers=layers,
                  num_classes=num_classes, auxiliary=auxiliary, **kwargs)


def imagenet_network(genotype: genotype_lib.Genotype, *, C: int = 48,
                     layers: int = 14, num_classes: int = 1000,
                     auxiliary: bool = True, **kwargs) -> EvalNetwork:
  """The reference's NetworkImageNet, mobile setting (C=48, 14 cells)."""
  return _network(genotype, 'imagenet', C=C, layers=layers,
                  num_classes=num_classes, auxiliary=auxiliary, **kwargs)


def init(net: nn.Module, key: jax.Array, image_shape: Sequence[int],
         ) -> Tuple[PyTree, PyTree]:
  """(params, batch_stats) of `net` for images of `image_shape` (NHWC),
  auxiliary head included when the network has one.

  Only the initialisers run (`jaxnas.ops.lazy_init`).
  """
  abstract = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)
  variables = ops.lazy_init(net, key, abstract, train=True,
                            other_rngs=('drop_path',))
  return variables['params'], variables.get('batch_stats', {})


def abstract_variables(net: nn.Module, image_shape: Sequence[int]) -> PyTree:
  """Shapes of all of `net`'s variables in training mode (auxiliary head
  included), without computing anything."""
  key = jax.random.key(0)
  return jax.eval_shape(
      lambda: net.init({'params': key, 'drop_path': key},
                       jnp.zeros(tuple(image_shape)), train=True))


def abstract_params(net: nn.Module, image_shape: Sequence[int]) -> PyTree:
  """Shapes of `net`'s params in training mode (auxiliary head included)."""
  return abstract_variables(net, image_shape)['params']


def count_params(params: PyTree, exclude: Sequence[str] = (AUX_NAME,)) -> int:
  """Number of parameters outside the top-level modules `exclude`."""
  return int(sum(np.prod(leaf.shape) for name, tree in params.items()
                 if name not in exclude for leaf in jax.tree.leaves(tree)))


def count_macs(fn, *args) -> int:
  """Multiply-adds of convolutions and dense layers in `fn(*args)`.

  Walks the jaxpr (no compilation): a convolution costs out_elements *
  kernel_h * kernel_w * in_channels / groups, a dot product its contraction
  size per output element. Other ops (BatchNorm, pooling, additions) are not
  counted. Trace networks with `depthwise_impl='grouped'`: the 'dense' form
  also counts its zero taps. The papers' tools are not known: DARTS reports
  574M for DARTS_V2 on ImageNet where this counts 530M.
  """
  jaxpr = jax.make_jaxpr(fn)(*args)
  return int(_jaxpr_macs(jaxpr.jaxpr))


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      out = eqn.outvars[0].aval.shape
      rhs = eqn.invars[1].aval.shape
      dn = eqn.params['dimension_numbers']
      # rhs_spec: (out feature dim, in feature dim, spatial dims...)
      spec = dn.rhs_spec
      k = int(np.prod([rhs[d] for d in spec[2:]])) * rhs[spec[1]]
      total += int(np.prod(out)) * k
    elif name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += int(np.prod(eqn.outvars[0].aval.shape)) * int(
          np.prod([lhs[d] for d in lhs_contract]))
    for sub in jax_core.jaxprs_in_params(eqn.params):
      total += _jaxpr_macs(sub)
  return total

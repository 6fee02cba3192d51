"""Architecture parametrisations: pytrees kept apart from the network weights.

An architecture is a dict `{'normal': (E, K), 'reduce': (E, K)}` (one row per
edge, one column per candidate op). A parametrisation is a pair of pure
functions: `init(key, shapes)` makes the pytree and `weights(arch)` turns it
into the per-edge mixing weights the search network consumes.

* `LOGITS`: DARTS logits, initialised 1e-3 * N(0, 1) as the reference code
  does (the paper says zeros; `scale=0.` gives that), mixed by softmax.
* `SIMPLEX`: GAEA's probabilities, initialised uniform and used as they are
  (updated by `jaxnas.optim.exponentiated_gradient`, which keeps them on the
  simplex).

Synopsis:

  arch = init_logits(key, {'normal': (14, 8), 'reduce': (14, 8)})
  mixing = softmax_weights(arch)     # rows sum to one
  arch = SIMPLEX.init(key, shapes); SIMPLEX.weights(arch) is arch
"""

from typing import Callable, Mapping, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import edges

Arch = Mapping[str, jax.Array]

# The reference's scale of the alpha initialisation (`1e-3 * randn`).
DARTS_INIT_SCALE = 1e-3


def init_logits(key: jax.Array, shapes: Mapping[str, Tuple[int, int]],
                scale: float = DARTS_INIT_SCALE) -> dict:
  """Gaussian logits `scale * N(0, 1)` for each cell type, in sorted order."""
  names = sorted(shapes)
  keys = jax.random.split(key, len(names))
  return {n: scale * jax.random.normal(k, shapes[n], jnp.float32)
          for n, k in zip(names, keys)}


def softmax_weights(arch: Arch) -> dict:
  """Row-wise softmax over each edge's candidate ops."""
  return {n: jax.nn.softmax(a, axis=-1) for n, a in arch.items()}


def init_uniform(key: jax.Array, shapes: Mapping[str, Tuple[int, int]],
                 scale: float = 0.) -> dict:
  """Uniform probabilities `1 / K` per row (`key` and `scale` unused)."""
  del key, scale
  return {n: jnp.full(s, 1. / s[-1], jnp.float32) for n, s in shapes.items()}


class Parametrisation(NamedTuple):
  """How architecture variables become mixing weights.

  Attributes:
    name: 'logits', 'simplex' or 'simplex_edges' (messages, configs).
    init: `(key, shapes, scale) -> arch` for the network's
      `arch_shapes()`.
    weights: arch -> what the search network mixes with (per cell type
      [E, K] rows on the simplex, or `jaxnas.edges.EdgeWeighted`).
    logits: one op leaf -> scores whose softmax are its weights (what the
      Gumbel samplers perturb: the logits, or log of probabilities, as
      GAEA's EGDAS samples from `log(alpha)`).
    mixing: arch -> per cell type [E, K] op weights (pictures, entropy).
    derive_weights: arch -> per cell type [E, K] scores the derivation rule
      reads (PC-DARTS with edge weights: op weight times edge weight).
  """
  name: str
  init: Callable[..., dict]
  weights: Callable[[Arch], dict]
  logits: Callable[[jax.Array], jax.Array]
  mixing: Callable[[Arch], dict]
  derive_weights: Callable[[Arch], dict]


def _log(p: jax.Array) -> jax.Array:
  return jnp.log(jnp.maximum(p, jnp.finfo(p.dtype).tiny))


LOGITS = Parametrisation('logits', init_logits, softmax_weights, lambda a: a,
                         softmax_weights, softmax_weights)
SIMPLEX = Parametrisation('simplex', init_uniform, dict, _log, dict, dict)


def node_ids(steps: int) -> np.ndarray:
  """[E]: the node each edge of a DARTS cell with `steps` nodes enters."""
  return np.concatenate([np.full(k, i) for i, (_, k) in
                         enumerate(node_segments(steps))])


def simplex_with_edges(steps: int) -> Parametrisation:
  """GAEA PC-DARTS: op probabilities and per-node edge probabilities.

  The arch is {'ops': {cell type: [E, K]}, 'edges': {cell type: [E]}}: ops
  uniform over K, edges uniform over each node's `2 + i` inputs (the
  reference's initialisation); the network gets `EdgeWeighted(ops, edges)`
  and the derivation the product `ops * edges` (its `_parse`).
  """
  ids = node_ids(steps)
  fan_in = np.bincount(ids)[ids].astype(np.float32)

  def init(key, shapes, scale=0.):
    return {'ops': init_uniform(key, shapes, scale),
            'edges': {t: jnp.asarray(1. / fan_in) for t in shapes}}

  def weights(arch):
    return {t: edges.EdgeWeighted(arch['ops'][t], arch['edges'][t])
            for t in arch['ops']}

  def derive_weights(arch):
    return {t: arch['ops'][t] * arch['edges'][t][:, None]
            for t in arch['ops']}

  return Parametrisation('simplex_edges', init, weights, _log,
                         lambda arch: dict(arch['ops']), derive_weights)




# ---------------------------------------------------------------------------
# Single-path samplers (GDAS, ROME, GAEA-GDAS).
#
# A sample says, per cell type and edge, which op to run and with what
# straight-through gate (`jaxnas.edges.SinglePath`): forward values are hard
# (one op, one or zero edges), gradients those of the relaxed weights
# softmax((log p + g) / tau), as GDAS (Dong & Yang 2019) and ROME (Wang et al.
# 2023) write them.


def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
  """`hard` in the forward pass, the gradient of `soft` in the backward."""
  return hard + soft - jax.lax.stop_gradient(soft)


def gumbel_max_st(key: jax.Array, logits: jax.Array, tau
                  ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Gumbel-max over the last axis with a straight-through relaxation.

  GDAS' sampler: perturbed scores `s = log_softmax(logits) + g`,
  g ~ Gumbel(0, 1); the choice is `argmax s`; the relaxed weights
  `softmax(s / tau)`. (GDAS redraws g when the softmax overflows; JAX's
  Gumbel draws are finite, and softmax is computed stably, so no redraw is
  needed.)

  Returns:
    (st, index, soft): `st` is one-hot in value with the gradient of `soft`;
    `index` [...] the chosen entries.
  """
  s = jax.nn.log_softmax(logits, axis=-1) + jax.random.gumbel(
      key, logits.shape, logits.dtype)
  soft = jax.nn.softmax(s / tau, axis=-1)
  index = jnp.argmax(s, axis=-1)
  hard = jax.nn.one_hot(index, logits.shape[-1], dtype=logits.dtype)
  return straight_through(hard, soft), index, soft


def node_segments(steps: int) -> Tuple[Tuple[int, int], ...]:
  """(first edge, number of edges) of each DARTS node, in edge order."""
  out, start = [], 0
  for i in range(steps):
    out.append((start, 2 + i))
    start += 2 + i
  return tuple(out)


def node_pairs(num_inputs: int) -> Tuple[Tuple[int, int], ...]:
  """The (i, k), i < k, input pairs of a node, in ROME-v1's logit order."""
  return tuple((i, k) for k in range(num_inputs) for i in range(k))


def topology_shape(steps: int, version: str) -> Tuple[int]:
  """Shape of one cell type's topology logits: per edge (v2) or pair (v1)."""
  if version == 'v2':
    return (sum(n for _, n in node_segments(steps)),)
  if version == 'v1':
    return (sum(len(node_pairs(n)) for _, n in node_segments(steps)),)
  raise ValueError(f"topology version must be 'v1' or 'v2', got {version!r}")


def gumbel_top2_st(key: jax.Array, beta: jax.Array, steps: int, tau
                   ) -> jax.Array:
  """ROME-v2: two distinct incoming edges per node by Gumbel-Top2.

  Per node j, `s_i = log_softmax(beta_j)_i + g_i` over its incoming edges; the
  two largest `s_i` are chosen (which samples two edges without replacement
  with probabilities softmax(beta_j), the paper's Sec. 3.5), and the same `s`
  gives the relaxed weights softmax(s / tau).

  Args:
    key: PRNG key.
    beta: [num_edges] logits of one cell type, edges in DARTS order.
    steps: intermediate nodes.
    tau: temperature.

  Returns:
    [num_edges] straight-through gates: value 1 on the chosen edges, else 0.
  """
  segments = node_segments(steps)
  keys = jax.random.split(key, len(segments))
  gates = []
  for k, (start, n) in zip(keys, segments):
    s = jax.nn.log_softmax(beta[start:start + n]) + jax.random.gumbel(
        k, (n,), beta.dtype)
    top = jax.lax.top_k(s, 2)[1]
    hard = jnp.sum(jax.nn.one_hot(top, n, dtype=beta.dtype), axis=0)
    gates.append(straight_through(hard, jax.nn.softmax(s / tau)))
  return jnp.concatenate(gates)


def _pair_membership(n: int) -> np.ndarray:
  """[pairs, n] 0/1: which inputs each pair of `node_pairs(n)` holds."""
  m = np.zeros((len(node_pairs(n)), n), np.float32)
  for p, (i, k) in enumerate(node_pairs(n)):
    m[p, i] = m[p, k] = 1.
  return m


def gumbel_pair_st(key: jax.Array, beta: jax.Array, steps: int, tau
                   ) -> jax.Array:
  """ROME-v1: one pair of incoming edges per node by Gumbel-max over pairs.

  `beta` holds one logit per pair (`node_pairs`), nodes in order. An edge's
  gate is the sum of the indicators (hard) and relaxed weights (soft) of the
  pairs holding it (the paper's Eq. 6). Returns [num_edges] gates as
  `gumbel_top2_st`.
  """
  segments = node_segments(steps)
  keys = jax.random.split(key, len(segments))
  gates, start = [], 0
  for k, (_, n) in zip(keys, segments):
    p = len(node_pairs(n))
    st, _, _ = gumbel_max_st(k, beta[start:start + p], tau)
    gates.append(st @ _pair_membership(n))
    start += p
  return jnp.concatenate(gates)


def edge_probabilities(beta: jax.Array, steps: int, version: str
                       ) -> jax.Array:
  """[num_edges] topology scores: v2 softmax per node; v1 the best pair's
  members get that pair's probability (for display and derivation)."""
  out, start = [], 0
  for _, n in node_segments(steps):
    if version == 'v2':
      out.append(jax.nn.softmax(beta[start:start + n]))
      start += n
    else:
      p = len(node_pairs(n))
      probs = jax.nn.softmax(beta[start:start + p])
      out.append(jnp.max(probs[:, None] * _pair_membership(n), axis=0))
      start += p
  return jnp.concatenate(out)


def sample_single_path(key: jax.Array, arch: Mapping, tau, *,
                       steps: int = 4, topology: str = 'none',
                       zero_terms: bool = False) -> dict:
  """One sub-network: an op per edge and, with a topology, 2 edges per node.

  Args:
    key: PRNG key.
    arch: {'ops': {cell type: [E, K] logits}} and, when `topology` is 'v1'
      or 'v2', {'edges': {cell type: logits}} (`topology_shape`).
    tau: temperature of the relaxed weights.
    steps: intermediate nodes per cell (topology only).
    topology: 'none' (every edge runs, GDAS), 'v2' (Gumbel-Top2 over each
      node's edges) or 'v1' (Gumbel-max over each node's edge pairs).
    zero_terms: add the other ops' gates (value 0) to each edge's output, as
      AutoDL-Projects' GDAS does in the NAS-Bench-201 cell: every op logit
      then gets a gradient from every sample, not only through the softmax.

  Returns:
    {cell type: `jaxnas.edges.SinglePath`}.
  """
  out = {}
  names = sorted(arch['ops'])
  keys = jax.random.split(key, 2 * len(names))
  for n, (k_op, k_edge) in zip(names, zip(keys[::2], keys[1::2])):
    st, index, _ = gumbel_max_st(k_op, arch['ops'][n], tau)
    chosen = jax.nn.one_hot(index, st.shape[-1], dtype=bool)
    gate = jnp.sum(jnp.where(chosen, st, 0.), axis=-1)
    offset = (jnp.sum(jnp.where(chosen, 0., st), axis=-1) if zero_terms
              else jnp.zeros_like(gate))
    if topology != 'none':
      sampler = {'v2': gumbel_top2_st, 'v1': gumbel_pair_st}.get(topology)
      if sampler is None:
        raise ValueError("topology must be 'none', 'v1' or 'v2', got "
                         f'{topology!r}')
      e_st = sampler(k_edge, arch['edges'][n], steps, tau)
      on = jax.lax.stop_gradient(e_st) > 0.5
      index = jnp.where(on, index, -1)
      gate, offset = gate * e_st, jnp.where(on, offset, 0.)
    out[n] = edges.SinglePath(index.astype(jnp.int32), gate, offset)
  return out


def mode_single_path(arch: Mapping, *, steps: int = 4,
                     topology: str = 'none') -> dict:
  """The most likely sub-network (argmax ops, top-2 edges), gates 1."""
  out = {}
  for n, logits in arch['ops'].items():
    index = jnp.argmax(logits, axis=-1)
    if topology != 'none':
      probs = edge_probabilities(arch['edges'][n], steps, topology)
      on = jnp.zeros(probs.shape, bool)
      for start, k in node_segments(steps):
        top = jax.lax.top_k(probs[start:start + k], 2)[1] + start
        on = on.at[top].set(True)
      index = jnp.where(on, index, -1)
    out[n] = edges.SinglePath(index.astype(jnp.int32),
                              jnp.ones(index.shape, logits.dtype),
                              jnp.zeros(index.shape, logits.dtype))
  return out

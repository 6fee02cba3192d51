"""The NAO-V2 search space: architectures, their token sequences, sampling.

As renqianluo/NAO_pytorch `NAO_V2/utils.py` and `operations.py`
(../shared/methods/nao_v2.md):

* Ops (`OPERATIONS_search_small`): 0 sep_conv 3x3, 1 sep_conv 5x5,
  2 avg_pool 3x3, 3 max_pool 3x3, 4 identity.
* A cell has B = 5 nodes; node i takes two inputs from {0, ..., i + 1}
  (0 and 1 are the cell's inputs) and an op for each: `[in1, op1, in2, op2]`.
  An architecture is a normal and a reduction cell, 2 x 20 integers.
* Token sequence (`parse_arch_to_seq`): input j -> token j + 1 (1..B+1),
  op k -> token k + B + 2 (7..11 for B = 5); token 0 is SOS. Vocabulary
  1 + (B + 1) + 5 = 12, length 40.
* Random architectures (`generate_arch`): every input and op uniform.
* The EPD's swap augmentation: exchanging the two (input, op) pairs of one
  node gives the same cell (a node sums its two branches).

`Encoding` describes a token sequence for `jaxnas.epd`: its vocabulary, its
length and which tokens each position allows (the reference's constrained
greedy decoding); `encoding()` is this space's. NAS-Bench-201 has its own
(`jaxnas.spaces.nb201.encoding`).
"""

from typing import NamedTuple

import numpy as np

OPS = ('sep_conv_3x3', 'sep_conv_5x5', 'avg_pool_3x3', 'max_pool_3x3',
       'identity')
NODES = 5
SOS = 0


class Encoding(NamedTuple):
  """A token sequence family: `allowed[p, t]` says whether position p may
  hold token t (token 0 is SOS and is never allowed)."""
  vocab_size: int
  length: int
  allowed: np.ndarray

  def valid(self, tokens) -> bool:
    tokens = np.asarray(tokens)
    return (tokens.shape == (self.length,) and
            bool(np.all(self.allowed[np.arange(self.length), tokens])))


def encoding(nodes: int = NODES, num_ops: int = len(OPS)) -> Encoding:
  """The NAO token sequence of two cells of `nodes` nodes."""
  vocab = 1 + (nodes + 1) + num_ops
  length = 2 * 4 * nodes
  allowed = np.zeros((length, vocab), bool)
  for p in range(length):
    if p % 2 == 0:  # an input of node (p // 4) % nodes: 0 .. node + 1
      node = (p // 2) % (2 * nodes) // 2
      allowed[p, 1:node + 3] = True
    else:
      allowed[p, nodes + 2:] = True
  return Encoding(vocab, length, allowed)


def to_tokens(arch, nodes: int = NODES) -> np.ndarray:
  """[normal (4B ints), reduce (4B ints)] -> the 8B-token sequence."""
  arch = np.asarray(arch, np.int64).reshape(2, nodes, 2, 2)
  tokens = arch.copy()
  tokens[..., 0] += 1
  tokens[..., 1] += nodes + 2
  return tokens.reshape(-1)


def from_tokens(tokens, nodes: int = NODES) -> np.ndarray:
  """The 8B-token sequence -> [2, 4B] ints; ValueError if invalid."""
  tokens = np.asarray(tokens, np.int64)
  if not encoding(nodes).valid(tokens):
    raise ValueError(f'not a valid NAO token sequence: {tokens.tolist()}')
  arch = tokens.reshape(2, nodes, 2, 2).copy()
  arch[..., 0] -= 1
  arch[..., 1] -= nodes + 2
  return arch.reshape(2, 4 * nodes)


def random_archs(n: int, rng: np.random.Generator, nodes: int = NODES,
                 num_ops: int = len(OPS)) -> np.ndarray:
  """`n` uniformly random architectures, [n, 2, 4B] ints."""
  archs = np.empty((n, 2, nodes, 2, 2), np.int64)
  for i in range(nodes):
    archs[:, :, i, :, 0] = rng.integers(0, i + 2, (n, 2, 2))
    archs[:, :, i, :, 1] = rng.integers(0, num_ops, (n, 2, 2))
  return archs.reshape(n, 2, 4 * nodes)


def swap_augment(tokens: np.ndarray, copies: int, rng: np.random.Generator,
                 nodes: int = NODES) -> np.ndarray:
  """The reference's `controller_expand`: `copies` variants of each sequence
  [n, 8B], each with the two (input, op) pairs of one random node of the
  normal cell and of one of the reduction cell exchanged. Returns
  [n * copies, 8B], variant c of sequence i at row c * n + i."""
  tokens = np.asarray(tokens)
  n = len(tokens)
  out = np.repeat(tokens[None], copies, 0).reshape(copies, n, 2, nodes, 2, 2)
  node = rng.integers(0, nodes, (copies, n, 2))
  c, i, cell = np.meshgrid(np.arange(copies), np.arange(n), np.arange(2),
                           indexing='ij')
  pairs = out[c, i, cell, node].copy()            # [copies, n, 2, 2, 2]
  out[c, i, cell, node] = pairs[..., ::-1, :]
  return out.reshape(copies * n, -1)


"""NAO's encoder-predictor-decoder (EPD) in Flax, over any token encoding.

As renqianluo/NAO_pytorch `NAO_V2/encoder.py`, `decoder.py`,
`controller.py` and `train_search.py` (../shared/methods/nao_v2.md):

* Encoder: token embedding (32), consecutive pairs of embeddings
  concatenated (length L -> L / 2, width 64), one LSTM layer (64); every
  step's output L2-normalised; the architecture embedding is the
  L2-normalised mean of those outputs.
* Predictor: linear + sigmoid on the embedding (the reference's 0-layer MLP).
* Decoder: one LSTM layer (64) started from (embedding, embedding), input
  token embedding (64), dot-product attention over the encoder's outputs
  (input projection, concat, linear + tanh, no biases), linear + log-softmax.
  Teacher forcing in training (input: SOS then the sequence shifted by one);
  greedy decoding at inference, restricted at each position to the tokens
  the encoding allows there (`jaxnas.spaces.nao.Encoding.allowed`), so every
  decoded sequence is a valid architecture.
* Loss: `trade_off * MSE(prediction, target) + (1 - trade_off) * NLL`,
  trade_off 0.8; Adam 1e-3 with gradient-norm clip 5 (`make_optimizer`).
* Generation (`Encoder.infer`, `generate_new_arch`): the gradient of the
  prediction with respect to the per-step encoder outputs, a step of
  `step_size` along it, per-step and mean re-normalisation, then greedy
  decoding from the moved outputs and embedding.

Everything is a pure function of the EPD's params; `fit` trains with a
jitted step over shuffled mini-batches, `generate` runs the reference's
outer loop (step sizes 1, 2, ... until enough new sequences).

Synopsis:

  enc = nao_space.encoding()            # or nb201.encoding()
  model = EPD(enc.vocab_size, enc.length)
  params = model.init(key, tokens[:1])['params']
  params, history = fit(model, params, tokens, targets, epochs=1000, key=k)
  new = generate(model, params, top_tokens, enc, count=300,
                 exclude=tokens)
"""

from typing import Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

SOS = 0


def _normalise(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(||x||, 1e-12), PyTorch's F.normalize."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class _DecoderStep(nn.Module):
  """One decoder step: LSTM on the input token, attention, log-softmax.

  Scanned over positions (`nn.scan`); the carry holds the LSTM state and the
  next input token. With `teacher` the next input is the given sequence's
  token (teacher forcing), else the argmax over the tokens `allowed` here.
  """
  vocab_size: int
  hidden: int

  @nn.compact
  def __call__(self, carry, teacher_token, allowed, teacher, enc_outs):
    lstm, token = carry
    lstm, y = nn.OptimizedLSTMCell(self.hidden, name='cell')(
        lstm, nn.Embed(self.vocab_size, self.hidden, name='embed')(token))
    q = nn.Dense(self.hidden, use_bias=False, name='attn_in')(y)
    attn = jax.nn.softmax(jnp.einsum('bh,bsh->bs', q, enc_outs), -1)
    mix = jnp.einsum('bs,bsh->bh', attn, enc_outs)
    y = jnp.tanh(nn.Dense(self.hidden, use_bias=False, name='attn_out')(
        jnp.concatenate([mix, y], -1)))
    logp = jax.nn.log_softmax(nn.Dense(self.vocab_size, name='out')(y), -1)
    greedy = jnp.argmax(jnp.where(allowed, logp, -jnp.inf), -1).astype(
        token.dtype)
    nxt = jnp.where(teacher, teacher_token, greedy)
    return (lstm, nxt), (logp, greedy)


_ScannedDecoder = nn.scan(
    _DecoderStep, variable_broadcast='params', split_rngs={'params': False},
    in_axes=(1, 0, nn.broadcast, nn.broadcast), out_axes=1)


class EPD(nn.Module):
  """The encoder, predictor and decoder over sequences of `length` tokens.

  Methods (with `model.apply(..., method=...)`): `encode`, `predict`,
  `decode` (teacher forcing), `greedy` (constrained decoding); `__call__`
  is `(prediction, log-probabilities)` for training. The LSTMs are scanned
  over positions, so the compiled program does not grow with the length.
  """
  vocab_size: int
  length: int
  emb_size: int = 32
  hidden: int = 64
  pair: int = 2          # tokens per encoder step (source 40 -> 20 steps)

  def setup(self):
    if self.length % self.pair:
      raise ValueError(f'length {self.length} is not a multiple of '
                       f'pair={self.pair}')
    if self.emb_size * self.pair != self.hidden:
      raise ValueError('the reference feeds the LSTM pairs of embeddings: '
                       f'need emb_size * pair == hidden, got {self.emb_size} '
                       f'* {self.pair} != {self.hidden}')
    self.enc_embed = nn.Embed(self.vocab_size, self.emb_size)
    self.encoder = nn.RNN(nn.OptimizedLSTMCell(self.hidden))
    self.regressor = nn.Dense(1)
    self.decoder = _ScannedDecoder(self.vocab_size, self.hidden)

  def encode(self, tokens: jax.Array) -> jax.Array:
    """[B, L] tokens -> per-step outputs [B, L / pair, hidden], normalised."""
    x = self.enc_embed(tokens)
    x = x.reshape(x.shape[0], self.length // self.pair,
                  self.pair * self.emb_size)
    return _normalise(self.encoder(x))

  def predict(self, enc_outs: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """(embedding [B, hidden], prediction in (0, 1) [B]) of encoder
    outputs."""
    emb = _normalise(jnp.mean(enc_outs, 1))
    return emb, jax.nn.sigmoid(self.regressor(emb)[:, 0])

  def _run(self, enc_outs, emb, teacher_tokens, allowed, teacher):
    b = emb.shape[0]
    carry = ((emb, emb), jnp.full((b,), SOS, jnp.int32))
    _, (logp, greedy) = self.decoder(carry, teacher_tokens, allowed,
                                     jnp.asarray(teacher), enc_outs)
    return logp, greedy

  def decode(self, enc_outs: jax.Array, emb: jax.Array,
             tokens: jax.Array) -> jax.Array:
    """Log-probabilities [B, L, V] of `tokens` with teacher forcing (the
    input at position p is token p - 1, SOS at 0)."""
    allowed = jnp.ones((self.length, self.vocab_size), bool)
    return self._run(enc_outs, emb, tokens.astype(jnp.int32), allowed,
                     True)[0]

  def greedy(self, enc_outs: jax.Array, emb: jax.Array,
             allowed: jax.Array) -> jax.Array:
    """Greedy decoding [B, L], position p restricted to `allowed[p]`."""
    dummy = jnp.zeros((emb.shape[0], self.length), jnp.int32)
    return self._run(enc_outs, emb, dummy, jnp.asarray(allowed), False)[1]

  def __call__(self, tokens: jax.Array):
    enc_outs = self.encode(tokens)
    emb, pred = self.predict(enc_outs)
    return pred, self.decode(enc_outs, emb, tokens)


def loss_fn(model: EPD, params, tokens: jax.Array, targets: jax.Array,
            trade_off: float = 0.8):
  """`(loss, (mse, nll))`: trade_off * MSE + (1 - trade_off) * NLL."""
  pred, logp = model.apply({'params': params}, tokens)
  mse = jnp.mean((pred - targets) ** 2)
  nll = -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], -1))
  return trade_off * mse + (1 - trade_off) * nll, (mse, nll)


def make_optimizer(lr: float = 1e-3, clip: float = 5.):
  """The reference's EPD optimizer: Adam (no weight decay) after clipping."""
  return optax.chain(optax.clip_by_global_norm(clip), optax.adam(lr))


def fit(model: EPD, params, tokens: np.ndarray, targets: np.ndarray, *,
        epochs: int, key: jax.Array, batch_size: int = 100,
        trade_off: float = 0.8, tx: Optional[optax.GradientTransformation] =
        None, callback: Optional[Callable[[int, dict], None]] = None):
  """Trains `params` on (tokens [N, L], targets [N] in [0, 1]).

  Each epoch visits a fresh permutation (seeded from `key`) in batches of
  `batch_size`; the last partial batch is dropped unless it is the only one.
  A fresh optimizer state is made per call (the reference re-creates Adam
  each round and keeps the EPD's weights). `callback(epoch, metrics)`
  receives each epoch's mean losses.

  Returns (params, list of per-epoch {'loss', 'mse', 'nll'}).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  targets = jnp.asarray(targets, jnp.float32)
  n = len(tokens)
  bs = min(batch_size, n)
  steps = n // bs
  tx = tx or make_optimizer()
  opt_state = tx.init(params)

  @jax.jit
  def epoch_fn(params, opt_state, key):
    perm = jax.random.permutation(key, n)[:steps * bs].reshape(steps, bs)

    def step(carry, idx):
      params, opt_state = carry
      (loss, (mse, nll)), grads = jax.value_and_grad(
          lambda p: loss_fn(model, p, tokens[idx], targets[idx], trade_off),
          has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), (loss, mse,
                                                                 nll)

    (params, opt_state), (loss, mse, nll) = jax.lax.scan(
        step, (params, opt_state), perm)
    return params, opt_state, {'loss': loss.mean(), 'mse': mse.mean(),
                               'nll': nll.mean()}

  history = []
  for e in range(epochs):
    params, opt_state, m = epoch_fn(params, opt_state,
                                    jax.random.fold_in(key, e))
    m = {k: float(v) for k, v in m.items()}
    history.append(m)
    if callback is not None:
      callback(e, m)
  return params, history


def predict(model: EPD, params, tokens: np.ndarray,
            batch_size: int = 1000) -> np.ndarray:
  """The predictor's outputs [N] for `tokens` [N, L]."""

  @jax.jit
  def f(t):
    return model.apply({'params': params}, t,
                       method=lambda m, t: m.predict(m.encode(t))[1])

  return np.concatenate([np.asarray(f(jnp.asarray(tokens[i:i + batch_size],
                                                  jnp.int32)))
                         for i in range(0, len(tokens), batch_size)])


def ascend(model: EPD, params, tokens: jax.Array, step_size: jax.Array,
           allowed: jax.Array) -> jax.Array:
  """One generation pass: move each sequence's encoder outputs by
  `step_size` times the gradient of its prediction, re-normalise, decode
  greedily. Returns new token sequences [B, L]."""
  enc_outs = model.apply({'params': params}, tokens, method=EPD.encode)

  def total_pred(outs):
    return jnp.sum(model.apply({'params': params}, outs,
                               method=EPD.predict)[1])

  grads = jax.grad(total_pred)(enc_outs)
  new_outs = _normalise(enc_outs + step_size * grads)
  new_emb = _normalise(jnp.mean(new_outs, 1))
  return model.apply({'params': params}, new_outs, new_emb, allowed,
                     method=EPD.greedy)


def generate(model: EPD, params, seeds: np.ndarray, allowed: np.ndarray,
             count: int, exclude: Sequence[Sequence[int]] = (),
             max_step_size: int = 50) -> Tuple[np.ndarray, int]:
  """The reference's generation loop: step sizes 1, 2, ... over `seeds`
  [S, L] until `count` new sequences (not in `exclude`, no duplicates) or
  the step size passes `max_step_size`.

  Returns (new sequences [<= count, L], last step size).
  """
  fn = jax.jit(lambda t, s: ascend(model, params, t, s, allowed))
  seen = {tuple(int(x) for x in t) for t in exclude}
  new = []
  step_size = 0
  seeds = jnp.asarray(seeds, jnp.int32)
  while len(new) < count:
    step_size += 1
    for t in np.asarray(fn(seeds, jnp.float32(step_size))):
      key = tuple(int(x) for x in t)
      if key not in seen:
        seen.add(key)
        new.append(t)
        if len(new) >= count:
          break
    if step_size > max_step_size:  # the reference stops after 51
      break
  return np.asarray(new, np.int64).reshape(-1, seeds.shape[1]), step_size

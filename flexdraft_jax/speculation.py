"""Drafts and their verification (ALGORITHM.md §4), for every step kind of `flex`.

`Candidates` is what a row verifies next: the target's logits for its next
position and drafts for the positions after it, with their top probabilities
and the kind of step that made them. `candidates` makes them from slot logits,
`lookup_drafts` from the row's own prompt and output (prompt lookup), and
`verify` judges them: the longest prefix matching the target's argmax
(greedy), or the speculative-sampling rule, with the bonus token after them.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from flexdraft_jax.sampling import SamplingConfig, argmax, probabilities, sample, top_probability

PLD_NGRAMS = (3, 2)  # n-gram sizes pld looks up, longest first


@flax.struct.dataclass
class Candidates:
  """What the next step verifies, for a row whose cache holds n tokens."""
  last_logits: jax.Array  # [B, V] f32 target logits for position n
  drafts: jax.Array       # [B, Bs] drafts for positions n, n+1, ...
  conf: jax.Array         # [B, Bs] the draft's top probability per draft
  q: jax.Array | None     # [B, Bs, V] the distributions drafts were drawn from (sampling only)
  certain: jax.Array      # [B] 1 when drafts[:, 0] is an already emitted bonus
  source: jax.Array       # [B] planner.SOURCES index of what made the drafts


def candidates(key, logits_BJV, sampling: SamplingConfig, source: int, last_logits=None,
               bonus=None, vocab_ids=None, vocab: int | None = None):
  """Candidates from slot logits [B, J, V]: after a cached clean token whose target
  logits are `last_logits`, or behind a committed, uncached `bonus`.

  With a draft vocabulary (`drafter.restrict_vocab`), the logits are [B, J, N] over the
  tokens `vocab_ids` [N] of a `vocab`-token target: drafts map back to token ids, and
  the distributions q put no mass outside the N tokens."""
  if sampling.greedy:
    drafts, q = argmax(logits_BJV), None
    conf = top_probability(logits_BJV)
  else:
    drafts, q = sample(key, logits_BJV, sampling), probabilities(logits_BJV, sampling)
    conf = q.max(-1)
  if vocab_ids is None:
    vocab = logits_BJV.shape[-1]
  else:
    drafts = vocab_ids[drafts]
    if q is not None:
      q = jnp.zeros(q.shape[:-1] + (vocab,), q.dtype).at[..., vocab_ids].set(q)
  if last_logits is None:  # replaced by delta(bonus) in _behind
    last_logits = jnp.zeros((drafts.shape[0], vocab), jnp.float32)
  return behind(Candidates(last_logits=last_logits, drafts=drafts, conf=conf, q=q,
                            certain=jnp.zeros(drafts.shape[:1], jnp.int32),
                            source=jnp.full(drafts.shape[:1], source, jnp.int32)), bonus)


def behind(c: Candidates, bonus):
  """c with the uncached `bonus` put first (certain), or c itself for bonus None."""
  if bonus is None:
    return c
  b, vocab = c.drafts.shape[0], c.last_logits.shape[-1]
  first = lambda a, x: jnp.concatenate([x[:, None], a], axis=1)
  return c.replace(last_logits=delta(bonus, vocab), drafts=first(c.drafts, bonus),
                   conf=first(c.conf, jnp.ones((b,), c.conf.dtype)),
                   q=None if c.q is None else first(c.q, jax.nn.one_hot(bonus, vocab,
                                                                        dtype=c.q.dtype)),
                   certain=jnp.ones((b,), jnp.int32))


def leading(ok_BK):
  """Length of each row's leading run of True."""
  return jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), axis=1), axis=1)


def verify(key, logits_BKV, drafts_BK, q_BKV, sampling: SamplingConfig, broken: bool = False):
  """Accepted count [B] and bonus [B] for K drafts; logits [B, K+1, V].

  logits[:, i] is the target's distribution at draft i's position (i < K) and
  after the last draft (i = K). Greedy: longest prefix matching the argmax.
  Sampling: accept d with prob min(1, p(d)/q(d)), then draw the bonus from
  norm(max(0, p - q)) at the first rejection, or from p after the last draft.
  `broken` (tests only) draws from p instead of the residual.
  """
  k = drafts_BK.shape[1]
  take = lambda a, i: jnp.take_along_axis(a, i[:, None, None], axis=1)[:, 0]
  if sampling.greedy:
    target = argmax(logits_BKV)
    acc = leading(target[:, :k] == drafts_BK)
    return acc, jnp.take_along_axis(target, acc[:, None], axis=1)[:, 0]
  k_u, k_b = jax.random.split(key)
  p = probabilities(logits_BKV, sampling)  # [B, K+1, V]
  at = lambda a: jnp.take_along_axis(a, drafts_BK[..., None], axis=-1)[..., 0]
  u = jax.random.uniform(k_u, drafts_BK.shape)
  acc = leading(u * at(q_BKV) < at(p[:, :k]))
  p_acc = take(p, acc)
  q_acc = take(jnp.concatenate([q_BKV, jnp.zeros_like(q_BKV[:, :1])], axis=1), acc)
  resid = p_acc if broken else jnp.maximum(p_acc - q_acc, 0.0)
  resid = jnp.where(resid.sum(-1, keepdims=True) > 0, resid, p_acc)  # float safety
  return acc, jax.random.categorical(k_b, jnp.log(resid), axis=-1).astype(jnp.int32)


def lookup_drafts(history_BH, length_B, k: int):
  """Prompt lookup: ([B, k] drafts, [B, k] conf 1/0). The drafts are the tokens that
  followed the latest earlier occurrence of the last n of history[:length] (n in
  PLD_NGRAMS, longest first), within history[:length]; conf 0 past them or without one."""
  h = history_BH.shape[1]
  i = jnp.arange(h)[None]
  found, start = jnp.zeros(length_B.shape, bool), jnp.zeros_like(length_B)
  for n in PLD_NGRAMS:
    tail = jnp.take_along_axis(history_BH, jnp.maximum(length_B[:, None] - n + jnp.arange(n), 0),
                               axis=1)
    hit = (i + n < length_B[:, None]) & (length_B[:, None] >= n)
    for j in range(n):
      hit &= jnp.roll(history_BH, -j, axis=1) == tail[:, j:j + 1]
    latest = jnp.max(jnp.where(hit, i, -1), axis=1)
    start = jnp.where(found | (latest < 0), start, latest + n)
    found |= latest >= 0
  pos = start[:, None] + jnp.arange(k)[None]
  drafts = jnp.take_along_axis(history_BH, jnp.minimum(pos, h - 1), axis=1)
  conf = (found[:, None] & (pos < length_B[:, None])).astype(jnp.float32)
  return jnp.where(conf > 0, drafts, 0), conf


def delta(tokens_B, vocab: int):
  """Logits that put all mass on tokens_B: 0 there, -inf elsewhere."""
  return jnp.where(jnp.arange(vocab)[None] == tokens_B[:, None], 0.0, -jnp.inf)

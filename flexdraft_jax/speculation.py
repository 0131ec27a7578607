"""Drafts and their verification (ALGORITHM.md §4), for every step kind of `flex`.

`Candidates` is what a row verifies next: the target's logits for its next
position and a token tree of drafts after it, with their probabilities and
the kind of step that made them. A chain is the tree whose node i's parent is
node i-1. Nodes come in best-first order, so every prefix of them is a
prefix-closed tree: a verify pass of width w takes the first w nodes.
`candidates` makes them from slot logits (`tree_order`: the best nodes of the
product of the slots' top-ranked tokens by path probability), `lookup_drafts`
from the row's own prompt and output (prompt lookup), and `verify` judges
them: the longest root path matching the target's argmax (greedy), or
multi-draft speculative sampling (SpecInfer / EAGLE: siblings tried in order,
the residual updated after each rejection), with the bonus token after them.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax.drafter import ALL_NODES as ALL  # a chain node's ancestry: position decides
from flexdraft_jax.drafter import holds_node
from flexdraft_jax.sampling import SamplingConfig, argmax, probabilities, sample, top_probability

PLD_NGRAMS = (3, 2)  # n-gram sizes pld looks up, longest first
MAX_BRANCH = 8       # most children of a tree node: the top ranks of its depth's distribution


@flax.struct.dataclass
class Candidates:
  """What the next step verifies, for a row whose cache holds n tokens."""
  last_logits: jax.Array  # [B, V] f32 target logits for position n
  drafts: jax.Array       # [B, T] node tokens, best first (parents before children)
  conf: jax.Array         # [B, T] the draft's probability of each node's token
  parent: jax.Array       # [B, T] parent node; -1: after the cache (judged by last_logits);
                          #        -2: no node (padding, never accepted)
  depth: jax.Array        # [B, T] 0 for parent -1; RoPE position n + depth
  anc: jax.Array          # [B, T] uint32 bits of the node's ancestors and itself (ALL: chain)
  q: jax.Array | None     # [B, T, V] the distributions drafts were drawn from (sampling only)
  certain: jax.Array      # [B] 1 when drafts[:, 0] is an already emitted bonus
  source: jax.Array       # [B] planner.SOURCES index of what made the drafts


def _chain_links(b: int, t: int) -> dict:
  """Candidates' parent, depth and anc [b, t] of a chain (node i after node i-1)."""
  i = jnp.arange(t, dtype=jnp.int32)[None]
  return dict(parent=jnp.broadcast_to(i - 1, (b, t)), depth=jnp.broadcast_to(i, (b, t)),
              anc=jnp.full((b, t), ALL))


def chain(drafts_BT, conf_BT, **kw) -> Candidates:
  """Candidates whose nodes form a chain (node i after node i-1)."""
  return Candidates(drafts=drafts_BT, conf=conf_BT, **_chain_links(*drafts_BT.shape), **kw)


def ancestry(anc_BT, depth_BT) -> jax.Array:
  """[B, T, T]: node j is node i or one of its ancestors (the bits of anc, or a lower
  depth in a chain, whose anc is ALL)."""
  j = jnp.arange(anc_BT.shape[1], dtype=jnp.int32)
  return holds_node(anc_BT[:, :, None], j[None, None]) & (depth_BT[:, None, :]
                                                          <= depth_BT[:, :, None])


def reach(a_BT, anc_BT, depth_BT) -> jax.Array:
  """[B, T] product of a over each node's ancestors and itself (cumprod along a chain)."""
  logs = jnp.log(jnp.maximum(a_BT, 1e-30))
  return jnp.exp(jnp.sum(jnp.where(ancestry(anc_BT, depth_BT), logs[:, None, :], 0.0), axis=2))


def tree_order(logp_BJR, nodes: int):
  """The `nodes` best nodes of the product tree whose depth-d children are the R top-ranked
  tokens of distribution d (log-probabilities logp [B, J, R], ranks sorted), by path
  log-probability, best first (a lazy k-best search: popping a node pushes its first child
  and its next sibling, each no better than it). Returns [B, nodes] int32 arrays (depth,
  rank, parent; parent -2 where fewer nodes exist) and the uint32 ancestry bits."""
  b, j, r = logp_BJR.shape
  width = 1 + 2 * nodes
  rows = jnp.arange(b)
  f_score = jnp.full((b, width), -jnp.inf).at[:, 0].set(logp_BJR[:, 0, 0])
  f_depth = jnp.zeros((b, width), jnp.int32)
  f_rank = jnp.zeros((b, width), jnp.int32)
  f_parent = jnp.full((b, width), -1, jnp.int32)
  depth, rank, parent = (jnp.zeros((b, nodes), jnp.int32) for _ in range(3))
  anc = jnp.zeros((b, nodes), jnp.uint32)
  for k in range(nodes):
    i = jnp.argmax(f_score, axis=1)
    score = f_score[rows, i]
    ok = score > -jnp.inf
    d, rk, par = f_depth[rows, i], f_rank[rows, i], f_parent[rows, i]
    depth, rank = depth.at[:, k].set(d), rank.at[:, k].set(rk)
    parent = parent.at[:, k].set(jnp.where(ok, par, -2))
    up = jnp.where(par >= 0, anc[rows, jnp.maximum(par, 0)], 0)
    anc = anc.at[:, k].set(jnp.where(ok, up | np.uint32(1 << k), 0))
    child = ok & (d + 1 < j)
    sib = ok & (rk + 1 < r)
    f_score = f_score.at[rows, i].set(-jnp.inf)
    f_score = f_score.at[:, 1 + 2 * k].set(
        jnp.where(child, score + logp_BJR[rows, jnp.minimum(d + 1, j - 1), 0], -jnp.inf))
    f_score = f_score.at[:, 2 + 2 * k].set(
        jnp.where(sib, score - logp_BJR[rows, d, rk]
                  + logp_BJR[rows, d, jnp.minimum(rk + 1, r - 1)],
                  -jnp.inf))
    f_depth = f_depth.at[:, 1 + 2 * k].set(d + 1).at[:, 2 + 2 * k].set(d)
    f_rank = f_rank.at[:, 1 + 2 * k].set(0).at[:, 2 + 2 * k].set(rk + 1)
    f_parent = f_parent.at[:, 1 + 2 * k].set(k).at[:, 2 + 2 * k].set(par)
  return depth, rank, parent, anc


def candidates(key, logits_BJV, sampling: SamplingConfig, source: int, last_logits=None,
               bonus=None, vocab_ids=None, vocab: int | None = None, nodes: int | None = None,
               branch: int = 1):
  """Candidates from slot logits [B, J, V] (distribution j for the tokens at depth j):
  after a cached clean token whose target logits are `last_logits`, or behind a committed,
  uncached `bonus`.

  branch 1: a chain of the J slots' drafts (argmax, or a sample). branch R > 1: a tree of
  `nodes` nodes (`tree_order`) whose children come from the R top ranks of their depth;
  greedy takes those tokens, sampling draws each node's token afresh from its depth's
  distribution (the tree's shape depends on the distributions only, so siblings are
  independent draws, as multi-draft speculative sampling requires). `conf` is the rank's
  probability.

  With a draft vocabulary (`drafter.restrict_vocab`), the logits are [B, J, N] over the
  tokens `vocab_ids` [N] of a `vocab`-token target: drafts map back to token ids, and
  the distributions q put no mass outside the N tokens."""
  b, j = logits_BJV.shape[:2]
  q = None if sampling.greedy else probabilities(logits_BJV, sampling)
  if branch == 1:
    if sampling.greedy:
      drafts, conf = argmax(logits_BJV), top_probability(logits_BJV)
    else:
      drafts, conf = sample(key, logits_BJV, sampling), q.max(-1)
    tree = _chain_links(b, j)
  else:
    p = jax.nn.softmax(logits_BJV.astype(jnp.float32), axis=-1) if q is None else q
    p_top, ids = jax.lax.top_k(p, min(branch, p.shape[-1]))  # [B, J, R]
    depth, rank, parent, anc = tree_order(jnp.log(jnp.maximum(p_top, 1e-30)),
                                          j if nodes is None else nodes)
    rows = jnp.arange(b)[:, None]
    conf = jnp.where(parent >= -1, p_top[rows, depth, rank], 0.0)
    if sampling.greedy:
      drafts = ids[rows, depth, rank]
    else:
      q = q[rows, depth]  # [B, nodes, N]: each node's own distribution
      drafts = sample(key, logits_BJV[rows, depth], sampling)
    tree = dict(parent=parent, depth=depth, anc=anc)
  if vocab_ids is None:
    vocab = logits_BJV.shape[-1]
  else:
    drafts = vocab_ids[drafts]
    if q is not None:
      q = jnp.zeros(q.shape[:-1] + (vocab,), q.dtype).at[..., vocab_ids].set(q)
  if last_logits is None:  # replaced by delta(bonus) in _behind
    last_logits = jnp.zeros((b, vocab), jnp.float32)
  return behind(Candidates(last_logits=last_logits, drafts=drafts, conf=conf, q=q,
                            certain=jnp.zeros((b,), jnp.int32),
                            source=jnp.full((b,), source, jnp.int32), **tree), bonus)


def behind(c: Candidates, bonus):
  """c with the uncached `bonus` put first (certain, the root of the tree), or c itself for
  bonus None."""
  if bonus is None:
    return c
  b, vocab = c.drafts.shape[0], c.last_logits.shape[-1]
  first = lambda a, x: jnp.concatenate(
      [jnp.broadcast_to(x, a.shape[:1] + a.shape[2:]).astype(a.dtype)[:, None], a], axis=1)
  return c.replace(last_logits=delta(bonus, vocab), drafts=first(c.drafts, bonus),
                   conf=first(c.conf, jnp.ones((), c.conf.dtype)),
                   parent=first(jnp.where(c.parent == -2, -2, c.parent + 1), -1),
                   depth=first(c.depth + 1, 0),
                   anc=first(jnp.where(c.parent == -2, 0, (c.anc << 1) | 1).astype(jnp.uint32),
                             np.uint32(1)),
                   q=None if c.q is None else first(c.q, jax.nn.one_hot(bonus, vocab,
                                                                        dtype=c.q.dtype)),
                   certain=jnp.ones((b,), jnp.int32))


def leading(ok_BK):
  """Length of each row's leading run of True."""
  return jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), axis=1), axis=1)


def verify(key, logits_BKV, c: Candidates, width: int, sampling: SamplingConfig,
           broken: bool | str = False):
  """(accepted count [B], bonus [B], path [B, width]) for the first `width` nodes of c;
  logits [B, width+1, V]: logits[:, 0] is the target's distribution after the cache
  (c.last_logits), logits[:, i+1] the one after node i. path[:, d] is the accepted node
  at depth d (d < count). Greedy: the deepest node whose every ancestor matches the
  target's argmax after its parent. Sampling: nodes in order; a child of the current
  node is accepted with prob min(1, p(d)/q(d)), and each rejection sets p to
  norm(max(0, p - q)) before the next sibling is tried; the bonus is drawn from p at the
  end (the residual, or the last accepted node's distribution). `broken` (tests only)
  leaves p unchanged on a rejection: every one (True or 'residual'), or one followed by
  another sibling ('siblings').
  """
  drafts, parent, depth = c.drafts[:, :width], c.parent[:, :width], c.depth[:, :width]
  b = drafts.shape[0]
  i = jnp.arange(width)[None]
  if sampling.greedy:
    target = argmax(logits_BKV)  # [B, width+1]
    up = jnp.take_along_axis(target, jnp.maximum(parent, -1) + 1, axis=1)
    match = (drafts == up) & (parent >= -1)
    lineage = ancestry(c.anc[:, :width], depth)  # [B, width, width]
    ok = jnp.all(~lineage | match[:, None, :], axis=2) & (parent >= -1)
    acc = jnp.max(jnp.where(ok, depth + 1, 0), axis=1)
    last = jnp.argmax(jnp.where(ok, depth, -1), axis=1)
    bonus = jnp.where(acc > 0, jnp.take_along_axis(target, last[:, None] + 1, axis=1)[:, 0],
                      target[:, 0])
    on = jnp.take_along_axis(lineage, last[:, None, None], axis=1)[:, 0]  # [B, width]
    path = jnp.argmax(on[:, None, :] & (depth[:, None, :] == i[..., None]), axis=2)
    return acc, bonus, path.astype(jnp.int32)
  k_u, k_b = jax.random.split(key)
  p_all = probabilities(logits_BKV, sampling)  # [B, width+1, V]
  u = jax.random.uniform(k_u, drafts.shape)
  rows = jnp.arange(b)
  cur, p = jnp.full((b,), -1, jnp.int32), p_all[:, 0]
  acc, path = jnp.zeros((b,), jnp.int32), jnp.zeros((b, width), jnp.int32)
  for n in range(width):
    x, q_n = drafts[:, n], c.q[:, n]
    tried = parent[:, n] == cur
    take = tried & (u[:, n] * q_n[rows, x] < p[rows, x])
    resid = p if broken in (True, "residual") else jnp.maximum(p - q_n, 0.0)
    if broken == "siblings":  # tests only
      later = jnp.any(parent[:, n + 1:] == cur[:, None], axis=1)
      resid = jnp.where(later[:, None], p, resid)
    total = resid.sum(-1, keepdims=True)
    resid = jnp.where(total > 0, resid / jnp.maximum(total, 1e-30), p)  # float safety
    p = jnp.where(take[:, None], p_all[:, n + 1], jnp.where(tried[:, None], resid, p))
    path = jnp.where(take[:, None] & (i == acc[:, None]), n, path)
    acc, cur = acc + take, jnp.where(take, n, cur)
  return acc, jax.random.categorical(k_b, jnp.log(p), axis=-1).astype(jnp.int32), path


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


def pad(c: Candidates, t: int) -> Candidates:
  """c with padding nodes (parent -2: never accepted) up to t nodes."""
  n = c.drafts.shape[1]
  if n >= t:
    return c
  fill = lambda a, v: jnp.concatenate(
      [a, jnp.full(a.shape[:1] + (t - n,) + a.shape[2:], v, a.dtype)], axis=1)
  return c.replace(drafts=fill(c.drafts, 0), conf=fill(c.conf, 0), parent=fill(c.parent, -2),
                   depth=fill(c.depth, 0), anc=fill(c.anc, 0),
                   q=None if c.q is None else fill(c.q, 0))

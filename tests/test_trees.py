"""Token trees (speculation.py): best-first construction, greedy path acceptance, and the
multi-draft sampling law, on small arrays (no model; flex-level tree runs: test_flex.py)."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from flexdraft_jax import speculation
from flexdraft_jax.sampling import SamplingConfig

GREEDY, T1 = SamplingConfig(), SamplingConfig(temperature=1.0)


def brute_force_best(logp_JR, nodes):
  """The `nodes` best rank paths of the product tree by summed log-probability."""
  j, r = logp_JR.shape
  paths = [p for d in range(1, j + 1) for p in itertools.product(range(r), repeat=d)]
  score = lambda p: sum(logp_JR[i, k] for i, k in enumerate(p))
  return sorted(paths, key=score, reverse=True)[:nodes]


@pytest.mark.parametrize("nodes", [1, 5, 15])
def test_tree_order_is_the_best_prefix_closed_set(nodes):
  rng = np.random.RandomState(nodes)
  p = rng.dirichlet(np.ones(12), size=(3, 4))            # [B=3, J=4, V=12]
  p_top = -np.sort(-p, axis=-1)[..., :4]                 # R = 4 ranks, sorted
  logp = np.log(p_top).astype(np.float32)
  depth, rank, parent, anc = map(np.asarray, speculation.tree_order(jnp.asarray(logp), nodes))
  for b in range(3):
    paths = []
    for k in range(nodes):
      assert parent[b, k] < k                            # parents come first
      up = paths[parent[b, k]] if parent[b, k] >= 0 else ()
      assert depth[b, k] == len(up)
      paths.append(up + (int(rank[b, k]),))
      want_anc = (1 << k) | (int(anc[b, parent[b, k]]) if parent[b, k] >= 0 else 0)
      assert int(anc[b, k]) == want_anc
    score = [sum(logp[b, i, r] for i, r in enumerate(path)) for path in paths]
    assert all(np.diff(score) <= 1e-6), score            # best first: every prefix is a tree
    assert set(paths) == set(brute_force_best(logp[b], nodes))


def test_tree_order_pads_when_the_tree_is_exhausted():
  logp = jnp.log(jnp.array([[[0.6, 0.4], [0.7, 0.3]]]))   # 2 depths x 2 ranks: 6 nodes exist
  _, _, parent, anc = speculation.tree_order(logp, 8)
  assert (np.asarray(parent)[0, :6] >= -1).all() and (np.asarray(parent)[0, 6:] == -2).all()
  assert (np.asarray(anc)[0, 6:] == 0).all()


def tree(tokens, parents, q=None, certain=0):
  """Candidates [1, T] for a hand-drawn tree (depths and ancestry from the parents)."""
  depth, anc = [], []
  for k, par in enumerate(parents):
    depth.append(0 if par < 0 else depth[par] + 1)
    anc.append((1 << k) | (anc[par] if par >= 0 else 0))
  a = lambda x, dt=jnp.int32: jnp.asarray([x], dt)
  return speculation.Candidates(
      last_logits=None, drafts=a(tokens), conf=a([1.0] * len(tokens), jnp.float32),
      parent=a(parents), depth=a(depth), anc=a(anc, jnp.uint32), q=q,
      certain=a(certain), source=a(1))


def one_hot_logits(tokens, v=8):
  return jnp.asarray(np.where(np.eye(v)[tokens] > 0, 5.0, 0.0)[None], jnp.float32)


def test_greedy_tree_accepts_the_matching_root_path():
  # root 3 (certain) -> children 5, 6; 6 -> children 1, 2; 5 -> child 7
  c = tree([3, 5, 6, 1, 2, 7], [-1, 0, 0, 2, 2, 1], certain=1)
  # target: after the cache 3, after 3 -> 6, after 5 -> 0, after 6 -> 2, after 1 -> 0,
  # after 2 -> 4 (the bonus), after 7 -> 0
  logits = one_hot_logits([3, 6, 0, 2, 0, 4, 0])
  acc, bonus, path = speculation.verify(None, logits, c, 6, GREEDY)
  assert int(acc[0]) == 3 and int(bonus[0]) == 4
  assert np.asarray(path)[0, :3].tolist() == [0, 2, 4]
  # Only the first 3 nodes verified: 6 is accepted, its children are not in the pass.
  acc, bonus, path = speculation.verify(None, logits[:, :4], c, 3, GREEDY)
  assert int(acc[0]) == 2 and int(bonus[0]) == 2 and np.asarray(path)[0, :2].tolist() == [0, 2]


def test_greedy_chain_is_the_leading_match():
  rng = np.random.RandomState(0)
  for _ in range(20):
    drafts = rng.randint(0, 4, (1, 6))
    target = rng.randint(0, 4, 7)
    c = speculation.chain(jnp.asarray(drafts, jnp.int32), jnp.ones((1, 6)), last_logits=None,
                          q=None, certain=jnp.zeros((1,), jnp.int32),
                          source=jnp.zeros((1,), jnp.int32))
    acc, bonus, path = speculation.verify(None, one_hot_logits(target, 4), c, 6, GREEDY)
    want = int(np.cumprod(drafts[0] == target[:6]).sum())
    assert int(acc[0]) == want and int(bonus[0]) == target[want]
    assert np.asarray(path)[0, :want].tolist() == list(range(want))


# ----------------------------------------------------------------------------
# Multi-draft speculative sampling keeps the target's law
# ----------------------------------------------------------------------------
V, SIBLINGS, SAMPLES = 5, 3, 60000
P = np.array([0.05, 0.4, 0.3, 0.05, 0.2])        # the target after the cache
Q = np.array([0.5, 0.2, 0.1, 0.15, 0.05])        # the draft: siblings are iid draws from it
P_CHILD = np.array([0.1, 0.1, 0.5, 0.2, 0.1])    # the target after any child


def first_two_tokens(broken: bool | str, seed=0):
  """Counts [V, V] of the first two tokens after the cache: three siblings drawn iid from
  Q (often the same token), each with one child drawn from Q."""
  parents = [-1] * SIBLINGS + list(range(SIBLINGS))
  logits = jnp.log(jnp.asarray(np.stack([P] + [P_CHILD] * (2 * SIBLINGS))))[None]
  q = jnp.broadcast_to(jnp.asarray(Q, jnp.float32), (1, 2 * SIBLINGS, V))

  def one(key):
    k_d, k_v, k_n = jax.random.split(key, 3)
    drafts = jax.random.categorical(k_d, jnp.log(q[0]), axis=-1).astype(jnp.int32)
    c = tree(np.zeros(2 * SIBLINGS, np.int32), parents, q=q).replace(drafts=drafts[None])
    acc, bonus, path = speculation.verify(k_v, logits, c, 2 * SIBLINGS, T1, broken)
    x1 = jnp.where(acc > 0, drafts[path[:, 0]], bonus)[0]
    x2_drawn = jax.random.categorical(k_n, jnp.log(jnp.asarray(P_CHILD)))  # after a bonus
    x2 = jnp.where(acc[0] > 1, drafts[path[0, 1]], jnp.where(acc[0] == 1, bonus[0], x2_drawn))
    return x1, x2, acc[0]

  x1, x2, acc = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(seed), SAMPLES))
  counts = np.zeros((V, V), np.int64)
  np.add.at(counts, (np.asarray(x1), np.asarray(x2)), 1)
  return counts, np.asarray(acc)


def pvalue(counts, law):
  expected = law.ravel() * counts.sum()
  return scipy_stats.chisquare(counts.ravel(), expected).pvalue


def test_multi_draft_sampling_keeps_the_target_law():
  counts, acc = first_two_tokens(False)
  assert pvalue(counts, np.outer(P, P_CHILD)) > 1e-4
  assert (acc == 2).mean() > 0.2 and (acc == 0).mean() > 0.02  # both outcomes exercised


@pytest.mark.parametrize("broken", ["residual", "siblings"])
def test_multi_draft_law_rejects_a_skipped_residual(broken):
  """Leaving p unchanged after a rejected sibling ('siblings'), or after any rejection
  ('residual'), breaks the law, and the statistic sees it."""
  counts, _ = first_two_tokens(broken)
  assert pvalue(counts, np.outer(P, P_CHILD)) < 1e-6

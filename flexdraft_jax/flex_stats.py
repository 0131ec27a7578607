"""FlexDraft decoding statistics: `FlexStats` (what the loop counts, step by step),
`record_step` (one step's counts) and `summarize` (tau, ALGORITHM.md §5, and the
histograms, on the host)."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax import planner


@flax.struct.dataclass
class FlexStats:
  steps: jax.Array           # [] verification steps of the batch (loop iterations)
  forward_passes: jax.Array  # [] model passes, prefill included
  row_steps: jax.Array       # [B] verification steps while the row was active
  committed: jax.Array       # [B] tokens committed (= num_new)
  accept_hist: jax.Array     # [Bs+1] row-steps that accepted exactly k drafts
  tried: jax.Array           # [Bs] row-steps whose pass verified draft k (k = 0 is the
                             #      first draft after the last bonus)
  accepted: jax.Array        # [Bs] ... that accepted drafts 0..k
  modes: jax.Array           # [4] steps of each kind (planner.KINDS)
  verify_hist: jax.Array     # [len(verify_buckets)] steps per verify width
  model_tried: jax.Array     # [3, Bs, NUM_BINS] drafts j verified after j-1 accepted, by source
  model_hit: jax.Array       # [3, Bs, NUM_BINS] ... and accepted (planner.AcceptanceModel.fit)
  depth_tried: jax.Array     # [3, Bs] row-steps whose path reached depth j-1 (all, j = 0),
                             #         by source (a certain root not counted)
  depth_hit: jax.Array       # [3, Bs] ... and accepted a node at depth j: a kind's per-depth
                             #         rate, a tree's siblings and coverage included
  predicted: jax.Array       # [] accepted drafts the table's acceptance model expected
  observed: jax.Array        # [] accepted drafts (both over active rows, table steps only)

  @classmethod
  def zeros(cls, batch: int, block_size: int, num_widths: int) -> "FlexStats":
    z = lambda *s: jnp.zeros(s, jnp.int32)
    nb = (3, block_size, planner.NUM_BINS)
    return cls(steps=z(), forward_passes=z(), row_steps=z(batch), committed=z(batch),
               accept_hist=z(block_size + 1), tried=z(block_size), accepted=z(block_size),
               modes=z(len(planner.KINDS)), verify_hist=z(num_widths),
               model_tried=z(*nb), model_hit=z(*nb), depth_tried=z(*nb[:2]),
               depth_hit=z(*nb[:2]), predicted=jnp.float32(0), observed=z())


def summarize(stats: FlexStats) -> dict[str, Any]:
  """Host summary: tau (ALGORITHM.md §5), histograms, acceptance_by_depth[k] =
  accepted[k] / tried[k] (the chance that a verified draft k and all before it pass) and
  the acceptance model's calibration error (predicted / observed accepted drafts - 1)."""
  s = jax.tree.map(np.asarray, stats)
  rate = np.where(s.tried > 0, s.accepted / np.maximum(s.tried, 1), np.nan)
  return {"tau": float(s.committed.sum() / max(s.row_steps.sum(), 1)),
          "steps": int(s.steps), "forward_passes": int(s.forward_passes),
          "new_tokens": int(s.committed.sum()), "acceptance_by_depth": rate.tolist(),
          "accept_hist": s.accept_hist.tolist(),
          "modes": dict(zip(planner.KINDS, s.modes.tolist())),
          "verify_hist": s.verify_hist.tolist(), "predicted_accepted": float(s.predicted),
          "observed_accepted": int(s.observed),
          "calibration_error": (float(s.predicted / s.observed - 1) if s.observed else None)}


def record_step(st: FlexStats, c, costs, *, kind, width, column, acc, path, drafted, count,
                active) -> FlexStats:
  """`st` after one step of `kind` at verify `width` (table column `column`) over
  candidates `c` (`speculation.Candidates`): acc nodes accepted along `path` [B, Bs],
  `drafted` of them committed, `count` tokens committed per row; with a cost table, the
  acceptance model's expected accepts against the observed ones."""
  on = active.astype(jnp.int32)
  t = c.drafts.shape[1]
  node = jnp.arange(t)[None]
  first = node < width
  on_path = jnp.any((path[:, :, None] == node[:, None, :])
                    & (jnp.arange(t)[None, :, None] < acc[:, None, None]), axis=1)
  parent_on = jnp.take_along_axis(on_path, jnp.maximum(c.parent, 0), axis=1)
  # A node was judged when it was verified and its parent accepted (or it hangs off the
  # cache); a certain root is not judged. Indexed by depth: the acceptance model's rows.
  judged = first & ((c.parent == -1) | ((c.parent >= 0) & parent_on))
  judged &= ~((c.certain[:, None] == 1) & (node == 0))
  depth = jnp.minimum(c.depth, st.model_tried.shape[1] - 1)
  where = (c.source[:, None], depth, planner.confidence_bins(c.conf))
  add = lambda a, x: a.at[where].add(jnp.where(active[:, None], x, 0).astype(jnp.int32))
  # drafts after the bonus whose depth this pass verified (k = 0: the first after it)
  verified = jnp.max(jnp.where(first & (c.parent >= -1), c.depth + 1, 0), axis=1) - c.certain
  k = jnp.arange(st.tried.shape[0])[None]
  counted = active[:, None] & ~((c.certain[:, None] == 1) & (k == 0))
  by_depth = lambda x: jnp.zeros_like(st.depth_tried).at[c.source].add(
      (counted & x).astype(jnp.int32))
  predicted, observed = st.predicted, st.observed
  if costs is not None:
    e = planner.own_expected_accepts(costs.acceptance, c, width)
    predicted = predicted + jnp.sum(jnp.where(active, e, 0.0))
    observed = observed + jnp.sum(drafted * on)
  return st.replace(
      steps=st.steps + 1, row_steps=st.row_steps + on,
      forward_passes=st.forward_passes + jnp.where(kind == planner.SEQUENTIAL, 2, 1),
      committed=st.committed + count, accept_hist=st.accept_hist.at[drafted].add(on),
      tried=st.tried + jnp.sum(on[:, None] * (k < verified[:, None]), axis=0),
      accepted=st.accepted + jnp.sum(on[:, None] * (k < drafted[:, None]), axis=0),
      modes=st.modes.at[kind].add(1),
      verify_hist=st.verify_hist.at[column].add(1),
      model_tried=add(st.model_tried, judged),
      model_hit=add(st.model_hit, judged & on_path),
      depth_tried=st.depth_tried + by_depth(k <= acc[:, None]),
      depth_hit=st.depth_hit + by_depth(k < acc[:, None]),
      predicted=predicted, observed=observed)

"""The flex planner: which step kind and verify width pay most on this hardware.

A step of kind k at verify width w costs `step_ms[k, w]` (measured on the
hardware at hand, per batch size) and commits, per active row,

    E_k(w) = 1 - certain + sum_{i < w} prod_{j <= i} alpha_j + FREE[k]

tokens, where alpha_j is the chance that draft j is accepted once drafts < j
were (1 for a `certain` draft 0: a bonus already emitted), and FREE[k] = 1 for
sequential, whose draft pass also yields the target's own next token. The planner picks
argmax over (kind, width) of sum_active E_k(w) / step_ms[k, w].

Where alpha comes from (`AcceptanceModel`, measured while calibrating):
- the row's current drafts were made by the *source* kind k leaves behind
  (SOURCE_OF): alpha_j = acceptance[source, j, bin(conf_j)], the observed
  acceptance rate of draft j at that softmax confidence (binned, then made
  monotone in confidence by isotonic regression). Raw confidences are not
  acceptance probabilities;
- otherwise (the row would switch to kind k): kind k's stationary curve
  alpha_bar[source_k, j], its acceptance over all confidences. What a kind
  costs is paid now; what it drafts pays from the next step on, so a kind is
  valued by the drafts it makes, not by the ones it inherits.

Kinds: `ar` (target pass over the bonus; width 1), `pld` (target pass over
prompt-lookup drafts; widths >= 2), `parallel`, `sequential` (ALGORITHM.md §4).
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax import speculation

KINDS = ("ar", "pld", "parallel", "sequential")
AR, PLD, PARALLEL, SEQUENTIAL = range(4)
SOURCES = ("lookup", "parallel", "sequential")  # what made a row's current drafts
LOOKUP = 0
SOURCE_OF = (LOOKUP, LOOKUP, 1, 2)  # kind -> the source of the drafts its step leaves
FREE = (0, 0, 0, 1)  # tokens a step of each kind commits past its bonus, for sure (sequential:
                     # the target's token after the bonus, from its draft pass)
NUM_BINS = 10                       # confidence bins of the acceptance model
KEEP = 0.9  # compile a kind whose stationary rate is at least this share of the best kind's
# ... and, for a speculative kind, at least this factor over ar's: a near tie is measurement
# noise, and carrying a branch costs. `scripts/branch_cost.py`, SmolLM2 at batch 1 on the
# 2-vCPU CPU with the kernel (2026-12-04, two runs): the flex loop carrying pld but taking
# only ar steps was 0.7-3.5% slower than the AR loop, and with the measured table (pld
# rates 1.01x ar's) 0.97-1.03x it (about 30% when the layers were unrolled, before).
MARGIN = 1.1
FORMAT = 2  # cost table file format
PRIOR = 2.0  # pseudo-counts that pull a sparse bin towards its depth's overall rate


def kind_widths(kind: int, widths: tuple[int, ...]) -> tuple[int, ...]:
  """The verify widths a kind steps at: ar verifies the bonus alone, pld at least 2."""
  if kind == AR:
    return (1,)
  if kind == PLD:
    return tuple(w for w in widths if w > 1) or widths
  return widths


@flax.struct.dataclass
class AcceptanceModel:
  """alpha[s, j, c]: P(draft j accepted | drafts < j accepted, its confidence in bin c),
  for drafts made by source s; alpha_bar[s, j]: the same over all confidences."""
  alpha: jax.Array      # [3, Bs, NUM_BINS]
  alpha_bar: jax.Array  # [3, Bs]

  @classmethod
  def fit(cls, tried, hit, depth_tried=None, depth_hit=None) -> "AcceptanceModel":
    """From counts [3, Bs, NUM_BINS] of judged / accepted draft nodes (`FlexStats`), and
    [3, Bs] of steps whose path reached the depth before / accepted a node at this depth,
    measured on whole trees (`cost_cache.measure_acceptance`): alpha_bar is then a kind's
    per-depth rate in its steady state, a tree's siblings and its coverage of the depth
    included. Without them (and on chains, where both agree), the node counts."""
    tried, hit = np.asarray(tried, np.float64), np.asarray(hit, np.float64)
    node_bar = _depth_rates(tried.sum(2), hit.sum(2))  # the prior of a sparse bin
    bar = node_bar if depth_tried is None else _depth_rates(depth_tried, depth_hit)
    alpha = (hit + PRIOR * node_bar[..., None]) / (tried + PRIOR)
    for s, j in np.ndindex(*alpha.shape[:2]):
      alpha[s, j] = _isotonic(alpha[s, j], tried[s, j] + PRIOR)
    return cls(alpha=alpha.astype(np.float32), alpha_bar=bar.astype(np.float32))

  @classmethod
  def from_confidence(cls, block_size: int) -> "AcceptanceModel":
    """No measurement: alpha = the bin's confidence, alpha_bar = 1/2 (a guess; tests)."""
    centers = (np.arange(NUM_BINS) + 0.5) / NUM_BINS
    return cls(alpha=np.broadcast_to(centers, (3, block_size, NUM_BINS)).astype(np.float32),
               alpha_bar=np.full((3, block_size), 0.5, np.float32))

  def stationary_tokens(self, kind: int, w: int) -> float:
    """Tokens a row commits per step of `kind` at width w in its steady state (every kind
    leaves a certain draft 0: its bonus, or sequential's free token)."""
    a = np.asarray(self.alpha_bar[SOURCE_OF[kind], :w], np.float64).copy()
    a[0] = 1.0
    return float(np.cumprod(a).sum() + FREE[kind])


def _depth_rates(tried_SJ, hit_SJ) -> np.ndarray:
  """[3, Bs] hit / tried per source and depth, pulled towards the depth before (PRIOR
  pseudo-counts; an untried depth inherits it, from 1/2 at depth 0)."""
  tried, hit = np.asarray(tried_SJ, np.float64), np.asarray(hit_SJ, np.float64)
  bar = np.zeros(tried.shape)
  for s in range(tried.shape[0]):
    prev = 0.5
    for j in range(tried.shape[1]):
      bar[s, j] = prev = (hit[s, j] + PRIOR * prev) / (tried[s, j] + PRIOR)
  return bar


def _isotonic(y, w):
  """Weighted non-decreasing fit of y (pool adjacent violators)."""
  blocks = []  # [value, weight, count]
  for yi, wi in zip(y, w):
    blocks.append([yi, wi, 1])
    while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
      v2, w2, n2 = blocks.pop()
      v1, w1, n1 = blocks.pop()
      blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
  return np.concatenate([np.full(n, v) for v, _, n in blocks])


@flax.struct.dataclass
class CostTable:
  """What the planner knows about one batch size: step costs and acceptance."""
  step_ms: jax.Array             # [4, len(widths)] per kind and verify width; inf: no such step
  acceptance: AcceptanceModel

  @classmethod
  def make(cls, step_ms, acceptance: AcceptanceModel) -> "CostTable":
    return cls(step_ms=np.asarray(step_ms, np.float32), acceptance=acceptance)


# ----------------------------------------------------------------------------
# In the loop
# ----------------------------------------------------------------------------
def confidence_bins(conf_BJ):
  return jnp.clip(jnp.floor(conf_BJ * NUM_BINS).astype(jnp.int32), 0, NUM_BINS - 1)


def _own_alpha(acc: AcceptanceModel, c):
  """[B, T] alpha of each node of candidates c by its own source's model (1 for a certain
  root): the chance that it is accepted once its parent was."""
  a = acc.alpha[c.source[:, None], jnp.minimum(c.depth, acc.alpha.shape[1] - 1),
                confidence_bins(c.conf)]
  a = jnp.where(c.parent < -1, 0.0, a)  # padding
  return jnp.where((c.certain[:, None] == 1) & (jnp.arange(a.shape[1])[None] == 0), 1.0, a)


def expected_tokens(acc: AcceptanceModel, c, kinds, width: int):
  """[len(kinds), B, width] E_k(w) for w = 1..width: tokens each row commits in a step
  of kind k verifying the first w nodes of candidates c (module docstring). A node is
  reached when it and its ancestors are accepted (`speculation.reach`; the cumulative
  product on a chain). A kind that did not make the row's drafts is valued by its own
  stationary chain curve."""
  j = jnp.arange(width)[None]
  own = speculation.reach(_own_alpha(acc, c)[:, :width], c.anc[:, :width], c.depth[:, :width])
  out = []
  for k in kinds:
    a = jnp.broadcast_to(acc.alpha_bar[SOURCE_OF[k], :width][None], own.shape)
    a = jnp.where((c.certain[:, None] == 1) & (j == 0), 1.0, a)
    r = jnp.where((c.source == SOURCE_OF[k])[:, None], own, jnp.cumprod(a, axis=1))
    out.append((1 - c.certain + FREE[k])[:, None] + jnp.cumsum(r, axis=1))
  return jnp.stack(out)


def own_expected_accepts(acc: AcceptanceModel, c, width):
  """[B] E[accepted drafts after the certain one] of verifying the first `width` nodes of
  c, by the model of their own source (the calibration error compares this with what was
  accepted)."""
  r = speculation.reach(_own_alpha(acc, c), c.anc, c.depth)
  return jnp.sum(r * (jnp.arange(r.shape[1])[None] < width), axis=1) - c.certain


def best_step(table: CostTable, branches, c, active_B):
  """Index into `branches` ((kind, width, column) triples) of the best tokens per ms for
  candidates c."""
  kinds = tuple(sorted({k for k, _, _ in branches}))
  width = max(w for _, w, _ in branches)
  e = expected_tokens(table.acceptance, c, kinds, width)
  gain = jnp.sum(jnp.where(active_B[None, :, None], e, 0.0), axis=1)  # [kinds, width]
  scores = jnp.stack([gain[kinds.index(k), w - 1] / table.step_ms[k, c] for k, w, c in branches])
  return jnp.argmax(scores)


# ----------------------------------------------------------------------------
# Before compiling
# ----------------------------------------------------------------------------
def stationary_rates(table: CostTable, widths: tuple[int, ...]) -> np.ndarray:
  """[4] best tokens per ms of each kind in its own steady state (max over widths)."""
  step_ms, acc = np.asarray(table.step_ms), jax.device_get(table.acceptance)
  rates = np.zeros(len(KINDS))
  for k in range(len(KINDS)):
    for w in kind_widths(k, widths):
      c = step_ms[k, widths.index(w)]
      if np.isfinite(c):
        rates[k] = max(rates[k], acc.stationary_tokens(k, w) / c)
  return rates


def compiled_kinds(table: CostTable, widths: tuple[int, ...], allowed=range(len(KINDS))):
  """The kinds worth compiling. A speculative kind must beat ar's stationary rate by
  MARGIN; of the rest, those within KEEP of the best stay. Carrying a branch that never
  wins costs time, and a kind far behind in its steady state only wins single steps.
  When no speculative kind clears the margin, this is (AR,): flex is plain AR."""
  rates = stationary_rates(table, widths)
  ok = [k for k in allowed if rates[k] > 0 and (k == AR or rates[k] >= MARGIN * rates[AR])]
  best = max(rates[k] for k in ok)
  return tuple(k for k in ok if rates[k] >= KEEP * best)


def monotone_costs(step_ms) -> np.ndarray:
  """Measured step times made physical: a wider step of a kind costs at least a narrower
  one, and every step at least an ar step (noise on a busy machine says otherwise)."""
  ms = np.array(step_ms, np.float64)
  fin = np.isfinite(ms)
  filled = np.maximum.accumulate(np.where(fin, ms, 0.0), axis=1)
  return np.where(fin, np.maximum(filled, ms[AR, 0]), np.inf).astype(np.float32)


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------
class CostTableError(ValueError):
  """A cost table that does not fit this model, drafter, dtype or block size."""


def table_to_json(step_ms: dict[int, Any], acceptance: AcceptanceModel | dict[str, Any],
                  widths: tuple[int, ...], key: dict[str, Any], header=None) -> dict[str, Any]:
  """step_ms: {batch: [4, W] array}; acceptance: a model or its {tried, hit} counts."""
  if isinstance(acceptance, AcceptanceModel):
    acc = {"alpha": np.asarray(acceptance.alpha).tolist(),
           "alpha_bar": np.asarray(acceptance.alpha_bar).tolist()}
  else:
    acc = {k: np.asarray(v).tolist() for k, v in acceptance.items()}
  fin = lambda row: [float(x) if math.isfinite(x) else None for x in row]
  out = {"format": FORMAT, "key": key, "kinds": list(KINDS), "verify_widths": list(widths),
         "sources": list(SOURCES), "acceptance": acc,
         "step_ms": {str(b): [fin(r) for r in np.asarray(t, np.float64)]
                     for b, t in step_ms.items()}}
  if header:
    out["header"] = header
  return out


def acceptance_from_json(acc: dict[str, Any]) -> AcceptanceModel:
  if "tried" in acc:
    return AcceptanceModel.fit(acc["tried"], acc["hit"], acc.get("depth_tried"),
                               acc.get("depth_hit"))
  return AcceptanceModel(alpha=np.asarray(acc["alpha"], np.float32),
                         alpha_bar=np.asarray(acc["alpha_bar"], np.float32))


def tables_from_json(raw: dict[str, Any], widths: tuple[int, ...], key: dict[str, Any] | None,
                     where: str) -> dict[int, CostTable]:
  """{batch: CostTable}; CostTableError (one line) when the file does not fit."""
  try:
    if raw.get("format") != FORMAT:
      raise CostTableError(f"{where} has format {raw.get('format')}, not {FORMAT} (an older "
                           f"cost table): measure it again (bench --calibrate)")
    if key is not None:
      diff = [f"{k}: {raw['key'].get(k)!r} (table) vs {v!r} (now)" for k, v in key.items()
              if k != "batch" and raw["key"].get(k) != v]
      if diff:
        raise CostTableError(f"{where} was measured for another setup: " + "; ".join(diff))
    if tuple(raw["verify_widths"]) != widths:
      raise CostTableError(f"{where} has verify widths {raw['verify_widths']}, this drafter "
                           f"{list(widths)} (block size): measure it again")
    acc = acceptance_from_json(raw["acceptance"])
    unfin = lambda row: [math.inf if x is None else float(x) for x in row]
    tables = {int(b): CostTable.make([unfin(r) for r in t], acc)
              for b, t in raw["step_ms"].items()}
  except CostTableError:
    raise
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise CostTableError(f"{where} is not a flex cost table ({type(e).__name__}: {e})") from None
  bs = len(widths) and widths[-1]
  for b, t in tables.items():
    a = t.acceptance
    if (t.step_ms.shape != (len(KINDS), len(widths)) or a.alpha.shape != (3, bs, NUM_BINS)
        or a.alpha_bar.shape != (3, bs)):
      raise CostTableError(f"{where}: batch {b} has step_ms {t.step_ms.shape} and acceptance "
                           f"{a.alpha.shape}; want ({len(KINDS)}, {len(widths)}) and "
                           f"(3, {bs}, {NUM_BINS})")
    if not np.all(t.step_ms > 0) or not np.isfinite(t.step_ms[AR, 0]):
      raise CostTableError(f"{where}: batch {b}: step times must be positive and ar's measured")
  return {b: t.replace(step_ms=monotone_costs(t.step_ms)) for b, t in tables.items()}


def load_tables(path, widths: tuple[int, ...], key: dict[str, Any] | None = None):
  """{batch: CostTable} from a cost table file (`bench --calibrate` or the user cache)."""
  try:
    raw = json.loads(pathlib.Path(path).read_text())
  except FileNotFoundError:
    raise CostTableError(f"cost table {path} does not exist") from None
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CostTableError(f"cost table {path} cannot be read ({type(e).__name__}: {e})") from None
  if not isinstance(raw, dict):
    raise CostTableError(f"cost table {path} is not a JSON object")
  return tables_from_json(raw, widths, key, f"cost table {path}")


def save_json(path, obj) -> None:
  """Writes atomically (a crash leaves the old file or none, never half a file)."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1) + "\n")
  tmp.replace(path)


def mode_kinds(mode: str) -> tuple[int, ...]:
  """The kinds a decoding mode may use."""
  return {"ar": (AR,), "pld": (AR, PLD), "parallel": (PARALLEL,),
          "sequential": (SEQUENTIAL,)}.get(mode, tuple(range(len(KINDS))))


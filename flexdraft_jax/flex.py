"""FlexDraft decoding (ALGORITHM.md §4): one jitted `lax.while_loop`, static shapes.

Per row the loop keeps the cache (n committed tokens cached) and `Candidates`:
the target's logits for position n and drafts for positions n, n+1, ... with
their top probabilities and, when sampling, the distributions they were drawn
from. A parallel step commits its bonus b without caching it: b becomes
drafts[:, 0] with confidence 1, q = delta(b) and last logits delta(b), so both
greedy and rejection sampling accept it with certainty; `certain` marks it so
that it is not emitted twice.

Each step verifies a static bucket of V drafts (`verify_buckets`) with
L_0 = the last logits and L_i = the target's logits at draft i-1, then drafts:
- parallel: one pass with groups of slots anchored at n-1+g (g = 0..V); the new
  drafts are [b] + slots 1.. of group acc, calibrated with b;
- sequential: a target pass over the V drafts, then a pass whose clean token is
  b (cached once) with one block anchored at b.
- pld (prompt lookup decoding, training-free): the drafts are the tokens that
  followed the latest earlier match of the row's last n committed tokens
  (n in PLD_NGRAMS, longest first) in its prompt + generated history, with
  confidence 1 (0 past them); each step is one target pass over [b] + drafts,
  b committed and uncached as in a parallel step. The draft params are unused.
Every row may verify all V drafts of the pass: the pass costs the same, so
per-row verify lengths only pick the bucket.

Passes inside `lax.switch`/`lax.cond` only read the cache and return their new
keys/values, which are written after the branch: XLA copies a cache that is
updated inside a conditional branch, whole, on every step.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flexdraft_jax import drafter
from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax.model_config import ModelConfig
from flexdraft_jax.sampling import SamplingConfig, probabilities, sample

MODES = ("ar", "parallel", "sequential", "flex", "pld")
STRATEGIES = ("min_confidence", "cumulative_product", "expected_throughput", "full")
VERIFY_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # static verify widths (see `verify_buckets`)
# 'flex' without a cost table: parallel while at most this many rows are active, else
# sequential (the paper finds parallel best at batch <= 2 on Qwen3-8B/A100). Done rows
# still ride in the static batch, so a measured cost table (`CostTable`) is the better guide.
FLEX_BATCH_THRESHOLD = 2
PARALLEL, SEQUENTIAL, PLD = 0, 1, 2  # rows of the cost table (PLD: none) and of FlexStats.modes
PLD_NGRAMS = (3, 2)  # n-gram sizes pld looks up, longest first


@dataclasses.dataclass(frozen=True)
class FlexConfig:
  mode: str = "flex"                             # one of MODES
  verify_strategy: str = "cumulative_product"    # one of STRATEGIES
  verify_threshold: float = 0.01                 # t of min_confidence / cumulative_product
  max_new_tokens: int = 128
  sampling: SamplingConfig = SamplingConfig()

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if self.verify_strategy not in STRATEGIES:
      raise ValueError(f"verify_strategy must be one of {STRATEGIES}, got {self.verify_strategy!r}")
    if not 0.0 < self.verify_threshold <= 1.0:
      raise ValueError(f"verify_threshold must be in (0, 1], got {self.verify_threshold}")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def verify_buckets(block_size: int) -> tuple[int, ...]:
  """Static verify widths: the VERIFY_BUCKETS below block_size, then block_size."""
  return tuple(v for v in VERIFY_BUCKETS if v < block_size) + (block_size,)


@flax.struct.dataclass
class CostTable:
  """What the flex policy knows about one batch size on this hardware, with this drafter.

  A step of either mode verifies the same candidates, so one step's expected
  gain does not depend on the mode; what differs is the next candidates: a
  sequential step drafts all of them from slot 0 anchored at the bonus, a
  parallel step takes calibrated slots 1.. of the accepted group. So each mode
  is weighted by its measured tau (committed tokens per row-step): a step of
  mode m at verify width w is worth tau[m] / step_ms[m, w] tokens per ms.
  Measured by `python -m flexdraft_jax.bench --calibrate` (`save_costs`).
  """
  step_ms: jax.Array  # [2, len(verify_buckets)] a parallel / a sequential step per verify width
  tau: jax.Array      # [2] committed tokens per row-step in parallel / sequential mode

  @classmethod
  def make(cls, step_ms, tau=(1.0, 1.0)) -> "CostTable":
    """A table from host values; tau (1, 1) compares step costs alone."""
    return cls(step_ms=np.asarray(step_ms, np.float32), tau=np.asarray(tau, np.float32))

  def rate(self):
    """[2, W] tau[m] / step_ms[m, w]: committed tokens per ms of each mode and width."""
    return self.tau[:, None] / self.step_ms


def save_costs(path, step_ms: dict[int, Any], tau: dict[str, float], block_size: int,
               header: dict[str, Any] | None = None) -> None:
  """Writes a cost table file: {"block_size", "verify_widths", "tau": {parallel,
  sequential}, "step_ms": {"<batch>": [[parallel ms per width], [sequential ...]]}}."""
  out = {"block_size": block_size, "verify_widths": list(verify_buckets(block_size)),
         "tau": {"parallel": tau["parallel"], "sequential": tau["sequential"]},
         "step_ms": {str(b): np.asarray(t).tolist() for b, t in step_ms.items()}}
  if header:
    out["header"] = header
  pathlib.Path(path).write_text(json.dumps(out, indent=2) + "\n")


def load_costs(path, block_size: int) -> dict[int, CostTable]:
  """{batch size: CostTable} from a `save_costs` file; ValueError if it does not fit."""
  try:
    raw = json.loads(pathlib.Path(path).read_text())
    widths, tau = tuple(raw["verify_widths"]), raw["tau"]
    tables = {int(b): CostTable.make(t, (tau["parallel"], tau["sequential"]))
              for b, t in raw["step_ms"].items()}
  except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path} is not a cost table from `bench --calibrate` "
                     f"({type(e).__name__}: {e})") from None
  if widths != verify_buckets(block_size):
    raise ValueError(f"cost table {path} was measured for verify widths {list(widths)} (block "
                     f"size {raw.get('block_size')}); this drafter has block size {block_size}, "
                     f"widths {list(verify_buckets(block_size))}: run bench --calibrate again")
  want = (2, len(widths))
  bad = [b for b, t in tables.items() if t.step_ms.shape != want]
  if bad or any(not np.all(t.step_ms > 0) or not np.all(t.tau > 0) for t in tables.values()):
    raise ValueError(f"cost table {path}: step_ms must be positive [2, {len(widths)}] lists and "
                     f"tau positive (batch sizes {bad or sorted(tables)})")
  return tables


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
  modes: jax.Array           # [3] steps in parallel / sequential / pld mode
  verify_hist: jax.Array     # [len(verify_buckets)] steps per verify width

  @classmethod
  def zeros(cls, batch: int, block_size: int) -> "FlexStats":
    z = lambda *s: jnp.zeros(s, jnp.int32)
    return cls(steps=z(), forward_passes=z(), row_steps=z(batch), committed=z(batch),
               accept_hist=z(block_size + 1), tried=z(block_size), accepted=z(block_size),
               modes=z(3), verify_hist=z(len(verify_buckets(block_size))))


def summarize(stats: FlexStats) -> dict[str, Any]:
  """Host summary: tau (ALGORITHM.md §5), histograms, and acceptance_by_depth[k] =
  accepted[k] / tried[k], the chance that a verified draft k and all before it pass."""
  s = jax.tree.map(np.asarray, stats)
  rate = np.where(s.tried > 0, s.accepted / np.maximum(s.tried, 1), np.nan)
  return {"tau": float(s.committed.sum() / max(s.row_steps.sum(), 1)),
          "steps": int(s.steps), "forward_passes": int(s.forward_passes),
          "new_tokens": int(s.committed.sum()), "acceptance_by_depth": rate.tolist(),
          "accept_hist": s.accept_hist.tolist(),
          "modes": dict(zip(("parallel", "sequential", "pld"), s.modes.tolist())),
          "verify_hist": s.verify_hist.tolist()}


@flax.struct.dataclass
class Candidates:
  """What the next step verifies, for a row whose cache holds n tokens."""
  last_logits: jax.Array  # [B, V] f32 target logits for position n
  drafts: jax.Array       # [B, Bs] drafts for positions n, n+1, ...
  conf: jax.Array         # [B, Bs] the draft's top probability per draft
  q: jax.Array | None     # [B, Bs, V] the distributions drafts were drawn from (sampling only)
  certain: jax.Array      # [B] 1 when drafts[:, 0] is an already emitted bonus


@flax.struct.dataclass
class FlexState:
  cache: model_lib.KVCache
  cand: Candidates
  tokens: jax.Array       # [B, M + Bs + 1] generated tokens, -1 past each row's end
  num_new: jax.Array      # [B]
  done: jax.Array         # [B]
  key: jax.Array
  stats: FlexStats


# ----------------------------------------------------------------------------
# Drafting and verification
# ----------------------------------------------------------------------------
def candidates(key, logits_BJV, sampling: SamplingConfig, last_logits=None, bonus=None):
  """Candidates from slot logits [B, J, V]: after a cached clean token whose target
  logits are `last_logits`, or behind a committed, uncached `bonus` (parallel step)."""
  if sampling.greedy:
    drafts, q = jnp.argmax(logits_BJV, axis=-1).astype(jnp.int32), None
    conf = jax.nn.softmax(logits_BJV, axis=-1).max(-1)
  else:
    drafts, q = sample(key, logits_BJV, sampling), probabilities(logits_BJV, sampling)
    conf = q.max(-1)
  b, vocab = drafts.shape[0], logits_BJV.shape[-1]
  if bonus is None:
    return Candidates(last_logits=last_logits, drafts=drafts, conf=conf, q=q,
                      certain=jnp.zeros((b,), jnp.int32))
  first = lambda a, x: jnp.concatenate([x[:, None], a], axis=1)
  return Candidates(last_logits=_delta(bonus, vocab), drafts=first(drafts, bonus),
                    conf=first(conf, jnp.ones((b,), conf.dtype)),
                    q=None if q is None else first(q, jax.nn.one_hot(bonus, vocab, dtype=q.dtype)),
                    certain=jnp.ones((b,), jnp.int32))


def _leading(ok_BK):
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
    target = jnp.argmax(logits_BKV, axis=-1).astype(jnp.int32)
    acc = _leading(target[:, :k] == drafts_BK)
    return acc, jnp.take_along_axis(target, acc[:, None], axis=1)[:, 0]
  k_u, k_b = jax.random.split(key)
  p = probabilities(logits_BKV, sampling)  # [B, K+1, V]
  at = lambda a: jnp.take_along_axis(a, drafts_BK[..., None], axis=-1)[..., 0]
  u = jax.random.uniform(k_u, drafts_BK.shape)
  acc = _leading(u * at(q_BKV) < at(p[:, :k]))
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


def _delta(tokens_B, vocab: int):
  """Logits that put all mass on tokens_B: 0 there, -inf elsewhere."""
  return jnp.where(jnp.arange(vocab)[None] == tokens_B[:, None], 0.0, -jnp.inf)


# ----------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------
def check_draft(params, cfg: ModelConfig, dcfg: drafter.DrafterConfig):
  """Raises ValueError when the draft params do not match dcfg (K layers, calibration rank)."""
  dcfg.validate(cfg)
  draft = params["draft"]
  layers = draft["layers"]
  k = len(layers) if isinstance(layers, tuple) else jax.tree.leaves(layers)[0].shape[0]
  if k != dcfg.num_draft_layers:
    raise ValueError(f"draft params have {k} draft layers but num_draft_layers = "
                     f"{dcfg.num_draft_layers}")
  rank = draft["calib"]["w1"].shape[1] if "calib" in draft else 0
  if rank != dcfg.calib_rank:
    raise ValueError(f"draft params have calibration rank {rank} but calib_rank = "
                     f"{dcfg.calib_rank}")


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "dcfg", "fcfg", "on_commit", "_broken"),
                   donate_argnames=("cache",))
def flex_generate(params, cache: model_lib.KVCache, prompt_BP, prompt_lens_B, stop_ids_BS, key,
                  costs=None, *, cfg: ModelConfig, dcfg: drafter.DrafterConfig, fcfg: FlexConfig,
                  on_commit=None, _broken: bool = False):
  """FlexDraft generation. Returns (tokens [B, M] -1 padded, num_new [B], FlexStats, cache).

  params = {'target', 'draft'}. `costs` (optional) is the `CostTable` of this
  batch size: the measured time of a parallel and of a sequential step (both
  passes) per verify width, and each mode's measured tau; done rows stay in the
  batch, so a step costs the same whatever the active count. `on_commit(tokens_BJ,
  count_B, drafted_B)`, if given, is called on the host once per step with the
  committed tokens, their count and how many came from accepted drafts.
  """
  m, bs = fcfg.max_new_tokens, dcfg.block_size
  if fcfg.mode == "ar":
    return _ar(params, cache, prompt_BP, prompt_lens_B, stop_ids_BS, key, cfg, fcfg, bs, on_commit)
  if fcfg.mode == "pld" and fcfg.verify_strategy == "expected_throughput":
    raise ValueError("mode 'pld' has no cost table row: use another verify_strategy")
  if fcfg.mode != "pld":
    check_draft(params, cfg, dcfg)
  b, width = prompt_BP.shape
  if cache.capacity < width + m + 2 * bs:
    raise ValueError(f"KV cache capacity {cache.capacity} is below the padded prompt width {width} "
                     f"+ max_new_tokens {m} + 2 * block_size {bs}")
  all_widths = verify_buckets(bs)
  if fcfg.verify_strategy == "expected_throughput" and costs is None:
    raise ValueError("verify_strategy 'expected_throughput' needs a cost table")
  if costs is not None and (costs.step_ms.shape != (2, len(all_widths))
                            or costs.tau.shape != (2,)):
    raise ValueError(f"costs must be a CostTable with step_ms of shape (2, {len(all_widths)}) "
                     f"(mode, verify width {all_widths}) and tau of shape (2,), got "
                     f"{costs.step_ms.shape} and {costs.tau.shape}")
  sampling = fcfg.sampling
  widths = (bs,) if fcfg.verify_strategy == "full" else all_widths  # compiled verify widths
  column = jnp.array([all_widths.index(w) for w in widths])  # widths -> cost/histogram column
  modes = {"parallel": (PARALLEL,), "sequential": (SEQUENTIAL,), "pld": (PLD,)}.get(
      fcfg.mode, (PARALLEL, SEQUENTIAL))
  slot_logits = functools.partial(drafter.slot_logits, params, cfg)

  # Prefill: the prompt as clean tokens, one block anchored at each row's last token.
  key, sub = jax.random.split(key)
  cache = cache.replace(lengths=jnp.zeros_like(cache.lengths))
  if fcfg.mode == "pld":  # the target alone; the drafts are looked up in the prompt
    logits, kv = model_lib.clean_pass(params["target"], cfg, prompt_BP,
                                      model_lib.next_positions(cache, width),
                                      jnp.broadcast_to(model_lib.causal_mask(width), (b, width, width)),
                                      cache)
  else:
    logits, h, kv = drafter.mixed_pass(params, cfg, dcfg, prompt_BP, (prompt_lens_B - 1)[:, None],
                                       cache)
  last = jnp.take_along_axis(logits, (prompt_lens_B - 1)[:, None, None], axis=1)[:, 0]
  zeros = jnp.zeros((b,), jnp.int32)

  def looked_up(tokens, num_new, bonus=None):
    """pld candidates from the prompt + tokens[:num_new]: [bonus] + lookups behind a bonus."""
    i = jnp.arange(width + tokens.shape[1])[None]
    gen = jnp.take_along_axis(tokens, jnp.clip(i - prompt_lens_B[:, None], 0, tokens.shape[1] - 1),
                              axis=1)
    history = jnp.where(i < prompt_lens_B[:, None],
                        jnp.pad(prompt_BP, ((0, 0), (0, tokens.shape[1]))), gen)
    drafts, conf = lookup_drafts(history, prompt_lens_B + num_new, bs - (bonus is not None))
    c = Candidates(last_logits=last, drafts=drafts, conf=conf, q=None, certain=zeros)
    if bonus is not None:
      first = lambda a, x: jnp.concatenate([x[:, None], a], axis=1)
      c = Candidates(last_logits=_delta(bonus, last.shape[-1]), drafts=first(drafts, bonus),
                     conf=first(conf, jnp.ones((b,), conf.dtype)), q=None, certain=zeros + 1)
    q = None if sampling.greedy else jax.nn.one_hot(c.drafts, last.shape[-1], dtype=jnp.float32)
    return c.replace(q=q)

  out0 = jnp.full((b, m + bs + 1), -1, jnp.int32)
  cand0 = (looked_up(out0, zeros) if fcfg.mode == "pld" else
           candidates(sub, slot_logits(h[:, 0]), sampling, last_logits=last))
  state = FlexState(cache=cache.append(kv, prompt_lens_B), cand=cand0, tokens=out0, num_new=zeros,
                    done=jnp.zeros((b,), bool), key=key,
                    stats=FlexStats.zeros(b, bs).replace(forward_passes=jnp.int32(1)))

  def plan(c: Candidates, active):
    """(mode, index into widths) of this step."""
    w = jnp.array(widths)
    if fcfg.verify_strategy == "expected_throughput":
      # Expected committed tokens per row verifying V: 1 - certain + sum_{i<V} prod_{j<=i} p_j.
      expect = (1 - c.certain)[:, None] + jnp.cumsum(jnp.cumprod(c.conf, axis=1), axis=1)
      gain = jnp.sum(jnp.where(active[:, None], expect[:, w - 1], 0.0), axis=0)
      best = jnp.argmax((gain * costs.rate()[jnp.array(modes)][:, column]).reshape(-1))
      return jnp.array(modes)[best // len(widths)], best % len(widths)
    if fcfg.verify_strategy == "full":
      v = jnp.full((b,), bs, jnp.int32)
    else:
      p = c.conf if fcfg.verify_strategy == "min_confidence" else jnp.cumprod(c.conf, axis=1)
      v = _leading(p >= fcfg.verify_threshold)
    bucket = jnp.argmax(w >= jnp.max(jnp.where(active, jnp.clip(v, 1, bs), 1)))
    if len(modes) == 1:
      return jnp.int32(modes[0]), bucket
    if costs is None:
      return jnp.where(active.sum() <= FLEX_BATCH_THRESHOLD, PARALLEL, SEQUENTIAL), bucket
    # This step's gain is the same in both modes; tau carries what the mode does next.
    return jnp.argmax(costs.rate()[:, column[bucket]]), bucket

  def judge(c: Candidates, logits_BKV, width, key):
    """verify() of drafts[:, :width] with L_0 = last_logits and L_i = logits_BKV[:, i-1]."""
    return verify(key, jnp.concatenate([c.last_logits[:, None], logits_BKV], axis=1),
                  c.drafts[:, :width], None if c.q is None else c.q[:, :width], sampling, _broken)

  def padded(kv, width):  # [L,B,width,K,H] -> [L,B,Bs,K,H]: one shape for every branch
    return jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, bs - width), (0, 0), (0, 0))), kv)

  def parallel(c: Candidates, cache, keys, width):
    """Verify + draft in one pass; the new drafts are [b] + group acc's calibrated slots."""
    anchors = cache.lengths[:, None] - 1 + jnp.arange(width + 1, dtype=jnp.int32)[None]
    logits, h, kv = drafter.mixed_pass(params, cfg, dcfg, c.drafts[:, :width], anchors, cache)
    acc, bonus = judge(c, logits, width, keys[0])
    h_acc = jnp.take_along_axis(h, acc[:, None, None, None], axis=1)[:, 0, 1:]  # [B, Bs-1, d]
    z = slot_logits(h_acc, jnp.broadcast_to(bonus[:, None], h_acc.shape[:2]))
    return acc, bonus, candidates(keys[1], z, sampling, bonus=bonus), padded(kv, width)

  def target_verify(c: Candidates, cache, keys, width):
    """Sequential step, pass 1: the target alone verifies (the drafts come from draft_pass)."""
    logits, kv = model_lib.clean_pass(params["target"], cfg, c.drafts[:, :width],
                                      model_lib.next_positions(cache, width),
                                      jnp.broadcast_to(model_lib.causal_mask(width), (b, width, width)),
                                      cache)
    acc, bonus = judge(c, logits, width, keys[0])
    return acc, bonus, c, padded(kv, width)

  def draft_pass(cache, bonus, key):
    """Sequential step, pass 2: b as a clean token, one block anchored at it."""
    logits, h, kv = drafter.mixed_pass(params, cfg, dcfg, bonus[:, None], cache.lengths[:, None], cache)
    return candidates(key, slot_logits(h[:, 0]), sampling, last_logits=logits[:, 0]), kv

  branches = [functools.partial(parallel if mode == PARALLEL else target_verify, width=w)
              for mode in modes for w in widths]

  def cond(s: FlexState):
    return jnp.any(~s.done)

  def body(s: FlexState):
    active = ~s.done
    on = active.astype(jnp.int32)
    mode, bucket = plan(s.cand, active)
    key, k_verify, k_draft = jax.random.split(s.key, 3)
    acc, bonus, cand, kv = lax.switch((mode - modes[0]) * len(widths) + bucket, branches, s.cand,
                                      s.cache, (k_verify, k_draft))
    cache = s.cache.append(kv, acc * on)
    if SEQUENTIAL in modes:
      if modes == (SEQUENTIAL,):
        cand, kv = draft_pass(cache, bonus, k_draft)
      else:
        skip = lambda cache: (cand, jax.tree.map(lambda a: jnp.zeros_like(a[:, :, :1]), kv))
        cand, kv = lax.cond(mode == SEQUENTIAL, lambda cache: draft_pass(cache, bonus, k_draft),
                            skip, cache)
      cache = cache.append(kv, on * (mode == SEQUENTIAL))
    # Committed: drafts[certain..acc-1], then the bonus; cut at a stop token and at M.
    j = jnp.arange(bs + 1)[None]
    certain, drafted = s.cand.certain, acc - s.cand.certain
    ext = jnp.concatenate([s.cand.drafts, s.cand.drafts[:, :1]], axis=1)
    shifted = jnp.take_along_axis(ext, jnp.minimum(certain[:, None] + j, bs), axis=1)
    tokens = jnp.where(j < drafted[:, None], shifted, bonus[:, None])
    stop = jnp.any(tokens[..., None] == stop_ids_BS[:, None], axis=-1) & (j <= drafted[:, None])
    count = jnp.where(stop.any(1), jnp.argmax(stop, axis=1), drafted) + 1
    count = jnp.where(active, jnp.minimum(count, m - s.num_new), 0)
    tokens = jnp.where(j < count[:, None], tokens, -1)
    if on_commit is not None:
      jax.debug.callback(on_commit, tokens, count, jnp.minimum(count, drafted), ordered=True)
    # Slots past num_new hold -1, so writing the -1 tail of `tokens` changes nothing.
    out = s.tokens.at[jnp.arange(b)[:, None], s.num_new[:, None] + j].set(tokens)
    st = s.stats
    depth = jnp.arange(bs)[None]
    verified = jnp.array(widths)[bucket] - certain  # drafts after the bonus in this pass
    st = st.replace(
        steps=st.steps + 1, row_steps=st.row_steps + on,
        forward_passes=st.forward_passes + jnp.where(mode == SEQUENTIAL, 2, 1),
        committed=st.committed + count, accept_hist=st.accept_hist.at[drafted].add(on),
        tried=st.tried + jnp.sum(on[:, None] * (depth < verified[:, None]), axis=0),
        accepted=st.accepted + jnp.sum(on[:, None] * (depth < drafted[:, None]), axis=0),
        modes=st.modes.at[mode].add(1), verify_hist=st.verify_hist.at[column[bucket]].add(1))
    num_new = s.num_new + count
    if fcfg.mode == "pld":
      cand = looked_up(out, num_new, bonus)
    done = s.done | (active & stop.any(1)) | (num_new >= m)
    return FlexState(cache=cache, cand=cand, tokens=out, num_new=num_new, done=done, key=key,
                     stats=st)

  state = lax.while_loop(cond, body, state)
  return state.tokens[:, :m], state.num_new, state.stats, state.cache


def _ar(params, cache, prompt_BP, prompt_lens_B, stop_ids_BS, key, cfg, fcfg, bs, on_commit):
  """Mode 'ar': the plain target loop of generate.py, with FlexStats."""
  on_token = None
  if on_commit is not None:
    on_token = lambda t, a: on_commit(t[:, None], a.astype(np.int32), np.zeros(a.shape, np.int32))
  tokens, num_new, steps, cache = generate_lib.generate(
      params["target"], cache, prompt_BP, prompt_lens_B, stop_ids_BS, key, cfg=cfg,
      max_new_tokens=fcfg.max_new_tokens, sampling=fcfg.sampling, on_token=on_token)
  stats = FlexStats.zeros(prompt_BP.shape[0], bs)
  stats = stats.replace(steps=steps + 1, forward_passes=steps + 1, row_steps=num_new,
                        committed=num_new)
  return tokens, num_new, stats, cache


def static_mode(fcfg: FlexConfig, batch: int, costs=None) -> str:
  """The mode flex would pick at every step of this executable, or 'flex' when it varies.

  The switch depends on the active row count (no cost table) or on the verify
  width (`CostTable`). When no step can choose differently, because the batch
  is at most FLEX_BATCH_THRESHOLD or one mode commits at least as many tokens
  per ms (`CostTable.rate`) at every verify width, the decisions are known
  before tracing, and compiling that mode alone drops the other mode's
  branches from the loop. The tokens are the same either way.
  """
  if fcfg.mode != "flex":
    return fcfg.mode
  if costs is None:
    return "parallel" if batch <= FLEX_BATCH_THRESHOLD else "flex"
  rate = np.asarray(costs.rate())
  if np.all(rate[PARALLEL] >= rate[SEQUENTIAL]):  # ties go to parallel, as in `plan`
    return "parallel"
  if np.all(rate[SEQUENTIAL] > rate[PARALLEL]):
    return "sequential"
  return "flex"


def compile_flex(params, cfg: ModelConfig, dcfg: drafter.DrafterConfig, batch: int, width: int,
                 capacity: int, num_stop_ids: int, *, fcfg: FlexConfig, costs=None, on_commit=None,
                 mesh=None):
  """Ahead-of-time compiled `flex_generate` for one shape bucket.

  Call it as `exe(params, cache, prompt_BP, prompt_lens_B, stop_ids_BS, key, costs)`.
  A flex config whose choice is fixed for this batch and cost table compiles
  only the mode it would choose (`static_mode`).

  With `mesh` (`training.make_mesh`), it is compiled for the shardings of
  `training.decode_shardings` (the training rules table): params and cache go
  in, and the cache comes back, sharded that way; tokens and num_new come back
  split by rows, the stats replicated. Arguments not yet placed (numpy arrays,
  uncommitted jax arrays) are placed by the call; place the params once with
  `jax.device_put(params, shardings.params)` so that calls do not move them.
  Streaming (`on_commit`) works on a one-device mesh only.
  """
  fcfg = dataclasses.replace(fcfg, mode=static_mode(fcfg, batch, costs))
  cache = jax.eval_shape(lambda: model_lib.KVCache.zeros(cfg, batch, capacity))
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  args = (i32(batch, width), i32(batch), i32(batch, num_stop_ids), jax.random.key(0), costs)
  static = dict(cfg=cfg, dcfg=dcfg, fcfg=fcfg, on_commit=on_commit)
  if mesh is None:
    return flex_generate.lower(params, cache, *args, **static).compile()
  return generate_lib.compile_on_mesh(lambda *a: flex_generate(*a, **static), params, cache, args,
                                      mesh, "on_commit" if on_commit is not None else None)

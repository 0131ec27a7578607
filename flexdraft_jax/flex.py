"""FlexDraft decoding (ALGORITHM.md §4): one jitted `lax.while_loop`, static shapes.

Per row the loop keeps the cache (n committed tokens cached) and `Candidates`:
the target's logits for position n and drafts for positions n, n+1, ... with
their top probabilities, the kind of step that made them (`source`) and, when
sampling, the distributions they were drawn from. A step that commits its
bonus b without caching it leaves b as drafts[:, 0] with confidence 1, q =
delta(b) and last logits delta(b), so both greedy and rejection sampling accept
it with certainty; `certain` marks it so that it is not emitted twice.

Each step is one of four kinds (`planner.KINDS`) at a static verify width w
(`verify_buckets`), verifying drafts[:, :w] with L_0 = the last logits and
L_i = the target's logits at draft i-1:
- ar: a target pass over drafts[:, :1] (the bonus); the next drafts are looked up;
- pld (prompt lookup, training-free): a target pass over w drafts; the next
  drafts are the tokens that followed the latest earlier match of the row's
  last n tokens (n in speculation.PLD_NGRAMS) in its prompt + output, confidence 1 (0 past them);
- parallel: one pass with groups of slots anchored at n-1+g (g = 0..w); the new
  drafts are [b] + slots 1.. of group acc, calibrated with b. A group's slots see only
  the clean tokens up to its anchor and their own block, so with
  `FlexConfig.parallel_pass='split'` the step verifies first and then runs group acc
  alone (a deep-layers-only pass over the cache): the same drafts for Bs slot tokens
  instead of (w+1) x Bs;
- sequential: a target pass over the w drafts, then a pass whose clean token is
  b (cached once) with one block anchored at b. That pass gives the target's own
  logits at b, so the token t after b is known exactly (its argmax, or a sample):
  the step commits it too, and the new drafts are [t] + slots 1.. calibrated with t
  (the parallel bonus's situation; ALGORITHM.md §4, sequential step).
Any kind can follow any other: each verifies whatever drafts the row holds.
`planner` picks the kind and width per step from a measured `CostTable`; the
kinds that cannot pay are not compiled (`compiled_kinds`). Every row may verify
all w drafts of the pass: the pass costs the same, so per-row verify lengths
only pick the width.

Passes inside `lax.switch`/`lax.cond` only read the cache and return their new
keys/values, which are written after the branch: XLA copies a cache that is
updated inside a conditional branch, whole, on every step.
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flexdraft_jax import drafter
from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import planner
from flexdraft_jax import prefill as prefill_lib
from flexdraft_jax.model_config import ModelConfig
from flexdraft_jax.planner import AR, KINDS, PARALLEL, PLD, SEQUENTIAL
from flexdraft_jax.flex_config import (  # re-exported: flex.FlexConfig, ...
    DRAFTED, FLEX_BATCH_THRESHOLD, MODES, PARALLEL_PASSES, STRATEGIES, VERIFY_BUCKETS,
    FlexConfig, branches, compiled_kinds, parallel_pass, parse_tree_nodes, table_for_mode,
    tree_shape, verify_buckets)
from flexdraft_jax.flex_stats import FlexStats, record_step
from flexdraft_jax.sampling import sample
from flexdraft_jax.speculation import (ALL, Candidates, behind, candidates, chain, leading,
                                       lookup_drafts, pad, reach, verify)


@flax.struct.dataclass
class FlexState:
  cache: model_lib.KVCache
  cand: Candidates
  tokens: jax.Array       # [B, M + Bs + 2] generated tokens, -1 past each row's end
  num_new: jax.Array      # [B]
  done: jax.Array         # [B]
  key: jax.Array
  stats: FlexStats


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------
def _padded(kv, width: int, bs: int):
  """[L,B,width,K,H] -> [L,B,Bs,K,H]: one shape for every branch."""
  return jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, bs - width), (0, 0), (0, 0))), kv)


class _Loop:
  """The pieces of one flex program, for static kinds and widths (built while tracing).

  `branches` lists (kind, width, cost-table column); `plan` picks one per step,
  `step` runs it: the kind's pass(es), then `commit` and `count`.
  """

  def __init__(self, params, cfg: ModelConfig, dcfg, fcfg: FlexConfig, kinds, costs,
               prompt_BP, prompt_lens_B, stop_ids_BS, on_commit=None, broken=False, only=None):
    self.params, self.cfg, self.dcfg, self.fcfg, self.costs = params, cfg, dcfg, fcfg, costs
    self.on_commit = on_commit
    self.prompt, self.lens, self.stops, self.broken = prompt_BP, prompt_lens_B, stop_ids_BS, broken
    self.bs, self.sampling, self.b = dcfg.block_size, fcfg.sampling, prompt_BP.shape[0]
    self.nodes, self.branch = tree_shape(fcfg, self.bs)
    self.kinds = kinds
    # The kinds whose drafts come from a second pass, after the verify pass and its append.
    self.second = (SEQUENTIAL,) + ((PARALLEL,) if parallel_pass(fcfg) == "split" else ())
    self.branches = branches(fcfg, self.bs, kinds, only)
    index = np.full((len(KINDS), len(verify_buckets(self.bs))), -1, np.int32)  # (kind, column)
    for i, (k, _, c) in enumerate(self.branches):
      index[k, c] = i
    self.index = index

  # -- passes ------------------------------------------------------------------
  def prefill(self, cache, key) -> FlexState:
    """The prompt as clean tokens (and one block anchored at each row's last token)."""
    b = self.prompt.shape[0]
    out0 = jnp.full((b, self.fcfg.max_new_tokens + self.bs + 2), -1, jnp.int32)
    key, sub = jax.random.split(key)
    chunk = min(self.fcfg.prefill_chunk, self.prompt.shape[1])
    if any(k in DRAFTED for k in self.kinds):  # chunks, then a block at each row's last token
      last, h, cache = prefill_lib.flex_prefill(self.params, self.cfg, self.dcfg, cache,
                                                self.prompt, self.lens, chunk=chunk)
      cand = self._candidates(sub, self._slot_logits(h[:, 0]), SEQUENTIAL, last_logits=last)
    else:  # the target alone; the drafts are looked up in the prompt
      last, cache = prefill_lib.prefill(self.params["target"], self.cfg, cache, self.prompt,
                                        self.lens, chunk=chunk)
      cand = self.looked_up(out0, jnp.zeros((b,), jnp.int32), None, last)
    return FlexState(cache=cache, cand=cand, tokens=out0,
                     num_new=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool), key=key,
                     stats=FlexStats.zeros(b, self.bs, len(verify_buckets(self.bs))).replace(
                         forward_passes=jnp.int32(1)))

  def _slot_logits(self, h, bonus=None):
    return drafter.slot_logits(self.params, self.cfg, h, bonus)

  def _candidates(self, key, logits, kind, bonus=None, **kw):
    """`candidates` from slot logits (over the draft vocabulary, where there is one): a tree
    of at most `self.nodes` nodes (`tree_shape`), padded to the block size."""
    vocab = self.params["draft"].get("vocab")
    c = candidates(key, logits, self.sampling, planner.SOURCE_OF[kind], bonus=bonus,
                   vocab_ids=None if vocab is None else vocab["ids"], vocab=self.cfg.vocab_size,
                   nodes=min(self.nodes - (bonus is not None), logits.shape[1] * self.branch),
                   branch=self.branch, **kw)
    return pad(c, self.bs)

  def _target_pass(self, c: Candidates, width, cache):
    """All layers over the first `width` nodes of c as clean tokens (each at position n +
    depth, seeing the cache and its ancestors): (logits [B,w,V], (k, v))."""
    clean = drafter.tree_tokens(cache.lengths, c.depth[:, :width], c.anc[:, :width])
    return model_lib.clean_pass(self.params["target"], self.cfg, c.drafts[:, :width], clean.pos,
                                drafter.visibility(clean, clean), cache)

  def looked_up(self, tokens, num_new, bonus, last_logits):
    """Lookup candidates from the prompt + tokens[:num_new] ([bonus] + lookups behind it)."""
    width = self.prompt.shape[1]
    i = jnp.arange(width + tokens.shape[1])[None]
    gen = jnp.take_along_axis(tokens, jnp.clip(i - self.lens[:, None], 0, tokens.shape[1] - 1),
                              axis=1)
    history = jnp.where(i < self.lens[:, None],
                        jnp.pad(self.prompt, ((0, 0), (0, tokens.shape[1]))), gen)
    drafts, conf = lookup_drafts(history, self.lens + num_new, self.bs - (bonus is not None))
    z = jnp.zeros((self.b,), jnp.int32)
    c = behind(chain(drafts, conf, last_logits=last_logits, q=None, certain=z,
                     source=z + planner.LOOKUP), bonus)
    q = None if self.sampling.greedy else jax.nn.one_hot(c.drafts, last_logits.shape[-1],
                                                         dtype=jnp.float32)
    return c.replace(q=q)

  def _judge(self, c: Candidates, logits_BKV, kv, width, key):
    """verify() of the first `width` nodes, L_0 = last_logits and L_i = logits_BKV[:, i-1]:
    (acc, bonus, path [B, Bs], the accepted path's (k, v) in depth order, padded to Bs)."""
    acc, bonus, path = verify(key, jnp.concatenate([c.last_logits[:, None], logits_BKV], axis=1),
                              c, width, self.sampling, self.broken)
    if self.branch > 1:  # only the accepted path's keys and values, at contiguous positions
      kv = jax.tree.map(lambda a: jnp.take_along_axis(a, path[None, :, :, None, None], axis=2), kv)
    return acc, bonus, jnp.pad(path, ((0, 0), (0, self.bs - width))), _padded(kv, width, self.bs)

  def _parallel(self, c: Candidates, cache, keys, width):
    """Verify + draft in one pass: group 0 of slots anchored at the last cached token, group
    i+1 at node i; the new drafts are [b] + the calibrated slots of the group anchored at
    the last accepted node."""
    depth, anc = c.depth[:, :width], c.anc[:, :width]
    anchors = jnp.concatenate([cache.lengths[:, None] - 1, cache.lengths[:, None] + depth], axis=1)
    anchor_anc = jnp.concatenate([jnp.full((self.b, 1), ALL), anc], axis=1)
    logits, h, kv = drafter.mixed_pass(self.params, self.cfg, self.dcfg, c.drafts[:, :width],
                                       anchors, cache,
                                       clean=drafter.tree_tokens(cache.lengths, depth, anc),
                                       anchor_anc=anchor_anc)
    acc, bonus, path, kv = self._judge(c, logits, kv, width, keys[0])
    group = jnp.where(acc > 0, jnp.take_along_axis(path, jnp.maximum(acc - 1, 0)[:, None],
                                                   axis=1)[:, 0] + 1, 0)
    h_acc = jnp.take_along_axis(h, group[:, None, None, None], axis=1)[:, 0]  # [B, Bs, d]
    cand = self._parallel_candidates(h_acc, bonus, keys[1])
    return acc, bonus, path, cand, kv

  def _parallel_candidates(self, h_BSD, bonus, key, kind=PARALLEL):
    """[b] + slots 1.. of a block's final-normed states [B, Bs, d], calibrated with b, the
    token at slot 0's position: the drafts of a parallel step (single or split; b its
    bonus) and of a sequential step (b the draft pass's own next token)."""
    h = h_BSD[:, 1:]
    z = self._slot_logits(h, jnp.broadcast_to(bonus[:, None], h.shape[:2]))
    return self._candidates(key, z, kind, bonus=bonus)

  def _verify_only(self, c: Candidates, cache, keys, width):
    """ar / pld / sequential pass 1: the target alone verifies; the next drafts come later."""
    logits, kv = self._target_pass(c, width, cache)
    acc, bonus, path, kv = self._judge(c, logits, kv, width, keys[0])
    return acc, bonus, path, c, kv

  def _draft(self, cache, bonus, key):
    """Sequential pass 2: b as a clean token, one block anchored at it. The target's logits
    at b give the next token t (argmax, or a sample: the target's own law), which this step
    commits; the drafts are [t] + slots 1.. calibrated with t (t first, certain)."""
    logits, h, kv = drafter.mixed_pass(self.params, self.cfg, self.dcfg, bonus[:, None],
                                       cache.lengths[:, None], cache)
    k_next, k_draft = jax.random.split(key)
    t = sample(k_next, logits[:, 0], self.sampling)
    return self._parallel_candidates(h[:, 0], t, k_draft, SEQUENTIAL), kv

  def _draft_split(self, cache, bonus, key):
    """Split parallel pass 2: group acc's block alone, anchored at the last accepted token
    (now cached): the drafts of `_parallel`'s group acc, calibrated with b."""
    h = drafter.slot_pass(self.params, self.cfg, self.dcfg, cache.lengths[:, None] - 1, cache)
    return self._parallel_candidates(h[:, 0], bonus, key)

  def _second_pass(self, kind, cand, cache, bonus, key, kv):
    """Pass 2 of the kinds that draft after verifying (sequential; parallel when split), for
    the step's kind: (candidates, clean (k, v) [L,B,1,..] to append for sequential)."""
    zeros = jax.tree.map(lambda a: jnp.zeros_like(a[:, :, :1]), kv)
    fns = {SEQUENTIAL: lambda cache: self._draft(cache, bonus, key),
           PARALLEL: lambda cache: (self._draft_split(cache, bonus, key), zeros)}
    passes = [k for k in self.second if k in self.kinds]  # not empty: see `step`
    if len(self.kinds) == 1:  # the program's one kind drafts after verifying: no switch
      return fns[passes[0]](cache)
    index = sum((kind == k).astype(jnp.int32) * (i + 1) for i, k in enumerate(passes))
    return lax.switch(index, [lambda cache: (cand, zeros)] + [fns[k] for k in passes], cache)

  # -- plan --------------------------------------------------------------------
  def plan(self, s: FlexState):
    """Index into `branches` of this step."""
    c, active = s.cand, ~s.done
    if self.costs is not None and len(self.branches) > 1:
      return planner.best_step(self.costs, self.branches, c, active)
    columns = sorted({col for _, _, col in self.branches})
    w = jnp.array([verify_buckets(self.bs)[col] for col in columns])
    if self.fcfg.verify_strategy == "full":
      v = jnp.full((self.b,), self.nodes, jnp.int32)
    else:
      p = (c.conf if self.fcfg.verify_strategy == "min_confidence"
           else reach(c.conf, c.anc, c.depth))  # the path's product (cumprod on a chain)
      v = leading(p >= self.fcfg.verify_threshold)
    column = jnp.array(columns)[jnp.argmax(w >= jnp.max(jnp.where(active, jnp.clip(v, 1, w[-1]),
                                                                  1)))]
    kinds = self.kinds
    if set(kinds) == {PARALLEL, SEQUENTIAL}:  # table-less flex
      kind = jnp.where(active.sum() <= FLEX_BATCH_THRESHOLD, PARALLEL, SEQUENTIAL)
    elif set(kinds) <= {AR, PLD}:
      kind = jnp.where(column == 0, AR, kinds[-1])
    else:
      kind = jnp.int32(kinds[0])
    index = jnp.asarray(self.index)[kind, column]
    return jnp.where(index >= 0, index, 0)  # a kind without that width: its first branch

  # -- step --------------------------------------------------------------------
  def step(self, s: FlexState, branch) -> FlexState:
    """One verification step of branch `branch` (a traced index)."""
    active = ~s.done
    on = active.astype(jnp.int32)
    key, k_verify, k_draft = jax.random.split(s.key, 3)
    fns = [functools.partial(self._parallel if k == PARALLEL and PARALLEL not in self.second
                             else self._verify_only, width=w) for k, w, _ in self.branches]
    kind = jnp.array([k for k, _, _ in self.branches])[branch]
    width = jnp.array([w for _, w, _ in self.branches])[branch]
    acc, bonus, path, cand, kv = lax.switch(branch, fns, s.cand, s.cache, (k_verify, k_draft))
    cache = s.cache.append(kv, acc * on)
    if any(k in self.kinds for k in self.second):
      cand, kv = self._second_pass(kind, cand, cache, bonus, k_draft, kv)
      if SEQUENTIAL in self.kinds:
        cache = cache.append(kv, on * (kind == SEQUENTIAL))
    # A sequential step also commits its draft pass's next token (now cand.drafts[:, 0]).
    free = (jnp.where(kind == SEQUENTIAL, cand.drafts[:, 0], -1) if SEQUENTIAL in self.kinds
            else jnp.full((self.b,), -1, jnp.int32))
    tokens, count, drafted, stop = self.commit(s, acc, bonus, path, active, free)
    if self.on_commit is not None:
      jax.debug.callback(self.on_commit, tokens, count, jnp.minimum(count, drafted), ordered=True)
    at = s.num_new[:, None] + jnp.arange(self.bs + 2)[None]
    out = s.tokens.at[jnp.arange(self.b)[:, None], at].set(tokens)  # a -1 tail changes nothing
    num_new = s.num_new + count
    if AR in self.kinds or PLD in self.kinds:
      looked = self.looked_up(out, num_new, bonus, cand.last_logits)
      if self.kinds == (AR,) or set(self.kinds) == {AR, PLD}:
        cand = looked
      else:
        cand = jax.tree.map(lambda a, b: jnp.where(kind <= PLD, a, b), looked, cand)
    column = jnp.array([col for _, _, col in self.branches])[branch]
    stats = record_step(s.stats, s.cand, self.costs, kind=kind, width=width, column=column,
                        acc=acc, path=path, drafted=drafted, count=count, active=active)
    done = s.done | (active & stop) | (num_new >= self.fcfg.max_new_tokens)
    return FlexState(cache=cache, cand=cand, tokens=out, num_new=num_new, done=done, key=key,
                     stats=stats)

  def commit(self, s: FlexState, acc, bonus, path, active, free):
    """Committed tokens [B, Bs+2] (-1 padded): the accepted path's nodes path[certain..acc-1],
    the bonus, then the step's `free` token where it is >= 0 (sequential's), cut at a stop
    token and at max_new_tokens; their count, how many were drafts, stopped."""
    j = jnp.arange(self.bs + 2)[None]
    certain, drafted = s.cand.certain, acc - s.cand.certain
    nodes = jnp.take_along_axis(path, jnp.minimum(certain[:, None] + j, self.bs - 1), axis=1)
    shifted = jnp.take_along_axis(s.cand.drafts, nodes, axis=1)
    tokens = jnp.where(j < drafted[:, None], shifted,
                       jnp.where(j == drafted[:, None], bonus[:, None], free[:, None]))
    made = drafted + 1 + (free >= 0)
    stop = jnp.any(tokens[..., None] == self.stops[:, None], axis=-1) & (j < made[:, None])
    count = jnp.where(stop.any(1), jnp.argmax(stop, axis=1) + 1, made)
    count = jnp.where(active, jnp.minimum(count, self.fcfg.max_new_tokens - s.num_new), 0)
    return jnp.where(j < count[:, None], tokens, -1), count, drafted, stop.any(1)


def _check(params, cfg, dcfg, fcfg, kinds, cache, width, costs):
  bs, m = dcfg.block_size, fcfg.max_new_tokens
  if any(k in DRAFTED for k in kinds):
    drafter.check_params(params["draft"], cfg, dcfg)
  if cache.capacity < width + m + 2 * bs:
    raise ValueError(f"KV cache capacity {cache.capacity} is below the padded prompt width {width} "
                     f"+ max_new_tokens {m} + 2 * block_size {bs}")
  if fcfg.verify_strategy == "expected_throughput" and costs is None:
    raise ValueError("verify_strategy 'expected_throughput' needs a cost table")
  want = (len(KINDS), len(verify_buckets(bs)))
  if costs is not None and (costs.step_ms.shape != want
                            or costs.acceptance.alpha.shape != (3, bs, planner.NUM_BINS)):
    raise ValueError(f"costs must be a planner.CostTable with step_ms of shape {want} (kind, "
                     f"verify width {verify_buckets(bs)}) and acceptance for block size {bs}, got "
                     f"{costs.step_ms.shape} and {costs.acceptance.alpha.shape}")


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg", "fcfg", "kinds", "on_commit",
                                             "_broken"),
                   donate_argnames=("cache",))
def flex_generate(params, cache: model_lib.KVCache, prompt_BP, prompt_lens_B, stop_ids_BS, key,
                  costs=None, *, cfg: ModelConfig, dcfg: drafter.DrafterConfig, fcfg: FlexConfig,
                  kinds: tuple[int, ...] | None = None, on_commit=None, _broken: bool = False):
  """FlexDraft generation. Returns (tokens [B, M] -1 padded, num_new [B], FlexStats, cache).

  params = {'target', 'draft'}. `kinds` (static; default: those of fcfg.mode,
  `planner.mode_kinds`) are the step kinds compiled in. `costs` (optional) is
  the `planner.CostTable` of this batch size: with it, every step takes the
  (kind, width) of most expected tokens per measured ms (`planner.best_step`);
  done rows stay in the batch, so a step costs the same whatever the active
  count. `on_commit(tokens_BJ, count_B, drafted_B)`, if given, is called on the
  host once per step with the committed tokens, their count and how many came
  from accepted drafts.
  """
  if kinds is None:  # a traced table cannot prune kinds (compile_flex does, `compiled_kinds`)
    kinds = DRAFTED if fcfg.mode == "flex" and costs is None else planner.mode_kinds(fcfg.mode)
  kinds = tuple(sorted(kinds))
  if kinds == (AR,):
    return _ar(params, cache, prompt_BP, prompt_lens_B, stop_ids_BS, key, cfg, fcfg,
               dcfg.block_size, on_commit)
  _check(params, cfg, dcfg, fcfg, kinds, cache, prompt_BP.shape[1], costs)
  loop = _Loop(params, cfg, dcfg, fcfg, kinds, costs, prompt_BP, prompt_lens_B, stop_ids_BS,
               on_commit, _broken)

  state = lax.while_loop(lambda s: jnp.any(~s.done), lambda s: loop.step(s, loop.plan(s)),
                         loop.prefill(cache, key))
  return state.tokens[:, :fcfg.max_new_tokens], state.num_new, state.stats, state.cache


def _ar(params, cache, prompt_BP, prompt_lens_B, stop_ids_BS, key, cfg, fcfg, bs, on_commit):
  """Kinds (ar,): the plain target loop of generate.py, with FlexStats."""
  on_token = None
  if on_commit is not None:
    on_token = lambda t, a: on_commit(t[:, None], a.astype(np.int32), np.zeros(a.shape, np.int32))
  tokens, num_new, steps, cache = generate_lib.generate(
      params["target"], cache, prompt_BP, prompt_lens_B, stop_ids_BS, key, cfg=cfg,
      max_new_tokens=fcfg.max_new_tokens, sampling=fcfg.sampling, on_token=on_token,
      prefill_chunk=fcfg.prefill_chunk)
  stats = FlexStats.zeros(prompt_BP.shape[0], bs, len(verify_buckets(bs)))
  stats = stats.replace(steps=steps + 1, forward_passes=steps + 1, row_steps=num_new,
                        committed=num_new, modes=stats.modes.at[AR].set(steps + 1))
  return tokens, num_new, stats, cache


def compile_flex(params, cfg: ModelConfig, dcfg: drafter.DrafterConfig, batch: int, width: int,
                 capacity: int, num_stop_ids: int, *, fcfg: FlexConfig, costs=None, on_commit=None,
                 mesh=None, kinds=None):
  """Ahead-of-time compiled `flex_generate` for one shape bucket, with `kinds` (default:
  `compiled_kinds`).

  Call it as `exe(params, cache, prompt_BP, prompt_lens_B, stop_ids_BS, key, costs)`.

  With `mesh` (`sharding.make_mesh`), it is compiled for the decode shardings
  of the rules table: params and cache go in, and the cache comes back, sharded
  that way; tokens and num_new come back split by rows, the stats replicated.
  Arguments not yet placed (numpy arrays, uncommitted jax arrays) are placed by
  the call; place the params once with `jax.device_put(params, shardings.params)`
  so that calls do not move them. Streaming (`on_commit`) works on a one-device
  mesh only.
  """
  if kinds is None:
    kinds = compiled_kinds(fcfg, batch, dcfg.block_size, costs)
  cache = jax.eval_shape(lambda: model_lib.KVCache.zeros(cfg, batch, capacity))
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  args = (i32(batch, width), i32(batch), i32(batch, num_stop_ids), jax.random.key(0), costs)
  static = dict(cfg=cfg, dcfg=dcfg, fcfg=fcfg, kinds=tuple(sorted(kinds)), on_commit=on_commit)
  if mesh is None:
    return flex_generate.lower(params, cache, *args, **static).compile()
  return generate_lib.compile_on_mesh(lambda *a: flex_generate(*a, **static), params, cache, args,
                                      mesh, "on_commit" if on_commit is not None else None)

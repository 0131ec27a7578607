r"""Decoding throughput benchmark: AR, speculative modes and HF transformers.

  python -m flexdraft_jax.bench --modes=ar,pld,parallel,sequential,flex --batch_sizes=1,4 \
    --drafter=workdir/drafter --out_dir=bench_out
  python -m flexdraft_jax.bench --batch_sizes=1 --profile   # + a decode-step breakdown

For each batch size b, the prompts (chat-templated with our tokenizer) are cut
into consecutive groups of b and decoded greedily as ragged batches. Each
executable is compiled ahead of time (timed apart), run once to warm up, then
each group is timed `--repeats` times and the median kept. By default both
sides generate exactly `--max_new_tokens` tokens per row (`--ignore_eos`), so
tokens/s compares the same work.

Modes (`MODES`): `ar` (the plain jitted loop; always run, as the reference),
and `parallel`, `sequential`, `flex`, `pld` (`flex.flex_generate` in that mode,
`pld` = prompt lookup, no drafter). Without `--drafter`, a random drafter
(`--random_drafter_layers`, `--block_size`) is exported to out_dir/random_drafter
and used (header `random_drafter: true`): speeds are then a lower bound. Each
mode's greedy tokens must equal AR's token for token; a mode that differs gets
`lossless: false` and null speed columns.

Writes `out_dir/bench.json` {"header", "rows"}, one row per (mode, batch_size):
tokens_per_s, tau (committed tokens per row-step, bonus included), speedup_vs_ar,
forward_passes (prefill included), mean_verify_len (mean static verify width of
the steps), mode_histogram ({parallel, sequential, pld} steps), compile_s,
lossless, plus ms_per_step, new_tokens, steps, wall_s and the HF columns;
`out_dir/throughput.png` (tokens/s vs batch size per mode), `out_dir/ar_profile.json`
with `--profile`, and prints a table.

  python -m flexdraft_jax.bench --calibrate --drafter=workdir/drafter --batch_sizes=1,2,4,8

instead measures the flex policy's cost table (`flex.CostTable`) and writes
`out_dir/costs.json` (`flex.save_costs`), which `--costs` here and in decode.py
read:
- step_ms: one step of each kind at each batch size and verify width w in
  `flex.verify_buckets(block_size)`. A parallel step is one mixed pass over w
  clean tokens with w+1 groups; a sequential step is a target pass over w
  tokens then a mixed pass over 1 token with one group (cache writes included;
  verify and drafting math excluded). Each is jitted on its own over a zero
  cache whose rows hold the typical mid-generation length (mean prompt +
  max_new_tokens / 2); the median of `--profile_runs` calls is kept.
- tau: the committed tokens per row-step of the parallel and of the sequential
  mode, from decoding the prompts in each mode at the smallest batch size.
Calibrate on other prompts than the ones you then time (e.g. the held-out
ShareGPT split for MT-Bench), so that flex does not learn the test set, then
pass `--costs=out_dir/costs.json` to time the modes with that table (`make
bench` does both). `--no_calibration` is the calibration-MLP ablation: the
drafter decodes without it (only parallel steps use it).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax import checkpoint
from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax import flex as flex_lib
from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import prompts as prompts_lib
from flexdraft_jax import resources
from flexdraft_jax import tokenizer as tokenizer_lib
from flexdraft_jax import weights
from flexdraft_jax.model_config import ModelConfig
from flexdraft_jax.sampling import SamplingConfig

_MODEL = flags.DEFINE_string(
    "model", "smollm2-135m-instruct",
    "`smollm2-135m-instruct` (bundled GGUF), a .gguf file, or an HF checkpoint folder.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Compute/param dtype; auto = f32 on CPU, bf16 on accelerators.")
_UNROLL = flags.DEFINE_bool(
    "unroll_layers", None, "Run layers from per-layer param trees (as `Engine` does on CPU, "
    "where XLA copies each layer's weights out of stacked arrays on every scan step); "
    "default: on CPU only.")
_PROMPTS = flags.DEFINE_string("prompts", "mtbench",
                               "mtbench, sharegpt-heldout, or a path to a .jsonl prompt file.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 8, "Prompts used (the first ones of the set).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt (at most).")
_MODES = flags.DEFINE_list("modes", ["ar"], "Decoding modes to time; known: ar, parallel, "
                           "sequential, flex, pld (ar always runs, as the reference).")
_DRAFTER = flags.DEFINE_string("drafter", None, "Exported drafter folder; default: a random one.")
_RANDOM_LAYERS = flags.DEFINE_integer("random_drafter_layers", 4,
                                      "Draft layers K of the random drafter (no --drafter).")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 8, "Block size of the random drafter.")
_NO_CALIB = flags.DEFINE_bool(
    "no_calibration", False, "Ablation: decode without the drafter's calibration MLP (parallel "
    "steps then draft slots 1.. from the raw slot logits; sequential steps never use it).")
_CALIBRATE = flags.DEFINE_bool("calibrate", False, "Only measure the flex cost table (step times "
                                "per batch size and verify width, tau per mode) and write "
                                "out_dir/costs.json (see above).")
_COSTS = flags.DEFINE_string("costs", None, "Cost table (costs.json of --calibrate) for the speculative "
                             "modes; without one, flex switches on the active row count "
                             "(flex.FLEX_BATCH_THRESHOLD).")
_MAX_PROMPT = flags.DEFINE_integer(
    "max_prompt_tokens", None, "Skip prompts longer than this many chat-templated tokens (the "
    "first --num_prompts of the rest are used); default: keep all.")
_STRATEGY = flags.DEFINE_enum("verify_strategy", "cumulative_product", list(flex_lib.STRATEGIES[:2])
                              + ["full"], "How many drafts a speculative step verifies ('full': "
                              "all, one compiled width, the fastest to compile).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to time.")
_COMPARE_HF = flags.DEFINE_bool(
    "compare_hf", True, "Also time HF transformers (torch, CPU) greedy `generate` on the same "
    "prompts, and check its tokens against ours. Skipped with a warning without torch.")
_HF_THREADS = flags.DEFINE_integer(
    "hf_num_threads", None, "torch intra-op threads for the HF reference; default: torch's own "
    "(one per core). On a busy machine 1 can be much faster than the default.")
_IGNORE_EOS = flags.DEFINE_bool(
    "ignore_eos", True, "Generate exactly --max_new_tokens per row on both sides (ours: no stop "
    "ids; HF: min_new_tokens=max_new_tokens), so both do the same work.")
_OUT_DIR = flags.DEFINE_string("out_dir", "bench_out", "Where the JSON results are written.")
_PROFILE = flags.DEFINE_bool("profile", False,
                             "Also time the pieces of one AR decode step (ar_profile.json).")
_PROFILE_RUNS = flags.DEFINE_integer("profile_runs", 20, "Timed runs per profiled piece.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per group; the median is reported.")

PROMPT_BUCKET = 64  # prompts are right-padded to a multiple of this (one executable per width)


# ----------------------------------------------------------------------------
# Settings, workload, results
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Options:
  """The benchmark's settings (one field per flag)."""
  model: str = "smollm2-135m-instruct"
  dtype: str | None = None           # None: f32 on CPU, bf16 on accelerators
  unroll_layers: bool | None = None  # None: on CPU only
  prompts: str = "mtbench"
  num_prompts: int = 8
  max_new_tokens: int = 64
  modes: tuple[str, ...] = ("ar",)
  drafter: str | None = None         # None: a random drafter, exported to out_dir
  random_drafter_layers: int = 4
  block_size: int = 8
  no_calibration: bool = False
  verify_strategy: str = "cumulative_product"
  calibrate: bool = False
  costs: str | None = None           # a --calibrate costs.json
  max_prompt_tokens: int | None = None
  batch_sizes: tuple[int, ...] = (1, 8)
  compare_hf: bool = True
  hf_num_threads: int | None = None  # None: torch's default
  ignore_eos: bool = True
  out_dir: str = "bench_out"
  profile: bool = False
  profile_runs: int = 20
  repeats: int = 2


@dataclasses.dataclass
class Workload:
  """What every runner decodes: a loaded target and chat-templated prompt ids."""
  cfg: ModelConfig
  params: Any
  prompt_ids: list[list[int]]
  eos_ids: list[int]            # the tokenizer's stop ids
  stop_ids: list[int]           # the ids we actually stop at ([-1]: none, with --ignore_eos)
  pad_id: int
  max_new_tokens: int
  repeats: int
  ignore_eos: bool
  verify_strategy: str = "cumulative_product"
  dcfg: drafter_lib.DrafterConfig | None = None
  draft: Any = None             # decoding draft params (None: pld/ar only)
  costs: dict[int, flex_lib.CostTable] = dataclasses.field(default_factory=dict)  # per batch


@dataclasses.dataclass
class GroupRun:
  """One group of prompts decoded as one batch."""
  tokens: list[list[int]]       # generated ids per row (without padding)
  new_tokens: int               # summed over rows
  steps: int                    # forward passes after prefill
  wall_s: float                 # median over repeats, prefill included, compile excluded


@dataclasses.dataclass
class ModeResult:
  """A runner's result for one batch size: all its groups, in order."""
  groups: list[GroupRun]
  compile_s: float = 0.0
  # Mode-specific columns merged into the row (e.g. acceptance for speculative modes).
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def new_tokens(self) -> int:
    return sum(g.new_tokens for g in self.groups)

  @property
  def steps(self) -> int:
    return sum(g.steps for g in self.groups)

  @property
  def wall_s(self) -> float:
    return sum(g.wall_s for g in self.groups)

  @property
  def tokens_per_s(self) -> float:
    return self.new_tokens / self.wall_s if self.wall_s else 0.0

  @property
  def ms_per_step(self) -> float:
    return 1e3 * self.wall_s / self.steps if self.steps else 0.0


Groups = list[list[list[int]]]
Runner = Callable[[Workload, Groups], ModeResult]


def _median_wall(call: Callable[[], Any], repeats: int) -> tuple[float, Any]:
  """Median seconds of `call()` over `repeats` runs, and its last output."""
  walls, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(call())
    walls.append(time.perf_counter() - start)
  return statistics.median(walls), out


# ----------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------
def run_ar(work: Workload, groups: Groups) -> ModeResult:
  """Our jitted AR loop (`generate.generate`), one executable per (batch, width)."""
  m = work.max_new_tokens
  result = ModeResult(groups=[])
  compiled = {}  # (batch, width) -> [executable, cache]; the cache is donated and handed back
  for gi, group in enumerate(groups):
    prompt_bp, lens_b = generate_lib.pad_prompts(group, PROMPT_BUCKET, work.pad_id)
    b, width = prompt_bp.shape
    args = (jnp.asarray(prompt_bp), jnp.asarray(lens_b),
            jnp.asarray(generate_lib.stop_matrix(work.stop_ids, b)), jax.random.key(0))
    if (b, width) not in compiled:
      cache = model_lib.KVCache.zeros(work.cfg, b, width + m)
      start = time.perf_counter()
      exe = generate_lib.compile_generate(work.params, work.cfg, b, width, cache.capacity,
                                          len(work.stop_ids), max_new_tokens=m,
                                          sampling=SamplingConfig())
      took = time.perf_counter() - start
      result.compile_s += took
      start = time.perf_counter()
      cache = jax.block_until_ready(exe(work.params, cache, *args))[3]  # warm-up
      logging.info("ar: compiled batch=%d width=%d capacity=%d in %.1f s; warm-up %.2f s",
                   b, width, cache.capacity, took, time.perf_counter() - start)
      compiled[b, width] = [exe, cache]
    slot = compiled[b, width]

    def call(slot=slot, args=args):
      out = slot[0](work.params, slot[1], *args)
      slot[1] = out[3]
      return out

    wall, (tokens, num_new, steps, _) = _median_wall(call, work.repeats)
    tokens, num_new = np.asarray(tokens), np.asarray(num_new)
    run = GroupRun(tokens=[tokens[r, :num_new[r]].tolist() for r in range(b)],
                   new_tokens=int(num_new.sum()), steps=int(steps), wall_s=wall)
    result.groups.append(run)
    logging.info("ar: batch=%d group %d/%d: %d tokens, %d steps, %.2f s (%.1f tok/s)", b,
                 gi + 1, len(groups), run.new_tokens, run.steps, wall, run.new_tokens / wall)
  result.extra = dict(tau=1.0, forward_passes=result.steps + len(groups), mean_verify_len=None,
                      mode_histogram=None)
  return result


def run_flex(work: Workload, groups: Groups, *, mode: str) -> ModeResult:
  """`flex.flex_generate` in `mode`, one executable per (batch, width); FlexStats summed."""
  m, bs = work.max_new_tokens, work.dcfg.block_size
  fcfg = flex_lib.FlexConfig(mode=mode, verify_strategy=work.verify_strategy, max_new_tokens=m)
  params = {"target": work.params, "draft": work.draft}
  result, compiled, stats = ModeResult(groups=[]), {}, []
  costs = work.costs.get(len(groups[0])) if mode != "pld" else None
  if mode == "flex" and work.costs and costs is None:
    logging.warning("flex: the cost table has no batch size %d; falling back to the "
                    "active-row threshold", len(groups[0]))
  for group in groups:
    prompt_bp, lens_b = generate_lib.pad_prompts(group, PROMPT_BUCKET, work.pad_id)
    b, width = prompt_bp.shape
    args = (jnp.asarray(prompt_bp), jnp.asarray(lens_b),
            jnp.asarray(generate_lib.stop_matrix(work.stop_ids, b)), jax.random.key(0), costs)
    if (b, width) not in compiled:  # [executable, cache]: the cache is donated and handed back
      start = time.perf_counter()
      exe = flex_lib.compile_flex(params, work.cfg, work.dcfg, b, width, width + m + 2 * bs,
                                  len(work.stop_ids), fcfg=fcfg, costs=costs)
      result.compile_s += time.perf_counter() - start
      cache = model_lib.KVCache.zeros(work.cfg, b, width + m + 2 * bs)
      compiled[b, width] = [exe, jax.block_until_ready(exe(params, cache, *args))[3]]  # warm-up
    slot = compiled[b, width]

    def call(slot=slot, args=args):
      out = slot[0](params, slot[1], *args)
      slot[1] = out[3]
      return out

    wall, (tokens, num_new, st, _) = _median_wall(call, work.repeats)
    tokens, num_new, st = np.asarray(tokens), np.asarray(num_new), jax.device_get(st)
    stats.append(st)
    result.groups.append(GroupRun(tokens=[tokens[r, :num_new[r]].tolist() for r in range(b)],
                                  new_tokens=int(num_new.sum()), steps=int(st.steps), wall_s=wall))
    logging.info("%s: batch=%d: %d tokens, %d steps, %.2f s", mode, b, int(num_new.sum()),
                 int(st.steps), wall)
  total = lambda f: sum(np.asarray(getattr(st, f)) for st in stats)
  hist = total("verify_hist")
  result.extra = dict(
      tau=float(total("committed").sum() / max(total("row_steps").sum(), 1)),
      forward_passes=int(total("forward_passes")),
      mean_verify_len=(float(np.dot(hist, flex_lib.verify_buckets(bs)) / hist.sum())
                       if hist.sum() else None),
      mode_histogram=dict(zip(("parallel", "sequential", "pld"), total("modes").tolist())),
      cost_table=costs is not None,
      compiled_mode=flex_lib.static_mode(fcfg, len(groups[0]), costs))
  return result


# Mode name -> runner.
MODES: dict[str, Runner] = {"ar": run_ar, **{
    m: functools.partial(run_flex, mode=m) for m in ("parallel", "sequential", "flex", "pld")}}
DRAFTED = ("parallel", "sequential", "flex")  # the modes that need a drafter


# ----------------------------------------------------------------------------
# HF transformers reference (torch imported only here)
# ----------------------------------------------------------------------------
class HfReference:
  """HF transformers' greedy `generate` on the same checkpoint, torch on CPU."""

  def __init__(self, model: str, dtype: str, num_threads: int | None = None):
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top

    self.torch = torch
    if num_threads:
      torch.set_num_threads(num_threads)
    torch_dtype = getattr(torch, dtype)
    if model == resources.SMOLLM2_NAME or model.endswith(".gguf"):
      path = (resources.smollm2_gguf_path() if model == resources.SMOLLM2_NAME
              else pathlib.Path(model))
      hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch_dtype, local_files_only=True)
    else:
      hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, local_files_only=True)
    self.model = hf.eval()
    self.dtype = dtype
    self.num_threads = torch.get_num_threads()
    self.version = torch.__version__

  def _batch(self, group: list[list[int]], pad_id: int):
    width = max(len(p) for p in group)
    ids = self.torch.full((len(group), width), pad_id, dtype=self.torch.long)
    mask = self.torch.zeros((len(group), width), dtype=self.torch.long)
    for r, p in enumerate(group):  # left padding
      ids[r, width - len(p):] = self.torch.tensor(p)
      mask[r, width - len(p):] = 1
    return ids, mask

  def _generate(self, ids, mask, work: Workload, max_new_tokens: int):
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=work.pad_id)
    if work.ignore_eos:
      kwargs["min_new_tokens"] = max_new_tokens
    else:
      kwargs["eos_token_id"] = work.eos_ids
    with self.torch.inference_mode():
      return self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)

  def run(self, work: Workload, groups: Groups) -> ModeResult:
    result = ModeResult(groups=[])
    start = time.perf_counter()
    self._generate(*self._batch(groups[0], work.pad_id), work, 2)  # warm-up
    logging.info("hf: warm-up %.2f s", time.perf_counter() - start)
    for gi, group in enumerate(groups):
      ids, mask = self._batch(group, work.pad_id)
      wall, out = _median_wall(lambda: self._generate(ids, mask, work, work.max_new_tokens),
                               work.repeats)
      gen = out[:, ids.shape[1]:].tolist()
      rows = []
      for row in gen:
        stop = next((i for i, t in enumerate(row) if t in work.eos_ids), None)
        rows.append(row if work.ignore_eos or stop is None else row[:stop + 1])
      run = GroupRun(tokens=rows, new_tokens=sum(len(r) for r in rows),
                     steps=max(len(gen[0]) - 1, 0), wall_s=wall)
      result.groups.append(run)
      logging.info("hf: batch=%d group %d/%d: %d tokens, %.2f s (%.1f tok/s)", len(group),
                   gi + 1, len(groups), run.new_tokens, wall, run.new_tokens / wall)
    return result


def _first_stop(tokens: list[int], eos_ids: Sequence[int]) -> int:
  return next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))


def compared_length(ours: list[int], hf: list[int], eos_ids: Sequence[int],
                    ignore_eos: bool) -> int:
  """How many leading tokens `same_tokens` compares."""
  if ignore_eos:
    return min(_first_stop(ours, eos_ids), _first_stop(hf, eos_ids))
  return max(len(ours), len(hf))


def same_tokens(ours: list[int], hf: list[int], eos_ids: Sequence[int], ignore_eos: bool) -> bool:
  """Whether two greedy continuations agree.

  With `ignore_eos`, HF is barred from emitting EOS (min_new_tokens) while we
  emit it and go on, so only the tokens before the first EOS are compared.
  """
  if ignore_eos:
    n = compared_length(ours, hf, eos_ids, ignore_eos)
    return ours[:n] == hf[:n]
  return ours == hf


# ----------------------------------------------------------------------------
# Decode-step profile
# ----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames="cfg", donate_argnames="cache")
def _full_step(params, cache, last_b, *, cfg):
  """One AR decode step as in the loop body: forward over the cache + argmax."""
  logits, cache = model_lib.forward(params, cfg, last_b[:, None], cache=cache,
                                    advance=jnp.zeros_like(cache.lengths))
  return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames="cfg")
def _nocache_step(params, last_b, *, cfg):
  """The same step with no cache: each token attends to itself only."""
  logits, _ = model_lib.forward(params, cfg, last_b[:, None])
  return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="cfg")
def _layers_nocache(params, last_b, *, cfg):
  """Embedding + the layer stack, no cache, no LM head."""
  b = last_b.shape[0]
  x, _ = model_lib.run_layers(cfg, params["layers"], model_lib.embed(params, cfg, last_b[:, None]),
                              jnp.zeros((b, 1), jnp.int32), jnp.ones((b, 1, 1), bool))
  return x


@functools.partial(jax.jit, static_argnames="cfg")
def _head(params, x_b1d, *, cfg):
  """Final norm + LM head + argmax."""
  logits = model_lib.lm_logits(params, cfg, model_lib.final_hidden(params, cfg, x_b1d))
  return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg"), donate_argnames="cache")
def _parallel_step(params, cache, tokens_BW, *, cfg, dcfg):
  """A parallel flex step's pass: w clean tokens, w+1 groups, the cache write."""
  anchors = cache.lengths[:, None] - 1 + jnp.arange(tokens_BW.shape[1] + 1)[None]
  logits, h, kv = drafter_lib.mixed_pass(params, cfg, dcfg, tokens_BW, anchors, cache)
  return logits, h, cache.append(kv, jnp.zeros_like(cache.lengths))


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg"), donate_argnames="cache")
def _sequential_step(params, cache, tokens_BW, *, cfg, dcfg):
  """A sequential flex step's passes: the target over w tokens, then 1 token + one group."""
  b, w = tokens_BW.shape
  stay = jnp.zeros_like(cache.lengths)
  logits, kv = model_lib.clean_pass(params["target"], cfg, tokens_BW,
                                    model_lib.next_positions(cache, w),
                                    jnp.broadcast_to(model_lib.causal_mask(w), (b, w, w)), cache)
  cache = cache.append(kv, stay)
  logits2, h, kv = drafter_lib.mixed_pass(params, cfg, dcfg, tokens_BW[:, :1],
                                          cache.lengths[:, None], cache)
  return logits, logits2, h, cache.append(kv, stay)


def calibrate(work: Workload, batch_sizes: Sequence[int],
              runs: int) -> tuple[dict[int, list], dict[str, float]]:
  """({batch: [[parallel ms per verify width], [sequential ...]]}, {mode: tau}): the
  `flex.CostTable`s of these batch sizes (see the module docstring)."""
  m, bs = work.max_new_tokens, work.dcfg.block_size
  width = -(-max(len(p) for p in work.prompt_ids) // PROMPT_BUCKET) * PROMPT_BUCKET
  typical = round(statistics.mean(len(p) for p in work.prompt_ids) + m / 2)
  params = {"target": work.params, "draft": work.draft}
  out = {}
  for b in batch_sizes:
    cache = model_lib.KVCache.zeros(work.cfg, b, width + m + 2 * bs)
    state = {"cache": cache.replace(lengths=jnp.full((b,), typical, jnp.int32))}
    row = []
    for step in (_parallel_step, _sequential_step):
      def call(step=step, tokens=None):
        *res, state["cache"] = step(params, state["cache"], tokens, cfg=work.cfg, dcfg=work.dcfg)
        return res
      row.append([_median_ms(functools.partial(call, tokens=jnp.ones((b, w), jnp.int32)), runs)
                  for w in flex_lib.verify_buckets(bs)])
    logging.info("calibrate: batch %d: parallel %s ms, sequential %s ms", b,
                 *[[round(c, 2) for c in r] for r in row])
    out[b] = row
  # tau is the same for any batch up to the verify width (the widest row's bucket);
  # the smallest batch size is the cheapest to decode.
  groups = _groups(work.prompt_ids, min(batch_sizes))
  once = dataclasses.replace(work, repeats=1, costs={})
  tau = {mode: run_flex(once, groups, mode=mode).extra["tau"] for mode in ("parallel", "sequential")}
  logging.info("calibrate: tau %s", {m: round(t, 3) for m, t in tau.items()})
  return out, tau


@jax.jit
def _noop(x):
  return x + 1


def _median_ms(call: Callable[[], Any], runs: int) -> float:
  jax.block_until_ready(call())  # compile / warm up
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def profile_step(work: Workload, batch: int, runs: int) -> dict[str, Any]:
  """Where one AR decode step's time goes at `batch` rows (medians of `runs` calls).

  Each piece is its own jitted call, so each includes one dispatch (`dispatch_ms`,
  a no-op call), which the steps inside the generate loop do not pay. The
  cache is zeros with every row's length set to the typical mid-generation
  length (mean prompt + max_new_tokens / 2). `attention_over_cache_ms` is
  full step - no-cache step: attention over the cache plus the k/v cache write.
  """
  m = work.max_new_tokens
  longest = max(len(p) for p in work.prompt_ids)
  width = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
  typical = round(statistics.mean(len(p) for p in work.prompt_ids) + m / 2)
  cache = model_lib.KVCache.zeros(work.cfg, batch, width + m)
  cache = cache.replace(lengths=jnp.full((batch,), typical, jnp.int32))
  last = jnp.ones((batch,), jnp.int32)
  cfg, params = work.cfg, work.params
  state = {"cache": cache}

  def full():
    tok, state["cache"] = _full_step(params, state["cache"], last, cfg=cfg)
    return tok, state["cache"]

  x = _layers_nocache(params, last, cfg=cfg)
  out = {
      "batch_size": batch, "cache_length": typical, "cache_capacity": cache.capacity,
      "runs": runs,
      "full_step_ms": _median_ms(full, runs),
      "nocache_step_ms": _median_ms(lambda: _nocache_step(params, last, cfg=cfg), runs),
      "layers_nocache_ms": _median_ms(lambda: _layers_nocache(params, last, cfg=cfg), runs),
      "lm_head_argmax_ms": _median_ms(lambda: _head(params, x, cfg=cfg), runs),
      "dispatch_ms": _median_ms(lambda: _noop(last), runs),
  }
  out["attention_over_cache_ms"] = out["full_step_ms"] - out["nocache_step_ms"]
  out["other_ms"] = out["nocache_step_ms"] - out["layers_nocache_ms"] - out["lm_head_argmax_ms"]
  return out


# ----------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------
def _versions() -> dict[str, str | None]:
  out = {}
  for dist in ("jax", "jaxlib", "flax", "torch", "transformers"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = None
  return out


def _load_avg() -> list[float] | None:
  """1/5/15-minute load averages: other work on the machine skews CPU timings."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def header(opts: Options, cfg: ModelConfig) -> dict[str, Any]:
  uname = platform.uname()
  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  return {
      "machine": {"processor": platform.processor() or _cpu_model(), "cpu_model": _cpu_model(),
                  "uname": f"{uname.system} {uname.release} {uname.machine}",
                  "node": uname.node, "cpu_count": os.cpu_count(), "cpus_usable": affinity},
      "versions": _versions(),
      "python": platform.python_version(),
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "dtype": cfg.dtype,
      "load_avg_start": _load_avg(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": shlex.join(getattr(sys, "orig_argv", [sys.executable] + sys.argv)),
      "settings": dataclasses.asdict(opts),
  }


def _groups(prompt_ids: list[list[int]], b: int) -> Groups:
  n = len(prompt_ids) // b
  if n * b < len(prompt_ids):
    logging.info("batch %d: timing %d group(s), the last %d prompt(s) are left out", b, n,
                 len(prompt_ids) - n * b)
  return [prompt_ids[i * b:(i + 1) * b] for i in range(n)]


# A greedy divergence from AR is a near tie, not a loss of exactness, when AR's
# logits there put the two tokens within this margin, relative to the top logit:
# a k-token pass and a one-token step sum in another order, and bf16 rounds each
# layer's output to 8 mantissa bits (2^-8 = 0.4%), so its ties are wider.
TIE_EPS = {"float32": 1e-4, "bfloat16": 2e-2}


@functools.partial(jax.jit, static_argnames="cfg")
def _logits_at(params, tokens_1T, n, *, cfg):
  """The target's logits at position n - 1 of tokens_1T (right padding is causal-masked)."""
  return model_lib.forward(params, cfg, tokens_1T)[0][0, n - 1]


def check_ties(work: Workload, prompts: list[list[int]], ar_rows: list[list[int]],
               rows: list[list[int]]) -> tuple[int, int]:
  """(near ties, real divergences) over rows that differ from AR's greedy tokens.

  At each row's first differing token j, AR's logits after prompt + ar[:j] are
  recomputed; the row is a near tie if logit[ar_j] - logit[ours_j] is within
  TIE_EPS[dtype] of |top logit| (or 1), else a real divergence.
  """
  eps, ties, real = TIE_EPS.get(work.cfg.dtype, 1e-4), 0, 0
  for prompt, want, got in zip(prompts, ar_rows, rows):
    j = next((i for i, (w, g) in enumerate(zip(want, got)) if w != g), None)
    if j is None:
      real += len(want) != len(got) and not work.ignore_eos  # a stop seen by one side only
      continue
    seq = prompt + want[:j]
    padded = np.zeros((1, -(-len(seq) // PROMPT_BUCKET) * PROMPT_BUCKET), np.int32)
    padded[0, :len(seq)] = seq
    logits = np.asarray(_logits_at(work.params, padded, len(seq), cfg=work.cfg), np.float32)
    margin = (logits[want[j]] - logits[got[j]]) / max(abs(float(logits.max())), 1.0)
    if margin <= eps:
      ties += 1
    else:
      real += 1
      logging.warning("row diverges from AR at token %d with relative margin %.2e > %.0e", j,
                      margin, eps)
  return ties, real


def make_row(mode: str, b: int, ours: ModeResult, hf: ModeResult | None,
             work: Workload, ar: ModeResult, prompts: list[list[int]] | None = None) -> dict[str, Any]:
  """One JSON row; unless it reproduces AR's greedy tokens up to near ties
  (`lossless` false), the speed columns are null."""
  rows, ar_rows = [t for g in ours.groups for t in g.tokens], [t for g in ar.groups for t in g.tokens]
  ties, real = (0, 0) if rows == ar_rows else check_ties(work, prompts, ar_rows, rows)
  lossless = real == 0
  row = {"mode": mode, "batch_size": b, "lossless": lossless, "exact_rows":
         sum(r == a for r, a in zip(rows, ar_rows)), "near_tie_rows": ties,
         "tokens_per_s": ours.tokens_per_s,
         "speedup_vs_ar": ar.wall_s / ours.wall_s if ours.wall_s else None,
         "tau": None, "forward_passes": None, "mean_verify_len": None, "mode_histogram": None,
         "ms_per_step": ours.ms_per_step, "compile_s": ours.compile_s,
         "new_tokens": ours.new_tokens, "steps": ours.steps, "wall_s": ours.wall_s,
         "groups": len(ours.groups), "hf_tokens_per_s": None, "hf_ms_per_step": None,
         "hf_new_tokens": None, "ratio_vs_hf": None, "matches_hf": None, "matches_hf_of": None,
         "matches_hf_tokens": None}
  row.update(ours.extra)
  if hf is not None:
    ours_rows = [t for g in ours.groups for t in g.tokens]
    hf_rows = [t for g in hf.groups for t in g.tokens]
    row.update(hf_tokens_per_s=hf.tokens_per_s, hf_ms_per_step=hf.ms_per_step,
               hf_new_tokens=hf.new_tokens,
               ratio_vs_hf=ours.tokens_per_s / hf.tokens_per_s if hf.tokens_per_s else None,
               matches_hf=sum(same_tokens(o, h, work.eos_ids, work.ignore_eos)
                              for o, h in zip(ours_rows, hf_rows)),
               matches_hf_of=len(ours_rows),
               matches_hf_tokens=sum(compared_length(o, h, work.eos_ids, work.ignore_eos)
                                     for o, h in zip(ours_rows, hf_rows)))
  if not lossless:
    logging.warning("%s at batch %d does not reproduce AR's greedy tokens beyond near ties: "
                    "no speed reported", mode, b)
    row.update(tokens_per_s=None, speedup_vs_ar=None, ms_per_step=None, wall_s=None,
               ratio_vs_hf=None)
  return row


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
  head = (f"{'mode':<11}{'batch':>6}{'tok/s':>9}{'ms/step':>9}{'tau':>6}{'speedup':>8}"
          f"{'lossless':>9}{'compile_s':>10}{'new_tok':>8}"
          f"{'hf_tok/s':>10}{'hf_ms/step':>11}{'ratio':>7}{'matches':>9}")
  lines = [head, "-" * len(head)]
  for r in rows:
    matches = "-" if r["matches_hf"] is None else f"{r['matches_hf']}/{r['matches_hf_of']}"
    lines.append(f"{r['mode']:<11}{r['batch_size']:>6}{_fmt(r['tokens_per_s'], '.1f'):>9}"
                 f"{_fmt(r['ms_per_step'], '.1f'):>9}{_fmt(r.get('tau'), '.2f'):>6}"
                 f"{_fmt(r.get('speedup_vs_ar'), '.2f'):>8}{str(r.get('lossless', '-')):>9}"
                 f"{r['compile_s']:>10.1f}{r['new_tokens']:>8}"
                 f"{_fmt(r['hf_tokens_per_s'], '.1f'):>10}{_fmt(r['hf_ms_per_step'], '.1f'):>11}"
                 f"{_fmt(r['ratio_vs_hf'], '.2f'):>7}{matches:>9}")
  return "\n".join(lines)


def format_profile(entries: list[dict[str, Any]]) -> str:
  keys = ("full_step_ms", "nocache_step_ms", "layers_nocache_ms", "lm_head_argmax_ms",
          "attention_over_cache_ms", "other_ms", "dispatch_ms", "generate_ms_per_step")
  lines = []
  for e in entries:
    lines.append(f"AR step profile, batch {e['batch_size']}, cache length {e['cache_length']} "
                 f"(capacity {e['cache_capacity']}), median of {e['runs']}:")
    lines += [f"  {k:<26}{_fmt(e.get(k), '8.2f')}" for k in keys]
  return "\n".join(lines)


def validate(opts: Options) -> None:
  """Raises app.UsageError for bad settings, before anything slow happens."""
  unknown = [m for m in opts.modes if m not in MODES]
  if unknown or not opts.modes:
    raise app.UsageError(f"unknown --modes {unknown or opts.modes}; known: {', '.join(MODES)}")
  if not opts.batch_sizes or any(b < 1 for b in opts.batch_sizes):
    raise app.UsageError(f"--batch_sizes must be positive integers, got {opts.batch_sizes}")
  if opts.num_prompts < max(opts.batch_sizes):
    raise app.UsageError(f"--num_prompts={opts.num_prompts} is smaller than the largest batch "
                         f"size {max(opts.batch_sizes)}; each batch needs that many prompts")
  if opts.max_new_tokens < 1:
    raise app.UsageError(f"--max_new_tokens must be >= 1, got {opts.max_new_tokens}")
  if opts.hf_num_threads is not None and opts.hf_num_threads < 1:
    raise app.UsageError(f"--hf_num_threads must be >= 1, got {opts.hf_num_threads}")
  if opts.repeats < 1 or opts.profile_runs < 1:
    raise app.UsageError("--repeats and --profile_runs must be >= 1")
  if opts.max_prompt_tokens is not None and opts.max_prompt_tokens < 1:
    raise app.UsageError(f"--max_prompt_tokens must be >= 1, got {opts.max_prompt_tokens}")
  if opts.block_size < 2 or opts.random_drafter_layers < 1:
    raise app.UsageError("--block_size must be >= 2 and --random_drafter_layers >= 1")


def load_drafter(opts: Options, cfg: ModelConfig, params, out_dir: pathlib.Path):
  """(DrafterConfig, draft params, header fields): --drafter, or a random one exported
  to out_dir/random_drafter. Only pld/ar: no draft params, --block_size."""
  if not opts.calibrate and not set(opts.modes) & set(DRAFTED):
    return drafter_lib.DrafterConfig(num_draft_layers=1, block_size=opts.block_size), None, {
        "drafter": None}
  cfg_dict = dataclasses.asdict(cfg)
  fingerprint = checkpoint.target_fingerprint(cfg_dict, params)
  path = opts.drafter
  if path is None:
    dcfg = drafter_lib.DrafterConfig(num_draft_layers=opts.random_drafter_layers,
                                     block_size=opts.block_size)
    try:
      draft = drafter_lib.init_draft(cfg, dcfg, params, jax.random.key(0))
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    path = out_dir / "random_drafter"
    checkpoint.export_drafter(path, jax.device_get(draft), dcfg.to_dict(), cfg_dict, fingerprint,
                              dtype="float32")
    logging.warning("no --drafter: using a random drafter (exported to %s); speculative speeds "
                    "are a lower bound", path)
  try:
    meta, draft = checkpoint.load_drafter(path, cfg_dict, fingerprint, dtype=cfg.param_dtype)
  except (checkpoint.DrafterFileError, checkpoint.DrafterMismatchError) as e:
    raise app.UsageError(str(e)) from None
  dcfg = drafter_lib.DrafterConfig(**meta).validate(cfg)
  if opts.no_calibration:
    draft = {k: v for k, v in draft.items() if k != "calib"}
    dcfg = dataclasses.replace(dcfg, calib_rank=0)
  return dcfg, draft, {"drafter": str(path), "random_drafter": opts.drafter is None,
                       "drafter_config": dcfg.to_dict(), "no_calibration": opts.no_calibration}


def plot_throughput(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
  """tokens/s vs batch size per mode (lossless rows only), as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for mode in dict.fromkeys(r["mode"] for r in rows):
    pts = [(r["batch_size"], r["tokens_per_s"]) for r in rows
           if r["mode"] == mode and r["tokens_per_s"] is not None]
    if pts:
      ax.plot(*zip(*pts), marker="o", label=mode)
  ax.set(xscale="log", xlabel="batch size", ylabel="tokens/s", title="Decoding throughput")
  batches = sorted({r["batch_size"] for r in rows})
  ax.set_xticks(batches, [str(b) for b in batches])
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(opts: Options) -> dict[str, Any]:
  """Runs the benchmark; writes and returns {"header": ..., "rows": [...]}."""
  validate(opts)

  tok = tokenizer_lib.load_tokenizer(opts.model)
  keep = None
  if opts.max_prompt_tokens is not None:
    keep = lambda t: len(tokenizer_lib.chat_prompt_ids(tok, t)) <= opts.max_prompt_tokens
  try:
    texts = prompts_lib.load_prompt_set(opts.prompts, opts.num_prompts, keep)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  if len(texts) < opts.num_prompts:
    raise app.UsageError(f"--prompts={opts.prompts} has only {len(texts)} prompts" + (
        f" of at most {opts.max_prompt_tokens} tokens" if keep else "") +
                         f"; --num_prompts={opts.num_prompts}")
  out_dir = pathlib.Path(opts.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)

  start = time.perf_counter()
  cfg, params = weights.load_model(opts.model, dtype=opts.dtype)
  dcfg, draft, drafter_header = load_drafter(opts, cfg, params, out_dir)
  params = model_lib.decoding_params(params, opts.unroll_layers)
  unroll = isinstance(params["layers"], tuple)
  draft = None if draft is None else drafter_lib.decoding_draft(draft, unroll)
  logging.info("loaded %s (%s, %s layers) in %.1f s", opts.model, cfg.dtype,
               "unrolled" if unroll else "scanned", time.perf_counter() - start)
  eos_ids = tokenizer_lib.stop_token_ids(tok)
  prompt_ids = [tokenizer_lib.chat_prompt_ids(tok, t) for t in texts]
  logging.info("%d prompts from %s, %d..%d tokens", len(prompt_ids), opts.prompts,
               min(map(len, prompt_ids)), max(map(len, prompt_ids)))
  work = Workload(cfg=cfg, params=params, prompt_ids=prompt_ids, eos_ids=eos_ids,
                  stop_ids=[-1] if opts.ignore_eos else eos_ids,
                  pad_id=tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0],
                  max_new_tokens=opts.max_new_tokens, repeats=opts.repeats,
                  ignore_eos=opts.ignore_eos, verify_strategy=opts.verify_strategy, dcfg=dcfg,
                  draft=draft)

  if opts.calibrate:
    step_ms, tau = calibrate(work, opts.batch_sizes, opts.profile_runs)
    head = dict(header(opts, cfg), **drafter_header, load_avg_end=_load_avg())
    flex_lib.save_costs(out_dir / "costs.json", step_ms, tau, dcfg.block_size, head)
    logging.info("wrote %s (verify widths %s)", out_dir / "costs.json",
                 flex_lib.verify_buckets(dcfg.block_size))
    return {"header": head, "step_ms": step_ms, "tau": tau}
  if opts.costs is not None:
    try:
      work.costs = flex_lib.load_costs(opts.costs, dcfg.block_size)
    except ValueError as e:
      raise app.UsageError(str(e)) from None

  hf_ref = None
  if opts.compare_hf:
    if importlib.util.find_spec("torch") is None:
      logging.warning("--compare_hf: torch is not installed; skipping the HF comparison")
    else:
      start = time.perf_counter()
      hf_ref = HfReference(opts.model, cfg.dtype, opts.hf_num_threads)
      logging.info("loaded the HF transformers reference in %.1f s (torch %s, %d threads)",
                   time.perf_counter() - start, hf_ref.version, hf_ref.num_threads)

  result = {"header": header(opts, cfg), "rows": []}
  result["header"].update(unroll_layers=unroll, **drafter_header)
  if hf_ref is not None:
    result["header"]["torch_num_threads"] = hf_ref.num_threads
  for b in opts.batch_sizes:
    groups = _groups(prompt_ids, b)
    ours = {}
    for mode in dict.fromkeys(("ar",) + opts.modes):
      logging.info("%s: batch %d, %d group(s)", mode, b, len(groups))
      ours[mode] = MODES[mode](work, groups)
    hf = None
    if hf_ref is not None:
      logging.info("hf: batch %d, %d group(s)", b, len(groups))
      hf = hf_ref.run(work, groups)
    for mode in opts.modes:
      result["rows"].append(make_row(mode, b, ours[mode], hf, work, ours["ar"],
                                     [p for g in groups for p in g]))
    # Written after every batch size, so a run cut short keeps what it measured.
    result["header"]["load_avg_end"] = _load_avg()
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
  plot_throughput(result["rows"], out_dir / "throughput.png")
  print(format_table(result["rows"]))
  logging.info("wrote %s and %s", out_dir / "bench.json", out_dir / "throughput.png")

  if opts.profile:
    entries = []
    for b in opts.batch_sizes:
      logging.info("profile: batch %d", b)
      entry = profile_step(work, b, opts.profile_runs)
      ar_row = next((r for r in result["rows"] if r["mode"] == "ar" and r["batch_size"] == b),
                    None)
      entry["generate_ms_per_step"] = ar_row["ms_per_step"] if ar_row else None
      entries.append(entry)
    profile = {"header": dict(result["header"], load_avg_end=_load_avg()), "profile": entries}
    (out_dir / "ar_profile.json").write_text(json.dumps(profile, indent=2) + "\n")
    print(format_profile(entries))
    logging.info("wrote %s", out_dir / "ar_profile.json")
    result["profile"] = entries
  return result


def _int_list(name: str, values: Sequence[str]) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise app.UsageError(f"--{name} must be a comma list of integers, got "
                         f"{','.join(values)}") from None


def options_from_flags() -> Options:
  return Options(
      model=_MODEL.value, dtype=None if _DTYPE.value == "auto" else _DTYPE.value,
      unroll_layers=_UNROLL.value,
      prompts=_PROMPTS.value, num_prompts=_NUM_PROMPTS.value, max_new_tokens=_MAX_NEW.value,
      modes=tuple(m.strip() for m in _MODES.value), drafter=_DRAFTER.value,
      random_drafter_layers=_RANDOM_LAYERS.value, block_size=_BLOCK_SIZE.value,
      no_calibration=_NO_CALIB.value,
      verify_strategy=_STRATEGY.value, calibrate=_CALIBRATE.value, costs=_COSTS.value,
      max_prompt_tokens=_MAX_PROMPT.value,
      batch_sizes=_int_list("batch_sizes", _BATCH_SIZES.value), compare_hf=_COMPARE_HF.value,
      hf_num_threads=_HF_THREADS.value, ignore_eos=_IGNORE_EOS.value, out_dir=_OUT_DIR.value,
      profile=_PROFILE.value, profile_runs=_PROFILE_RUNS.value, repeats=_REPEATS.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  run(options_from_flags())


if __name__ == "__main__":
  app.run(main)

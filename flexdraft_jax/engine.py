"""Prompts in, text and stats out: tokenizer + weights + the jitted generate loop.

`Engine` loads a target once and serves batches of prompts. Compilation is done
ahead of time per shape bucket (batch, padded prompt width, cache capacity) and
timed apart from decoding, so tokens/s never includes compile time.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np
import tqdm

from flexdraft_jax import checkpoint
from flexdraft_jax import cost_cache
from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax import flex as flex_lib
from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import planner
from flexdraft_jax import prefill as prefill_lib
from flexdraft_jax import sharding as sharding_lib
from flexdraft_jax import tokenizer as tokenizer_lib
from flexdraft_jax import weights
from flexdraft_jax.sampling import SamplingConfig

PROMPT_BUCKET = 64     # prompts are right-padded to a multiple of this
CAPACITY_BUCKET = 256  # cache capacity is rounded up to a multiple of this


@dataclasses.dataclass
class Stats:
  new_tokens: int = 0
  decode_s: float = 0.0    # wall time of the jitted calls, compile excluded
  compile_s: float = 0.0
  forward_passes: int = 0  # model passes after prefill (flex: prefill included), all batches
  steps: int = 0           # loop iterations (verification steps), all batches
  row_steps: int = 0       # verification steps summed over real rows (the tau denominator)
  modes: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(planner.KINDS, 0))
  compiled: list = dataclasses.field(default_factory=list)  # one line per executable built
  predicted: float = 0.0   # accepted drafts the cost table's acceptance model expected
  observed: int = 0        # ... and accepted (flex steps planned with a table)
  acceptance_by_depth: list = dataclasses.field(default_factory=list)
  widths: dict = dataclasses.field(default_factory=dict)  # verify width (nodes) -> steps
  _tried: np.ndarray | None = None
  _accepted: np.ndarray | None = None

  @property
  def tokens_per_s(self) -> float:
    return self.new_tokens / self.decode_s if self.decode_s else 0.0

  @property
  def calibration_error(self) -> float | None:
    """Accepted drafts the acceptance model expected / observed - 1 (None: no data)."""
    return self.predicted / self.observed - 1 if self.observed else None

  @property
  def tau(self) -> float:
    """Committed tokens per verification step, bonus included (ALGORITHM.md §5)."""
    return self.new_tokens / self.row_steps if self.row_steps else 0.0

  def add_flex(self, fs, real: int) -> None:
    """Adds one batch's `flex_stats.FlexStats` (its first `real` rows are real prompts)."""
    fs = jax.device_get(fs)
    self.forward_passes += int(fs.forward_passes)
    self.steps += int(fs.steps)
    self.row_steps += int(np.sum(fs.row_steps[:real]))
    for kind, n in zip(planner.KINDS, fs.modes):
      self.modes[kind] += int(n)
    self.predicted += float(fs.predicted)
    self.observed += int(fs.observed)
    for w, n in zip(flex_lib.verify_buckets(len(fs.tried)), fs.verify_hist):
      if n:
        self.widths[w] = self.widths.get(w, 0) + int(n)
    self._tried = fs.tried if self._tried is None else self._tried + fs.tried
    self._accepted = fs.accepted if self._accepted is None else self._accepted + fs.accepted
    self.acceptance_by_depth = (self._accepted / np.maximum(self._tried, 1)).round(3).tolist()


@dataclasses.dataclass
class Completion:
  prompt: str
  text: str
  token_ids: list[int]


class Engine:
  """A loaded target model with its tokenizer, ready to generate."""

  def __init__(self, model: str, dtype: str | None = None, chat_template: bool = True,
               unroll_layers: bool | None = None, *, target=None, tokenizer: str | None = None,
               drafter: str | None = None, costs: str | None = "auto", mesh=None,
               prefill_chunk: int | None = None, draft_vocab: int | None = None):
    """`unroll_layers` runs layers from per-layer param trees (default: on CPU
    without the matmul kernel, `model.decoding_params`).

    XLA:CPU copies each layer's weights out of the stacked [L, ...] arrays on
    every scan step (unrolled decoding measured ~3x faster at batch 1); the
    kernel reads packed stacks in place, so with it the layers stay a scan.
    `target=(cfg, params)` serves already loaded (or random) weights, with the
    tokenizer of `tokenizer` (default: `model`'s). `drafter` is an exported
    drafter folder (train.py's `workdir/drafter`); it must have been trained for
    this target (architecture and weights fingerprint are checked). `costs`
    drives the flex planner (`planner`): 'auto' (default) measures each step
    kind's cost on first use of a batch size on this hardware and caches it
    (`cost_cache.table_for`, with the drafter's acceptance.json); a path is a
    table from `python -m flexdraft_jax.bench --calibrate`; 'none' (or None)
    uses the table-less rules (`flex.FLEX_BATCH_THRESHOLD`). `mesh` (a
    `jax.sharding.Mesh` from `sharding.make_mesh`, or its (data, fsdp, tensor)
    shape) shards params, cache and rows by `sharding.decode_shardings`.
    `prefill_chunk` (default `prefill.DEFAULT_CHUNK`) is the most prompt tokens
    a prefill pass takes (`prefill.prefill`); at most the model's max_position.
    `draft_vocab` is the number of tokens drafts are drawn from, the most frequent in
    the drafter's training data (`drafter.restrict_vocab`; default
    `drafter.default_draft_vocab` where the drafter has token_counts.npz, 0: all).
    """
    self.mesh = mesh if mesh is None or isinstance(mesh, jax.sharding.Mesh) else (
        sharding_lib.make_mesh(mesh))
    if self.mesh is not None:
      sharding_lib.check_mesh(self.mesh)
    self.cfg, params = target if target is not None else weights.load_model(model, dtype=dtype)
    self.prefill_chunk = check_prefill_chunk(prefill_chunk, self.cfg.max_position)
    # Sharded decoding keeps the dense layouts (the CPU kernel's packed panels replicate).
    pack = False if self.mesh is not None else None
    self.params = model_lib.decoding_params(params, unroll_layers, pack=pack)
    unroll_layers = isinstance(self.params["layers"], tuple)
    self.dcfg, self.draft, self.draft_vocab, fingerprint = None, None, 0, None
    if drafter is not None:
      folder = checkpoint.drafter_dir(drafter)
      fingerprint = checkpoint.target_fingerprint(dataclasses.asdict(self.cfg), params)
      meta, draft = checkpoint.load_drafter(drafter, dataclasses.asdict(self.cfg), fingerprint,
                                            dtype=self.cfg.param_dtype)
      self.dcfg = drafter_lib.DrafterConfig(**meta).validate(self.cfg)
      draft, self.draft_vocab = with_draft_vocab(draft, params, self.cfg, folder, draft_vocab)
      self.draft = drafter_lib.decoding_draft(draft, unroll_layers, pack=pack)
    if self.mesh is not None:  # placed once, as the executables expect them
      both = {"target": self.params, "draft": self.draft}
      both = jax.device_put(both, sharding_lib.param_shardings(both, self.mesh))
      self.params, self.draft = both["target"], both["draft"]
    self.costs, self._auto_costs, self.setup_key = {}, None, None
    costs = "none" if costs is None else costs
    if self.dcfg is not None:
      acceptance = cost_cache.load_acceptance(folder) if costs == "auto" else None
      self.setup_key = cost_cache.setup_key(self.cfg, fingerprint, self.dcfg,
                                            cost_cache.drafter_digest(folder), unroll_layers,
                                            acceptance and acceptance[1], self.draft_vocab)
      if costs == "auto":
        self._auto_costs = acceptance and (self.setup_key, acceptance[0])
      elif costs != "none":
        self.load_costs(costs)
    elif costs not in ("none", "auto"):
      raise ValueError(f"cost table {costs} given without a drafter")
    self.tokenizer = tokenizer_lib.load_tokenizer(tokenizer or model)
    self.chat_template = chat_template and bool(self.tokenizer.chat_template)
    self.stop_ids = tokenizer_lib.stop_token_ids(self.tokenizer)
    self._compiled = {}

  def load_costs(self, path) -> None:
    """Uses a `bench --calibrate` table; CostTableError unless it was measured for this
    model, drafter, dtype and block size."""
    self.costs = planner.load_tables(path, flex_lib.verify_buckets(self.dcfg.block_size),
                                     cost_cache.identity(self.setup_key))
    self._auto_costs = None
    self._compiled = {}

  def cost_table(self, batch: int) -> planner.CostTable | None:
    """The planner's table at this batch size: given, measured and cached, or None."""
    if batch not in self.costs and self._auto_costs is not None:
      key, acceptance = self._auto_costs
      self.costs[batch] = cost_cache.table_for({"target": self.params, "draft": self.draft},
                                               self.cfg, self.dcfg, batch, key, acceptance)
    return self.costs.get(batch)

  def encode(self, prompt: str) -> list[int]:
    if self.chat_template:
      return tokenizer_lib.chat_prompt_ids(self.tokenizer, prompt)
    return self.tokenizer.encode(prompt)

  def _executable(self, batch, width, capacity, max_new_tokens, sampling, on_token, flex, stats):
    key = (batch, width, capacity, max_new_tokens, sampling, on_token, flex)
    if key in self._compiled:
      return self._compiled[key]
    if flex is None:
      what, compile_ = "ar", lambda: generate_lib.compile_generate(
          self.params, self.cfg, batch, width, capacity, len(self.stop_ids),
          max_new_tokens=max_new_tokens, sampling=sampling, on_token=on_token, mesh=self.mesh,
          prefill_chunk=self.prefill_chunk)
      call = lambda exe: lambda p, c, x, n, s, k: exe(p, c, x, n, s, k)
    else:
      fcfg = dataclasses.replace(flex, max_new_tokens=max_new_tokens, sampling=sampling,
                                 prefill_chunk=self.prefill_chunk)
      costs = flex_lib.table_for_mode(fcfg, self.dcfg.block_size,
                                      self.cost_table(batch))  # measured on first use
      if fcfg.verify_strategy == "expected_throughput" and costs is None:
        raise ValueError(f"verify_strategy 'expected_throughput' needs a cost table with "
                         f"batch size {batch} (bench --calibrate)")
      kinds = flex_lib.compiled_kinds(fcfg, batch, self.dcfg.block_size, costs)
      what = (f"{fcfg.mode}: {'+'.join(planner.KINDS[k] for k in kinds)} "
              f"({'cost table' if costs is not None else 'no cost table'})")
      compile_ = lambda: flex_lib.compile_flex(
          {"target": self.params, "draft": self.draft}, self.cfg, self.dcfg, batch, width,
          capacity, len(self.stop_ids), fcfg=fcfg, costs=costs, on_commit=on_token,
          mesh=self.mesh, kinds=kinds)
      call = lambda exe: lambda p, c, x, n, s, k: exe({"target": p, "draft": self.draft}, c, x, n,
                                                      s, k, costs)
    start = time.perf_counter()
    with cost_cache.CompileCounter() as counter:
      self._compiled[key] = call(compile_())
    took = time.perf_counter() - start
    stats.compile_s += took
    stats.compiled.append(f"{what}, batch {batch}: compile {took:.1f} s, {counter.describe()}")
    return self._compiled[key]

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               on_token: Callable | None = None,
               flex: flex_lib.FlexConfig | None = None,
               prompt_bucket: int = PROMPT_BUCKET,
               stats: Stats | None = None,
               progress: bool = False) -> tuple[list[Completion], Stats]:
    """Generates for all prompts, `batch_size` rows at a time, in batches of similar prompt
    lengths (sorted; results come back in the given order).

    `flex` (needs a drafter) decodes speculatively in its mode; its
    max_new_tokens and sampling are taken from the arguments here. Prompts are
    right-padded to a multiple of `prompt_bucket`, and each padded length
    compiles once: a bucket at the longest prompt length means one compile.
    Pass `stats` to add this call's counts to it (it is also returned).
    `progress` shows a bar over the prompts (with ETA) on stderr.
    """
    if flex is not None and flex.mode != "ar" and self.draft is None:
      raise ValueError(f"mode {flex.mode!r} needs a drafter (Engine(..., drafter=PATH))")
    flex = None if flex is None or flex.mode == "ar" else flex
    stats = Stats() if stats is None else stats
    ids = [self.encode(p) for p in prompts]
    longest = max(len(i) for i in ids)
    if longest + max_new_tokens > self.cfg.max_position:
      raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                       f"exceeds the model's {self.cfg.max_position} positions")
    room = max_new_tokens + (2 * self.dcfg.block_size if flex else 0)
    self._check_prefill_memory(min(batch_size, len(ids)) if self.mesh is None else 0,
                               -(-longest // prompt_bucket) * prompt_bucket)
    # Batches of similar lengths: a batch pads to its longest prompt, so unsorted ragged
    # prompts (ShareGPT: 55 tokens median, 5.9k max) would mostly compute padding. Streaming
    # (`on_token`, row 0 of each batch) keeps the given order.
    order = list(range(len(ids))) if on_token else sorted(range(len(ids)), key=lambda i: len(ids[i]))
    prompts, ids = [prompts[i] for i in order], [ids[i] for i in order]
    key = jax.random.key(seed)
    out = []
    bar = tqdm.tqdm(total=len(ids), unit="prompt", file=sys.stderr, disable=not progress,
                    desc="decode")
    for start in range(0, len(ids), batch_size):
      chunk = ids[start:start + batch_size]
      chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # a short last batch repeats a row
      prompt_bp, lens = generate_lib.pad_prompts(chunk, prompt_bucket)
      capacity = -(-(prompt_bp.shape[1] + room) // CAPACITY_BUCKET) * CAPACITY_BUCKET
      fn = self._executable(batch_size, prompt_bp.shape[1], capacity, max_new_tokens, sampling,
                            on_token, flex, stats)
      zeros = lambda: model_lib.KVCache.zeros(self.cfg, batch_size, capacity)
      cache = zeros() if self.mesh is None else jax.jit(  # allocated sharded
          zeros, out_shardings=sharding_lib.cache_shardings(jax.eval_shape(zeros), self.mesh))()
      stops = generate_lib.stop_matrix(self.stop_ids, batch_size)
      key, sub = jax.random.split(key)
      jax.block_until_ready(cache)
      t0 = time.perf_counter()
      tokens, num_new, steps, _ = jax.block_until_ready(fn(self.params, cache, prompt_bp, lens,
                                                           stops, sub))
      stats.decode_s += time.perf_counter() - t0
      tokens, num_new = np.asarray(tokens), np.asarray(num_new)
      real = min(batch_size, len(prompts) - start)
      if flex:
        stats.add_flex(steps, real)
      else:
        stats.forward_passes += int(steps)
        stats.steps += int(steps)
        stats.row_steps += int(num_new[:real].sum())  # AR: one token per step
      for row, prompt in enumerate(prompts[start:start + batch_size]):
        toks = tokens[row, :num_new[row]].tolist()
        stats.new_tokens += len(toks)
        out.append(Completion(prompt=prompt, text=self.decode(toks), token_ids=toks))
      bar.update(real)
    bar.close()
    unsorted = [None] * len(out)
    for i, completion in zip(order, out):
      unsorted[i] = completion
    return unsorted, stats

  def _check_prefill_memory(self, batch: int, width: int) -> None:
    """ValueError when the prefill's largest buffers would not fit in memory.

    Prompts are prefilled in chunks of C = min(prefill_chunk, width) tokens
    (`prefill`): the peak is the KV cache of the padded prompts plus one chunk's
    f32 attention scores and probabilities, [B, heads, C, C + CACHE_CHUNK]
    (`prefill.scores_bytes`), and its MLP activations; nothing grows with W^2.
    """
    c, cfg = min(self.prefill_chunk, width), self.cfg
    itemsize = cfg.jnp_dtype.itemsize
    cache = 2 * cfg.num_layers * batch * cfg.num_kv_heads * width * cfg.head_dim * itemsize
    chunk = (prefill_lib.scores_bytes(batch, cfg.num_heads, c)
             + 3 * batch * c * cfg.intermediate_size * itemsize)
    need, free = cache + chunk, available_memory()
    if batch and free is not None and need > free:
      raise ValueError(
          f"prompts padded to {width} tokens at batch {batch} need about {need / 2**30:.1f} GiB "
          f"to prefill ({cache / 2**30:.1f} GiB of KV cache, {chunk / 2**20:.0f} MiB per "
          f"{c}-token chunk), more than the {free / 2**30:.1f} GiB available on "
          f"{jax.devices()[0].platform}: lower --prefill_chunk or --batch_size, or skip long "
          f"prompts (decode.py --max_prompt_tokens)")

  def decode(self, token_ids: list[int]) -> str:
    return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def with_draft_vocab(draft, target, cfg, drafter_path, size: int | None):
  """(draft restricted to its draft vocabulary (`drafter.draft_vocab_ids`), that vocabulary's
  size, 0 for all tokens); `target` is the target's params as loaded, `drafter_path` the
  export's folder or its drafter.json."""
  counts = checkpoint.load_token_counts(checkpoint.drafter_dir(drafter_path), cfg.vocab_size)
  ids = drafter_lib.draft_vocab_ids(counts, size, cfg.vocab_size)
  if ids is None:
    return draft, 0
  return drafter_lib.restrict_vocab(draft, target, cfg, ids), int(ids.shape[0])


def check_prefill_chunk(chunk: int | None, max_position: int) -> int:
  """The prefill chunk size to use (None: the default, at most max_position); ValueError for
  one out of range."""
  if chunk is None:
    return min(prefill_lib.DEFAULT_CHUNK, max_position)
  if chunk < 1:
    raise ValueError(f"--prefill_chunk must be >= 1, got {chunk}")
  if chunk > max_position:
    raise ValueError(f"--prefill_chunk={chunk} is above the KV cache capacity: the cache holds "
                     f"at most the model's max_position={max_position} tokens")
  return chunk


def available_memory() -> int | None:
  """Bytes free for new arrays on the default device (host RAM on CPU), or None if unknown."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    try:
      for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
    except OSError:
      return None
    return None
  stats = device.memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


class StreamPrinter:
  """Host callback for streaming: prints row 0's text as its tokens commit.

  Serves the AR loop (`on_token(tokens_B, active_B)`) and the flex loop
  (`on_commit(tokens_BJ, count_B, drafted_B)`); on a tty, tokens that came
  from accepted drafts are shown in colour.
  """
  DRAFT_COLOUR, RESET = "\033[32m", "\033[0m"

  def __init__(self, tokenizer, out=sys.stdout):
    self.tokenizer, self.out = tokenizer, out
    self.colour = hasattr(out, "isatty") and out.isatty()
    self.ids: list[int] = []
    self.printed = 0

  def __call__(self, tokens, counts, drafted=None):
    if drafted is None:  # AR: one token per active row
      if bool(counts[0]):
        self._emit([int(tokens[0])], 0)
      return
    n = int(counts[0])
    if n:
      self._emit([int(t) for t in tokens[0, :n]], int(drafted[0]))

  def _emit(self, new_ids: list[int], num_drafted: int) -> None:
    for i, tok in enumerate(new_ids):
      self.ids.append(tok)
      text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
      if text.endswith("\ufffd"):  # wait for a whole UTF-8 character
        continue
      piece = text[self.printed:]
      if self.colour and i < num_drafted and piece:
        piece = f"{self.DRAFT_COLOUR}{piece}{self.RESET}"
      self.out.write(piece)
      self.printed = len(text)
    self.out.flush()

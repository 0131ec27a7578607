"""The planner's cost model measures itself: step times per (hardware, setup, batch size).

On the first use of a key (device kind, model fingerprint, dtype, drafter
fingerprint, block size, batch size, layer layout, matmul path, jax version)
`table_for` times one loop step of every kind and verify width
(`measure_step_ms`, a few seconds after one compile) and stores the table
under the user cache directory; later uses read it. The acceptance model is
the drafter's (`acceptance.json` beside its weights, written by `bench
--calibrate`): it does not depend on the hardware.

Also here: the persistent XLA compilation cache under the same root, so a
second run of a CLI does not compile again.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

from flexdraft_jax import flex as flex_lib
from flexdraft_jax import flex_stats
from flexdraft_jax import flex_timing
from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import planner

ACCEPTANCE_FILE = "acceptance.json"  # in a drafter folder
CONTEXT = 128         # prompt tokens in the timed cache (attention cost at a typical context)
# Timed rounds (one call of every branch per round, so that load drift hits all alike):
# at least MIN_ROUNDS and MIN_SECONDS in all, at most MAX_ROUNDS.
MIN_ROUNDS, MIN_SECONDS, MAX_ROUNDS = 3, 2.0, 9
_warned: set[str] = set()


def cache_root() -> pathlib.Path:
  """$XDG_CACHE_HOME/flexdraft_jax, or ~/.cache/flexdraft_jax."""
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "flexdraft_jax"


def warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    print(f"flexdraft_jax: {message}", file=sys.stderr)


def _writable_dir(path: pathlib.Path) -> pathlib.Path | None:
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".probe-{os.getpid()}"
    probe.write_text("")
    probe.unlink()
    return path
  except OSError as e:
    warn_once(f"cache directory {path} is not writable ({e.strerror or e}); going on without it")
    return None


def enable_compilation_cache(root: pathlib.Path | None = None,
                             min_compile_s: float = 0.5) -> pathlib.Path | None:
  """Turns on JAX's persistent compilation cache in root/xla (default: cache_root()) for
  programs that take at least `min_compile_s` to compile."""
  path = _writable_dir((root or cache_root()) / "xla")
  if path is not None:
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


class CompileCounter:
  """Counts persistent-cache hits and misses while active (`with CompileCounter() as c`)."""

  def __enter__(self):
    self.hits = self.misses = 0
    self._listener = self._on_event
    jax.monitoring.register_event_listener(self._listener)
    return self

  def _on_event(self, event: str, **_):
    if event == "/jax/compilation_cache/cache_hits":
      self.hits += 1
    elif event == "/jax/compilation_cache/cache_misses":
      self.misses += 1

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_listener(self._listener)

  def describe(self) -> str:
    if not self.hits and not self.misses:
      return "no persistent cache"
    return "persistent cache hit" if not self.misses else "compiled (cache miss)"


# ----------------------------------------------------------------------------
# Keys and acceptance
# ----------------------------------------------------------------------------
def file_digest(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()[:16]


IDENTITY = ("model", "dtype", "drafter", "block_size")  # what an explicit table must match


def setup_key(cfg, target_fingerprint: str, dcfg, drafter_fingerprint: str, unrolled: bool,
              acceptance_digest: str | None = None, draft_vocab: int = 0) -> dict[str, Any]:
  """What a measured step time depends on (the batch size is a key of the table); an
  explicit table (`bench --calibrate`) is checked on the IDENTITY fields only."""
  return {"model": target_fingerprint, "dtype": cfg.dtype, "drafter": drafter_fingerprint,
          "block_size": dcfg.block_size, "device": jax.devices()[0].device_kind,
          "platform": jax.default_backend(), "jax": jax.__version__, "unrolled": unrolled,
          "matmul": _matmul_path(), "acceptance": acceptance_digest,
          "draft_vocab": draft_vocab,  # tokens drafts are drawn from (0: all)
          # How parallel steps run here (tables are measured with FlexConfig's default).
          "parallel_pass": flex_lib.parallel_pass(flex_lib.FlexConfig())}


def identity(key: dict[str, Any]) -> dict[str, Any]:
  return {k: key[k] for k in IDENTITY}


def drafter_digest(drafter_dir) -> str:
  """The digest of a drafter's weights: its export's file, or all of a release's shards."""
  from flexdraft_jax import checkpoint  # pylint: disable=g-import-not-at-top
  files = checkpoint.drafter_weight_files(drafter_dir)
  if len(files) == 1:
    return file_digest(files[0])
  return hashlib.sha256(" ".join(file_digest(f) for f in files).encode()).hexdigest()[:16]


def _matmul_path() -> str:
  """'xla', or the CPU kernel path in use (flexdraft_jax.cpu_matmul, where built) and the
  digest of its library, so that a rebuilt kernel measures its own tables."""
  try:
    from flexdraft_jax import cpu_matmul  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "xla"
  on, why = cpu_matmul._status(cpu_matmul.mode(), jax.default_backend())  # no second notice
  return f"{why} {file_digest(cpu_matmul.library_path())}" if on else why


def load_acceptance(drafter_dir) -> tuple[planner.AcceptanceModel, str] | None:
  """(model, digest) from the drafter's acceptance.json, or None (with a one-line warning)."""
  path = pathlib.Path(drafter_dir) / ACCEPTANCE_FILE
  if not path.is_file():
    warn_once(f"drafter {drafter_dir} has no {ACCEPTANCE_FILE} (measure it with `python -m "
              "flexdraft_jax.bench --calibrate --save_acceptance`): flex uses its table-less rule")
    return None
  try:
    raw = json.loads(path.read_text())
    model = planner.acceptance_from_json(raw["acceptance"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    warn_once(f"{path} cannot be read ({type(e).__name__}: {e}): flex uses its table-less rule")
    return None
  return model, hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------
def measure_step_ms(params, cfg, dcfg, batch: int, *, context: int = CONTEXT,
                    acceptance: planner.AcceptanceModel | None = None,
                    progress=None, min_seconds: float = MIN_SECONDS) -> np.ndarray:
  """[len(KINDS), len(widths)] ms of one loop step per kind and verify width, inf where a
  kind has no step of that width, for `batch` rows at `context` cached tokens.

  Each (kind, width) is its own small program (`flex_timing.timed_step`), timed in rounds that
  alternate it with the ar step, so that load drift cancels in its ratio to ar. With
  `acceptance`, a kind's widths are measured narrowest first and the rest are skipped
  (inf) once even the kind's widest steady state at this cost, tokens / ms, cannot beat
  ar by planner.MARGIN: the costs only grow with the width. On a machine where nothing
  speculative pays, that is a handful of compiles instead of one per branch. Each width
  gets at least MIN_ROUNDS rounds, more until `min_seconds` are spent, at most MAX_ROUNDS.
  """
  bs = dcfg.block_size
  fcfg = flex_lib.FlexConfig(mode="flex", max_new_tokens=2 * bs)
  kinds = tuple(range(len(planner.KINDS)))
  widths = flex_lib.verify_buckets(bs)
  rng = np.random.RandomState(0)
  prompt = rng.randint(0, cfg.vocab_size, (batch, context)).astype(np.int32)
  lens = np.full((batch,), context, np.int32)
  stops = generate_lib.stop_matrix([-1], batch)
  capacity = -(-(context + fcfg.max_new_tokens + 2 * bs) // 128) * 128
  state = flex_timing.prefill_state(params, model_lib.KVCache.zeros(cfg, batch, capacity), prompt,
                                 lens, stops, jax.random.key(0), cfg=cfg, dcfg=dcfg, fcfg=fcfg,
                                 kinds=kinds)
  log = progress or (lambda m: None)

  def call(kind, width):
    nonlocal state
    start = time.perf_counter()
    state = jax.block_until_ready(flex_timing.timed_step(
        params, state, prompt, lens, stops, cfg=cfg, dcfg=dcfg, fcfg=fcfg, kind=kind,
        width=width))
    return time.perf_counter() - start

  call(planner.AR, 1)  # compiles
  ar = [call(planner.AR, 1) for _ in range(MIN_ROUNDS)]
  step_ms = np.full((len(kinds), len(widths)), np.inf)
  step_ms[planner.AR, 0] = 1e3 * statistics.median(ar)
  log(f"ar width 1: {step_ms[planner.AR, 0]:.1f} ms")
  best_ar = 1.0 / step_ms[planner.AR, 0]  # tokens per ms of ar (a certain bonus each step)
  for kind in kinds[1:]:
    for width in planner.kind_widths(kind, widths):
      call(kind, width)  # compiles
      ratios, spent = [], 0.0
      while len(ratios) < MAX_ROUNDS and (len(ratios) < MIN_ROUNDS or spent < min_seconds):
        t_ar, t_k = call(planner.AR, 1), call(kind, width)
        ratios.append(t_k / t_ar)
        spent += t_ar + t_k
      ms = step_ms[planner.AR, 0] * statistics.median(ratios)
      step_ms[kind, widths.index(width)] = ms
      log(f"{planner.KINDS[kind]} width {width}: {ms:.1f} ms")
      if acceptance is not None:
        most = acceptance.stationary_tokens(kind, widths[-1])
        if most / ms < planner.MARGIN * best_ar:
          log(f"{planner.KINDS[kind]}: wider steps cannot beat ar here (at most "
              f"{most:.2f} tokens a step); not measured")
          break
  return planner.monotone_costs(step_ms)


def table_for(params, cfg, dcfg, batch: int, key: dict[str, Any],
              acceptance: planner.AcceptanceModel, root: pathlib.Path | None = None,
              log=None) -> planner.CostTable:
  """The cached table of `key` at this batch size, measured and stored on first use.

  A cache file that is corrupt, stale or for another key is measured again (with a
  one-line warning); an unwritable cache directory only loses the file.
  """
  log = log or (lambda m: print(f"flexdraft_jax: {m}", file=sys.stderr))
  widths = flex_lib.verify_buckets(dcfg.block_size)
  full_key = dict(key, batch=batch)
  digest = hashlib.sha256(json.dumps(full_key, sort_keys=True).encode()).hexdigest()[:20]
  directory = (root or cache_root()) / "costs"
  path = directory / f"{digest}.json"
  if path.is_file():
    try:
      tables = planner.load_tables(path, widths, full_key)
      if batch in tables:
        return planner.CostTable.make(tables[batch].step_ms, acceptance)
      log(f"cost cache {path} has no batch {batch}: measuring again")
    except planner.CostTableError as e:
      log(f"{e}: measuring again")
  log(f"measuring flex step costs at batch {batch} on {jax.devices()[0].device_kind} (first use of this "
      f"setup; a few compiles, then a few seconds)")
  start = time.perf_counter()
  step_ms = measure_step_ms(params, cfg, dcfg, batch, acceptance=acceptance, progress=log)
  took = time.perf_counter() - start
  summary = ", ".join(f"{k} {r[np.isfinite(r)].min():.0f}" for k, r in zip(planner.KINDS, step_ms)
                      if np.isfinite(r).any())
  if _writable_dir(directory) is not None:
    try:
      planner.save_json(path, planner.table_to_json({batch: step_ms}, acceptance, widths,
                                                    full_key, header={"measured_s": took}))
      log(f"measured in {took:.0f} s (fastest step ms: {summary}); stored in {path}")
    except OSError as e:
      warn_once(f"could not write {path} ({e.strerror or e}); the table is used for this run only")
  return planner.CostTable.make(step_ms, acceptance)


def measure_acceptance(params, cfg, dcfg, prompt_ids: list[list[int]], *, batch: int = 4,
                       max_new_tokens: int = 64, stop_ids=(-1,), bucket: int = 64,
                       log=None) -> dict[str, np.ndarray]:
  """Counts {tried, hit} [3, Bs, NUM_BINS] and {depth_tried, depth_hit} [3, Bs] for
  `planner.AcceptanceModel.fit`: the prompts decoded greedily in pld, parallel and
  sequential mode, verifying whole trees (FlexConfig's default, as decoding does), so that
  every node is judged whenever its parent passed."""
  bs = dcfg.block_size
  tried = np.zeros((3, bs, planner.NUM_BINS), np.int64)
  hit = np.zeros_like(tried)
  d_tried, d_hit = np.zeros((3, bs), np.int64), np.zeros((3, bs), np.int64)
  groups = [prompt_ids[i:i + batch] for i in range(0, len(prompt_ids), batch)]
  for mode in ("pld", "parallel", "sequential"):
    fcfg = flex_lib.FlexConfig(mode=mode, verify_strategy="full", max_new_tokens=max_new_tokens)
    compiled = {}
    for gi, group in enumerate(groups):
      group = group + [group[-1]] * (batch - len(group))
      prompt, lens = generate_lib.pad_prompts(group, bucket)
      capacity = prompt.shape[1] + max_new_tokens + 2 * bs
      if prompt.shape[1] not in compiled:
        compiled[prompt.shape[1]] = flex_lib.compile_flex(
            params, cfg, dcfg, batch, prompt.shape[1], capacity, len(stop_ids), fcfg=fcfg)
      out = compiled[prompt.shape[1]](params, model_lib.KVCache.zeros(cfg, batch, capacity),
                                      prompt, lens, generate_lib.stop_matrix(list(stop_ids), batch),
                                      jax.random.key(0), None)
      st = jax.device_get(out[2])
      tried += st.model_tried
      hit += st.model_hit
      d_tried += st.depth_tried
      d_hit += st.depth_hit
      if log:
        log(f"acceptance: {mode} group {gi + 1}/{len(groups)}: tau "
            f"{flex_stats.summarize(st)['tau']:.2f}")
  return {"tried": tried, "hit": hit, "depth_tried": d_tried, "depth_hit": d_hit}


def save_acceptance(path, counts: dict[str, np.ndarray], header: dict[str, Any]) -> None:
  """acceptance.json: the counts (fitted when loaded) and how they were measured."""
  planner.save_json(path, {"format": planner.FORMAT, "sources": list(planner.SOURCES),
                           "acceptance": {k: np.asarray(v).tolist() for k, v in counts.items()},
                           "header": header})

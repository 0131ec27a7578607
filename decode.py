r"""Generates text with a target model: plain AR or FlexDraft speculative decoding.

  python decode.py --prompt="Tell me a joke."          # flex, with the shipped SmolLM2 drafter
  python decode.py --prompts_file=mtbench --num_prompts=3 --batch_size=1 --stream --compare_ar
  python decode.py --prompts_file=questions.jsonl --batch_size=8 --max_new_tokens=256
  python decode.py --drafter=runs/smollm2/drafter --mode=flex --stats --stream --prompt="..."
  python decode.py --drafter=none --prompt="..."       # plain AR decoding
"""
from __future__ import annotations

import math
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging

from flexdraft_jax import cli

_PROMPT = flags.DEFINE_string("prompt", None, "One prompt (a user message).")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "jsonl file (each row has `prompt` (str) or `turns`: the first is "
    "used), or a prompt set: mtbench, sharegpt-heldout, sharegpt-train.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", None, "Use the first n prompts of the file.")
_MAX_PROMPT = flags.DEFINE_integer(
    "max_prompt_tokens", None, "Skip prompts of the file longer than this many tokens (chat "
    "template included); --num_prompts counts the prompts kept. Default: keep all.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Most tokens generated per prompt.")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", None, "Most prompt tokens per prefill pass (prompts longer than this are "
    "prefilled in chunks; lower it if the prefill runs out of memory). Default: 256.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 means greedy decoding.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, in (0, 1].")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k likeliest tokens; 0 disables.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
_BATCH = flags.DEFINE_integer("batch_size", None,
                              "Rows decoded together; default: all prompts, at most 8.")
_MODEL = flags.DEFINE_string(
    "model", "smollm2-135m-instruct",
    "`smollm2-135m-instruct` (bundled GGUF), a .gguf file, or an HF checkpoint folder.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Compute/param dtype; auto = f32 on CPU, bf16 on accelerators.")
_CHAT = flags.DEFINE_bool("chat_template", True, "Apply the model's chat template.")
_STREAM = flags.DEFINE_bool("stream", False, "Print the first row's tokens as they commit "
                            "(accepted drafts in colour on a tty).")
_DRAFTER = flags.DEFINE_string(
    "drafter", "auto", "Exported drafter folder (train.py's workdir/drafter); 'auto' = the "
    "drafter shipped in drafters/ for the default model (none for other models); 'none' = AR.")
_DRAFT_VOCAB = flags.DEFINE_integer(
    "draft_vocab", None, "Tokens the drafts are drawn from: the most frequent in the "
    "drafter's training data (its token_counts.npz). Default: a sixth of the vocabulary "
    "(8192 for SmolLM2) where the drafter has counts; 0 = the whole vocabulary. Verification always "
    "uses the target's whole vocabulary, so the output is the same.", lower_bound=0)
_COMPARE_AR = flags.DEFINE_bool(
    "compare_ar", False, "Also decode the prompts with plain AR and print the speedup measured "
    "in this run: after a warm-up run of each, ar, mode, mode, ar are timed (and, when "
    "greedy, whether the tokens are identical).")
_MODE = flags.DEFINE_enum("mode", None, ["ar", "parallel", "sequential", "flex"],
                          "Decoding mode; default: flex with a drafter, else ar.")
_BLOCK = flags.DEFINE_integer("block_size", None,
                              "Expected drafter block size; an error if the drafter's differs.")
_THRESHOLD = flags.DEFINE_float("verify_threshold", 0.01,
                                "Confidence threshold t of the verify-length rule, in (0, 1].")
_STRATEGY = flags.DEFINE_enum("verify_strategy", "cumulative_product",
                              ["min_confidence", "cumulative_product", "expected_throughput",
                               "full"],
                              "How many drafts to verify per step.")
_TREE_NODES = flags.DEFINE_string(
    "tree_nodes", "auto", "Token trees: the most draft tokens a step verifies, root included. "
    "'auto' = a tree as large as the drafter's block, whose first nodes (the most probable "
    "paths) the planner or --verify_strategy chooses; 1 = chains; N = at most N nodes (a "
    "verify width: 2, 4, 8, ... up to the block size). Not with --mode=ar.")
_COSTS = flags.DEFINE_string(
    "costs", "auto", "The flex planner's cost table: 'auto' = measure each step kind on first "
    "use of a batch size on this machine and cache it (under $XDG_CACHE_HOME/flexdraft_jax); a "
    "costs.json from `python -m flexdraft_jax.bench --calibrate`; 'none' = no table (flex "
    "switches on the active batch size).")
_COMPILE_CACHE = flags.DEFINE_bool(
    "compilation_cache", True, "Keep compiled programs in the persistent XLA cache "
    "($XDG_CACHE_HOME/flexdraft_jax/xla), so the next run does not compile them again.")
_STATS = flags.DEFINE_bool("stats", False, "Print tau, acceptance by depth and the mode histogram.")


def _prompt_sets() -> tuple[str, ...]:
  from flexdraft_jax import prompts as prompts_lib  # no jax import
  return prompts_lib.PROMPT_SETS


def _drafter_path() -> str | None:
  """--drafter resolved: a folder, or None for AR ('none', or 'auto' with another model)."""
  if _DRAFTER.value == "none":
    return None
  if _DRAFTER.value == "auto":
    from flexdraft_jax import resources  # no jax import
    if _MODEL.value != resources.SMOLLM2_NAME:
      return None
    path = resources.shipped_drafter_path()
    return str(path) if (path / "drafter.json").is_file() else None
  return _DRAFTER.value


def _missing(flag: str, value: str, want: str = "file") -> str | None:
  """Why the path `value` of `flag` cannot be read as a `want` ('file' or 'folder'), or None."""
  path = pathlib.Path(value)
  if not value or not path.exists():
    return f"{flag}={value} does not exist"
  if want == "file" and path.is_dir():
    return f"{flag}={value} is a directory, not a file"
  if want == "folder" and not path.is_dir() and path.suffix != ".json":
    return f"{flag}={value} is a file, not a folder (an exported drafter's folder or drafter.json)"
  return None


def _usage_checks(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
    raise app.UsageError("pass exactly one of --prompt or --prompts_file")
  if _PROMPT.value is not None:
    from flexdraft_jax import prompts as prompts_lib  # no jax import
    if not _PROMPT.value.strip():
      raise app.UsageError("--prompt must not be empty")
    if not prompts_lib.is_text(_PROMPT.value):
      raise app.UsageError("--prompt is not valid UTF-8 text")
  if _PROMPTS_FILE.value is not None and _PROMPTS_FILE.value not in _prompt_sets():
    why = _missing("--prompts_file", _PROMPTS_FILE.value)
    if why:
      raise app.UsageError(why + (" (or name a prompt set: " + ", ".join(_prompt_sets()) + ")"
                                  if "does not exist" in why else ""))
    from flexdraft_jax import prompts as prompts_lib  # no jax import
    prompts_lib.jsonl(_PROMPTS_FILE.value)  # PromptFileError before the model loads
  if _MAX_PROMPT.value is not None and (_MAX_PROMPT.value < 1 or _PROMPTS_FILE.value is None):
    raise app.UsageError("--max_prompt_tokens must be >= 1 and needs --prompts_file")
  if _NUM_PROMPTS.value is not None and _NUM_PROMPTS.value < 1:
    raise app.UsageError(f"--num_prompts must be >= 1, got {_NUM_PROMPTS.value}")
  if _PREFILL_CHUNK.value is not None and _PREFILL_CHUNK.value < 1:
    raise app.UsageError(f"--prefill_chunk must be >= 1, got {_PREFILL_CHUNK.value}")
  if _MAX_NEW.value < 1:
    raise app.UsageError(f"--max_new_tokens must be >= 1, got {_MAX_NEW.value}")
  if not (math.isfinite(_TEMPERATURE.value) and _TEMPERATURE.value >= 0):
    raise app.UsageError(f"--temperature must be >= 0 and finite, got {_TEMPERATURE.value}")
  if not 0.0 < _TOP_P.value <= 1.0:
    raise app.UsageError(f"--top_p must be in (0, 1], got {_TOP_P.value}")
  if _TOP_K.value < 0:
    raise app.UsageError(f"--top_k must be >= 0, got {_TOP_K.value}")
  if not 0 <= _SEED.value < 2**32:
    raise app.UsageError(f"--seed must be in [0, 2**32), got {_SEED.value}")
  if _BATCH.value is not None and _BATCH.value < 1:
    raise app.UsageError(f"--batch_size must be >= 1, got {_BATCH.value}")
  if not 0.0 < _THRESHOLD.value <= 1.0:
    raise app.UsageError(f"--verify_threshold must be in (0, 1], got {_THRESHOLD.value}")
  if _drafter_path() is None and _MODE.value not in (None, "ar"):
    raise app.UsageError(f"--mode={_MODE.value} needs --drafter")
  if _COSTS.value not in ("auto", "none") and (why := _missing("--costs", _COSTS.value)):
    raise app.UsageError(f"{why} (or pass auto or none)")
  if _DRAFTER.value not in ("auto", "none") and (why := _missing("--drafter", _DRAFTER.value,
                                                                 "folder")):
    raise app.UsageError(why)
  model = _MODEL.value
  if model != "smollm2-135m-instruct" and not pathlib.Path(model).exists():
    raise app.UsageError(f"--model={model} is neither smollm2-135m-instruct nor an existing "
                         ".gguf file or HF folder")


def _load_prompts(engine) -> list[str]:
  """--prompt, or --prompts_file's first --num_prompts (of at most --max_prompt_tokens)."""
  from flexdraft_jax import prompts as prompts_lib
  if _PROMPT.value is not None:
    return [_PROMPT.value]
  keep = None
  if _MAX_PROMPT.value is not None:
    keep = lambda text: len(engine.encode(text)) <= _MAX_PROMPT.value
  prompts = prompts_lib.load_prompt_set(_PROMPTS_FILE.value, _NUM_PROMPTS.value, keep)
  if not prompts:
    raise app.UsageError(f"no prompt of {_PROMPTS_FILE.value} has at most "
                         f"{_MAX_PROMPT.value} tokens")
  return prompts


def _report(engine, mode: str, batch: int, stats) -> None:
  """The run's one-line summaries on stderr: speed, compiles, the planner's choices."""
  print(f"[{mode} | {stats.new_tokens} new tokens | {stats.tokens_per_s:.1f} tok/s (compile "
        f"excluded) | tau {stats.tau:.2f} | {stats.forward_passes} forward passes | compile "
        f"{stats.compile_s:.1f} s | batch {batch} | {engine.cfg.dtype}]", file=sys.stderr)
  for line in stats.compiled:
    print(f"[{line}]", file=sys.stderr)
  if mode != "ar":
    kinds = " ".join(f"{k} {n}" for k, n in stats.modes.items() if n)
    err = stats.calibration_error
    err = "" if err is None else f" | acceptance model: expected/observed accepted - 1 = {err:+.2f}"
    vocab = (f"{engine.draft_vocab} most frequent tokens" if engine.draft_vocab
             else "all tokens")
    widths = " ".join(f"{w}:{n}" for w, n in sorted(stats.widths.items()))
    print(f"[planner: steps by kind: {kinds} | nodes verified per step (width:steps) {widths} "
          f"| tau {stats.tau:.2f}{err} | drafts from {vocab}]", file=sys.stderr)
  if _STATS.value:
    print(f"[steps {stats.steps} | modes {stats.modes} | acceptance by depth "
          f"{stats.acceptance_by_depth}]", file=sys.stderr)


def main(argv):
  _usage_checks(argv)
  from flexdraft_jax import cost_cache  # after flag checks: imports jax
  from flexdraft_jax import engine as engine_lib
  from flexdraft_jax import flex as flex_lib
  from flexdraft_jax.sampling import SamplingConfig

  if _COMPILE_CACHE.value:
    cost_cache.enable_compilation_cache()
  logging.info("loading %s", _MODEL.value)
  try:
    engine = engine_lib.Engine(_MODEL.value, None if _DTYPE.value == "auto" else _DTYPE.value,
                               chat_template=_CHAT.value, drafter=_drafter_path(),
                               costs=_COSTS.value, prefill_chunk=_PREFILL_CHUNK.value,
                               draft_vocab=_DRAFT_VOCAB.value)
  except ValueError as e:  # Engine's checks of the flags raise plain ValueErrors
    raise app.UsageError(str(e)) from None
  if _TOP_K.value > engine.cfg.vocab_size:
    raise app.UsageError(f"--top_k={_TOP_K.value} is above the vocabulary's "
                         f"{engine.cfg.vocab_size} tokens")
  prompts = _load_prompts(engine)
  batch = _BATCH.value or min(len(prompts), 8)
  if batch > len(prompts):
    raise app.UsageError(f"--batch_size={batch} is larger than the {len(prompts)} prompt(s)")
  sampling = SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  if _BLOCK.value is not None and engine.dcfg and _BLOCK.value != engine.dcfg.block_size:
    raise app.UsageError(f"--block_size={_BLOCK.value} but the drafter was trained with "
                         f"block_size={engine.dcfg.block_size}")
  mode = _MODE.value or ("flex" if engine.dcfg else "ar")
  try:
    flex = flex_lib.FlexConfig(mode=mode, verify_strategy=_STRATEGY.value,
                               verify_threshold=_THRESHOLD.value,
                               tree_nodes=flex_lib.parse_tree_nodes(_TREE_NODES.value))
    if engine.dcfg is not None:
      flex_lib.tree_shape(flex, engine.dcfg.block_size)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  printer = engine_lib.StreamPrinter(engine.tokenizer) if _STREAM.value else None
  # Streaming shows row 0 of each batch; at batch 1 that is every prompt, in turn.
  chunks = ([[p] for p in prompts] if printer and batch == 1 else [prompts])
  results, stats = [], engine_lib.Stats()
  try:
    for chunk in chunks:
      if printer:
        print(f">>> {chunk[0]}\n")
      out, _ = engine.generate(chunk, max_new_tokens=_MAX_NEW.value, batch_size=batch,
                               sampling=sampling, seed=_SEED.value, on_token=printer, flex=flex,
                               stats=stats, progress=printer is None and len(chunk) > batch)
      results += out
      if printer:
        print("\n")
  except ValueError as e:  # e.g. prompt + max_new_tokens beyond the model, no cost table
    raise app.UsageError(str(e)) from None
  for i, r in enumerate(results):
    if not (printer and (batch == 1 or i == 0)):
      print(f">>> {r.prompt}\n{r.text}\n")
  _report(engine, mode, batch, stats)
  if _COMPARE_AR.value and mode != "ar":
    _compare_ar(engine, prompts, results, stats, mode, batch, sampling, flex)


def _compare_ar(engine, prompts, results, stats, mode, batch, sampling, flex) -> None:
  """Speedup over AR as ALGORITHM.md defines it (compile excluded, warm-up first): the
  printed run warmed the mode up and one untimed AR run warms AR up; then ar, mode, mode,
  ar are timed (a steady drift of the machine's speed hits both alike) and their summed
  decode times compared."""
  run = lambda fc: engine.generate(prompts, max_new_tokens=_MAX_NEW.value, batch_size=batch,
                                   sampling=sampling, seed=_SEED.value, flex=fc)
  ar = run(None)[0]  # warm-up
  timed = [run(fc)[1] for fc in (None, flex, flex, None)]
  ar_s = timed[0].decode_s + timed[3].decode_s
  mode_s = timed[1].decode_s + timed[2].decode_s
  same = ""
  if sampling.greedy:
    n_same = sum(a.token_ids == r.token_ids for a, r in zip(ar, results))
    same = f" | greedy tokens identical to AR in {n_same}/{len(ar)} prompts"
  print(f"[ar | {timed[0].new_tokens} new tokens | {2 * timed[0].new_tokens / ar_s:.1f} tok/s | "
        f"{mode} speedup over AR: {ar_s / mode_s:.2f}x (same prompts, this run, after a warm-up "
        f"run of each: ar, {mode}, {mode}, ar; compile excluded){same}]", file=sys.stderr)


_parse_flags, _main = cli.wrap(main, "decode.py")  # tests/cli_runner.py calls these in process

if __name__ == "__main__":
  app.run(_main, flags_parser=_parse_flags)

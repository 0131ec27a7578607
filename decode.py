r"""Generates text with a target model: plain AR or FlexDraft speculative decoding.

  python decode.py --prompt="Tell me a joke."
  python decode.py --prompts_file=questions.jsonl --batch_size=8 --max_new_tokens=256
  python decode.py --drafter=runs/smollm2/drafter --mode=flex --stats --stream --prompt="..."
"""
from __future__ import annotations

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging

_PROMPT = flags.DEFINE_string("prompt", None, "One prompt (a user message).")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "jsonl file; each row has `prompt` (str) or `turns` (first is used).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Most tokens generated per prompt.")
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
_DRAFTER = flags.DEFINE_string("drafter", None, "Exported drafter folder (train.py's workdir/drafter).")
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
_COSTS = flags.DEFINE_string(
    "costs", None, "Cost table from `python -m flexdraft_jax.bench --calibrate` (costs.json); "
    "without one, flex switches on the active batch size.")
_STATS = flags.DEFINE_bool("stats", False, "Print tau, acceptance by depth and the mode histogram.")


def _usage_checks(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
    raise app.UsageError("pass exactly one of --prompt or --prompts_file")
  if _PROMPTS_FILE.value and not pathlib.Path(_PROMPTS_FILE.value).is_file():
    raise app.UsageError(f"--prompts_file={_PROMPTS_FILE.value} does not exist")
  if _MAX_NEW.value < 1:
    raise app.UsageError(f"--max_new_tokens must be >= 1, got {_MAX_NEW.value}")
  if _TEMPERATURE.value < 0:
    raise app.UsageError(f"--temperature must be >= 0, got {_TEMPERATURE.value}")
  if not 0.0 < _TOP_P.value <= 1.0:
    raise app.UsageError(f"--top_p must be in (0, 1], got {_TOP_P.value}")
  if _TOP_K.value < 0:
    raise app.UsageError(f"--top_k must be >= 0, got {_TOP_K.value}")
  if _BATCH.value is not None and _BATCH.value < 1:
    raise app.UsageError(f"--batch_size must be >= 1, got {_BATCH.value}")
  if not 0.0 < _THRESHOLD.value <= 1.0:
    raise app.UsageError(f"--verify_threshold must be in (0, 1], got {_THRESHOLD.value}")
  if _DRAFTER.value is None and _MODE.value not in (None, "ar"):
    raise app.UsageError(f"--mode={_MODE.value} needs --drafter")
  if _COSTS.value is not None and not pathlib.Path(_COSTS.value).is_file():
    raise app.UsageError(f"--costs={_COSTS.value} does not exist")
  if _DRAFTER.value is not None and not pathlib.Path(_DRAFTER.value).exists():
    raise app.UsageError(f"--drafter={_DRAFTER.value} does not exist")
  model = _MODEL.value
  if model != "smollm2-135m-instruct" and not pathlib.Path(model).exists():
    raise app.UsageError(f"--model={model} is neither smollm2-135m-instruct nor an existing "
                         ".gguf file or HF folder")


def main(argv):
  _usage_checks(argv)
  from flexdraft_jax import checkpoint  # after flag checks: imports jax
  from flexdraft_jax import engine as engine_lib
  from flexdraft_jax import flex as flex_lib
  from flexdraft_jax import prompts as prompts_lib
  from flexdraft_jax.sampling import SamplingConfig

  if _PROMPT.value is not None:
    prompts = [_PROMPT.value]
  else:
    try:
      prompts = prompts_lib.jsonl(_PROMPTS_FILE.value)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  batch = _BATCH.value or min(len(prompts), 8)
  if batch > len(prompts):
    raise app.UsageError(f"--batch_size={batch} is larger than the {len(prompts)} prompt(s)")
  sampling = SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)

  logging.info("loading %s", _MODEL.value)
  try:
    engine = engine_lib.Engine(_MODEL.value, None if _DTYPE.value == "auto" else _DTYPE.value,
                               chat_template=_CHAT.value, drafter=_DRAFTER.value,
                               costs=_COSTS.value)
  except (checkpoint.DrafterMismatchError, checkpoint.DrafterFileError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  if _BLOCK.value is not None and engine.dcfg and _BLOCK.value != engine.dcfg.block_size:
    raise app.UsageError(f"--block_size={_BLOCK.value} but the drafter was trained with "
                         f"block_size={engine.dcfg.block_size}")
  mode = _MODE.value or ("flex" if engine.dcfg else "ar")
  flex = flex_lib.FlexConfig(mode=mode, verify_strategy=_STRATEGY.value,
                             verify_threshold=_THRESHOLD.value)
  printer = engine_lib.StreamPrinter(engine.tokenizer) if _STREAM.value else None
  if printer:
    print(f">>> {prompts[0]}\n")
  try:
    results, stats = engine.generate(prompts, max_new_tokens=_MAX_NEW.value, batch_size=batch,
                                     sampling=sampling, seed=_SEED.value, on_token=printer,
                                     flex=flex)
  except ValueError as e:  # e.g. prompt + max_new_tokens beyond the model, no cost table
    raise app.UsageError(str(e)) from None
  for i, r in enumerate(results):
    if printer and i == 0:
      print()
      continue
    print(f">>> {r.prompt}\n{r.text}\n")
  print(f"\n[{mode} | {stats.new_tokens} new tokens | {stats.tokens_per_s:.1f} tok/s (compile "
        f"excluded) | tau {stats.tau:.2f} | {stats.forward_passes} forward passes | compile "
        f"{stats.compile_s:.1f} s | batch {batch} | {engine.cfg.dtype}]", file=sys.stderr)
  if _STATS.value:
    print(f"[steps {stats.steps} | modes {stats.modes} | acceptance by depth "
          f"{stats.acceptance_by_depth}]", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)

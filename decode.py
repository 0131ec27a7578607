r"""Generates text with a target model: the jitted, batched AR loop.

  python decode.py --prompt="Tell me a joke."
  python decode.py --prompts_file=questions.jsonl --batch_size=8 --max_new_tokens=256
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
_STREAM = flags.DEFINE_bool("stream", False, "Print the first row's tokens as they commit.")


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
  model = _MODEL.value
  if model != "smollm2-135m-instruct" and not pathlib.Path(model).exists():
    raise app.UsageError(f"--model={model} is neither smollm2-135m-instruct nor an existing "
                         ".gguf file or HF folder")


def main(argv):
  _usage_checks(argv)
  from flexdraft_jax import engine as engine_lib  # after flag checks: imports jax
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
  engine = engine_lib.Engine(_MODEL.value, None if _DTYPE.value == "auto" else _DTYPE.value,
                             chat_template=_CHAT.value)
  printer = engine_lib.StreamPrinter(engine.tokenizer) if _STREAM.value else None
  if printer:
    print(f">>> {prompts[0]}\n")
  results, stats = engine.generate(prompts, max_new_tokens=_MAX_NEW.value, batch_size=batch,
                                   sampling=sampling, seed=_SEED.value, on_token=printer)
  for i, r in enumerate(results):
    if printer and i == 0:
      print()
      continue
    print(f">>> {r.prompt}\n{r.text}\n")
  print(f"\n[{stats.new_tokens} new tokens | {stats.tokens_per_s:.1f} tok/s (compile excluded) | "
        f"{stats.forward_passes} decode steps | compile {stats.compile_s:.1f} s | "
        f"batch {batch} | {engine.cfg.dtype}]", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)

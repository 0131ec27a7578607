"""Prompt sets, as lists of first user turns: MT-Bench, ShareGPT, jsonl files."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import pathlib
from typing import Callable

from flexdraft_jax import cli
from flexdraft_jax import resources

HELDOUT_PER_10K = 200  # ~2% of ShareGPT conversations are held out
PROMPT_SETS = ("mtbench", "sharegpt-train", "sharegpt-heldout")

_log = logging.getLogger(__name__)


class PromptFileError(cli.UserError, ValueError):
  """A prompt file or set name that cannot be used; the message names it (and the line)."""


class PromptFileNotFound(PromptFileError, FileNotFoundError):
  """A prompt file that does not exist."""


def _limited(prompts: tuple[str, ...] | list[str], limit: int | None) -> list[str]:
  if limit is not None and limit < 0:
    raise PromptFileError(f"limit must be >= 0, got {limit}")
  return list(prompts if limit is None else prompts[:limit])


# ----------------------------------------------------------------------------
# jsonl / MT-Bench
# ----------------------------------------------------------------------------
def jsonl(path: str | pathlib.Path, limit: int | None = None) -> list[str]:
  """Prompts of a jsonl file whose rows have `prompt` (str) or `turns` (first is used)."""
  path = pathlib.Path(path)
  if path.is_dir():
    raise PromptFileError(f"{path} is a directory, not a prompt file")
  if not path.is_file():
    raise PromptFileNotFound(f"prompt file not found: {path}")
  prompts = []
  with path.open("rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the "
                              "line)") from None
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
      prompts.append(_row_prompt(row, f"{path}:{lineno}"))
  if not prompts:
    raise PromptFileError(f"{path}: no prompts (the file is empty)")
  return _limited(prompts, limit)


def _row_prompt(row: object, where: str) -> str:
  if not isinstance(row, dict):
    raise PromptFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
  if "prompt" in row:
    prompt = row["prompt"]
  elif "turns" in row:
    turns = row["turns"]
    if not isinstance(turns, list) or not turns:
      raise PromptFileError(f"{where}: 'turns' must be a non-empty list")
    prompt = turns[0]
  else:
    raise PromptFileError(f"{where}: row has neither 'prompt' nor 'turns' (keys: {sorted(row)})")
  if not isinstance(prompt, str) or not prompt.strip():
    raise PromptFileError(f"{where}: prompt must be a non-empty string, got {prompt!r:.60}")
  if not is_text(prompt):
    raise PromptFileError(f"{where}: the prompt holds a lone surrogate ({prompt!r:.60}), "
                          "which is not text a tokenizer can take")
  return prompt


def is_text(s: str) -> bool:
  """Whether `s` is encodable text (no lone surrogates, as JSON escapes or an argv of
  invalid UTF-8 bytes make)."""
  try:
    s.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


@functools.lru_cache(maxsize=1)
def _mtbench() -> tuple[str, ...]:
  return tuple(jsonl(resources.mtbench_questions_path()))


def mtbench(limit: int | None = None) -> list[str]:
  """First turns of the 80 MT-Bench questions, in file order."""
  return _limited(_mtbench(), limit)


# ----------------------------------------------------------------------------
# ShareGPT
# ----------------------------------------------------------------------------
def _read_json_list(path: pathlib.Path) -> list[object]:
  """A JSON list, element by element; a file cut off mid-list keeps its whole elements.

  The packaged ShareGPT file is truncated (it ends mid-string, with no `]`).
  """
  text = path.read_text(encoding="utf-8")
  decoder, ws = json.JSONDecoder(), json.decoder.WHITESPACE.match
  pos = ws(text, 0).end()
  if text[pos:pos + 1] != "[":
    raise ValueError(f"{path}: expected a JSON list")
  complete = text.rstrip().endswith("]")
  items, pos = [], pos + 1
  while True:
    pos = ws(text, pos).end()
    if pos >= len(text) or text[pos] == "]":
      break
    try:
      item, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      if complete:
        raise ValueError(f"{path}: invalid JSON at char {e.pos} ({e.msg})") from None
      _log.warning("%s is truncated (char %d); using its first %d complete entries.",
                   path, e.pos, len(items))
      break
    items.append(item)
    pos = ws(text, pos).end()
    if text[pos:pos + 1] == ",":
      pos += 1
  return items


def _is_heldout(key: str) -> bool:
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") % 10_000 < HELDOUT_PER_10K


def sharegpt_conversations() -> list[dict]:
  """The ShareGPT entries (`id`, `conversations`), parsed anew on each call."""
  path = resources.sharegpt_json_path()
  convs = _read_json_list(path)
  for i, conv in enumerate(convs):
    if not isinstance(conv, dict) or not isinstance(conv.get("conversations"), list):
      raise ValueError(f"{path}: entry {i} has no 'conversations' list")
  return convs


def _first_exchange(conv: dict) -> tuple[object, object]:
  """The values of the first human turn and of the first gpt turn after it (None if absent)."""
  turns = [m for m in conv["conversations"] if isinstance(m, dict)]
  for i, turn in enumerate(turns):
    if turn.get("from") == "human":
      reply = next((m.get("value") for m in turns[i + 1:] if m.get("from") == "gpt"), None)
      return turn.get("value"), reply
  return None, None


@functools.lru_cache(maxsize=1)
def _sharegpt_splits() -> dict[str, tuple[tuple[str, str | None], ...]]:
  """`{"train": ..., "heldout": ...}` (first human turn, first reply) pairs, in file order."""
  splits = {"train": [], "heldout": []}
  for conv in sharegpt_conversations():
    prompt, reply = _first_exchange(conv)
    if not isinstance(prompt, str) or not prompt.strip():
      continue
    if not isinstance(reply, str) or not reply.strip():
      reply = None
    # Long chats are stored in parts "<id>_0", "<id>_1", ...: keep parts together.
    cid = conv.get("id")
    key = cid.rsplit("_", 1)[0] if isinstance(cid, str) and cid else prompt
    splits["heldout" if _is_heldout(key) else "train"].append((prompt, reply))
  heldout = {p for p, _ in splits["heldout"]}  # the same text under another id stays out of train
  return {"train": tuple((p, r) for p, r in splits["train"] if p not in heldout),
          "heldout": tuple(splits["heldout"])}


def sharegpt_pairs(split: str, limit: int | None = None) -> list[tuple[str, str | None]]:
  """`(first human turn, first gpt reply after it or None)` pairs, as `sharegpt` splits them."""
  if split not in ("train", "heldout"):
    raise ValueError(f"ShareGPT split must be 'train' or 'heldout', got {split!r}")
  return _limited(_sharegpt_splits()[split], limit)


def sharegpt(split: str, limit: int | None = None) -> list[str]:
  """First human turns of ShareGPT conversations; `split` is "train" or "heldout".

  The split is a stable hash of the conversation id, so it is the same in every
  process; no prompt text is in both splits.
  """
  return [prompt for prompt, _ in sharegpt_pairs(split, limit)]


# ----------------------------------------------------------------------------
# By name
# ----------------------------------------------------------------------------
def load_prompt_set(name_or_path: str | pathlib.Path, limit: int | None = None,
                    keep: Callable[[str], bool] | None = None) -> list[str]:
  """Prompts of a named set (see `PROMPT_SETS`) or of a `.jsonl` file: the first
  `limit` of those that pass `keep` (all prompts when it is None)."""
  name = str(name_or_path)
  if keep is not None:
    _limited([], limit)  # checks the limit
    kept, skipped = [], 0
    for prompt in load_prompt_set(name):
      if limit is not None and len(kept) == limit:
        break
      if keep(prompt):
        kept.append(prompt)
      else:
        skipped += 1
    if skipped:
      _log.info("%s: skipped %d prompt(s) that do not pass the filter", name, skipped)
    return kept
  if name == "mtbench":
    return mtbench(limit)
  if name.startswith("sharegpt-") and name in PROMPT_SETS:
    return sharegpt(name.removeprefix("sharegpt-"), limit)
  if name.endswith(".jsonl") or pathlib.Path(name).is_file():
    return jsonl(name, limit)
  if pathlib.Path(name).is_dir():
    raise PromptFileError(f"{name} is a directory, not a prompt file")
  raise PromptFileError(f"unknown prompt set {name!r}: use one of {list(PROMPT_SETS)} "
                        "or a path to a .jsonl file")

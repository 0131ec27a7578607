"""Target-model tokenizers, built from a GGUF's metadata or an HF checkpoint folder.

A GGUF has no `tokenizer.json`: its vocabulary, merges and special ids live in
llama.cpp metadata keys. We rebuild a byte-level BPE `tokenizers.Tokenizer` from
them the way transformers' GGUF converter does (same ids), without torch and
without transformers' GGUF loader, and wrap it in `PreTrainedTokenizerFast`.
"""
from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from flexdraft_jax import gguf_file
from flexdraft_jax import resources

Messages = str | Sequence[str] | Sequence[dict[str, str]]
_log = logging.getLogger(__name__)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
# Split regexes of `tokenizer.ggml.pre` types whose merges were not learned on
# GPT-2's regex (copied from transformers' GGUF converter). Types not listed use
# GPT-2's regex, as transformers does.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {"llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3,
               "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}
_GPT2_REGEX_PRES = {None, "default", "gpt2", "gpt-2", "smollm", "starcoder"}


# ----------------------------------------------------------------------------
# GGUF metadata
# ----------------------------------------------------------------------------
def read_gguf_metadata(path: str | pathlib.Path, prefix: str = "tokenizer.") -> dict[str, Any]:
  """Metadata keys under `prefix` (plus `general.architecture`), no tensor data."""
  return gguf_file.read(path, prefix, tensors=False).metadata


# ----------------------------------------------------------------------------
# Building tokenizers
# ----------------------------------------------------------------------------
def _byte_level_bpe(meta: dict[str, Any], split_digits: bool = False) -> Tokenizer:
  """Byte-level BPE as transformers' GGUF converter (`GPT2Tokenizer`) builds it."""
  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())
  # Tokens outside the byte alphabet are stored as raw text; respell them.
  vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
           for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
  if "tokenizer.ggml.merges" not in meta:
    raise ValueError("the 'gpt2' tokenizer has no tokenizer.ggml.merges")
  merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                             end_of_word_suffix="", fuse_unk=False))
  pre = meta.get("tokenizer.ggml.pre")
  if pre in _PRE_SPLITS:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  elif split_digits:  # what SmolLM2's tokenizer.json and llama.cpp's "smollm" do
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
  else:
    if pre not in _GPT2_REGEX_PRES:
      _log.warning("GGUF tokenizer.ggml.pre=%r is unknown; splitting with GPT-2's regex "
                   "(as transformers does), ids may differ from llama.cpp.", pre)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, ...) are matched whole and are special;
  # user-defined ones are matched whole but not special.
  tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                          for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet])
  tok.add_tokens([AddedToken(t, normalized=False, special=False)
                  for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])
  return tok


_BUILDERS = {"gpt2": _byte_level_bpe}


def load_gguf_tokenizer(path: str | pathlib.Path, *,
                        split_digits: bool = False) -> PreTrainedTokenizerFast:
  """A tokenizer from a GGUF file's metadata (no torch, no transformers GGUF loader).

  By default ids match `AutoTokenizer.from_pretrained(..., gguf_file=...)`. That
  ignores `tokenizer.ggml.pre == "smollm"`, which isolates digits before the
  GPT-2 split; `split_digits=True` restores it (ids then match SmolLM2's own
  tokenizer.json: they differ on whitespace runs before digits, "a  1").
  """
  meta = read_gguf_metadata(path)
  kind = meta.get("tokenizer.ggml.model")
  if kind not in _BUILDERS:
    raise ValueError(f"{path}: unsupported GGUF tokenizer model {kind!r} "
                     f"(tokenizer.ggml.model); supported: {sorted(_BUILDERS)}")
  if "tokenizer.ggml.tokens" not in meta:
    raise ValueError(f"{path}: GGUF has no tokenizer.ggml.tokens")
  try:
    backend = _BUILDERS[kind](meta, split_digits=split_digits)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  tokens = meta["tokenizer.ggml.tokens"]
  specials = {}
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
    token_id = meta.get(f"tokenizer.ggml.{key}")
    if token_id is not None:
      if not 0 <= token_id < len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.{key}={token_id} is outside the vocabulary")
      specials[name] = tokens[token_id]
  return PreTrainedTokenizerFast(
      tokenizer_object=backend, chat_template=meta.get("tokenizer.chat_template"),
      add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
      add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)), **specials)


def load_tokenizer(model: str | pathlib.Path, *,
                   split_digits: bool = False) -> PreTrainedTokenizerFast:
  """Tokenizer for `model`: 'smollm2-135m-instruct', a `.gguf` file or an HF folder.

  `split_digits` applies to GGUF files only (see `load_gguf_tokenizer`).
  """
  if str(model).lower() == resources.SMOLLM2_NAME:
    return load_gguf_tokenizer(resources.smollm2_gguf_path(), split_digits=split_digits)
  path = pathlib.Path(model).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"no tokenizer at {str(model)!r}: expected {resources.SMOLLM2_NAME!r}, "
                            "a .gguf file or an HF checkpoint folder")
  if path.is_file():
    if path.suffix.lower() != ".gguf":
      raise ValueError(f"{path}: a tokenizer file must be a .gguf (or pass the checkpoint folder)")
    return load_gguf_tokenizer(path, split_digits=split_digits)
  # Imported here: `AutoTokenizer` imports torch when it is installed.
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  try:
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot load an HF tokenizer from this folder ({e})") from None
  if not isinstance(tok, PreTrainedTokenizerFast):
    raise ValueError(f"{path}: tokenizer is a {type(tok).__name__}, not a PreTrainedTokenizerFast")
  return tok


# ----------------------------------------------------------------------------
# Prompt helpers
# ----------------------------------------------------------------------------
def _messages(turns_or_text: Messages) -> list[dict[str, str]]:
  if isinstance(turns_or_text, str):
    return [{"role": "user", "content": turns_or_text}]
  turns = list(turns_or_text)
  if all(isinstance(t, str) for t in turns):  # alternate user/assistant, user first
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
  if all(isinstance(t, dict) and {"role", "content"} <= t.keys() for t in turns):
    return turns
  raise TypeError("expected a str, a list of str turns, or a list of {'role', 'content'} dicts")


def chat_prompt_ids(tokenizer: PreTrainedTokenizerFast, turns_or_text: Messages) -> list[int]:
  """Token ids of the chat-templated conversation, ending in the assistant header."""
  if not tokenizer.chat_template:
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
  text = tokenizer.apply_chat_template(_messages(turns_or_text), tokenize=False,
                                       add_generation_prompt=True)
  # The template writes any BOS/special tokens itself, as `apply_chat_template` assumes.
  return tokenizer.encode(text, add_special_tokens=False)


def stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
  """Ids that end generation: EOS, plus `<|im_end|>` when the vocabulary has it."""
  ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
  im_end = tokenizer.get_vocab().get("<|im_end|>")
  if im_end is not None and im_end not in ids:
    ids.append(im_end)
  if not ids:
    raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS or <|im_end|> token")
  return ids

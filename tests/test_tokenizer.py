"""Our GGUF tokenizer vs transformers' GGUF loader, on real ShareGPT text."""
from __future__ import annotations

import json
import os
import pathlib
import random
import re
import subprocess
import sys

import gguf
import pytest

from flexdraft_jax import prompts, resources
from flexdraft_jax import tokenizer as tokenizer_lib

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_ROLES = {"human": "user", "gpt": "assistant"}


@pytest.fixture(scope="module")
def ours():
  return tokenizer_lib.load_tokenizer(resources.SMOLLM2_NAME)


@pytest.fixture(scope="module")
def reference():
  from transformers import AutoTokenizer  # test-only: transformers' own GGUF path (uses torch)
  path = resources.smollm2_gguf_path()
  return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                       local_files_only=True)


@pytest.fixture(scope="module")
def conversations():
  return [c for c in prompts.sharegpt_conversations()[:6000] if c["conversations"]]


@pytest.fixture(scope="module")
def texts(conversations):
  """~1,500 ShareGPT strings: random first human / gpt turns plus hard cases."""
  rng = random.Random(0)
  human = [m["value"] for c in conversations for m in c["conversations"][:1]
           if m["from"] == "human" and m["value"]]
  gpt = [m["value"] for c in conversations for m in c["conversations"]
         if m["from"] == "gpt" and m["value"]]
  picked = rng.sample(human, 600) + rng.sample(gpt, 600)
  pool = human + gpt
  for hard in (_non_ascii, _code, _digits, _whitespace):
    picked += [s for s in pool if hard(s)][:80]
  return [s[:6000] for s in picked]


def _non_ascii(s: str) -> bool:
  return any(ord(c) > 127 for c in s)


def _code(s: str) -> bool:
  return "```" in s or "def " in s or "{\n" in s


def _digits(s: str) -> bool:
  return sum(c.isdigit() for c in s) > 0.1 * len(s) > 3


def _whitespace(s: str) -> bool:
  return bool(re.search(r" {4,}\S|\t|\n\n\n", s))


def _assert_same_ids(got: list[list[int]], want: list[list[int]], texts: list[str]):
  bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
  assert len(got) == len(want) and not bad, (
      f"{len(bad)} of {len(texts)} differ; first: {texts[bad[0]][:200]!r}" if bad else "lengths")


def test_sample_covers_hard_cases(texts):
  assert len(texts) >= 1000
  for hard in (_non_ascii, _code, _digits, _whitespace):
    assert sum(map(hard, texts)) >= 50, hard.__name__


def test_ids_match_transformers_gguf(ours, reference, texts):
  got = ours(texts)["input_ids"]
  _assert_same_ids(got, reference(texts)["input_ids"], texts)
  assert sum(map(len, got)) > 100_000


def test_decode_round_trip(ours, reference, texts):
  ids = ours(texts)["input_ids"]
  decoded = ours.batch_decode(ids)
  assert decoded == texts
  assert decoded == reference.batch_decode(ids)


def test_special_tokens_match(ours, reference):
  assert ours.get_vocab() == reference.get_vocab()
  assert len(ours) == len(reference) == 49152
  for name in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
    assert getattr(ours, name) == getattr(reference, name), name
  assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
  assert sorted(ours.all_special_tokens) == sorted(reference.all_special_tokens)
  assert ours.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
  assert ours.encode("hi") == reference.encode("hi")  # no BOS added: add_bos_token is false
  assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(
      reference.backend_tokenizer.to_str())


def test_chat_template_matches(ours, reference, conversations):
  chats = []
  for c in conversations[:300]:
    msgs = [{"role": _ROLES[m["from"]], "content": m["value"][:3000]}
            for m in c["conversations"][:4] if m["from"] in _ROLES]
    if len(msgs) >= 2:
      chats.append(msgs)
  assert len(chats) >= 100
  for gen in (False, True):
    got = [ours.apply_chat_template(m, tokenize=False, add_generation_prompt=gen) for m in chats]
    assert got == [reference.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)
                   for m in chats]
    ids = [ours.encode(s, add_special_tokens=False) for s in got]
    _assert_same_ids(ids, [reference.encode(s, add_special_tokens=False) for s in got], got)
  # Each message, the default system message and the generation prompt open with <|im_start|>.
  for msgs, row in zip(chats, ids):
    assert row.count(ours.bos_token_id) == len(msgs) + 2


def test_chat_prompt_ids(ours, reference):
  texts = prompts.mtbench()[:10] + ["Hello 123", "  spaced\tout  "]
  for text in texts:
    want = reference.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, return_dict=False)
    got = tokenizer_lib.chat_prompt_ids(ours, text)
    assert got == want
    assert got[-4:] == ours.encode("<|im_start|>assistant\n")
  turns = ["Hi", "Hello! How can I help?", "Name 3 colors."]
  msgs = [{"role": r, "content": t} for r, t in zip(("user", "assistant", "user"), turns)]
  assert tokenizer_lib.chat_prompt_ids(ours, turns) == tokenizer_lib.chat_prompt_ids(ours, msgs)
  with pytest.raises(TypeError):
    tokenizer_lib.chat_prompt_ids(ours, [1, 2])


def test_stop_token_ids(ours, tmp_path):
  assert tokenizer_lib.stop_token_ids(ours) == [2]  # eos is <|im_end|> itself
  ours.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  config["eos_token"] = "<|endoftext|>"
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  assert tokenizer_lib.stop_token_ids(tokenizer_lib.load_tokenizer(tmp_path)) == [0, 2]


def test_hf_folder(ours, tmp_path, texts):
  ours.save_pretrained(tmp_path)
  folder = tokenizer_lib.load_tokenizer(tmp_path)
  assert folder(texts[:200])["input_ids"] == ours(texts[:200])["input_ids"]
  assert folder.chat_template == ours.chat_template
  assert folder.eos_token_id == ours.eos_token_id


def test_split_digits(ours):
  split = tokenizer_lib.load_tokenizer(resources.SMOLLM2_NAME, split_digits=True)
  assert ours.tokenize("a  1") == ["a", "Ġ", "Ġ", "1"]  # transformers: GPT-2 regex only
  assert split.tokenize("a  1") == ["a", "ĠĠ", "1"]  # llama.cpp "smollm" / tokenizer.json
  assert split.encode("Hello 123") == ours.encode("Hello 123")


def _write_gguf(path, model: str, tokens: list[str]):
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model(model)
  writer.add_token_list(tokens)
  writer.add_token_merges(["a b"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_errors(tmp_path):
  _write_gguf(tmp_path / "bert.gguf", "bert", ["a", "b", "ab"])
  with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'"):
    tokenizer_lib.load_tokenizer(tmp_path / "bert.gguf")
  _write_gguf(tmp_path / "tiny.gguf", "gpt2", ["a", "b", "ab"])
  assert tokenizer_lib.load_tokenizer(tmp_path / "tiny.gguf").encode("abab") == [2, 2]
  (tmp_path / "junk.gguf").write_bytes(b"NOPE" + bytes(64))
  with pytest.raises(ValueError, match="not a GGUF file"):
    tokenizer_lib.load_tokenizer(tmp_path / "junk.gguf")
  (tmp_path / "cut.gguf").write_bytes((tmp_path / "tiny.gguf").read_bytes()[:40])
  with pytest.raises(ValueError, match="truncated"):
    tokenizer_lib.load_tokenizer(tmp_path / "cut.gguf")
  with pytest.raises(FileNotFoundError, match="nope"):
    tokenizer_lib.load_tokenizer(tmp_path / "nope")
  (tmp_path / "x.txt").write_text("hi")
  with pytest.raises(ValueError, match=".gguf"):
    tokenizer_lib.load_tokenizer(tmp_path / "x.txt")
  with pytest.raises(ValueError, match="cannot load an HF tokenizer"):
    tokenizer_lib.load_tokenizer(tmp_path)


def test_gguf_path_avoids_torch_and_transformers_gguf():
  code = ("import sys, time; t = time.time()\n"
          "from flexdraft_jax.tokenizer import load_tokenizer\n"
          "tok = load_tokenizer('smollm2-135m-instruct')\n"
          "print(time.time() - t, 'torch' in sys.modules,\n"
          "      any(m.startswith('transformers.integrations.gguf') for m in sys.modules))")
  env = {**os.environ, "PYTHONPATH": str(_ROOT)}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env=env, cwd=_ROOT)
  seconds, torch_loaded, hf_gguf_loaded = out.stdout.split()
  assert (torch_loaded, hf_gguf_loaded) == ("False", "False")
  assert float(seconds) < 20  # ~2 s on 2 CPUs: import + 0.15 s metadata + 0.5 s build

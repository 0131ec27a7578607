"""Prompt sets: MT-Bench, ShareGPT train/held-out, jsonl files."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from flexdraft_jax import prompts

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_DIGEST = ("import hashlib, json\n"
           "from flexdraft_jax import prompts\n"
           "print(hashlib.sha256(json.dumps(prompts.sharegpt('heldout')).encode()).hexdigest())")


def test_mtbench():
  qs = prompts.mtbench()
  assert len(qs) == 80 == len(set(qs))
  assert qs[0].startswith("Compose an engaging travel blog post about a recent trip to Hawaii")
  assert all(isinstance(q, str) and q.strip() for q in qs)
  assert prompts.mtbench(limit=3) == qs[:3]
  assert prompts.load_prompt_set("mtbench") == qs


def test_sharegpt_splits_disjoint():
  train, heldout = prompts.sharegpt("train"), prompts.sharegpt("heldout")
  assert len(train) > 10_000 and len(heldout) > 100
  assert 0.01 < len(heldout) / (len(train) + len(heldout)) < 0.035
  assert not set(train) & set(heldout)
  assert all(p.strip() for p in train + heldout)
  assert prompts.sharegpt("train", limit=5) == train[:5]
  assert prompts.load_prompt_set("sharegpt-heldout", limit=7) == heldout[:7]
  assert prompts.load_prompt_set("sharegpt-train") == train
  with pytest.raises(ValueError, match="'train' or 'heldout'"):
    prompts.sharegpt("test")


def test_sharegpt_first_human_turns():
  convs = prompts.sharegpt_conversations()[:500]
  first = []
  for c in convs:
    human = [m["value"] for m in c["conversations"] if m["from"] == "human"]
    if human and human[0].strip():
      first.append(human[0])
  everything = set(prompts.sharegpt("train")) | set(prompts.sharegpt("heldout"))
  assert first and set(first) <= everything
  # Conversations opening with a gpt turn still give their first human turn.
  assert any(c["conversations"][0]["from"] != "human" for c in convs)


def test_sharegpt_split_is_deterministic_across_processes():
  want = hashlib.sha256(json.dumps(prompts.sharegpt("heldout")).encode()).hexdigest()
  for seed in ("1", "2"):  # a different str-hash seed must not change the split
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(_ROOT)}
    out = subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True,
                         check=True, env=env, cwd=_ROOT)
    assert out.stdout.strip() == want


def test_jsonl(tmp_path):
  path = tmp_path / "p.jsonl"
  rows = [{"prompt": "first"}, {"turns": ["second", "follow-up"]},
          {"prompt": "π ≈ 3.14", "x": 1}]
  path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
  assert prompts.jsonl(path) == ["first", "second", "π ≈ 3.14"]
  assert prompts.jsonl(path, limit=1) == ["first"]
  assert prompts.load_prompt_set(str(path)) == ["first", "second", "π ≈ 3.14"]


@pytest.mark.parametrize("text, match", [
    ('{"prompt": "ok"}\n{"prompt": "a"\n', r"p\.jsonl:2: invalid JSON"),
    ('{"prompt": "ok"}\n\n{"question": "a"}\n', r"p\.jsonl:3: row has neither"),
    ('{"turns": []}\n', r"p\.jsonl:1: 'turns' must be a non-empty list"),
    ('{"prompt": 3}\n', r"p\.jsonl:1: prompt must be a non-empty string"),
    ('["a"]\n', r"p\.jsonl:1: expected a JSON object"),
    ("", r"p\.jsonl: no prompts"),
    ("\n  \n", r"p\.jsonl: no prompts"),
])
def test_jsonl_errors(tmp_path, text, match):
  path = tmp_path / "p.jsonl"
  path.write_text(text)
  with pytest.raises(ValueError, match=match):
    prompts.jsonl(path)


def test_missing_and_unknown(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    prompts.load_prompt_set(tmp_path / "missing.jsonl")
  with pytest.raises(ValueError, match="unknown prompt set 'sharegpt-test'"):
    prompts.load_prompt_set("sharegpt-test")


def test_read_json_list_truncated(tmp_path, caplog):
  items = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"q{i}"}]}
           for i in range(3)]
  full = json.dumps(items, indent=2)
  path = tmp_path / "s.json"
  path.write_text(full)
  assert prompts._read_json_list(path) == items
  path.write_text(full[:full.rindex('"q2"') + 2])  # cut inside the last entry
  with caplog.at_level(logging.WARNING):
    assert prompts._read_json_list(path) == items[:2]
  assert "truncated" in caplog.text
  path.write_text(full.replace('"q1"', "q1"))  # complete file, broken in the middle
  with pytest.raises(ValueError, match="invalid JSON"):
    prompts._read_json_list(path)
  path.write_text('{"a": 1}')
  with pytest.raises(ValueError, match="expected a JSON list"):
    prompts._read_json_list(path)


def test_keep_filters_before_the_limit():
  every = prompts.load_prompt_set("mtbench")
  short = [p for p in every if len(p) < 200]
  assert 3 <= len(short) < len(every)
  assert prompts.load_prompt_set("mtbench", 3, keep=lambda p: len(p) < 200) == short[:3]
  assert prompts.load_prompt_set("mtbench", None, keep=lambda p: len(p) < 200) == short

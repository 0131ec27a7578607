"""decode.py: bad flags give a one-line UsageError; a plain --prompt answers."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _decode(*args, timeout=300):
  return subprocess.run([sys.executable, str(ROOT / "decode.py"), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, reason", [
    ([], "exactly one of --prompt or --prompts_file"),
    (["--prompt=a", "--prompts_file=x.jsonl"], "exactly one of --prompt or --prompts_file"),
    (["--prompts_file=/nonexistent.jsonl"], "does not exist"),
    (["--prompt=a", "--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
    (["--prompt=a", "--temperature=-1"], "--temperature must be >= 0"),
    (["--prompt=a", "--top_p=0"], "--top_p must be in (0, 1]"),
    (["--prompt=a", "--top_k=-2"], "--top_k must be >= 0"),
    (["--prompt=a", "--batch_size=0"], "--batch_size must be >= 1"),
    (["--prompt=a", "--batch_size=2"], "larger than the 1 prompt(s)"),
    (["--prompt=a", "--model=/no/such/model"], "neither smollm2-135m-instruct"),
    (["--prompt=a", "extra"], "unexpected arguments: extra"),
])
def test_bad_flags_are_usage_errors(args, reason):
  r = _decode(*args)
  assert r.returncode != 0
  assert reason in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def test_malformed_prompts_file(tmp_path):
  f = tmp_path / "p.jsonl"
  f.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
  r = _decode(f"--prompts_file={f}")
  assert r.returncode != 0 and "neither 'prompt' nor 'turns'" in r.stderr
  assert "Traceback" not in r.stderr


def test_prompt_alone_answers_with_real_text():
  r = _decode("--prompt=What is the capital of France?", "--max_new_tokens=12")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Paris" in r.stdout
  assert "tok/s (compile excluded)" in r.stderr and "compile" in r.stderr

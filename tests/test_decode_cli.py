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
    (["--prompt=a", "--verify_threshold=0"], "--verify_threshold must be in (0, 1]"),
    (["--prompt=a", "--verify_threshold=1.5"], "--verify_threshold must be in (0, 1]"),
    (["--prompt=a", "--drafter=none", "--mode=flex"], "--mode=flex needs --drafter"),
    (["--prompt=a", "--model=/tmp", "--mode=flex"], "--mode=flex needs --drafter"),  # auto: none
    (["--prompts_file=mtbench", "--num_prompts=0"], "--num_prompts must be >= 1"),
    (["--prompts_file=nosuchset"], "does not exist"),
    (["--prompt=a", "--drafter=/no/such/drafter"], "does not exist"),
    (["--prompt=a", "--max_prompt_tokens=64"], "needs --prompts_file"),
    (["--prompts_file=mtbench", "--max_prompt_tokens=5"], "no prompt of mtbench has at most 5"),
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
  """No flags: flex with the shipped drafter, and --compare_ar checks it against AR."""
  r = _decode("--prompt=What is the capital of France?", "--max_new_tokens=12", "--compare_ar")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Paris" in r.stdout
  assert "[flex |" in r.stderr and "tok/s (compile excluded)" in r.stderr
  assert "speedup over AR" in r.stderr
  assert "greedy tokens identical to AR in 1/1 prompts" in r.stderr, r.stderr[-2000:]


@pytest.fixture(scope="module")
def drafters(tmp_path_factory):
  """A random drafter exported for SmolLM2, and one exported for another target."""
  import dataclasses

  import jax

  from flexdraft_jax import checkpoint, drafter, resources, weights
  cfg, params = weights.load_model(resources.SMOLLM2_NAME, dtype="float32")
  dcfg = drafter.DrafterConfig(num_draft_layers=2, block_size=4, calib_rank=8)
  draft = jax.device_get(drafter.init_draft(cfg, dcfg, params, jax.random.key(0)))
  root = tmp_path_factory.mktemp("drafters")
  arch = dataclasses.asdict(cfg)
  checkpoint.export_drafter(root / "ok", draft, dcfg.to_dict(), arch,
                            checkpoint.target_fingerprint(arch, params))
  checkpoint.export_drafter(root / "other", draft, dcfg.to_dict(), {**arch, "num_layers": 28},
                            "0" * 64)
  return root


def test_drafter_flags(drafters):
  r = _decode("--prompt=a", f"--drafter={drafters}/other")
  assert r.returncode != 0 and "trained for another target" in r.stderr
  assert "num_layers=28, this target has 30" in r.stderr and "Traceback" not in r.stderr
  r = _decode("--prompt=a", f"--drafter={drafters}/ok", "--block_size=16")
  assert r.returncode != 0 and "trained with block_size=4" in r.stderr
  r = _decode("--prompt=What is the capital of France?", "--max_new_tokens=12",
              f"--drafter={drafters}/ok", "--mode=flex", "--stats")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Paris" in r.stdout and "[flex |" in r.stderr and "acceptance by depth" in r.stderr
  r = _decode("--prompt=a", f"--drafter={drafters}/ok", "--verify_strategy=expected_throughput")
  assert r.returncode != 0 and "needs a cost table" in r.stderr and "Traceback" not in r.stderr


def test_cost_table_drives_flex(drafters, tmp_path):
  """A table that makes parallel steps expensive turns flex sequential at batch 1."""
  import json

  from flexdraft_jax import engine, flex, prompts
  widths = flex.verify_buckets(4)
  flex.save_costs(tmp_path / "costs.json", {1: [[100.0] * len(widths), [1.0] * len(widths)]},
                  {"parallel": 1.0, "sequential": 1.0}, block_size=4)
  e = engine.Engine("smollm2-135m-instruct", dtype="float32", drafter=str(drafters / "ok"),
                    costs=str(tmp_path / "costs.json"))
  ps = prompts.mtbench(1)
  ar, _ = e.generate(ps, max_new_tokens=8, batch_size=1)
  out, stats = e.generate(ps, max_new_tokens=8, batch_size=1, flex=flex.FlexConfig(mode="flex"))
  assert out[0].token_ids == ar[0].token_ids
  assert stats.modes["parallel"] == 0 and stats.modes["sequential"] > 0


def test_prefill_that_cannot_fit_is_a_clear_error(monkeypatch):
  """Checked before anything compiles: long prompts x batch against the free memory."""
  from flexdraft_jax import engine
  e = engine.Engine("smollm2-135m-instruct", dtype="float32")
  monkeypatch.setattr(engine, "available_memory", lambda: 2**28)
  with pytest.raises(ValueError, match=r"padded to 2944 tokens at batch 2 need about 1.2 GiB"):
    e.generate(["word " * 2900] * 2, max_new_tokens=4, batch_size=2)

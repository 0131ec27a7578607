"""decode.py: bad flags give a one-line UsageError; a plain --prompt answers.

Every `python decode.py ...` of this module runs in one interpreter
(`cli_runner`, as a fresh process would: same exit code, stdout and stderr),
which loads SmolLM2 once instead of once per call.
"""
import pathlib

import pytest

from cli_runner import CliRunner

ROOT = pathlib.Path(__file__).resolve().parents[1]
_runner: list[CliRunner] = []  # started on first use, closed with the module


@pytest.fixture(scope="module", autouse=True)
def _close_runner():
  yield
  while _runner:
    _runner.pop().close()


def _decode(*args, timeout=300):
  if not _runner or not _runner[0].alive:  # a call that timed out killed it
    _runner[:] = [CliRunner(ROOT / "decode.py")]
  return _runner[0].run(*args, timeout=timeout)


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
    (["--prompt=a", "--costs=/no/such/costs.json"], "--costs=/no/such/costs.json does not exist"),
    (["--prompt=a", "--tree_nodes=0"], "--tree_nodes must be 'auto', 1 (chains) or a positive"),
    (["--prompt=a", "--tree_nodes=-3"], "--tree_nodes must be 'auto', 1 (chains) or a positive"),
    (["--prompt=a", "--tree_nodes=12"], "one of the verify widths (1, 2, 4, 8, 16) of block size 16"),
    (["--prompt=a", "--tree_nodes=64"], "tree_nodes must be 0 (auto), 1 (chains) or a verify width up to 32"),
    (["--prompt=a", "--mode=ar", "--tree_nodes=8"], "token trees (tree_nodes=8) need a drafter's mode"),
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
  """No flags: flex with the shipped drafter (its cost table measured on first use, in the
  session's cache dir), and --compare_ar checks it against AR."""
  r = _decode("--prompt=What is the capital of France?", "--max_new_tokens=12", "--compare_ar",
              timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Paris" in r.stdout
  assert "[flex |" in r.stderr and "tok/s (compile excluded)" in r.stderr
  assert "speedup over AR" in r.stderr
  assert "greedy tokens identical to AR in 1/1 prompts" in r.stderr, r.stderr[-2000:]
  assert "measuring flex step costs at batch 1" in r.stderr and "[planner: steps by kind:" in r.stderr


@pytest.fixture(scope="module")
def drafters(tmp_path_factory, smollm2):
  """A random drafter exported for SmolLM2, and one exported for another target."""
  import dataclasses

  import jax

  from flexdraft_jax import checkpoint, drafter
  cfg, params = smollm2
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
  assert "nodes verified per step (width:steps)" in r.stderr
  r = _decode("--prompt=a", f"--drafter={drafters}/ok", "--verify_strategy=expected_throughput")
  assert r.returncode != 0 and "needs a cost table" in r.stderr and "Traceback" not in r.stderr


def test_cost_table_drives_flex(drafters, tmp_path, smollm2):
  """A table that makes every kind but sequential expensive turns flex sequential at
  batch 1; a table measured for another drafter is refused in one line."""
  import numpy as np

  from flexdraft_jax import cost_cache, engine, flex, planner, prompts
  widths = flex.verify_buckets(4)
  e = engine.Engine("smollm2-135m-instruct", target=smollm2, drafter=str(drafters / "ok"),
                    costs="none")  # target: the session's f32 SmolLM2, not loaded again
  ms = np.full((len(planner.KINDS), len(widths)), 100.0)
  ms[planner.AR], ms[planner.SEQUENTIAL] = 1.0, 1.2  # a step never costs less than ar's
  counts = {"tried": np.zeros((3, 4, planner.NUM_BINS)), "hit": np.zeros((3, 4, planner.NUM_BINS))}
  path = tmp_path / "costs.json"
  planner.save_json(path, planner.table_to_json({1: ms}, counts, widths, e.setup_key))
  other = tmp_path / "other.json"
  planner.save_json(other, planner.table_to_json({1: ms}, counts, widths,
                                                 dict(e.setup_key, drafter="0123")))
  with pytest.raises(planner.CostTableError, match="another setup: drafter"):
    e.load_costs(other)
  e.load_costs(path)
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
  # Chunked prefill: the KV cache (2 x 30 layers x 2 rows x 3 kv heads x 2944 x 64 x f32 =
  # 0.25 GiB) plus one 256-token chunk's scores and MLP activations, no [W, W] term.
  with pytest.raises(ValueError, match=r"padded to 2944 tokens at batch 2 need about 0.3 GiB to "
                                       r"prefill \(0.3 GiB of KV cache, 22 MiB per 256-token "
                                       r"chunk\).* lower --prefill_chunk or --batch_size"):
    e.generate(["word " * 2900] * 2, max_new_tokens=4, batch_size=2)

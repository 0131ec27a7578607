"""`python -m flexdraft_jax.bench`: runs end to end on small settings; flag errors."""
from __future__ import annotations

import json

from absl import app
from absl import flags
from absl.testing import flagsaver
import jax
import numpy as np
import pytest

from flexdraft_jax import cpu_matmul
from flexdraft_jax import flex as flex_lib
from flexdraft_jax import planner
from flexdraft_jax import resources
from flexdraft_jax.bench import driver
from flexdraft_jax.bench import hf_reference
from flexdraft_jax.bench import report
from flexdraft_jax.bench import runners
from flexdraft_jax.bench import ties
from flexdraft_jax.bench import workload

_ROW_KEYS = {"mode", "batch_size", "tokens_per_s", "ms_per_step", "compile_s", "new_tokens",
             "hf_tokens_per_s", "hf_ms_per_step", "ratio_vs_hf", "matches_hf", "tau",
             "speedup_vs_ar", "forward_passes", "mean_verify_len", "mode_histogram", "lossless"}
_HEADER_KEYS = {"machine", "versions", "backend", "dtype", "date", "command"}


def _main(*argv: str) -> None:
  """Runs `driver.main` as `python -m flexdraft_jax.bench *argv` would, flags restored after."""
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    # In-process: no persistent XLA cache (it would stay on for the rest of the session,
    # and a cache write has crashed the suite; see conftest).
    flags.FLAGS(["bench", "--nocompilation_cache", *argv])
    driver.main(["bench"])


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
  path.write_text('{"prompt": "Say hi."}\n{"turns": ["What is 2+2?", "And 3+3?"]}\n'
                  '{"prompt": "Name a color."}\n')
  return path


@pytest.fixture(scope="module")
def tiny_hf_folder(tmp_path_factory):
  """A tiny random Llama saved as an HF folder, with SmolLM2's tokenizer."""
  torch = pytest.importorskip("torch")
  from transformers import LlamaConfig, LlamaForCausalLM

  from flexdraft_jax import tokenizer as tokenizer_lib
  folder = tmp_path_factory.mktemp("tiny_llama")
  tok = tokenizer_lib.load_tokenizer(resources.SMOLLM2_NAME)
  torch.manual_seed(0)
  config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, initializer_range=0.2,
                       tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  LlamaForCausalLM(config).save_pretrained(folder)
  tok.save_pretrained(folder)
  return folder


def _check_rows(rows, batch_sizes, max_new_tokens, num_prompts):
  assert [r["batch_size"] for r in rows] == list(batch_sizes)
  for r in rows:
    assert _ROW_KEYS <= r.keys()
    assert r["mode"] == "ar" and r["lossless"] and r["tau"] == 1.0
    groups = num_prompts // r["batch_size"]
    assert r["groups"] == groups
    # --ignore_eos (default): every row generates exactly max_new_tokens.
    assert r["new_tokens"] == groups * r["batch_size"] * max_new_tokens
    assert r["steps"] == groups * (max_new_tokens - 1)
    assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["compile_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(r["new_tokens"] / r["wall_s"])
    assert r["ms_per_step"] == pytest.approx(1e3 * r["wall_s"] / r["steps"])


def test_bench_tiny_model_vs_hf(tmp_path, tiny_hf_folder, prompt_file):
  """Tiny HF-folder model: our rows, the HF columns, token agreement and the profile."""
  _main(f"--model={tiny_hf_folder}", f"--prompts={prompt_file}", "--num_prompts=2",
        "--batch_sizes=1,2", "--max_new_tokens=4", "--repeats=1", "--compare_hf",
        "--profile", "--profile_runs=3", f"--out_dir={tmp_path}")
  result = json.loads((tmp_path / "bench.json").read_text())
  assert _HEADER_KEYS <= result["header"].keys()
  assert result["header"]["dtype"] == "float32"
  assert result["header"]["machine"]["cpu_count"] >= 1
  assert result["header"]["torch_num_threads"] >= 1
  # The default: unrolled on CPU without the kernel (a scan over packed stacks with it).
  assert result["header"]["unroll_layers"] == (jax.default_backend() == "cpu"
                                               and not cpu_matmul.enabled())
  rows = result["rows"]
  _check_rows(rows, (1, 2), 4, 2)
  for r in rows:
    assert r["hf_new_tokens"] == r["new_tokens"]
    assert r["hf_tokens_per_s"] > 0 and r["hf_ms_per_step"] > 0
    assert r["ratio_vs_hf"] == pytest.approx(r["tokens_per_s"] / r["hf_tokens_per_s"])
  b1 = rows[0]
  assert (b1["matches_hf"], b1["matches_hf_of"]) == (2, 2)  # same greedy tokens as HF
  assert 0 < b1["matches_hf_tokens"] <= 2 * 4
  profile = json.loads((tmp_path / "ar_profile.json").read_text())["profile"]
  assert [p["batch_size"] for p in profile] == [1, 2]
  for p in profile:
    for key in ("full_step_ms", "nocache_step_ms", "layers_nocache_ms", "lm_head_argmax_ms"):
      assert p[key] > 0
    assert p["attention_over_cache_ms"] == pytest.approx(p["full_step_ms"] - p["nocache_step_ms"])


def test_bench_smollm2_small(tmp_path, prompt_file):
  """The real default model on small settings, no HF comparison.

  Scanned layers, explicitly (the CPU default where the kernel is built; unrolled
  without it): they compile in a few seconds whatever the depth.
  """
  _main(f"--prompts={prompt_file}", "--num_prompts=2", "--batch_sizes=1,2",
        "--max_new_tokens=4", "--compare_hf=false", "--repeats=1", "--unroll_layers=false",
        f"--out_dir={tmp_path}")
  result = json.loads((tmp_path / "bench.json").read_text())
  assert result["header"]["settings"]["model"] == resources.SMOLLM2_NAME
  assert result["header"]["unroll_layers"] is False
  _check_rows(result["rows"], (1, 2), 4, 2)
  assert all(r["hf_tokens_per_s"] is None and r["matches_hf"] is None for r in result["rows"])
  assert not (tmp_path / "ar_profile.json").exists()
  assert (tmp_path / "throughput.png").stat().st_size > 0


_TINY_SPEC = ("--prompts={}", "--num_prompts=2", "--batch_sizes=1", "--max_new_tokens=8",
              "--compare_hf=false", "--repeats=1", "--random_drafter_layers=1", "--block_size=4")


def test_bench_speculative_modes(tmp_path, tiny_hf_folder, prompt_file, monkeypatch):
  """ar, parallel and pld on a tiny model with a random drafter: lossless, stats, the plot.
  'sequential' is faked to return wrong tokens: lossless=false, no speed."""
  def lossy(work, groups):  # a runner (bench.runners): one timed call per group
    for _ in groups:
      yield lambda: 0
    return workload.ModeResult(groups=[workload.GroupRun(tokens=[[0] * 8] * len(g), new_tokens=8 * len(g),
                                                   steps=8, wall_s=1.0) for g in groups])

  monkeypatch.setitem(runners.MODES, "sequential", lossy)
  _main(f"--model={tiny_hf_folder}", f"--prompts={prompt_file}", "--num_prompts=2",
        "--batch_sizes=1", "--max_new_tokens=8", "--compare_hf=false", "--repeats=1",
        "--random_drafter_layers=1", "--block_size=4",
        "--verify_strategy=full", "--modes=parallel,parallel@1,pld,ar,sequential",
        f"--out_dir={tmp_path}")
  result = json.loads((tmp_path / "bench.json").read_text())
  assert result["header"]["random_drafter"] is True
  assert result["header"]["drafter"] == str(tmp_path / "random_drafter")
  assert (tmp_path / "random_drafter").is_dir()
  rows = {r["mode"]: r for r in result["rows"]}
  assert [r["mode"] for r in result["rows"]] == ["parallel", "parallel@1", "pld", "ar", "sequential"]
  assert rows["parallel"]["tree_nodes"] == 4 and rows["parallel@1"]["tree_nodes"] == 1  # chains
  for mode in ("parallel", "parallel@1", "pld", "ar"):
    r = rows[mode]
    assert _ROW_KEYS <= r.keys() and r["lossless"] is True, mode
    assert r["new_tokens"] == 2 * 8 and r["tokens_per_s"] > 0
    assert r["speedup_vs_ar"] == pytest.approx(rows["ar"]["wall_s"] / r["wall_s"])
  assert rows["ar"]["speedup_vs_ar"] == pytest.approx(1.0)
  assert rows["ar"]["mean_verify_len"] is None and rows["ar"]["forward_passes"] == 2 * 8
  for mode in ("parallel", "parallel@1", "pld"):
    r = rows[mode]
    assert r["tau"] >= 1.0 and r["mean_verify_len"] == 4  # 'full': every step verifies 4
    assert r["mode_histogram"][mode.split("@")[0]] == r["steps"] and sum(r["mode_histogram"].values()) == r["steps"]
    assert r["forward_passes"] == r["steps"] + 2  # one pass a step, plus a prefill per group
  seq = rows["sequential"]
  assert seq["lossless"] is False and _ROW_KEYS <= seq.keys()
  assert seq["tokens_per_s"] is None and seq["speedup_vs_ar"] is None
  assert seq["ms_per_step"] is None and seq["wall_s"] is None
  assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"


def test_calibrate_then_flex_with_the_table(tmp_path, tiny_hf_folder, prompt_file):
  """--calibrate writes the cost table (step ms per kind, verify width and batch; the
  acceptance counts); --costs hands it to the speculative modes, and flex compiles the
  kinds `flex.compiled_kinds` keeps."""
  common = (f"--model={tiny_hf_folder}", f"--prompts={prompt_file}", "--num_prompts=2",
            "--batch_sizes=1", "--max_new_tokens=8", "--random_drafter_layers=1", "--block_size=4")
  # The calibration-MLP ablation: the drafter runs without it (a drafter of its own).
  common += ("--no_calibration",)
  _main(*common, "--calibrate", f"--out_dir={tmp_path / 'cal'}")
  path = tmp_path / "cal" / "costs.json"
  raw = json.loads(path.read_text())
  assert raw["verify_widths"] == [1, 2, 4] and list(raw["step_ms"]) == ["1"]
  assert raw["kinds"] == list(planner.KINDS) and raw["format"] == planner.FORMAT
  ar, pld, par, seq = raw["step_ms"]["1"]
  assert ar[0] > 0 and ar[1:] == [None, None] and pld[0] is None and min(pld[1:]) > 0
  assert len(par) == len(seq) == 3 and min(par + seq) > 0
  tried = np.asarray(raw["acceptance"]["tried"])
  assert tried.shape == (3, 4, planner.NUM_BINS) and (tried.sum((1, 2)) > 0).all()  # each source
  assert (tmp_path / "cal" / "acceptance.json").is_file()
  assert raw["header"]["settings"]["calibrate"] is True
  assert not (tmp_path / "cal" / "bench.json").exists()
  _main(*common, "--modes=flex", f"--costs={path}", "--compare_hf=false", "--repeats=1",
        f"--out_dir={tmp_path / 'run'}")
  result = json.loads((tmp_path / "run" / "bench.json").read_text())
  assert result["header"]["no_calibration"] is True
  assert result["header"]["drafter_config"]["calib_rank"] == 0
  row = result["rows"][0]
  assert row["lossless"] and row["cost_table"] is True
  table = planner.load_tables(path, (1, 2, 4))[1]
  kinds = flex_lib.compiled_kinds(flex_lib.FlexConfig(), 1, 4, table)
  assert row["compiled_kinds"] == [planner.KINDS[k] for k in kinds]
  assert row["calibration_error"] is None or row["calibration_error"] > -1
  with pytest.raises(app.UsageError, match=r"--modes=parallel@8: tree_nodes must be .* verify "
                                           r"widths \(1, 2, 4\) of block size 4"):
    _main(*common, "--modes=parallel@8", "--compare_hf=false", f"--out_dir={tmp_path / 'run'}")
  with pytest.raises(app.UsageError, match="another setup: .*block_size: 4 \\(table\\) vs 8"):
    _main(*common[:-2], "--block_size=8", "--no_calibration", "--modes=flex", f"--costs={path}",
          f"--out_dir={tmp_path / 'run'}")


@pytest.mark.parametrize("argv, message", [
    (("--num_prompts=2", "--batch_sizes=1,4"), "smaller than the largest batch size 4"),
    (("--modes=ar,warp",), "unknown --modes"),
    (("--modes=ar@4",), "token trees \\(@N\\) need one of parallel, sequential, flex"),
    (("--modes=parallel@0",), "--tree_nodes must be 'auto', 1 \\(chains\\)"),
    (("--batch_sizes=1,x",), "comma list of integers"),
    (("--batch_sizes=0",), "positive integers"),
    (("--max_new_tokens=0",), "--max_new_tokens"),
    (("--hf_num_threads=0",), "--hf_num_threads"),
])
def test_usage_errors(tmp_path, argv, message):
  with pytest.raises(app.UsageError, match=message):
    _main(*argv, "--compare_hf=false", f"--out_dir={tmp_path}")
  assert not (tmp_path / "bench.json").exists()


def test_too_few_prompts_in_file(tmp_path, prompt_file):
  with pytest.raises(app.UsageError, match="has only 3 prompts"):
    _main(f"--prompts={prompt_file}", "--num_prompts=5", "--batch_sizes=1",
          "--compare_hf=false", f"--out_dir={tmp_path}")


def test_format_table():
  row = {"mode": "ar", "batch_size": 8, "tokens_per_s": 12.5, "ms_per_step": 80.0, "tau": 1.0,
         "speedup_vs_ar": 1.0, "lossless": True,
         "compile_s": 6.0, "new_tokens": 512, "hf_tokens_per_s": None, "hf_ms_per_step": None,
         "ratio_vs_hf": None, "matches_hf": None, "matches_hf_of": None}
  lines = report.format_table([row]).splitlines()
  assert lines[0].split()[:3] == ["mode", "batch", "tok/s"]
  assert lines[2].split() == ["ar", "8", "12.5", "80.0", "1.00", "1.00", "True", "6.0", "512",
                              "-", "-", "-", "-"]
  lossy = dict(row, mode="pld", tokens_per_s=None, ms_per_step=None, speedup_vs_ar=None,
               lossless=False, tau=2.5)
  assert report.format_table([lossy]).splitlines()[2].split()[:7] == [
      "pld", "8", "-", "-", "2.50", "-", "False"]


def test_same_tokens_ignore_eos():
  eos = [2]
  assert hf_reference.same_tokens([5, 6, 2, 9], [5, 6, 7, 8], eos, ignore_eos=True)
  assert not hf_reference.same_tokens([5, 6, 2, 9], [5, 7, 7, 8], eos, ignore_eos=True)
  assert hf_reference.same_tokens([5, 6], [5, 6], eos, ignore_eos=False)
  assert not hf_reference.same_tokens([5, 6, 2], [5, 6, 7], eos, ignore_eos=False)
  assert hf_reference.compared_length([5, 6, 2, 9], [5, 6, 7, 8], eos, ignore_eos=True) == 2
  assert hf_reference.compared_length([5, 6, 7], [5, 6, 7], eos, ignore_eos=True) == 3


def test_check_ties_separates_near_ties_from_real_divergences(monkeypatch):
  """A changed token with a large AR logit margin is a real divergence; within eps, a tie."""
  import numpy as np
  from conftest import random_params
  from flexdraft_jax import model as model_lib
  from flexdraft_jax.model_config import ModelConfig
  cfg = ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
  params = random_params(cfg, seed=3)
  prompt, ar = [1, 2, 3], []
  for _ in range(4):  # AR greedy by full forwards
    logits = np.asarray(model_lib.forward(params, cfg, jax.numpy.array([prompt + ar]))[0][0, -1])
    ar.append(int(logits.argmax()))
  logits = np.asarray(model_lib.forward(params, cfg, jax.numpy.array([prompt + ar[:2]]))[0][0, -1])
  worst = int(logits.argmin())
  work = workload.Workload(cfg=cfg, params=params, prompt_ids=[prompt], eos_ids=[0], stop_ids=[-1],
                        pad_id=0, max_new_tokens=4, repeats=1, ignore_eos=True)
  assert ties.check_ties(work, [prompt], [ar], [ar]) == (0, 0)
  wrong = ar[:2] + [worst, 5]
  assert ties.check_ties(work, [prompt], [ar], [wrong]) == (0, 1)
  monkeypatch.setitem(ties.TIE_EPS, "float32", 1e9)  # every margin is "within eps" now
  assert ties.check_ties(work, [prompt], [ar], [wrong]) == (1, 0)


def test_groups_by_length_are_longest_first_and_leave_out_the_shortest():
  from flexdraft_jax.bench.workload import make_groups
  ids = [[0] * n for n in (3, 9, 1, 7, 5)]
  assert [[len(r) for r in g] for g in make_groups(ids, 2)] == [[3, 9], [1, 7]]
  assert [[len(r) for r in g] for g in make_groups(ids, 2, by_length=True)] == [[9, 7], [5, 3]]


def test_time_interleaved_rounds_alternate_the_mode_order():
  """Every round calls each mode's group once, forward then reversed; each runner gets its
  last output and median wall back per group and returns its result."""
  order = []

  def runner(name, groups):
    got = []
    for g in range(groups):
      out, wall = yield lambda g=g: order.append((name, g)) or (name, g)
      assert out == (name, g) and wall >= 0.0
      got.append(g)
    return got

  results = runners.time_interleaved({m: runner(m, 2) for m in ("a", "b", "c")}, repeats=3)
  assert results == {"a": [0, 1], "b": [0, 1], "c": [0, 1]}
  fwd, rev = ["a", "b", "c"], ["c", "b", "a"]
  assert [m for m, _ in order] == (fwd + rev + fwd) * 2
  assert [g for _, g in order] == [0] * 9 + [1] * 9

"""The flex planner's model: acceptance fit, cost table files, the self-measuring cache."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from flexdraft_jax import cost_cache
from flexdraft_jax import drafter
from flexdraft_jax import flex
from flexdraft_jax import model as model_lib
from flexdraft_jax import planner
from flexdraft_jax import speculation


BS = 4
WIDTHS = flex.verify_buckets(BS)
KEY = {"model": "m1", "dtype": "float32", "drafter": "d1", "block_size": BS}


def test_acceptance_fit_is_monotone_in_confidence_and_fills_gaps():
  tried = np.zeros((3, BS, planner.NUM_BINS))
  hit = np.zeros_like(tried)
  # Parallel drafts, depth 1: confident ones pass more often, but bin 7 is noisy (0/4).
  tried[1, 1, [2, 5, 7, 9]] = [100, 100, 4, 100]
  hit[1, 1, [2, 5, 7, 9]] = [10, 50, 0, 90]
  model = planner.AcceptanceModel.fit(tried, hit)
  a = np.asarray(model.alpha[1, 1])
  assert np.all(np.diff(a) >= -1e-7), a                    # isotonic in the bins
  assert a[9] > 0.85 and a[2] < 0.15
  assert a[7] >= a[5] - 1e-6                               # pooled, not a dip to ~0
  np.testing.assert_allclose(model.alpha_bar[1, 1], (150 + 2 * 0.5) / (304 + 2), rtol=1e-5)
  assert model.alpha_bar[1, 2] == pytest.approx(model.alpha_bar[1, 1])  # untried: inherited


def test_expected_tokens_follow_the_formula():
  acc = planner.AcceptanceModel(alpha=np.full((3, BS, planner.NUM_BINS), 0.5, np.float32),
                                alpha_bar=np.full((3, BS), 0.25, np.float32))
  conf = np.ones((2, BS), np.float32)
  certain = np.array([1, 0], np.int32)
  source = np.array([planner.SOURCE_OF[planner.PARALLEL]] * 2, np.int32)
  c = speculation.chain(np.zeros((2, BS), np.int32), conf, last_logits=None, q=None,
                        certain=certain, source=source)
  e = np.asarray(planner.expected_tokens(acc, c, (planner.PARALLEL, planner.SEQUENTIAL), BS))
  # Own source (parallel): certain row: 1 + .5 + .25 + .125; uncertain: 1 + .5 + .25 + ...
  np.testing.assert_allclose(e[0, 0], [1, 1.5, 1.75, 1.875])
  np.testing.assert_allclose(e[0, 1], [1.5, 1.75, 1.875, 1.9375])
  # Sequential would draft anew: its stationary curve (1/4) applies, and its draft pass
  # commits the target's next token too (planner.FREE).
  np.testing.assert_allclose(e[1, 0], [2, 2.25, 2.3125, 2.328125])


def test_costs_are_made_monotone_in_width_and_at_least_ar():
  inf = np.inf
  ms = planner.monotone_costs([[80.0, inf, inf], [inf, 79.0, 70.0], [90.0, 120.0, 100.0],
                               [190.0, 185.0, 200.0]])
  np.testing.assert_allclose(ms, [[80, inf, inf], [inf, 80, 80], [90, 120, 120],
                                  [190, 190, 200]])


def _table_json(**key):
  ms = {1: [[1.0, np.inf, np.inf], [np.inf, 2.0, 3.0], [2.0, 2.5, 3.0], [3.0, 3.0, 4.0]]}
  counts = {"tried": np.ones((3, BS, planner.NUM_BINS)), "hit": np.zeros((3, BS, planner.NUM_BINS))}
  return planner.table_to_json(ms, counts, WIDTHS, dict(KEY, **key))


def test_table_file_round_trip_and_one_line_errors(tmp_path):
  path = tmp_path / "costs.json"
  planner.save_json(path, _table_json())
  tables = planner.load_tables(path, WIDTHS, KEY)
  assert list(tables) == [1] and tables[1].step_ms[0, 1] == np.inf
  np.testing.assert_allclose(tables[1].step_ms[2], [2.0, 2.5, 3.0])
  cases = [(dict(KEY, model="m2"), "another setup: model"),
           (dict(KEY, drafter="d2"), "drafter: 'd1'"),
           (dict(KEY, dtype="bfloat16"), "dtype"),
           (dict(KEY, block_size=8), "block_size")]
  for key, match in cases:
    with pytest.raises(planner.CostTableError, match=match) as e:
      planner.load_tables(path, WIDTHS, key)
    assert "\n" not in str(e.value)
  with pytest.raises(planner.CostTableError, match="verify widths"):
    planner.load_tables(path, flex.verify_buckets(8))
  for text, match in (('{"1": [[1.0], [2.0]]}', "older cost table"),
                      ("{not json", "cannot be read"), ("[1, 2]", "not a JSON object"),
                      (json.dumps(dict(_table_json(), step_ms={"1": [[1.0]]})), "want")):
    path.write_text(text)
    with pytest.raises(planner.CostTableError, match=match):
      planner.load_tables(path, WIDTHS)
  with pytest.raises(planner.CostTableError, match="does not exist"):
    planner.load_tables(tmp_path / "missing.json", WIDTHS)


# ----------------------------------------------------------------------------
# The self-measuring cache (tiny model: one quick compile)
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_flex(tiny_model):
  cfg, target = tiny_model("llama")
  dcfg = drafter.DrafterConfig(num_draft_layers=1, block_size=BS, calib_rank=8)
  draft = drafter.init_draft(cfg, dcfg, target, jax.random.key(0))
  target = model_lib.decoding_params(target)  # the library's decoding layout
  params = {"target": target,
            "draft": drafter.decoding_draft(draft, isinstance(target["layers"], tuple))}
  return cfg, dcfg, params


def test_measured_step_costs_cover_every_kind_and_width(tiny_flex):
  cfg, dcfg, params = tiny_flex
  ms = cost_cache.measure_step_ms(params, cfg, dcfg, 2, context=16, min_seconds=0)
  assert ms.shape == (len(planner.KINDS), len(WIDTHS))
  assert np.isfinite(ms[planner.AR, 0]) and np.isinf(ms[planner.AR, 1:]).all()
  assert np.isinf(ms[planner.PLD, 0]) and np.isfinite(ms[planner.PLD, 1:]).all()
  assert np.isfinite(ms[planner.PARALLEL:]).all() and (ms[np.isfinite(ms)] > 0).all()


def test_cache_measures_once_then_reuses_and_remeasures_bad_files(tiny_flex, tmp_path,
                                                                  monkeypatch):
  cfg, dcfg, params = tiny_flex
  acc = planner.AcceptanceModel.from_confidence(BS)
  calls, logs = [], []
  real = cost_cache.measure_step_ms

  def counted(params, cfg, dcfg, batch, **k):
    calls.append(batch)
    # Timing accuracy is not tested here: every batch size times the batch-2 programs,
    # which the test above compiled (another batch would compile every step again).
    return real(params, cfg, dcfg, 2, **dict(k, context=16, min_seconds=0))

  monkeypatch.setattr(cost_cache, "measure_step_ms", counted)
  get = lambda batch=2: cost_cache.table_for(params, cfg, dcfg, batch, KEY, acc, root=tmp_path,
                                             log=logs.append)
  first = get()
  files = list((tmp_path / "costs").glob("*.json"))
  assert calls == [2] and len(files) == 1 and "stored in" in logs[-1], logs
  again = get()
  assert calls == [2]
  np.testing.assert_array_equal(first.step_ms, again.step_ms)
  get(batch=3)  # another batch size: another key, measured
  assert calls == [2, 3] and len(list((tmp_path / "costs").glob("*.json"))) == 2
  files[0].write_text("{truncated")
  logs.clear()
  get()
  assert len(calls) == 3 and "cannot be read" in logs[0], logs
  raw = json.loads(files[0].read_text())
  files[0].write_text(json.dumps(dict(raw, format=1)))  # stale
  logs.clear()
  get()
  assert len(calls) == 4 and "older cost table" in logs[0], logs


def test_unwritable_cache_directory_warns_once_and_still_plans(tiny_flex, tmp_path, capsys,
                                                               monkeypatch):
  cfg, dcfg, params = tiny_flex
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  monkeypatch.setattr(cost_cache, "measure_step_ms",
                      lambda *a, **k: np.ones((len(planner.KINDS), len(WIDTHS))))
  acc = planner.AcceptanceModel.from_confidence(BS)
  for _ in range(2):
    table = cost_cache.table_for(params, cfg, dcfg, 1, KEY, acc, root=blocker, log=lambda m: None)
    assert table.step_ms.shape == (len(planner.KINDS), len(WIDTHS))
  err = capsys.readouterr().err
  assert err.count("not writable") == 1, err


def test_drafter_without_acceptance_file_is_a_warning(tmp_path, capsys):
  assert cost_cache.load_acceptance(tmp_path) is None
  (tmp_path / cost_cache.ACCEPTANCE_FILE).write_text("{")
  assert cost_cache.load_acceptance(tmp_path) is None
  err = capsys.readouterr().err
  assert "has no acceptance.json" in err and "cannot be read" in err


def test_shipped_drafter_has_an_acceptance_model():
  from flexdraft_jax import resources
  model, _ = cost_cache.load_acceptance(resources.shipped_drafter_path())
  bar = np.asarray(model.alpha_bar)
  assert bar.shape[0] == 3 and (bar > 0).all() and (bar < 1).all()
  # Sequential drafts (slot 0, bonus known) pass more often than calibrated parallel ones.
  assert bar[planner.SOURCE_OF[planner.SEQUENTIAL], 0] > bar[planner.SOURCE_OF[planner.PARALLEL], 1]


def test_persistent_compilation_cache_hits_in_a_new_process(tmp_path):
  """A second process compiling the same program reads it from the cache directory."""
  script = (
      "import sys, jax, jax.numpy as jnp\n"
      "from flexdraft_jax import cost_cache\n"
      "import pathlib\n"
      "cost_cache.enable_compilation_cache(pathlib.Path(sys.argv[1]), min_compile_s=0)\n"
      "with cost_cache.CompileCounter() as c:\n"
      "  jax.jit(lambda x: jnp.sin(x) @ x.T).lower(jnp.ones((8, 8))).compile()\n"
      "print(c.describe())\n")
  runs = [subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, check=True, env={"JAX_PLATFORMS": "cpu",
                                                     "PATH": "/usr/bin:/bin"}).stdout.strip()
          for _ in range(2)]
  assert runs == ["compiled (cache miss)", "persistent cache hit"], runs


def test_stationary_rate_of_a_tree_comes_from_depth_counts():
  """A tree judges several siblings per depth: the node counts give each node's rate (1/4
  here), the depth counts the rate at which some sibling passes (3/4), which is what a
  step of that kind gains per depth."""
  tried = np.zeros((3, BS, planner.NUM_BINS))
  hit = np.zeros_like(tried)
  tried[1, :, 5], hit[1, :, 5] = 300, 75
  depth_tried, depth_hit = np.zeros((3, BS)), np.zeros((3, BS))
  depth_tried[1], depth_hit[1] = 100, 75
  nodes = planner.AcceptanceModel.fit(tried, hit)
  depths = planner.AcceptanceModel.fit(tried, hit, depth_tried, depth_hit)
  assert nodes.alpha_bar[1, 1] == pytest.approx(0.25, abs=0.01)
  assert depths.alpha_bar[1, 1] == pytest.approx(0.75, abs=0.01)
  np.testing.assert_allclose(nodes.alpha, depths.alpha)  # per-node rates: the same

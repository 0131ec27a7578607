"""Results tables in README.md and docs/RESULTS.md, rendered from docs/results/*.json.

  python -m flexdraft_jax.bench.docs_tables --check   # exit 1 if a table differs
  python -m flexdraft_jax.bench.docs_tables --write   # re-render every table in place

A table lives between two markers in the markdown:

  <!-- table: NAME -->
  ...rendered text: the table, then each JSON's command, machine and date...
  <!-- /table -->

`TABLES` maps NAME to a `Table`: the JSON files (paths under docs/results/), the kind
of rendering and its options. Nothing here imports JAX: the docs test runs in a second.
Adding a table: commit the JSON, add a `Table` to `TABLES`, put the two marker lines
where it goes, run `--write`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = "docs/results"
DOCS = ("README.md", "docs/RESULTS.md")
REGION = re.compile(
    r"^(<!-- table: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)^(<!-- /table -->)$", re.S | re.M)
OPENING = re.compile(r"^<!-- table: ([\w.-]+) -->$", re.M)  # markers sit on lines of their own


@dataclasses.dataclass(frozen=True)
class Table:
  kind: str  # a key of RENDERERS
  files: tuple[str, ...]  # under docs/results/
  options: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------- formatting helpers


def _num(x: float | None, digits: int = 1) -> str:
  if x is None:
    return "-"
  return f"{x:,.{digits}f}"


def _speed(row: dict) -> str:
  """tok/s with the speedup over AR of the same run; 'withheld' where not lossless."""
  if not row.get("lossless", True) or row.get("tokens_per_s") is None:
    return "withheld (not AR's tokens)"
  return f"{_num(row['tokens_per_s'])} ({row['speedup_vs_ar']:.2f}x)"


def _md(header: list[str], rows: list[list[str]]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return out


def _mode_name(row: dict) -> str:
  """The bench's --modes entry: 'parallel', or 'parallel@1' (chains), 'sequential@8', ..."""
  return row["mode"]


def _chose(row: dict) -> str:
  hist = {k: v for k, v in (row.get("mode_histogram") or {}).items() if v}
  kinds = row.get("compiled_kinds")
  if kinds == ["ar"]:
    return "ar (the AR loop alone)"
  total = sum(hist.values())
  return ", ".join(f"{k} {v} of {total} steps" for k, v in hist.items()) or "-"


# ---------------------------------------------------------------- sources: command, machine, date


def load(path: str) -> Any:
  return json.loads((ROOT / RESULTS / path).read_text())


def machine(data: dict) -> str:
  """The machine a JSON was measured on, in words, from what the JSON recorded."""
  if isinstance(data.get("machine"), str):
    return data["machine"]
  h = data.get("header", {})
  m = h.get("machine")
  if isinstance(m, dict):
    if h.get("backend", "cpu") == "cpu":
      cpus = m.get("cpus_usable", m.get("cpu_count"))
      model = m.get("cpu_model") or m.get("processor")
      where = f"{cpus}-vCPU {model}"
    else:
      devices = ", ".join(h.get("devices", []))
      where = f"{h.get('backend')} {devices} ({m.get('cpu_count')}-CPU {m.get('cpu_model')} host)"
    if "dtype" not in h:  # not a bench header (e.g. a replay script's)
      return where
    versions = h.get("versions", {})
    return f"{where}, {h.get('dtype')}, jax {versions.get('jax')}"
  if "backend" in h:  # scripts/step_costs.py headers
    cpu = h.get("cpu_model") or "CPU model not recorded"
    return f"{h['backend']} ({cpu}), matmul: {h.get('matmul')}, jax {h.get('jax')}"
  return ""


def command(data: dict) -> str:
  """The command as inline code; a JSON that kept only a description (`what`) gives that."""
  cmd = data.get("header", {}).get("command") or data.get("command")
  return f"`{cmd}`" if cmd else data.get("what", "")


def date(data: dict) -> str:
  d = data.get("header", {}).get("date") or data.get("date", "")
  return d.replace("T", " ").replace("+00:00", " UTC")[:20].rstrip() if "T" in d else d


def sources(files: tuple[str, ...]) -> list[str]:
  out = []
  for f in dict.fromkeys(files):  # each JSON once, in order
    d = load(f)
    out.append(f"- `docs/results/{f}` ({date(d)}; {machine(d)}): {command(d)}")
  return out


# ---------------------------------------------------------------- renderers: Table -> md lines


def render_by_batch(t: Table) -> list[str]:
  """One line per batch size: AR tok/s, then each mode's tok/s (speedup) and tau."""
  modes = t.options["modes"]
  rows_by_batch: dict[int, dict[str, dict]] = {}
  for f in t.files:
    for r in load(f)["rows"]:
      rows_by_batch.setdefault(r["batch_size"], {})[_mode_name(r)] = r
  header = ["batch", "ar tok/s"] + [m for m in modes if m != "ar"]
  if t.options.get("tau", True):
    header.append("tau (" + " / ".join(m for m in modes if m != "ar") + ")")
  if t.options.get("chose"):
    header.append("flex chose")
  lines = []
  for b in sorted(rows_by_batch):
    rows = rows_by_batch[b]
    line = [str(b), _num(rows["ar"]["tokens_per_s"])]
    line += [_speed(rows[m]) if m in rows else "-" for m in modes if m != "ar"]
    if t.options.get("tau", True):
      line.append(" / ".join(_num(rows[m]["tau"], 2) if m in rows else "-"
                             for m in modes if m != "ar"))
    if t.options.get("chose"):
      line.append(_chose(rows["flex"]) if "flex" in rows else "-")
    lines.append(line)
  return _md(header, lines)


def render_modes(t: Table) -> list[str]:
  """One line per (run, mode): tau, tok/s and the speedup over AR of the same run."""
  labels = t.options.get("labels", {})
  data = {f: load(f) for f in t.files}
  nodes = any("tree_nodes" in r for d in data.values() for r in d["rows"])  # 1: chains
  header = ((["run"] if labels else []) + ["mode"] + (["tree nodes"] if nodes else [])
            + ["tau", "tok/s", "vs AR (same run)", "steps"])
  lines = []
  for f in t.files:
    for r in data[f]["rows"]:
      name = _mode_name(r)
      if r["mode"] == "ar" and not t.options.get("ar_rows", True):
        continue
      speed = "withheld" if not r.get("lossless", True) else _num(r["tokens_per_s"])
      vs = "-" if r.get("speedup_vs_ar") is None else f"{r['speedup_vs_ar']:.2f}x"
      steps = _chose(r) if r["mode"] != "ar" else f"{r['steps']} ar"
      lines.append(([labels[f]] if labels else []) + [name]
                   + ([str(r.get("tree_nodes", "-"))] if nodes else [])
                   + [_num(r["tau"], 2), speed, vs, steps])
  return _md(header, lines)


def render_variants(t: Table) -> list[str]:
  """One line per JSON (a variant): tau and tok/s (vs AR) of each mode in it."""
  modes = t.options["modes"]
  header = ["variant"] + [f"{m} {c}" for m in modes for c in ("tau", "tok/s (vs AR)")]
  lines = []
  for f in t.files:
    rows = {_mode_name(r): r for r in load(f)["rows"]}
    lines.append([t.options["labels"][f]]
                 + [c for m in modes for c in (_num(rows[m]["tau"], 2), _speed(rows[m]))])
  return _md(header, lines)


def render_step_costs(t: Table) -> list[str]:
  """One line per step program; one column per JSON (batch size): median ms (x ar)."""
  data = [load(f) for f in t.files]
  names: list[str] = []
  for d in data:
    names += [k for k in d["median_ms"] if k not in names]
  header = ["step program"] + [f"batch {d['header']['batch_size']}: ms (x ar)" for d in data]
  lines = []
  for n in names:
    cells = []
    for d in data:
      ms, ratio = d["median_ms"].get(n), d["median_ratio_to_ar"].get(n)
      cells.append("-" if ms is None else f"{ms:.1f} ({ratio:.2f}x)")
    lines.append([n] + cells)
  return _md(header, lines)


def render_matmul(t: Table) -> list[str]:
  """matmul_bench runs before/after: 30 layers' and the LM head's ms per row count."""
  d = load(t.files[0])
  old, new = d["runs"]["old"], d["runs"]["new"]
  header = ["rows"] + [str(r) for r in d["rows"]]
  f = lambda xs: [f"{x:.1f}" for x in xs]  # noqa: E731
  lines = [
      ["30 layers, before (ms)"] + f(old["layers_ms"]["kernel"]),
      ["30 layers, after (ms)"] + f(new["layers_ms"]["kernel"]),
      ["XLA's dot, same runs (ms)"] + [f"{a:.1f} / {b:.1f}" for a, b in
                                       zip(old["layers_ms"]["xla"], new["layers_ms"]["xla"])],
      ["LM head, before / after (ms)"] + [f"{a:.1f} / {b:.1f}" for a, b in
                                          zip(old["lm_head_ms"]["kernel"],
                                              new["lm_head_ms"]["kernel"])],
  ]
  return _md(header, lines)


def render_cost_table(t: Table) -> list[str]:
  """A `bench --calibrate` cost table: step ms per kind (lines) and verify width (columns)."""
  d = load(t.files[0])
  lines = []
  for batch, table in d["step_ms"].items():
    for kind, ms in zip(d["kinds"], table):
      lines.append([batch, kind] + [_num(x) for x in ms])
  return _md(["batch", "kind"] + [f"width {w} (ms)" for w in d["verify_widths"]], lines)


def render_replay(t: Table) -> list[str]:
  """tree_replay.py's rows ('{prefix}_{shape}': tau): one line per draft shape, one column
  per step kind (prefix)."""
  taus = {r["name"]: r["tau"] for r in load(t.files[0])["rows"]}
  kinds = t.options["kinds"]  # prefix -> column title
  shapes: list[str] = []
  for name in taus:
    shape = name.split("_", 1)[1]
    if shape not in shapes:
      shapes.append(shape)
  lines = [[shape] + [_num(taus.get(f"{k}_{shape}"), 3) for k in kinds] for shape in shapes]
  return _md(["drafts verified per step"] + list(kinds.values()), lines)


def render_headline(t: Table) -> list[str]:
  """One line per (platform, JSON, mode, batch): the current speedup, for the README's top."""
  header = ["platform", "date", "mode", "batch", "tau", "tok/s", "speedup over AR (same run)"]
  lines = []
  for label, f, mode, batch in t.options["rows"]:
    d = load(f)
    rows = [r for r in d["rows"] if r["batch_size"] == batch]
    if mode == "best fixed":  # the fastest mode other than ar and flex that kept AR's tokens
      fixed = [r for r in rows if r["mode"] not in ("ar", "flex") and r.get("speedup_vs_ar")]
      r = max(fixed, key=lambda r: r["speedup_vs_ar"])
    else:
      r = next(r for r in rows if _mode_name(r) == mode)
    vs = "withheld" if r.get("speedup_vs_ar") is None else f"**{r['speedup_vs_ar']:.2f}x**"
    lines.append([label, date(d)[:10], _mode_name(r), str(batch), _num(r["tau"], 2),
                  _num(r["tokens_per_s"]), vs])
  return _md(header, lines)


RENDERERS: dict[str, Callable[[Table], list[str]]] = {
    "by_batch": render_by_batch,
    "modes": render_modes,
    "variants": render_variants,
    "step_costs": render_step_costs,
    "matmul": render_matmul,
    "headline": render_headline,
    "cost_table": render_cost_table,
    "replay": render_replay,
}

_MODES5 = ["ar", "pld", "parallel", "sequential", "flex"]

_HEADLINE_ROWS = (
    ("this CPU (2-vCPU Intel Xeon), f32", "cpu/trees_flex_2026-12-07_b1.json", "flex", 1),
    ("this CPU, best fixed mode", "cpu/trees_flex_2026-12-07_b1.json", "best fixed", 1),
    ("H200, bf16", "h200/bench_b1_b8.json", "flex", 1),
)

TABLES: dict[str, Table] = {
    # README, first screen: the current speedup per platform.
    "headline": Table("headline", tuple(r[1] for r in _HEADLINE_ROWS), {"rows": _HEADLINE_ROWS}),
    # README and RESULTS: the current CPU results (2026-12-07, Intel Xeon).
    "cpu_flex_2026-12-07": Table("modes", (
        "cpu/trees_flex_2026-12-07_b1.json", "cpu/trees_flex_2026-12-07_b4.json",
    ), {"labels": {
        "cpu/trees_flex_2026-12-07_b1.json": "batch 1",
        "cpu/trees_flex_2026-12-07_b4.json": "batch 4",
    }}),
    # RESULTS: the day's steps to it.
    "cpu_trees_2026-12-07": Table("modes", (
        "cpu/seq_free_token_before_2026-12-07.json",
        "cpu/seq_free_token_after_2026-12-07.json",
        "cpu/trees_auto_2026-12-07_b1.json",
    ), {"labels": {
        "cpu/seq_free_token_before_2026-12-07.json": "chains, before the free token",
        "cpu/seq_free_token_after_2026-12-07.json": "chains + sequential's free token",
        "cpu/trees_auto_2026-12-07_b1.json": "token trees (16 nodes)",
    }}),
    "cpu_tree_replay_2026-12-07": Table("replay", ("cpu/tree_replay_2026-12-07.json",), {
        "kinds": {"par": "parallel tau", "seq": "sequential tau (before the free token)",
                  "newseq": "sequential tau (with its free token)"}}),
    "cpu_costs_2026-12-07_b4": Table("cost_table", ("cpu/calibrate_trees_2026-12-07_b4.json",)),
    # README and RESULTS: the H200 (2026-11-28, the shipped drafter, chains).
    "h200_2026-11-28": Table("by_batch", ("h200/bench_b1_b8.json", "h200/bench_b64.json"),
                             {"modes": ["ar", "parallel", "sequential", "flex"]}),
    # RESULTS: history, oldest first.
    "cpu_make_bench_2026-11-28": Table("by_batch", ("cpu/make_bench.json",), {"modes": _MODES5}),
    "cpu_b16_2026-11-28": Table("by_batch", ("cpu/mtbench_b16.json",), {"modes": _MODES5}),
    "cpu_ablation_2026-11-28": Table("variants", (
        "cpu/ablation_base.json", "cpu/ablation_no_calib.json", "cpu/ablation_full.json",
    ), {"modes": ["parallel", "sequential"], "labels": {
        "cpu/ablation_base.json": "shipped drafter, confidence verify length",
        "cpu/ablation_no_calib.json": "without the calibration MLP",
        "cpu/ablation_full.json": "full block (always verify 16)",
    }}),
    "cpu_planner_curve_2026-12-04": Table("by_batch", tuple(
        f"cpu/planner_curve_2026-12-04_b{b}.json" for b in (1, 4, 16, 64)),
        {"modes": _MODES5, "tau": False, "chose": True}),
    "cpu_planner_curve_split_2026-12-04": Table("by_batch", tuple(
        f"cpu/planner_curve_split_2026-12-04_b{b}.json" for b in (1, 4, 16, 64)),
        {"modes": _MODES5, "tau": False, "chose": True}),
    "cpu_step_costs_2026-12-04": Table("step_costs", (
        "cpu/step_costs_2026-12-04_b1.json", "cpu/step_costs_2026-12-04_b4.json")),
    "cpu_step_costs_vocab_2026-12-06": Table("step_costs", (
        "cpu/step_costs_vocab_2026-12-06_b1.json", "cpu/step_costs_vocab_2026-12-06_b4.json")),
    "cpu_planner_curve_vocab_2026-12-06": Table("by_batch", tuple(
        f"cpu/planner_curve_vocab_2026-12-06_b{b}.json" for b in (1, 4, 16)),
        {"modes": _MODES5, "chose": True}),
    "cpu_matmul_interleaved_2026-12-06": Table(
        "matmul", ("cpu/matmul_interleaved_x_2026-12-06.json",)),
    "cpu_step_costs_kernel_xi_2026-12-06": Table("step_costs", (
        "cpu/step_costs_kernel_xi_2026-12-06_b1.json",
        "cpu/step_costs_kernel_xi_2026-12-06_b4.json")),
    "cpu_planner_curve_final_2026-12-06": Table("by_batch", tuple(
        f"cpu/planner_curve_final_2026-12-06_b{b}.json" for b in (1, 4, 16)),
        {"modes": _MODES5, "chose": True}),
}


def render(name: str) -> str:
  """The text between a table's markers: the table, then its JSONs' sources."""
  t = TABLES[name]
  lines = RENDERERS[t.kind](t)
  lines += ["", "Rendered from (date; machine; command):"] + sources(t.files)
  return "\n".join(lines) + "\n"


def regions(text: str) -> list[tuple[str, str]]:
  """(name, body) of every marked table in a markdown text."""
  return [(m["name"], m["body"]) for m in REGION.finditer(text)]


def rewrite(text: str) -> str:
  """text with every marked table re-rendered (a name not in TABLES raises KeyError)."""
  return REGION.sub(lambda m: m[1] + "\n" + render(m["name"]) + "\n" + m[4], text)


def check(text: str) -> list[str]:
  """The names of the tables in text that differ from their rendering (or are unknown)."""
  bad = []
  starts = {m.start() for m in REGION.finditer(text)}
  bad += [f"{m[1]} (no <!-- /table -->)" for m in OPENING.finditer(text) if m.start() not in starts]
  for name, body in regions(text):
    if name not in TABLES or body != "\n" + render(name) + "\n":
      bad.append(name)
  return bad


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--check", action="store_true", help="exit 1 if a table differs from its JSON")
  g.add_argument("--write", action="store_true", help="re-render every marked table in place")
  p.add_argument("--list", action="store_true", help="also print each table's name and files")
  args = p.parse_args(argv)
  status = 0
  for doc in DOCS:
    path = ROOT / doc
    text = path.read_text()
    if args.write:
      new = rewrite(text)
      if new != text:
        path.write_text(new)
        print(f"{doc}: rewritten")
    else:
      bad = check(text)
      for name in bad:
        print(f"{doc}: table {name} differs from its rendering "
              f"(python -m flexdraft_jax.bench.docs_tables --write)", file=sys.stderr)
      status |= bool(bad)
  if args.list:
    for name, t in TABLES.items():
      print(name, t.kind, ", ".join(t.files))
  return status


if __name__ == "__main__":
  sys.exit(main())

"""The results tables in README.md and docs/RESULTS.md equal their rendering from JSON.

No model, no JAX: `flexdraft_jax.bench.docs_tables` reads docs/results/*.json only.
"""
from __future__ import annotations

import re

import pytest

from flexdraft_jax.bench import docs_tables


def _text(doc):
  return (docs_tables.ROOT / doc).read_text()


@pytest.mark.parametrize("doc", docs_tables.DOCS)
def test_tables_equal_their_rendering(doc):
  text = _text(doc)
  assert docs_tables.regions(text), f"{doc} has no rendered table"
  assert docs_tables.check(text) == [], (
      f"{doc}: run python -m flexdraft_jax.bench.docs_tables --write")


def test_a_hand_edited_number_fails():
  text = _text("README.md")
  name, body = docs_tables.regions(text)[0]
  # Change the last digit of the first measured value (a decimal, e.g. tau) in the table's
  # first data line, in a copy of the README.
  data_line = body.split("\n")[3]
  edited_line = re.sub(r"(\d+\.\d*)(\d)", lambda m: m[1] + str((int(m[2]) + 1) % 10),
                       data_line, count=1)
  assert edited_line != data_line
  edited = text.replace(data_line, edited_line, 1)
  assert docs_tables.check(edited) == [name]
  assert docs_tables.rewrite(edited) == text  # --write puts the rendered number back


def test_an_unknown_or_unclosed_table_is_reported():
  unknown = "<!-- table: no_such_table -->\n| a |\n<!-- /table -->\n"
  assert docs_tables.check(unknown) == ["no_such_table"]
  assert docs_tables.check("<!-- table: h200_2026-11-28 -->\n| a |\n") == [
      "h200_2026-11-28 (no <!-- /table -->)"]


def test_every_rendered_table_is_registered_and_every_json_has_its_sources():
  used = {name for doc in docs_tables.DOCS for name, _ in docs_tables.regions(_text(doc))}
  assert used <= set(docs_tables.TABLES)
  for name in used:
    for f in docs_tables.TABLES[name].files:
      data = docs_tables.load(f)
      assert docs_tables.command(data), (name, f, "no command")
      assert docs_tables.machine(data), (name, f, "no machine")
      assert docs_tables.date(data), (name, f, "no date")


def test_the_readme_stays_short():
  prose = re.sub(r"<!-- table: .*?<!-- /table -->", "", _text("README.md"), flags=re.S)
  assert len(prose.split()) <= 1700


def test_every_registered_table_with_its_json_renders():
  for name, t in docs_tables.TABLES.items():
    if all((docs_tables.ROOT / docs_tables.RESULTS / f).exists() for f in t.files):
      assert "| --- |" in docs_tables.render(name), name

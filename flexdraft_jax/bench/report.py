"""The printed table, the throughput plot and the JSON header (machine, versions)."""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import pathlib
import platform
import shlex
import sys
from typing import Any

import jax

from flexdraft_jax.bench.options import Options
from flexdraft_jax.model_config import ModelConfig


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
  head = (f"{'mode':<11}{'batch':>6}{'tok/s':>9}{'ms/step':>9}{'tau':>6}{'speedup':>8}"
          f"{'lossless':>9}{'compile_s':>10}{'new_tok':>8}"
          f"{'hf_tok/s':>10}{'hf_ms/step':>11}{'ratio':>7}{'matches':>9}")
  lines = [head, "-" * len(head)]
  for r in rows:
    matches = "-" if r["matches_hf"] is None else f"{r['matches_hf']}/{r['matches_hf_of']}"
    lines.append(f"{r['mode']:<11}{r['batch_size']:>6}{_fmt(r['tokens_per_s'], '.1f'):>9}"
                 f"{_fmt(r['ms_per_step'], '.1f'):>9}{_fmt(r.get('tau'), '.2f'):>6}"
                 f"{_fmt(r.get('speedup_vs_ar'), '.2f'):>8}{str(r.get('lossless', '-')):>9}"
                 f"{r['compile_s']:>10.1f}{r['new_tokens']:>8}"
                 f"{_fmt(r['hf_tokens_per_s'], '.1f'):>10}{_fmt(r['hf_ms_per_step'], '.1f'):>11}"
                 f"{_fmt(r['ratio_vs_hf'], '.2f'):>7}{matches:>9}")
  return "\n".join(lines)


def format_profile(entries: list[dict[str, Any]]) -> str:
  keys = ("full_step_ms", "nocache_step_ms", "layers_nocache_ms", "lm_head_argmax_ms",
          "attention_over_cache_ms", "other_ms", "dispatch_ms", "generate_ms_per_step")
  lines = []
  for e in entries:
    lines.append(f"AR step profile, batch {e['batch_size']}, cache length {e['cache_length']} "
                 f"(capacity {e['cache_capacity']}), median of {e['runs']}:")
    lines += [f"  {k:<26}{_fmt(e.get(k), '8.2f')}" for k in keys]
  return "\n".join(lines)



def plot_throughput(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
  """tokens/s vs batch size per mode (lossless rows only), as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for mode in dict.fromkeys(r["mode"] for r in rows):
    pts = [(r["batch_size"], r["tokens_per_s"]) for r in rows
           if r["mode"] == mode and r["tokens_per_s"] is not None]
    if pts:
      ax.plot(*zip(*pts), marker="o", label=mode)
  ax.set(xscale="log", xlabel="batch size", ylabel="tokens/s", title="Decoding throughput")
  batches = sorted({r["batch_size"] for r in rows})
  ax.set_xticks(batches, [str(b) for b in batches])
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _versions() -> dict[str, str | None]:
  out = {}
  for dist in ("jax", "jaxlib", "flax", "torch", "transformers"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = None
  return out


def load_avg() -> list[float] | None:
  """1/5/15-minute load averages: other work on the machine skews CPU timings."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def header(opts: Options, cfg: ModelConfig) -> dict[str, Any]:
  uname = platform.uname()
  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  return {
      "machine": {"processor": platform.processor() or _cpu_model(), "cpu_model": _cpu_model(),
                  "uname": f"{uname.system} {uname.release} {uname.machine}",
                  "node": uname.node, "cpu_count": os.cpu_count(), "cpus_usable": affinity},
      "versions": _versions(),
      "python": platform.python_version(),
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "dtype": cfg.dtype,
      "load_avg_start": load_avg(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": shlex.join(getattr(sys, "orig_argv", [sys.executable] + sys.argv)),
      "settings": dataclasses.asdict(opts),
  }

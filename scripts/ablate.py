r"""Drafter training ablations at equal budgets, from one command.

  python scripts/ablate.py --config=configs/smollm2_135m.py --workdir=runs/ablate --steps=300
  python scripts/ablate.py --config=configs/tiny.py --workdir=/tmp/abl --steps=4 \
      --variants=base,no_calib,calib_hidden --tau_prompts=0          # the proof on CPU

Every variant trains from scratch for --steps steps (the same data, seed, batch and
schedule; only its overrides differ), so budgets are equal in steps and tokens.
Fine-tuning from the shipped drafter is not an option here: K, the block size and the
calibration change the param tree. Then, unless --tau_prompts=0, each export is decoded
on MT-Bench (T=0, batch 1) in parallel and sequential mode by `flexdraft_jax.bench` for
the measured tau. A variant whose workdir already holds an export (or a bench.json) is
not trained (benched) again, so a stopped run resumes.

Writes <workdir>/ablation.json and prints a markdown table: held-out per-slot accuracy
(raw, and calibrated for slots >= 1), the tau proxies (1 + sum_k prod_{i<=k} acc_i) and
the measured tau.
"""
from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> --config overrides. DFlash weights slot k (1-based) by exp(-(k-1)/7): slot_decay
# e^(-1/7). 'base' is the config's own (the paper's logit-delta calibration, decay 0.9).
VARIANTS = {
    "base": {},
    "k4": {"drafter.num_draft_layers": 4},
    "k10": {"drafter.num_draft_layers": 10},
    "block8": {"drafter.block_size": 8},
    "no_calib": {"drafter.calib_rank": 0},
    "calib_hidden": {"drafter.calib_target": "hidden"},
    "decay_dflash": {"loss.slot_decay": round(math.exp(-1 / 7), 6)},
    "decay_uniform": {"loss.slot_decay": 1.0},
}

_CONFIG = flags.DEFINE_string("config", "configs/smollm2_135m.py", "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/ablate", "One subdirectory per variant.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps per variant (the equal budget).")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Variants to run, of {list(VARIANTS)}.")
_TRAIN_FLAGS = flags.DEFINE_multi_string(
    "train_flag", [], "Extra train.py flags for every variant, e.g. --train_flag=--config.dtype=bfloat16.")
_OFFLINE = flags.DEFINE_bool("offline", False, "Cache the target's K/V per variant "
                             "(--mode=cache_kv, its own data dir) and train offline.")
_TAU_PROMPTS = flags.DEFINE_integer("tau_prompts", 20, "MT-Bench prompts for the measured tau; "
                                    "0 skips it.")
_TAU_NEW = flags.DEFINE_integer("tau_new_tokens", 64, "New tokens per prompt for the tau.")
_BENCH_FLAGS = flags.DEFINE_multi_string("bench_flag", [], "Extra flexdraft_jax.bench flags.")


def _run(cmd: list[str], log: pathlib.Path) -> None:
  t0 = time.perf_counter()
  print(f"  $ {' '.join(cmd)}  (log: {log})", file=sys.stderr, flush=True)
  with open(log, "a") as f:
    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
  if rc:
    tail = log.read_text(errors="replace").strip().splitlines()[-1:]
    raise SystemExit(f"ablate.py: error: exit {rc} from {cmd[1]} ({tail[0] if tail else ''}); "
                     f"see {log}")
  print(f"  done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def _train(name: str, overrides: dict, root: pathlib.Path) -> pathlib.Path:
  work = root / name
  work.mkdir(parents=True, exist_ok=True)
  data = work / "data" if _OFFLINE.value else root / "data"  # a K/V cache lives beside its data
  args = [f"--config={_CONFIG.value}", f"--workdir={work}",
          f"--config.data.train_dir={data / 'train'}", f"--config.data.heldout_dir={data / 'heldout'}",
          f"--config.num_steps={_STEPS.value}", "--config.optim.total_steps=0",
          f"--config.eval_every={_STEPS.value}", f"--config.save_every={_STEPS.value}",
          *(f"--config.{k}={v}" for k, v in overrides.items()), *_TRAIN_FLAGS.value]
  if _OFFLINE.value:
    args.append("--config.data.offline=True")
  if not (work / "drafter" / "drafter.json").exists():
    if _OFFLINE.value:
      _run([sys.executable, "train.py", "--mode=cache_kv", *args], work / "train.log")
    _run([sys.executable, "train.py", *args], work / "train.log")
  return work


def _bench(work: pathlib.Path) -> dict:
  out = work / "bench"
  if not (out / "bench.json").exists():
    _run([sys.executable, "-m", "flexdraft_jax.bench", f"--drafter={work / 'drafter'}",
          "--prompts=mtbench", f"--num_prompts={_TAU_PROMPTS.value}", "--batch_sizes=1",
          f"--max_new_tokens={_TAU_NEW.value}", "--modes=parallel,sequential", "--costs=none",
          "--compare_hf=false", "--repeats=1", f"--out_dir={out}", *_BENCH_FLAGS.value],
         work / "bench.log")
  rows = json.loads((out / "bench.json").read_text())["rows"]
  return {r["mode"]: r.get("tau") for r in rows if r["mode"] in ("parallel", "sequential")}


def _held_out(work: pathlib.Path) -> dict:
  rows = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines() if l.strip()]
  last = next((r for r in reversed(rows) if "eval_acc" in r), None)
  if last is None:
    raise SystemExit(f"ablate.py: error: {work}/metrics.jsonl has no held-out evaluation")
  return {"step": last["step"], "acc": last["eval_acc"], "acc_calib": last.get("eval_acc_calib"),
          "tau_proxy_sequential": last["eval_tau_proxy_sequential"],
          "tau_proxy_parallel": last["eval_tau_proxy_parallel"], "loss": last["eval_loss"]}


def _table(results: dict) -> str:
  f = lambda x: "-" if x is None else f"{x:.2f}"
  lines = ["| variant | overrides | acc slot 0 / 1 / 2 | calibrated acc slot 1 | tau proxy seq / par "
           "| MT-Bench tau seq / par |", "| --- | --- | --- | --- | --- | --- |"]
  for name, r in results.items():
    h, t = r["held_out"], r.get("tau", {})
    over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(config)"
    lines.append(f"| {name} | {over} | {' / '.join(f(a) for a in h['acc'][:3])} | "
                 f"{f(h['acc_calib'][0]) if h['acc_calib'] else '-'} | "
                 f"{f(h['tau_proxy_sequential'])} / {f(h['tau_proxy_parallel'])} | "
                 f"{f(t.get('sequential'))} / {f(t.get('parallel'))} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
  if _STEPS.value < 1 or _TAU_PROMPTS.value < 0:
    raise app.UsageError("--steps must be >= 1 and --tau_prompts >= 0")
  root = pathlib.Path(_WORKDIR.value).absolute()
  results = {}
  for i, name in enumerate(_VARIANTS.value):
    print(f"[{i + 1}/{len(_VARIANTS.value)}] {name}: {VARIANTS[name] or 'the config'}",
          file=sys.stderr, flush=True)
    work = _train(name, VARIANTS[name], root)
    results[name] = {"overrides": VARIANTS[name], "held_out": _held_out(work)}
    if _TAU_PROMPTS.value:
      results[name]["tau"] = _bench(work)
    (root / "ablation.json").write_text(json.dumps(
        {"config": _CONFIG.value, "steps": _STEPS.value, "train_flags": _TRAIN_FLAGS.value,
         "offline": _OFFLINE.value, "tau_prompts": _TAU_PROMPTS.value,
         "tau_new_tokens": _TAU_NEW.value, "variants": results}, indent=2) + "\n")
  print(_table(results))


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  from flexdraft_jax import cli
  cli.run(main, "ablate.py")

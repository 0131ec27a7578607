"""The benchmark driver: loads the workload, runs every mode per batch size, writes
bench.json / costs.json / ar_profile.json (the flags: `bench/__main__.py`)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import time
from typing import Any

from absl import app
from absl import logging
import jax

from flexdraft_jax import checkpoint
from flexdraft_jax import cost_cache
from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax import engine as engine_lib
from flexdraft_jax import flex as flex_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import planner
from flexdraft_jax import prompts as prompts_lib
from flexdraft_jax import tokenizer as tokenizer_lib
from flexdraft_jax import weights
from flexdraft_jax.bench import calibration
from flexdraft_jax.bench import options as options_lib
from flexdraft_jax.bench import profiling
from flexdraft_jax.bench import report
from flexdraft_jax.bench import runners
from flexdraft_jax.bench import ties
from flexdraft_jax.bench.hf_reference import HfReference
from flexdraft_jax.bench.options import Options
from flexdraft_jax.bench.workload import Workload, make_groups
from flexdraft_jax.model_config import ModelConfig


def load_drafter(opts: Options, cfg: ModelConfig, params, out_dir: pathlib.Path):
  """(DrafterConfig, draft params, header fields): --drafter, or a random one exported
  to out_dir/random_drafter. Only pld/ar: no draft params, --block_size."""
  bases = {runners.split_mode(m)[0] for m in opts.modes}
  if not opts.calibrate and not bases & set(runners.DRAFTED):
    return drafter_lib.DrafterConfig(num_draft_layers=1, block_size=opts.block_size), None, {
        "drafter": None}
  cfg_dict = dataclasses.asdict(cfg)
  fingerprint = checkpoint.target_fingerprint(cfg_dict, params)
  path = opts.drafter
  if path is None:
    dcfg = drafter_lib.DrafterConfig(num_draft_layers=opts.random_drafter_layers,
                                     block_size=opts.block_size)
    try:
      draft = drafter_lib.init_draft(cfg, dcfg, params, jax.random.key(0))
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    path = out_dir / "random_drafter"
    checkpoint.export_drafter(path, jax.device_get(draft), dcfg.to_dict(), cfg_dict, fingerprint,
                              dtype="float32")
    logging.warning("no --drafter: using a random drafter (exported to %s); speculative speeds "
                    "are a lower bound", path)
  try:
    meta, draft = checkpoint.load_drafter(path, cfg_dict, fingerprint, dtype=cfg.param_dtype)
  except (checkpoint.DrafterFileError, checkpoint.DrafterMismatchError) as e:
    raise app.UsageError(str(e)) from None
  dcfg = drafter_lib.DrafterConfig(**meta).validate(cfg)
  if opts.no_calibration:
    draft = {k: v for k, v in draft.items() if k != "calib"}
    dcfg = dataclasses.replace(dcfg, calib_rank=0)
  try:
    draft, vocab = engine_lib.with_draft_vocab(draft, params, cfg, path, opts.draft_vocab)
  except (ValueError, checkpoint.DrafterFileError) as e:
    raise app.UsageError(str(e)) from None
  return dcfg, draft, {"drafter": str(path), "random_drafter": opts.drafter is None,
                       "drafter_config": dcfg.to_dict(), "no_calibration": opts.no_calibration,
                       "draft_vocab": vocab}



def load_prompts(opts: Options, tok) -> list[str]:
  """--prompts: the first --num_prompts (of at most --max_prompt_tokens tokens)."""
  keep = None
  if opts.max_prompt_tokens is not None:
    keep = lambda t: len(tokenizer_lib.chat_prompt_ids(tok, t)) <= opts.max_prompt_tokens
  texts = prompts_lib.load_prompt_set(opts.prompts, opts.num_prompts, keep)  # UserError
  if len(texts) < opts.num_prompts:
    raise app.UsageError(f"--prompts={opts.prompts} has only {len(texts)} prompts" + (
        f" of at most {opts.max_prompt_tokens} tokens" if keep else "") +
                         f"; --num_prompts={opts.num_prompts}")
  return texts


def load_workload(opts: Options, out_dir: pathlib.Path):
  """(Workload, drafter header, target fingerprint): tokenizer, prompts, the target in its
  decoding layout and the drafter."""
  tok = tokenizer_lib.load_tokenizer(opts.model)
  texts = load_prompts(opts, tok)
  out_dir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  cfg, params = weights.load_model(opts.model, dtype=opts.dtype)
  dcfg, draft, drafter_header = load_drafter(opts, cfg, params, out_dir)
  fingerprint = checkpoint.target_fingerprint(dataclasses.asdict(cfg), params)
  params = model_lib.decoding_params(params, opts.unroll_layers)
  unroll = isinstance(params["layers"], tuple)
  draft = None if draft is None else drafter_lib.decoding_draft(draft, unroll)
  logging.info("loaded %s (%s, %s layers) in %.1f s", opts.model, cfg.dtype,
               "unrolled" if unroll else "scanned", time.perf_counter() - start)
  eos_ids = tokenizer_lib.stop_token_ids(tok)
  prompt_ids = [tokenizer_lib.chat_prompt_ids(tok, t) for t in texts]
  longest = max(map(len, prompt_ids))
  if longest + opts.max_new_tokens > cfg.max_position:
    raise app.UsageError(f"--max_new_tokens={opts.max_new_tokens}: a prompt of {longest} tokens "
                         f"plus that exceeds the model's {cfg.max_position} positions")
  logging.info("%d prompts from %s, %d..%d tokens", len(prompt_ids), opts.prompts,
               min(map(len, prompt_ids)), max(map(len, prompt_ids)))
  work = Workload(cfg=cfg, params=params, prompt_ids=prompt_ids, eos_ids=eos_ids,
                  stop_ids=[-1] if opts.ignore_eos else eos_ids,
                  pad_id=tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0],
                  max_new_tokens=opts.max_new_tokens, repeats=opts.repeats,
                  ignore_eos=opts.ignore_eos, verify_strategy=opts.verify_strategy, dcfg=dcfg,
                  draft=draft)
  return work, drafter_header, fingerprint


def calibrate(opts: Options, work: Workload, key: dict, drafter_header: dict,
              out_dir: pathlib.Path) -> dict[str, Any]:
  """--calibrate: step times and acceptance counts -> costs.json and acceptance.json."""
  folder = pathlib.Path(drafter_header["drafter"])
  widths = flex_lib.verify_buckets(work.dcfg.block_size)
  step_ms, counts = calibration.calibrate(work, opts.batch_sizes)
  head = dict(report.header(opts, work.cfg), **drafter_header, load_avg_end=report.load_avg())
  planner.save_json(out_dir / "costs.json", planner.table_to_json(step_ms, counts, widths, key, head))
  cost_cache.save_acceptance(out_dir / cost_cache.ACCEPTANCE_FILE, counts, head)
  if opts.save_acceptance:
    cost_cache.save_acceptance(folder / cost_cache.ACCEPTANCE_FILE, counts, head)
  logging.info("wrote %s and %s%s", out_dir / "costs.json", cost_cache.ACCEPTANCE_FILE,
               f" (and {folder / cost_cache.ACCEPTANCE_FILE})" if opts.save_acceptance else "")
  return {"header": head, "step_ms": {b: t.tolist() for b, t in step_ms.items()},
          "acceptance": {k: v.tolist() for k, v in counts.items()}}


def hf_reference(opts: Options, cfg: ModelConfig) -> HfReference | None:
  """--compare_hf: transformers on torch CPU, when torch is installed."""
  if not opts.compare_hf:
    return None
  if importlib.util.find_spec("torch") is None:
    logging.warning("--compare_hf: torch is not installed; skipping the HF comparison")
    return None
  start = time.perf_counter()
  hf_ref = HfReference(opts.model, cfg.dtype, opts.hf_num_threads)
  logging.info("loaded the HF transformers reference in %.1f s (torch %s, %d threads)",
               time.perf_counter() - start, hf_ref.version, hf_ref.num_threads)
  return hf_ref


def time_modes(opts: Options, work: Workload, header: dict, out_dir: pathlib.Path) -> dict:
  """Every mode (and HF) per batch size: {"header", "rows"}, bench.json after each size."""
  for m in opts.modes:  # a tree size this drafter's block has no verify width for
    base, nodes = runners.split_mode(m)
    try:
      flex_lib.FlexConfig(mode=base, tree_nodes=nodes)
      flex_lib.tree_shape(flex_lib.FlexConfig(tree_nodes=nodes), work.dcfg.block_size)
    except ValueError as e:
      raise app.UsageError(f"--modes={m}: {e}") from None
  hf_ref = hf_reference(opts, work.cfg)
  result = {"header": header, "rows": []}
  if hf_ref is not None:
    header["torch_num_threads"] = hf_ref.num_threads
  for b in opts.batch_sizes:
    groups = make_groups(work.prompt_ids, b, opts.group_by_length)
    modes = list(dict.fromkeys(("ar",) + opts.modes))
    logging.info("batch %d, %d group(s): %s, timed in interleaved rounds", b, len(groups),
                 ", ".join(modes))
    ours = runners.time_interleaved({m: runners.runner(m)(work, groups) for m in modes},
                                    work.repeats)
    hf = None
    if hf_ref is not None:
      logging.info("hf: batch %d, %d group(s)", b, len(groups))
      hf = hf_ref.run(work, groups)
    for mode in opts.modes:
      result["rows"].append(ties.make_row(mode, b, ours[mode], hf, work, ours["ar"],
                                          [p for g in groups for p in g]))
    # Written after every batch size, so a run cut short keeps what it measured.
    header["load_avg_end"] = report.load_avg()
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
  report.plot_throughput(result["rows"], out_dir / "throughput.png")
  print(report.format_table(result["rows"]))
  logging.info("wrote %s and %s", out_dir / "bench.json", out_dir / "throughput.png")
  return result


def profile(opts: Options, work: Workload, result: dict, out_dir: pathlib.Path) -> list[dict]:
  """--profile: the AR step's pieces per batch size -> ar_profile.json."""
  entries = []
  for b in opts.batch_sizes:
    logging.info("profile: batch %d", b)
    entry = profiling.profile_step(work, b, opts.profile_runs)
    ar_row = next((r for r in result["rows"] if r["mode"] == "ar" and r["batch_size"] == b), None)
    entry["generate_ms_per_step"] = ar_row["ms_per_step"] if ar_row else None
    entries.append(entry)
  out = {"header": dict(result["header"], load_avg_end=report.load_avg()), "profile": entries}
  (out_dir / "ar_profile.json").write_text(json.dumps(out, indent=2) + "\n")
  print(report.format_profile(entries))
  logging.info("wrote %s", out_dir / "ar_profile.json")
  return entries


def run(opts: Options) -> dict[str, Any]:
  """Runs the benchmark; writes and returns {"header": ..., "rows": [...]}."""
  options_lib.validate(opts)
  out_dir = pathlib.Path(opts.out_dir)
  work, drafter_header, fingerprint = load_workload(opts, out_dir)
  unroll = isinstance(work.params["layers"], tuple)
  if work.draft is not None:
    folder = pathlib.Path(drafter_header["drafter"])
    acceptance = (cost_cache.load_acceptance(folder) if opts.costs == "auto"
                  and not opts.calibrate else None)
    key = cost_cache.setup_key(
        work.cfg, fingerprint, work.dcfg, cost_cache.drafter_digest(folder) + (
            "-no_calibration" if opts.no_calibration else ""), unroll, acceptance and acceptance[1],
        drafter_header["draft_vocab"])
    if opts.calibrate:
      return calibrate(opts, work, key, drafter_header, out_dir)
    if opts.costs == "auto":
      work.auto_costs = acceptance and (key, acceptance[0])
    elif opts.costs != "none":
      try:
        work.costs = planner.load_tables(opts.costs, flex_lib.verify_buckets(work.dcfg.block_size),
                                         cost_cache.identity(key))
      except planner.CostTableError as e:
        raise app.UsageError(str(e)) from None
  header = dict(report.header(opts, work.cfg), unroll_layers=unroll, **drafter_header)
  result = time_modes(opts, work, header, out_dir)
  if opts.profile:
    result["profile"] = profile(opts, work, result, out_dir)
  return result


PROG = "python -m flexdraft_jax.bench"


def main(argv):
  """The CLI's main (behind `cli.wrap` in `__main__`: user errors are one line, exit 2)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if options_lib.compilation_cache():
    cost_cache.enable_compilation_cache()
  run(options_lib.options_from_flags())

"""The benchmark's flags, its settings (`Options`) and their validation."""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Sequence

from absl import app
from absl import flags

from flexdraft_jax import flex as flex_lib
from flexdraft_jax.bench import runners

_MODEL = flags.DEFINE_string(
    "model", "smollm2-135m-instruct",
    "`smollm2-135m-instruct` (bundled GGUF), a .gguf file, or an HF checkpoint folder.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Compute/param dtype; auto = f32 on CPU, bf16 on accelerators.")
_UNROLL = flags.DEFINE_bool(
    "unroll_layers", None, "Run layers from per-layer param trees (XLA:CPU copies each "
    "layer's weights out of stacked arrays on every scan step; the CPU matmul kernel reads "
    "packed stacks in place); default: on CPU without the kernel, as `Engine` does.")
_PROMPTS = flags.DEFINE_string("prompts", "mtbench",
                               "mtbench, sharegpt-heldout, or a path to a .jsonl prompt file.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 8, "Prompts used (the first ones of the set).")
_GROUP_BY_LENGTH = flags.DEFINE_bool(
    "group_by_length", False, "Sort the prompts by length, longest first, before cutting them into "
    "batches (as Engine.generate groups them); default: batches of consecutive prompts.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt (at most).")
_MODES = flags.DEFINE_list("modes", ["ar"], "Decoding modes to time; known: ar, parallel, "
                           "sequential, flex, pld (ar always runs, as the reference). A drafted "
                           "mode takes @N for token trees of at most N nodes (@1: chains; "
                           "bare: auto, a tree as large as the block), e.g. "
                           "parallel@1,parallel.")
_DRAFTER = flags.DEFINE_string("drafter", None, "Exported drafter folder; default: a random one.")
_RANDOM_LAYERS = flags.DEFINE_integer("random_drafter_layers", 4,
                                      "Draft layers K of the random drafter (no --drafter).")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 8, "Block size of the random drafter.")
_NO_CALIB = flags.DEFINE_bool(
    "no_calibration", False, "Ablation: decode without the drafter's calibration MLP (parallel "
    "steps then draft slots 1.. from the raw slot logits; sequential steps never use it).")
_DRAFT_VOCAB = flags.DEFINE_integer(
    "draft_vocab", None, "Tokens the drafts are drawn from, the most frequent in the drafter's "
    "training data (its token_counts.npz); default: drafter.default_draft_vocab (a sixth "
    "of the vocabulary) where the drafter has counts; 0: the whole vocabulary.", lower_bound=0)
_CALIBRATE = flags.DEFINE_bool("calibrate", False, "Only measure the flex planner's cost table "
                                "(step times per batch size, kind and verify width; the "
                                "drafter's acceptance by depth and confidence) and write "
                                "out_dir/costs.json and out_dir/acceptance.json.")
_SAVE_ACCEPTANCE = flags.DEFINE_bool(
    "save_acceptance", False, "With --calibrate: also write acceptance.json into the drafter "
    "folder, where decode.py's measured cost tables (--costs=auto) read it.")
_COMPILE_CACHE = flags.DEFINE_bool(
    "compilation_cache", True, "Keep compiled programs in the persistent XLA cache "
    "($XDG_CACHE_HOME/flexdraft_jax/xla); compile times are reported either way.")
_COSTS = flags.DEFINE_string("costs", "auto", "The speculative modes' cost table: 'auto' = "
                             "measured on first use per batch size and cached (needs the "
                             "drafter's acceptance.json), a costs.json of --calibrate, or "
                             "'none' (flex switches on the active row count).")
_MAX_PROMPT = flags.DEFINE_integer(
    "max_prompt_tokens", None, "Skip prompts longer than this many chat-templated tokens (the "
    "first --num_prompts of the rest are used); default: keep all.")
_STRATEGY = flags.DEFINE_enum("verify_strategy", "cumulative_product", list(flex_lib.STRATEGIES[:2])
                              + ["full"], "How many drafts a speculative step verifies ('full': "
                              "all, one compiled width, the fastest to compile).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to time.")
_COMPARE_HF = flags.DEFINE_bool(
    "compare_hf", True, "Also time HF transformers (torch, CPU) greedy `generate` on the same "
    "prompts, and check its tokens against ours. Skipped with a warning without torch.")
_HF_THREADS = flags.DEFINE_integer(
    "hf_num_threads", None, "torch intra-op threads for the HF reference; default: torch's own "
    "(one per core). On a busy machine 1 can be much faster than the default.")
_IGNORE_EOS = flags.DEFINE_bool(
    "ignore_eos", True, "Generate exactly --max_new_tokens per row on both sides (ours: no stop "
    "ids; HF: min_new_tokens=max_new_tokens), so both do the same work.")
_OUT_DIR = flags.DEFINE_string("out_dir", "bench_out", "Where the JSON results are written.")
_PROFILE = flags.DEFINE_bool("profile", False,
                             "Also time the pieces of one AR decode step (ar_profile.json).")
_PROFILE_RUNS = flags.DEFINE_integer("profile_runs", 20, "Timed runs per profiled piece.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed rounds per group (each round runs every "
                                "mode once, in reverse order every other round); the median is "
                                "reported.")


@dataclasses.dataclass(frozen=True)
class Options:
  """The benchmark's settings (one field per flag)."""
  model: str = "smollm2-135m-instruct"
  dtype: str | None = None           # None: f32 on CPU, bf16 on accelerators
  unroll_layers: bool | None = None  # None: model.decoding_params' default
  prompts: str = "mtbench"
  num_prompts: int = 8
  group_by_length: bool = False
  max_new_tokens: int = 64
  modes: tuple[str, ...] = ("ar",)
  drafter: str | None = None         # None: a random drafter, exported to out_dir
  random_drafter_layers: int = 4
  block_size: int = 8
  no_calibration: bool = False
  draft_vocab: int | None = None     # None: drafter.default_draft_vocab with counts; 0: all
  verify_strategy: str = "cumulative_product"
  calibrate: bool = False
  costs: str = "auto"                # auto, none, or a --calibrate costs.json
  save_acceptance: bool = False      # --calibrate also writes the drafter's acceptance.json
  max_prompt_tokens: int | None = None
  batch_sizes: tuple[int, ...] = (1, 8)
  compare_hf: bool = True
  hf_num_threads: int | None = None  # None: torch's default
  ignore_eos: bool = True
  out_dir: str = "bench_out"
  profile: bool = False
  profile_runs: int = 20
  repeats: int = 2


def validate(opts: Options) -> None:
  """Raises app.UsageError for bad settings, before anything slow happens."""
  if not [m for m in opts.modes if m]:
    raise app.UsageError(f"--modes must name at least one mode of {', '.join(runners.MODES)}")
  for m in opts.modes:
    try:
      runners.split_mode(m)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  unknown = [m for m in opts.modes if runners.split_mode(m)[0] not in runners.MODES]
  if unknown:
    raise app.UsageError(f"unknown --modes {unknown or opts.modes}; known: {', '.join(runners.MODES)}")
  if not opts.batch_sizes or any(b < 1 for b in opts.batch_sizes):
    raise app.UsageError(f"--batch_sizes must be positive integers, got {opts.batch_sizes}")
  if opts.num_prompts < max(opts.batch_sizes):
    raise app.UsageError(f"--num_prompts={opts.num_prompts} is smaller than the largest batch "
                         f"size {max(opts.batch_sizes)}; each batch needs that many prompts")
  if opts.max_new_tokens < 1:
    raise app.UsageError(f"--max_new_tokens must be >= 1, got {opts.max_new_tokens}")
  if opts.hf_num_threads is not None and opts.hf_num_threads < 1:
    raise app.UsageError(f"--hf_num_threads must be >= 1, got {opts.hf_num_threads}")
  if opts.repeats < 1 or opts.profile_runs < 1:
    raise app.UsageError("--repeats and --profile_runs must be >= 1")
  if opts.max_prompt_tokens is not None and opts.max_prompt_tokens < 1:
    raise app.UsageError(f"--max_prompt_tokens must be >= 1, got {opts.max_prompt_tokens}")
  if opts.costs not in ("auto", "none") and not pathlib.Path(opts.costs).is_file():
    why = "is a directory" if pathlib.Path(opts.costs).is_dir() else "does not exist"
    raise app.UsageError(f"--costs={opts.costs} {why} (or pass auto or none)")
  if opts.drafter is not None and not pathlib.Path(opts.drafter).exists():
    raise app.UsageError(f"--drafter={opts.drafter} does not exist")
  out = pathlib.Path(opts.out_dir or ".").absolute()
  existing = next(p for p in (out, *out.parents) if p.exists())
  if not existing.is_dir():
    raise app.UsageError(f"--out_dir={opts.out_dir}: {existing} is a file, not a folder")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise app.UsageError(f"--out_dir={opts.out_dir}: {existing} is not writable")
  if opts.save_acceptance and (not opts.calibrate or opts.drafter is None):
    raise app.UsageError("--save_acceptance needs --calibrate and --drafter")
  if opts.block_size < 2 or opts.random_drafter_layers < 1:
    raise app.UsageError("--block_size must be >= 2 and --random_drafter_layers >= 1")



def _int_list(name: str, values: Sequence[str]) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise app.UsageError(f"--{name} must be a comma list of integers, got "
                         f"{','.join(values)}") from None


def compilation_cache() -> bool:
  return _COMPILE_CACHE.value


def options_from_flags() -> Options:
  return Options(
      model=_MODEL.value, dtype=None if _DTYPE.value == "auto" else _DTYPE.value,
      unroll_layers=_UNROLL.value,
      prompts=_PROMPTS.value, num_prompts=_NUM_PROMPTS.value,
      group_by_length=_GROUP_BY_LENGTH.value, max_new_tokens=_MAX_NEW.value,
      modes=tuple(m.strip() for m in _MODES.value), drafter=_DRAFTER.value,
      random_drafter_layers=_RANDOM_LAYERS.value, block_size=_BLOCK_SIZE.value,
      no_calibration=_NO_CALIB.value, draft_vocab=_DRAFT_VOCAB.value,
      verify_strategy=_STRATEGY.value, calibrate=_CALIBRATE.value, costs=_COSTS.value,
      save_acceptance=_SAVE_ACCEPTANCE.value,
      max_prompt_tokens=_MAX_PROMPT.value,
      batch_sizes=_int_list("batch_sizes", _BATCH_SIZES.value), compare_hf=_COMPARE_HF.value,
      hf_num_threads=_HF_THREADS.value, ignore_eos=_IGNORE_EOS.value, out_dir=_OUT_DIR.value,
      profile=_PROFILE.value, profile_runs=_PROFILE_RUNS.value, repeats=_REPEATS.value)

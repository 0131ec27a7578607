"""Checks of a training config (configs/*.py plus --config.* overrides) before any work.

`validate(config, mode)` raises `ConfigError`, a one-line message that names the
field (`config.optim.learning_rate must be > 0, got -1.0`), before any data is
built, any weights are loaded or anything is compiled. `unknown_override` turns
ml_collections' error for a --config.KEY that does not exist into one line with
its suggestion.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re

from flexdraft_jax import cli
from flexdraft_jax import resources
from flexdraft_jax.model_config import FAMILIES, ModelConfig

DTYPES = ("", "float32", "bfloat16")
EXPORT_DTYPES = ("bfloat16", "float32")   # checkpoint.EXPORT_DTYPES
RESPONSES = ("self", "original")          # data.RESPONSE_MODES
LABELS = ("data", "target_argmax")        # training.LossConfig.labels
KV_DTYPES = ("bfloat16", "float32")       # kv_data.DTYPES
CALIB_TARGETS = ("logits", "hidden")      # drafter.CALIB_TARGETS
MODES = ("train", "generate", "memory", "cache_kv")  # train.py --mode


class ConfigError(cli.UserError, ValueError):
  """A config field out of range; the message is one line that names the field."""


def _at_least(config, name: str, low, kind=int):
  value = _get(config, name)
  kinds = (int,) if kind is int else (int, float)
  if (not isinstance(value, kinds) or isinstance(value, bool) or not math.isfinite(value)
      or value < low):
    raise ConfigError(f"config.{name} must be {'an integer' if kind is int else 'a number'} "
                      f">= {low}, got {value!r}")


def _positive(config, name: str):
  value = _get(config, name)
  if isinstance(value, float) and math.isinf(value):
    raise ConfigError(f"config.{name} must be a finite number, got {value!r}")
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ConfigError(f"config.{name} must be > 0, got {value!r}")


def _in_range(config, name: str, low: float, high: float):
  value = _get(config, name)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
    # nan fails the comparison too
    raise ConfigError(f"config.{name} must be in [{low}, {high}), got {value!r}")


def _one_of(config, name: str, choices):
  value = _get(config, name)
  if value not in choices:
    raise ConfigError(f"config.{name} must be one of {', '.join(map(repr, choices))}, "
                      f"got {value!r}")


def _get(config, name: str):
  node = config
  for part in name.split("."):
    if part not in node:
      raise ConfigError(f"config.{name} is missing (the config file must define it)")
    node = node[part]
  return node


def mesh_shape(mesh) -> tuple[int, int, int] | None:
  """(data, fsdp, tensor) of config.mesh, None for 'auto'; ConfigError if malformed."""
  if mesh == "auto":
    return None
  try:
    shape = tuple(int(s) for s in str(mesh).split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise ConfigError(f"config.mesh must be 'auto' or three positive 'data,fsdp,tensor' sizes, "
                      f"got {mesh!r}")
  return shape


def _check_model(config, mode: str) -> None:
  model = _get(config, "model")
  if not isinstance(model, str) or not model:
    raise ConfigError(f"config.model must be {resources.SMOLLM2_NAME!r}, a .gguf file, an HF "
                      f"folder or 'random', got {model!r}")
  if model == "random":
    if not _get(config, "tokenizer"):
      raise ConfigError("config.tokenizer must name a tokenizer for model='random' "
                        f"(e.g. {resources.SMOLLM2_NAME!r})")
    arch = _get(config, "random_model").to_dict()
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"dtype", "param_dtype"}
    unknown = sorted(set(arch) - fields)
    if unknown:
      raise ConfigError(f"config.random_model.{unknown[0]} is not a ModelConfig field")
    if arch.get("family") not in FAMILIES:
      raise ConfigError(f"config.random_model.family must be one of {FAMILIES}, got "
                        f"{arch.get('family')!r}")
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
             "num_kv_heads", "head_dim")
    for name in sizes + (("max_position",) if "max_position" in arch else ()):
      _at_least(config, f"random_model.{name}", 1)
    try:
      ModelConfig(**{**arch, "rope_scaling": None})
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.random_model: {e}") from None
  elif (model != resources.SMOLLM2_NAME and mode != "memory"
        and not pathlib.Path(model).exists()):
    raise ConfigError(f"config.model={model!r} is neither {resources.SMOLLM2_NAME!r}, 'random' "
                      "nor an existing .gguf file or HF folder")
  if "model_arch" in config and mode == "memory":
    arch = config.model_arch.to_dict()
    if arch.get("family") not in FAMILIES:
      raise ConfigError(f"config.model_arch.family must be one of {FAMILIES}, got "
                        f"{arch.get('family')!r}")


def _check_paths(config, mode: str) -> None:
  for name in ("data.train_dir", "data.heldout_dir"):
    path = _get(config, name)
    if not isinstance(path, str):
      raise ConfigError(f"config.{name} must be a path or '' (the workdir's), got {path!r}")
    building = mode == "generate" or (mode in ("train", "cache_kv") and (_get(config, "data.generate_if_missing")
                                                           or _get(config, "data.archive")))
    if path and not building and mode != "memory" and not pathlib.Path(path).is_dir():
      if name == "data.heldout_dir" and not _get(config, "eval_every"):
        continue
      raise ConfigError(f"config.{name}={path!r} does not exist (build it with "
                        "train.py --mode=generate, or set data.generate_if_missing=True)")


def _check_archive(config, mode: str) -> None:
  path = _get(config, "data.archive")
  if not isinstance(path, str):
    raise ConfigError(f"config.data.archive must be a .npz path or '', got {path!r}")
  if path and mode in ("train", "cache_kv") and not pathlib.Path(path).is_file():
    why = "is a directory" if pathlib.Path(path).is_dir() else "does not exist"
    raise ConfigError(f"config.data.archive={path!r} {why}")


def _check_init_from(config, mode: str) -> None:
  path = _get(config, "init_from")
  if not isinstance(path, str):
    raise ConfigError(f"config.init_from must be an exported drafter folder or '', got {path!r}")
  folder = pathlib.Path(path)
  if path and mode == "train" and not ((folder / "drafter.json").is_file()
                                       or (folder / "config.json").is_file()):
    raise ConfigError(f"config.init_from={path!r} is not an exported drafter (no drafter.json "
                      "in it; train.py writes one to <workdir>/drafter) nor the authors' "
                      "release (config.json + safetensors)")


def _check_offline(config) -> None:
  offline = config.data.get("offline", False)
  if not isinstance(offline, bool):
    raise ConfigError(f"config.data.offline must be True or False, got {offline!r}")
  if "kv_dtype" in config.data:
    _one_of(config, "data.kv_dtype", KV_DTYPES)
  if offline and _get(config, "loss.labels") == "target_argmax":
    raise ConfigError("config.loss.labels='target_argmax' needs the clean pass, which "
                      "config.data.offline=True skips; use labels='data' or offline=False")


def validate(config, mode: str = "train") -> None:
  """ConfigError for the first field out of range (see the module docstring)."""
  if mode not in MODES:
    raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
  _check_model(config, mode)
  _one_of(config, "dtype", DTYPES)
  _one_of(config, "export_dtype", EXPORT_DTYPES)
  for name, low in (("drafter.num_draft_layers", 1), ("drafter.block_size", 2),
                    ("drafter.calib_rank", 0)):
    _at_least(config, name, low)
  if "calib_target" in config.drafter:
    _one_of(config, "drafter.calib_target", CALIB_TARGETS)
  _one_of(config, "data.responses", RESPONSES)
  for name, low in (("data.num_prompts", 1), ("data.num_heldout_prompts", 0),
                    ("data.max_prompt_len", 1), ("data.max_response_len", 1),
                    ("data.generate_batch_size", 1), ("seq_len", 2), ("batch_size", 1),
                    ("anchors_per_seq", 1), ("optim.warmup_steps", 0), ("optim.total_steps", 0),
                    ("num_steps", 1), ("log_every", 1), ("save_every", 1), ("eval_every", 0),
                    ("eval_batches", 1), ("seed", 0), ("decode_batch_size", 0),
                    ("decode_context", 0)):
    _at_least(config, name, low)
  if _get(config, "eval_every") and not _get(config, "data.num_heldout_prompts"):
    raise ConfigError("config.data.num_heldout_prompts must be >= 1 when eval_every > 0 "
                      "(or set eval_every=0)")
  if _get(config, "seq_len") < _get(config, "drafter.block_size") + 1:
    raise ConfigError(f"config.seq_len={config.seq_len} is below drafter.block_size + 1 = "
                      f"{config.drafter.block_size + 1}")
  _positive(config, "optim.learning_rate")
  for name in ("optim.weight_decay", "loss.calib_weight", "time_limit_s", "hbm_gib"):
    _at_least(config, name, 0, float)
  for name in ("optim.clip_norm", "loss.slot_decay"):
    _positive(config, name)
  for name in ("optim.b1", "optim.b2"):
    _in_range(config, name, 0.0, 1.0)
  _one_of(config, "loss.labels", LABELS)
  _check_offline(config)
  shape = mesh_shape(_get(config, "mesh"))
  if shape is not None and config.batch_size % (shape[0] * shape[1]):
    raise ConfigError(f"config.batch_size={config.batch_size} must be a multiple of data*fsdp="
                      f"{shape[0] * shape[1]} of config.mesh={config.mesh!r}")
  _check_paths(config, mode)
  _check_init_from(config, mode)
  _check_archive(config, mode)


def check_workdir(workdir) -> None:
  """cli.WorkdirError when `workdir` is empty, a file, or cannot be written (the nearest
  existing folder of a new one): before any work, as the run would fail at its first write."""
  if not workdir:
    raise cli.WorkdirError("--workdir must not be empty")
  path = pathlib.Path(workdir).absolute()
  if path.exists() and not path.is_dir():
    raise cli.WorkdirError(f"--workdir={workdir} is a file, not a directory")
  existing = next(p for p in (path, *path.parents) if p.exists())
  if not existing.is_dir():
    raise cli.WorkdirError(f"--workdir={workdir}: {existing} is a file, not a directory")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise cli.WorkdirError(f"--workdir={workdir}: {existing} is not writable")


def check_devices(config, num_devices: int) -> None:
  """ConfigError when config.mesh needs more devices than there are, or 'auto' (all devices
  on 'data') does not divide config.batch_size."""
  shape = mesh_shape(config.mesh)
  if shape is None:
    if config.batch_size % num_devices:
      raise ConfigError(f"config.batch_size={config.batch_size} must be a multiple of the "
                        f"{num_devices} devices of config.mesh='auto' (all on 'data')")
    return
  need = shape[0] * shape[1] * shape[2]
  if need > num_devices:
    raise ConfigError(f"config.mesh={config.mesh!r} needs {need} devices, {num_devices} are "
                      "available")


def unknown_override(error: Exception, argv) -> str | None:
  """A one-line message for ml_collections' error on a --config.KEY that does not exist.

  Returns None when `error` is not that error.
  """
  text = str(error).encode().decode("unicode_escape")
  key = re.search(r"'([^'\s]+)'", text)
  if key is None:
    return None
  flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.")
               and key.group(1) in a.split("=", 1)[0].split(".")), f"--config...{key.group(1)}")
  hint = re.search(r'Did you mean "([^"]+)"', text)
  suggestion = f" (did you mean {hint.group(1)!r}?)" if hint else ""
  return f"{flag}: the config has no field {key.group(1)!r}{suggestion}"

"""The authors' FlexDraft release as a drafter of ours.

The release (repository Yaro1214/FlexDraft, its Qwen3-8B drafter) is an HF-style
folder: a Qwen3 `config.json` and safetensors (one file, or shards with
`model.safetensors.index.json`), keys with or without a `model.` prefix, in
bf16, f16 or f32. What this module reads of it:

  config.json
    num_hidden_layers          K, the number of draft layers
    num_target_layers          the target's depth L
    block_size                 B
    flexdraft_config
      target_layer_ids         the target layers the draft layers pair with: they
                               must be split..L-1 (the split is the first id)
      enable_anchor_bias_logits, anchor_bias_rank
                               the calibration MLP and its rank r (256 unless given)
    hidden_size, num_attention_heads, num_key_value_heads, head_dim, vocab_size,
    rms_norm_eps, model_type   checked against the target's
  tensors (torch Linear weights are [out, in]; ours are [in, ...out])
    layers.{i}.self_attn.{q,k,v,o}_proj.weight  -> draft/layers/{q,k,v,o}_proj/kernel[i]
    layers.{i}.self_attn.{q,k}_norm.weight      -> draft/layers/{q,k}_norm/scale[i]
    mask_embedding [d]                          -> draft/mask
    anchor_bias_mlp.0.{weight [r, 2d], bias}    -> draft/calib/{w1, b1}
    anchor_bias_mlp.2.{weight [V, r], bias}     -> draft/calib/{w2, b2}

The release's copies of each layer's MLP and norms, and its final norm, are not
read: its forward pass uses the target's (as ours does). It records no target
weights fingerprint, so only the target's architecture can be checked.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import safetensors

from flexdraft_jax import checkpoint

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
PREFIX = "model."
DEFAULT_RANK = 256  # the release's anchor_bias_rank when its config names none
# The release's config field -> our target field (ModelConfig / checkpoint.TARGET_FIELDS).
ARCH_FIELDS = (("num_target_layers", "num_layers"), ("hidden_size", "hidden_size"),
               ("num_attention_heads", "num_heads"), ("num_key_value_heads", "num_kv_heads"),
               ("head_dim", "head_dim"), ("vocab_size", "vocab_size"),
               ("rms_norm_eps", "rms_norm_eps"))

_said: set[str] = set()


class ReleaseError(checkpoint.DrafterFileError):
  """The release folder is incomplete or not one this loader reads; the message says why."""


class ReleaseMismatchError(ReleaseError, checkpoint.DrafterMismatchError):
  """The release was made for another target architecture."""


def say_once(message: str) -> None:
  """One line on stderr, the first time this process has it to say."""
  if message not in _said:
    _said.add(message)
    print(f"flexdraft_jax: {message}", file=sys.stderr)


def release_folder(path) -> pathlib.Path | None:
  """The release folder `path` names (the folder or its config.json), None for anything
  else (an export of ours, a missing path). ReleaseError for a folder with a config.json
  that is not a FlexDraft release, e.g. the target's own folder."""
  path = pathlib.Path(path)
  folder = path.parent if path.name == CONFIG_FILE else path
  config = folder / CONFIG_FILE
  if not config.is_file() or (folder / checkpoint.META_FILE).is_file():
    return None
  hf = _read_config(folder)
  if "flexdraft_config" not in hf and "num_target_layers" not in hf:
    raise ReleaseError(f"{config} has neither flexdraft_config nor num_target_layers: not a "
                       f"FlexDraft release (and no {checkpoint.META_FILE}: not an export)")
  return folder


def _read_config(folder: pathlib.Path) -> dict:
  try:
    hf = json.loads((folder / CONFIG_FILE).read_text())
  except (OSError, ValueError) as e:
    raise ReleaseError(f"{folder / CONFIG_FILE} cannot be read: {e}") from None
  if not isinstance(hf, dict):
    raise ReleaseError(f"{folder / CONFIG_FILE} is not a JSON object")
  return hf


def drafter_config(folder: pathlib.Path, target_config: dict) -> dict:
  """Our drafter config (`drafter.DrafterConfig` fields) for the release in `folder`, after
  checking it against the target (`target_config`: its ModelConfig fields, at least
  checkpoint.TARGET_FIELDS). One-line ReleaseMismatchError / ReleaseError."""
  hf = _read_config(folder)
  where = folder / CONFIG_FILE
  if hf.get("model_type", "qwen3") != "qwen3" or target_config.get("family") != "qwen3":
    raise ReleaseMismatchError(
        f"{where}: the release drafts for a qwen3 target (model_type "
        f"{hf.get('model_type', 'qwen3')!r}); this target is {target_config.get('family')!r}")
  if hf.get("attention_bias"):
    raise ReleaseError(f"{where}: attention_bias=true, but Qwen3 projectors have no biases")
  release = {**hf, "head_dim": hf.get("head_dim") or _div(hf, "hidden_size",
                                                          "num_attention_heads")}
  optional = ("rms_norm_eps",)  # compared where both sides have it
  diffs = [f"{theirs}={release.get(theirs)!r}, this target has {ours}={target_config[ours]!r}"
           for theirs, ours in ARCH_FIELDS
           if ours in target_config and release.get(theirs) != target_config[ours]
           and not (theirs in optional and theirs not in release)]
  if diffs:
    raise ReleaseMismatchError(f"{where} was made for another target: {'; '.join(diffs)}")
  depth, k = target_config["num_layers"], hf.get("num_hidden_layers")
  fd = hf.get("flexdraft_config") or {}
  if not isinstance(fd, dict):
    raise ReleaseError(f"{where}: flexdraft_config is {type(fd).__name__}, not an object")
  ids = fd.get("target_layer_ids")
  if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
    raise ReleaseError(f"{where}: flexdraft_config.target_layer_ids is {ids!r}; it must list "
                       "the target layers the draft layers pair with")
  split = ids[0]
  if ids != list(range(split, depth)):
    raise ReleaseError(f"{where}: target_layer_ids {ids} is not a contiguous run ending at "
                       f"the target's last layer {depth - 1}")
  if not isinstance(k, int) or split + k != depth:
    raise ReleaseError(f"{where}: the split layer {split} plus num_hidden_layers={k} draft "
                       f"layers is not the target's depth {depth}")
  block = hf.get("block_size")
  if not isinstance(block, int) or block < 2:
    raise ReleaseError(f"{where}: block_size is {block!r}; it must be an integer >= 2")
  rank = 0
  if fd.get("enable_anchor_bias_logits"):
    rank = fd.get("anchor_bias_rank", DEFAULT_RANK)
    if not isinstance(rank, int) or rank < 1:
      raise ReleaseError(f"{where}: anchor_bias_rank is {rank!r}; it must be an integer >= 1")
  else:
    say_once(f"{where}: calibration is disabled (enable_anchor_bias_logits is not true): "
             "loading the drafter without it (calib_rank 0)")
  return {"num_draft_layers": k, "block_size": block, "calib_rank": rank,
          "calib_target": "logits"}


def _div(hf: dict, a: str, b: str) -> Any:
  try:
    return hf[a] // hf[b]
  except (KeyError, TypeError, ZeroDivisionError):
    return None


def tensor_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name (as stored, prefix and all) -> the safetensors file holding it."""
  index = folder / INDEX_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
      files = {name: folder / file for name, file in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise ReleaseError(f"{index} cannot be read: {type(e).__name__}: {e}") from None
    missing = sorted({p.name for p in files.values() if not p.is_file()})
    if missing:
      raise ReleaseError(f"{index} names shard {missing[0]}, which is missing")
    return files
  shards = sorted(folder.glob("*.safetensors"))
  if not shards:
    other = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    hint = f" ({other[0]} is a torch pickle: save it with safetensors)" if other else ""
    raise ReleaseError(f"no *.safetensors files in {folder}{hint}")
  files = {}
  for path in shards:
    try:
      with safetensors.safe_open(path, framework="flax") as f:
        files.update({name: path for name in f.keys()})
    except safetensors.SafetensorError as e:
      raise ReleaseError(f"{path} is corrupt: {e}") from None
  return files


def expected_tensors(dcfg: dict, target_config: dict) -> dict[str, tuple[int, ...]]:
  """Release tensor name (no prefix) -> its torch shape, for every tensor we read."""
  d, n, kv, h, v = (target_config[f] for f in ("hidden_size", "num_heads", "num_kv_heads",
                                               "head_dim", "vocab_size"))
  out = {}
  for i in range(dcfg["num_draft_layers"]):
    a = f"layers.{i}.self_attn."
    out.update({a + "q_proj.weight": (n * h, d), a + "k_proj.weight": (kv * h, d),
                a + "v_proj.weight": (kv * h, d), a + "o_proj.weight": (d, n * h),
                a + "q_norm.weight": (h,), a + "k_norm.weight": (h,)})
  out["mask_embedding"] = (d,)
  r = dcfg["calib_rank"]
  if r:
    out.update({"anchor_bias_mlp.0.weight": (r, 2 * d), "anchor_bias_mlp.0.bias": (r,),
                "anchor_bias_mlp.2.weight": (v, r), "anchor_bias_mlp.2.bias": (v,)})
  return out


def read_tensors(folder: pathlib.Path, want: dict[str, tuple[int, ...]]) -> dict[str, Any]:
  """The tensors `want` names (jnp arrays as stored), shapes and dtypes checked."""
  files = tensor_files(folder)
  by_name = {name[len(PREFIX):] if name.startswith(PREFIX) else name: (name, path)
             for name, path in files.items()}
  out, handles = {}, {}
  try:
    for name, shape in want.items():
      if name not in by_name:
        raise ReleaseError(f"tensor {name} (or {PREFIX}{name}) is missing from the release in "
                           f"{folder}")
      stored, path = by_name[name]
      if path not in handles:
        handles[path] = safetensors.safe_open(path, framework="flax").__enter__()
      a = handles[path].get_tensor(stored)
      if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ReleaseError(f"tensor {stored} in {path.name} has dtype {a.dtype}; expected bf16, "
                           "f16 or f32")
      if tuple(a.shape) != shape:
        raise ReleaseError(f"tensor {stored} in {path.name} has shape {tuple(a.shape)}; the "
                           f"config implies {shape}")
      out[name] = a
  except safetensors.SafetensorError as e:
    raise ReleaseError(f"a safetensors file in {folder} is corrupt: {e}") from None
  finally:
    for f in handles.values():
      f.__exit__(None, None, None)
  return out


def draft_params(tensors: dict[str, Any], dcfg: dict, target_config: dict,
                 dtype: str | None = None) -> dict:
  """Our draft tree (`drafter.init_draft`'s layout, layers stacked [K, ...]) from the
  release's tensors; floats cast to `dtype` when given, else kept as stored."""
  d, n, kv, h = (target_config[f] for f in ("hidden_size", "num_heads", "num_kv_heads",
                                            "head_dim"))
  cast = lambda a: a.astype(dtype) if dtype else a
  heads = {"q_proj": n, "k_proj": kv, "v_proj": kv}

  def layer(i):
    get = lambda key: tensors[f"layers.{i}.self_attn.{key}"]
    attn = {name: {"kernel": get(f"{name}.weight").T.reshape(d, heads[name], h)}
            for name in heads}
    attn["o_proj"] = {"kernel": get("o_proj.weight").T.reshape(n, h, d)}
    attn["q_norm"] = {"scale": get("q_norm.weight")}
    attn["k_norm"] = {"scale": get("k_norm.weight")}
    return attn

  layers = [layer(i) for i in range(dcfg["num_draft_layers"])]
  stack = lambda *xs: cast(jnp.stack(xs))
  draft = {"mask": cast(tensors["mask_embedding"]),
           "layers": {name: {key: stack(*(l[name][key] for l in layers))
                             for key in layers[0][name]} for name in layers[0]}}
  if dcfg["calib_rank"]:
    draft["calib"] = {"w1": cast(tensors["anchor_bias_mlp.0.weight"].T),
                      "b1": cast(tensors["anchor_bias_mlp.0.bias"]),
                      "w2": cast(tensors["anchor_bias_mlp.2.weight"].T),
                      "b2": cast(tensors["anchor_bias_mlp.2.bias"])}
  return draft


def load_release(folder: pathlib.Path, target_config: dict,
                 dtype: str | None = None) -> tuple[dict, dict]:
  """(drafter config, draft params) of the release in `folder` for this target: what
  `checkpoint.load_drafter` returns for an export. Says once on stderr that the target's
  weights cannot be verified (the release has no fingerprint)."""
  dcfg = drafter_config(folder, target_config)
  draft = draft_params(read_tensors(folder, expected_tensors(dcfg, target_config)), dcfg,
                       target_config, dtype)
  say_once(f"{folder} is the authors' FlexDraft release: it records no target fingerprint, so "
           "only the target's architecture was checked, not that its weights are the ones the "
           "drafter was trained on")
  return dcfg, draft


# ----------------------------------------------------------------------------
# The convert command: python -m flexdraft_jax.checkpoint convert SRC DST --model=TARGET
# ----------------------------------------------------------------------------
def convert(src: str | pathlib.Path, dst: str | pathlib.Path, model: str,
            dtype: str = "auto") -> pathlib.Path:
  """Writes the drafter in `src` (the authors' release, or an export) as our export in
  `dst`, for the target `model` (a name, .gguf file or HF folder: `weights.load_model`),
  with that target's fingerprint. `dtype` 'auto' keeps f32 where the source has any f32
  tensor and writes bf16 otherwise. Returns the drafter.json path."""
  from flexdraft_jax import weights  # pylint: disable=g-import-not-at-top
  if dtype not in ("auto",) + checkpoint.EXPORT_DTYPES:
    raise ValueError(f"dtype must be auto or one of {checkpoint.EXPORT_DTYPES}, got {dtype!r}")
  if pathlib.Path(dst).resolve() == checkpoint.drafter_dir(src).resolve():
    raise ReleaseError(f"{dst} is the source folder: write the export elsewhere")
  release, config = release_folder(src), pathlib.Path(model) / CONFIG_FILE
  if release is not None and config.is_file():  # check the architecture before the weights load
    arch = weights.config_from_hf(_read_config(config.parent), False, "bfloat16", "bfloat16")
    drafter_config(release, dataclasses.asdict(arch))
  cfg, params = weights.load_model(model, dtype="bfloat16")  # the fingerprint reads bf16
  target = dataclasses.asdict(cfg)
  meta, draft = checkpoint.load_drafter(src, target, None)
  if dtype == "auto":
    wide = any(x.dtype == jnp.float32 for x in jax.tree.leaves(draft))
    dtype = "float32" if wide else "bfloat16"
  fingerprint = checkpoint.target_fingerprint(target, params)
  return checkpoint.export_drafter(dst, jax.device_get(draft), meta, target, fingerprint,
                                   dtype=dtype)


USAGE = "python -m flexdraft_jax.checkpoint convert SRC DST --model=TARGET [--dtype=auto]"


def main() -> None:
  """The `convert` command (absl flags, one-line usage errors through `cli`)."""
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from flexdraft_jax import cli, weights  # pylint: disable=g-import-not-at-top
  model = flags.DEFINE_string("model", None, "The target: smollm2-135m-instruct, a .gguf file "
                              "or an HF folder (e.g. Qwen3-8B's); its fingerprint is recorded.")
  dtype = flags.DEFINE_enum("dtype", "auto", ("auto",) + checkpoint.EXPORT_DTYPES,
                            "Export dtype; auto = f32 if the source has f32 tensors, else bf16.")

  def run(argv):
    if len(argv) != 4 or argv[1] != "convert":
      raise app.UsageError(f"usage: {USAGE}")
    if model.value is None:
      raise app.UsageError("--model is required: the target the drafter serves")
    logging.set_verbosity(logging.WARNING)  # jax logs its backend search at INFO
    try:
      path = convert(argv[2], argv[3], model.value, dtype.value)
    except (checkpoint.DrafterFileError, checkpoint.DrafterMismatchError,
            weights.WeightsError) as e:
      raise app.UsageError(str(e)) from None
    print(f"wrote {path} (fingerprint of {model.value})")

  cli.run(run, "python -m flexdraft_jax.checkpoint")

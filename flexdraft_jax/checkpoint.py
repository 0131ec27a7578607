"""Training checkpoints, preemption, and the standalone drafter artifact.

Training checkpoints live in `workdir/checkpoints/<step>/` (an orbax
CheckpointManager) with three items: `state` ({'step', 'draft', 'opt_state'};
the frozen target is never saved), `data` (the grain iterator state) and
`config` (the run config as JSON). Orbax writes each step to
`<step>.orbax-checkpoint-tmp` and renames it when complete (on GCS it writes
`commit_success.txt` instead), so an interrupted save is never listed as a step;
a Checkpointer deletes leftover temporary dirs when it opens the workdir. A step whose
files were damaged afterwards (a full disk, a crash of a shared filesystem, an empty
step folder) is skipped with a one-line warning: a run resumes from the newest step
that restores, and no checkpoint is ever deleted for it (one saved again at the same
step moves the damaged folder aside to `<step>.unrestorable-<time>` first).

The exported drafter is `drafter.safetensors` (params named by their '.'-joined
paths) plus `drafter.json` (format, drafter config, and the target it was
trained for: architecture facts and a weights fingerprint).
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import time
import warnings
import zipfile
import zlib
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy

# Config keys that may change when resuming a run (matched on the last
# component of a nested key); any other change is a CheckpointError.
RESUMABLE_KEYS = frozenset({"num_steps", "time_limit_s", "log_every", "save_every", "eval_every",
                            "decode_batch_size", "decode_context"})

TARGET_FIELDS = ("family", "hidden_size", "num_layers", "vocab_size", "num_heads",
                 "num_kv_heads", "head_dim")
DRAFTER_FORMAT = "flexdraft-jax-drafter"
DRAFTER_VERSION = 1
WEIGHTS_FILE = "drafter.safetensors"
META_FILE = "drafter.json"
# Response token counts of the drafter's training data: its draft vocabulary
# (drafter.vocab_ids / restrict_vocab), optional.
TOKEN_COUNTS_FILE = "token_counts.npz"
EXPORT_DTYPES = ("bfloat16", "float32")
SAMPLE_SIZE = 4096  # most values hashed per target leaf


class CheckpointError(ValueError):
  """The checkpoints in the workdir cannot be used by this run; the message says why."""


class DrafterMismatchError(ValueError):
  """The exported drafter was trained for a different target model."""


class DrafterFileError(ValueError):
  """The exported drafter is missing, corrupt, or of an unknown format."""


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Nested dicts -> {key path: leaf}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  tree = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


# ----------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------
def _config_diff(old: dict, new: dict) -> list[str]:
  """'key: old -> new' for every differing key not in RESUMABLE_KEYS (nested keys '.'-joined)."""
  old, new = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
  absent = "<absent>"
  return [f"{'.'.join(key)}: {old.get(key, absent)!r} -> {new.get(key, absent)!r}"
          for key in sorted(old.keys() | new.keys())
          if key[-1] not in RESUMABLE_KEYS and old.get(key, absent) != new.get(key, absent)]


class Checkpointer:
  """Saves and restores the train state, data iterator and config under `workdir/checkpoints`.

  Opening a workdir whose newest readable checkpoint has a different config (outside
  RESUMABLE_KEYS) raises CheckpointError. Interval saves are asynchronous (the
  next save waits for the previous one); forced saves, `latest_step`, `restore`
  and `close` wait until every started save is finalized. A checkpoint that does not
  restore is skipped with one warning line on stderr (`skipped` lists them), never
  deleted.
  """

  def __init__(self, workdir: str | os.PathLike, config: dict, save_interval_steps: int,
               max_to_keep: int | None = 3):
    self.config = json.loads(json.dumps(config))
    self.skipped: dict[int, str] = {}  # step -> why it does not restore
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        create=True, cleanup_tmp_directories=True,
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_interval_steps),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(max_to_keep))
    self._manager = ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints",
                                          options=options)
    try:
      self._check_config()
    except Exception:
      self.close()
      raise

  @property
  def directory(self) -> pathlib.Path:
    return pathlib.Path(self._manager.directory)

  def _skip(self, step: int, error: Exception) -> None:
    """Remembers that `step` does not restore, and says so once (process 0)."""
    if step in self.skipped:
      return
    lines = str(error).strip().splitlines() or [""]
    self.skipped[step] = f"{type(error).__name__}: {lines[0][:200]}"
    if jax.process_index() == 0:
      print(f"warning: checkpoint {self.directory / str(step)} does not restore "
            f"({self.skipped[step]}); skipped, not deleted", file=sys.stderr)

  def _check_config(self):
    """The config of the newest checkpoint whose config restores against this run's."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        saved = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
      except Exception as e:  # noqa: BLE001 - damaged on disk: any error of the reader
        self._skip(step, e)
        continue
      diffs = _config_diff(saved, self.config)
      if diffs:
        raise CheckpointError(
            f"the checkpoints in {self.directory} were made with a different config (step "
            f"{step}); these keys must not change on resume:\n  " + "\n  ".join(diffs) +
            f"\nUse a new workdir, or restore those values (keys that may change: "
            f"{', '.join(sorted(RESUMABLE_KEYS))}).")
      return

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (whether it restores or not), or None."""
    self._manager.wait_until_finished()
    return self._manager.latest_step()

  def maybe_save(self, step: int, state: dict, data_iter: grain.DatasetIterator | None = None,
                 force: bool = False) -> bool:
    """Saves when `step` is a multiple of the interval, or any new step when `force`.

    Returns whether a save started. A forced save (preemption, end of training)
    returns once the checkpoint is complete on disk; forcing a step that is
    already saved only waits for it. A step saved before that does not restore
    (`skipped`) is moved aside first, to `<step>.unrestorable-<time>`.
    """
    if step in self.skipped and step in self._manager.all_steps():
      self._manager.wait_until_finished()
      if jax.process_index() == 0:
        aside = self.directory / f"{step}.unrestorable-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(self.directory / str(step), aside)
        print(f"warning: moved the checkpoint that does not restore to {aside}",
              file=sys.stderr)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices(f"checkpoint_aside_{step}")
      self._manager.reload()
      del self.skipped[step]
    if step in self._manager.all_steps():
      saved = False
    else:
      items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(self.config)}
      if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if force:
      self._manager.wait_until_finished()
    return saved

  def _restore_step(self, step: int, abstract_state: Any,
                    data_iter: grain.DatasetIterator | None) -> Any:
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.Array) else x, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_newest(self, abstract_state: Any,
                     data_iter: grain.DatasetIterator | None = None) -> tuple[int, Any] | None:
    """(step, state) of the newest checkpoint that restores, `data_iter`'s position set in
    place; None when there is no checkpoint. Each newer one that does not restore is
    warned about in one line and left on disk; CheckpointError when none restores.

    `abstract_state` gives the tree structure, dtypes and shardings: arrays or
    `jax.ShapeDtypeStruct`s with a `.sharding` (e.g. from `jax.eval_shape`, or
    `training.state_shardings` of the current mesh). Arrays are passed to orbax as
    ShapeDtypeStructs with their shardings, so every leaf is read straight into
    its target sharding: a checkpoint saved under one mesh restores under another.
    A ShapeDtypeStruct without a sharding gets the layout recorded in the checkpoint.
    """
    self._manager.wait_until_finished()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    _quiet_closed_loop_callbacks()  # before any read: a failed one's leftovers race it
    for step in steps:
      if step in self.skipped:
        continue
      try:
        return step, self._restore_step(step, abstract_state, data_iter)
      except Exception as e:  # noqa: BLE001 - damaged on disk: any error of the reader
        self._skip(step, e)
      _drop_failed_reads()
    raise CheckpointError(
        f"none of the {len(steps)} checkpoints in {self.directory} restores (steps "
        f"{', '.join(map(str, steps))}; newest: {self.skipped[steps[0]]}); nothing was "
        "deleted: move that folder away to start from scratch, or use another workdir")

  def restore(self, abstract_state: Any, data_iter: grain.DatasetIterator | None = None) -> Any:
    """The state of `restore_newest`; CheckpointError when there is no checkpoint."""
    restored = self.restore_newest(abstract_state, data_iter)
    if restored is None:
      raise CheckpointError(f"no checkpoint to restore in {self.directory}")
    return restored[1]

  def close(self):
    self._manager.close()  # waits for outstanding saves

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc):
    self.close()


def _quiet_closed_loop_callbacks() -> None:
  """From now on, drops the unraisable 'RuntimeError: Event loop is closed' that reads of a
  failed orbax restore raise when they finish after the restore gave up (tensorstore calls
  back into its closed event loop; sys.unraisablehook would print each with a traceback;
  the skip's one line says what failed). Any other unraisable is printed as before."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    if not (unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)
  hook._drops_closed_loop_callbacks = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _drop_failed_reads() -> None:
  """Collects the read tasks a failed orbax restore leaves behind, with asyncio's logger
  off: each would log 'Task exception was never retrieved' and a traceback."""
  log = logging.getLogger("asyncio")
  level = log.level
  log.setLevel(logging.CRITICAL)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      gc.collect()
  finally:
    log.setLevel(level)


class SigtermFlag:
  """Installs a SIGTERM handler that only sets a flag (nothing is saved inside it).

  The train loop checks `is_set()` after each step; when set it forces a save
  and exits. `uninstall()` (or leaving the `with` block) restores the previous
  handler. Install from the main thread.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._event.set())

  def is_set(self) -> bool:
    return self._event.is_set()

  def uninstall(self):
    signal.signal(signal.SIGTERM, self._previous)

  def __enter__(self) -> SigtermFlag:
    return self

  def __exit__(self, *exc):
    self.uninstall()


# ----------------------------------------------------------------------------
# Standalone drafter artifact
# ----------------------------------------------------------------------------
def _target_arch(target_config: dict) -> dict:
  missing = [f for f in TARGET_FIELDS if f not in target_config]
  if missing:
    raise ValueError(f"target config lacks {', '.join(missing)}")
  return {f: target_config[f] for f in TARGET_FIELDS}


def _sample_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Per-axis strides that keep at most SAMPLE_SIZE elements (budget spread smallest axis first)."""
  strides, budget = [1] * len(shape), SAMPLE_SIZE
  for rank, axis in enumerate(sorted(range(len(shape)), key=lambda a: shape[a])):
    count = max(1, min(shape[axis], int(budget ** (1 / (len(shape) - rank)))))
    strides[axis] = max(1, -(-shape[axis] // count))
    budget //= max(1, -(-shape[axis] // strides[axis]))
  return tuple(strides)


@jax.jit
def _samples(leaves: list[jax.Array]) -> list[jax.Array]:
  """Strided samples of each leaf, floats rounded to bf16 (f32 and bf16 copies agree).

  Per-axis strided slices keep sharded leaves sharded: only the samples are gathered.
  """
  out = []
  for x in leaves:
    s = jax.lax.slice(x, (0,) * x.ndim, x.shape, _sample_strides(x.shape))
    out.append(s.astype(jnp.float32).astype(jnp.bfloat16)
               if jnp.issubdtype(s.dtype, jnp.floating) else s)
  return out


def target_fingerprint(target_cfg_dict: dict, target_params: Any) -> str:
  """sha256 of the target's architecture facts and a strided sample of every weight.

  Independent of the storage dtype (f32 or bf16) of the same weights.
  """
  h = hashlib.sha256(json.dumps(_target_arch(target_cfg_dict), sort_keys=True).encode())
  flat = sorted(((jax.tree_util.keystr(path), leaf) for path, leaf
                 in jax.tree_util.tree_flatten_with_path(target_params)[0]), key=lambda kv: kv[0])
  for (name, leaf), sample in zip(flat, _samples([leaf for _, leaf in flat])):
    h.update(f"{name}{tuple(leaf.shape)}".encode())
    if isinstance(sample, jax.Array) and not sample.is_fully_addressable:  # multi-process
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      sample = multihost_utils.process_allgather(sample, tiled=True)
    h.update(np.asarray(sample).tobytes())
  return h.hexdigest()


def _cast(x: Any, dtype: str | None) -> Any:
  x = jnp.asarray(x)
  return x.astype(dtype) if dtype and jnp.issubdtype(x.dtype, jnp.floating) else x


def _replace_into(path: pathlib.Path, write) -> None:
  """Writes `path` via `write(tmp_path)` and an atomic rename."""
  tmp = path.with_name(path.name + ".tmp")
  write(tmp)
  os.replace(tmp, path)


def export_drafter(path_dir: str | os.PathLike, draft_params: dict, drafter_config: dict,
                   target_config: dict, fingerprint: str,
                   dtype: str = "bfloat16") -> pathlib.Path:
  """Writes drafter.safetensors (floats cast to `dtype`), then drafter.json; returns the json path."""
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
  flat = _flatten(draft_params)
  dotted = [".".join(path) for path in flat if any("." in key for key in path)]
  if dotted:
    raise ValueError(f"param names must not contain '.': {dotted}")
  tensors = {".".join(path): np.asarray(_cast(x, dtype)) for path, x in flat.items()}
  meta = {"format": DRAFTER_FORMAT, "version": DRAFTER_VERSION, "drafter": drafter_config,
          "target": {**_target_arch(target_config), "fingerprint": fingerprint}, "dtype": dtype}
  out = pathlib.Path(path_dir)
  out.mkdir(parents=True, exist_ok=True)
  _replace_into(out / WEIGHTS_FILE, lambda tmp: safetensors.numpy.save_file(tensors, tmp))
  _replace_into(out / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
  return out / META_FILE


def _short(value: Any) -> str:
  return f"{value[:16]}…" if isinstance(value, str) and len(value) > 16 else repr(value)


def save_token_counts(path_dir: str | os.PathLike, counts) -> pathlib.Path:
  """Writes the drafter's token counts [V] (`data.token_counts`) beside its weights."""
  out = pathlib.Path(path_dir) / TOKEN_COUNTS_FILE
  def write(tmp):
    with open(tmp, "wb") as f:  # a file object: np.savez would append '.npz' to the name
      np.savez_compressed(f, counts=np.asarray(counts, np.int64))
  _replace_into(out, write)
  return out


def load_token_counts(path_dir: str | os.PathLike, vocab_size: int) -> np.ndarray | None:
  """The drafter's token counts [vocab_size], None when it has none; DrafterFileError for a
  corrupt file or one for another vocabulary."""
  path = pathlib.Path(path_dir) / TOKEN_COUNTS_FILE
  if not path.is_file():
    return None
  try:
    with np.load(path) as f:
      counts = np.asarray(f["counts"])
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise DrafterFileError(f"{path} is corrupt ({type(e).__name__}: {e})") from None
  if counts.shape != (vocab_size,) or counts.min(initial=0) < 0:
    raise DrafterFileError(f"{path} holds counts of shape {counts.shape}; this target has "
                           f"{vocab_size} tokens")
  return counts


def meta_file(path_dir_or_json: str | os.PathLike) -> pathlib.Path:
  """An export's drafter.json, given its folder or that file."""
  path = pathlib.Path(path_dir_or_json)
  return path if path.suffix == ".json" else path / META_FILE


def drafter_dir(path_dir_or_json: str | os.PathLike) -> pathlib.Path:
  """An export's folder (its weights, token counts, acceptance.json), given it or its json."""
  return meta_file(path_dir_or_json).parent


def drafter_meta(path_dir_or_json: str | os.PathLike) -> dict:
  """drafter.json of an export, checked for format and version (DrafterFileError)."""
  meta_path = meta_file(path_dir_or_json)
  try:
    meta = json.loads(meta_path.read_text())
  except FileNotFoundError:
    if (meta_path.parent / "config.json").is_file():
      raise DrafterFileError(
          f"{meta_path} does not exist: {meta_path.parent} is not an export (for the authors' "
          f"FlexDraft release: `python -m flexdraft_jax.checkpoint convert` it)") from None
    raise DrafterFileError(f"{meta_path} does not exist: not an exported drafter") from None
  except (OSError, ValueError) as e:
    raise DrafterFileError(f"{meta_path} is corrupt: {e}") from None
  if not isinstance(meta, dict) or meta.get("format") != DRAFTER_FORMAT:
    raise DrafterFileError(f"{meta_path} is not a {DRAFTER_FORMAT} file")
  if meta.get("version") != DRAFTER_VERSION:
    raise DrafterFileError(f"{meta_path} has version {meta.get('version')!r}; this code reads "
                           f"version {DRAFTER_VERSION}")
  return meta


def load_drafter(path_dir_or_json: str | os.PathLike, target_config: dict,
                 fingerprint: str | None, dtype: str | None = None) -> tuple[dict, dict]:
  """Loads a drafter for this target: (drafter config, nested params of jnp arrays).

  Reads our exports, and the authors' FlexDraft release (`official`: a folder with a
  config.json and safetensors), whose target is checked by architecture only (it records
  no fingerprint; said once on stderr). Raises DrafterMismatchError naming every target
  field (and the fingerprint, unless None) that differs, DrafterFileError for a missing or
  corrupt file (each one line). Floats are cast to `dtype` when given.
  """
  from flexdraft_jax import official  # pylint: disable=g-import-not-at-top (it imports us)
  release = official.release_folder(path_dir_or_json)
  if release is not None:
    return official.load_release(release, target_config, dtype)
  meta_path = meta_file(path_dir_or_json)
  meta = drafter_meta(meta_path)
  trained_for = meta.get("target", {})
  expected = _target_arch(target_config)
  if fingerprint is not None:
    expected["fingerprint"] = fingerprint
  diffs = [f"{key}={_short(trained_for.get(key))}, this target has {_short(value)}"
           for key, value in expected.items() if trained_for.get(key) != value]
  if diffs:
    raise DrafterMismatchError(f"drafter {meta_path} was trained for another target: "
                               + "; ".join(diffs))
  weights_path = meta_path.parent / WEIGHTS_FILE
  try:
    with safetensors.safe_open(weights_path, framework="flax") as f:
      flat = {tuple(name.split(".")): _cast(f.get_tensor(name), dtype) for name in f.keys()}
  except FileNotFoundError:
    raise DrafterFileError(f"{weights_path} does not exist (next to {meta_path.name})") from None
  except safetensors.SafetensorError as e:
    raise DrafterFileError(f"{weights_path} is corrupt: {e}") from None
  return meta["drafter"], _unflatten(flat)


def drafter_weight_files(path_dir_or_json: str | os.PathLike) -> list[pathlib.Path]:
  """The files holding a drafter's weights (an export's, or a release's shards), sorted."""
  from flexdraft_jax import official  # pylint: disable=g-import-not-at-top
  release = official.release_folder(path_dir_or_json)
  if release is not None:
    return sorted(set(official.tensor_files(release).values()))
  return [drafter_dir(path_dir_or_json) / WEIGHTS_FILE]


if __name__ == "__main__":  # python -m flexdraft_jax.checkpoint convert SRC DST --model=TARGET
  from flexdraft_jax import official  # pylint: disable=g-import-not-at-top
  official.main()

"""Offline mode: the frozen target's clean keys/values of the K deep layers, cached per token.

The train step's clean pass (all L target layers, no gradient) exists only to
give the mask slots the keys and values of the K deep layers. Offline mode
computes them once per dataset and stores them beside it:

  kv.bin        one record per token of tokens.bin, in the same order:
                [K, 2 (k, v), kv_heads, head_dim] in `dtype` (bf16 by default),
                post-RoPE at the token's position within its own row
  kv_meta.json  target fingerprint, split layer, K, dtype, record shape, and
                `rows`: the commit point

A build appends a window of rows at a time (records, then an atomic rewrite of
kv_meta.json). A reader ignores records past the committed rows and a rerun
cuts them off and resumes, so a crash costs at most the batch in flight.

Records come from `drafter.clean_kv`, the function the online step runs, over
each row alone (positions 0..n-1). Packing and cutting keep every token's
position within its row (`data.make_iterator`), so a packed token reads the
record computed at its own RoPE position.

Bytes per token: K * 2 * kv_heads * head_dim * itemsize (SmolLM2-135M, K=6,
bf16: 4,608). Online mode stays the default: an 8B target's cache would be
terabytes.
"""
from __future__ import annotations

import functools
import json
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from flexdraft_jax import data as data_lib
from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax.drafter import DrafterConfig
from flexdraft_jax.model_config import ModelConfig

_KV, _KV_META = "kv.bin", "kv_meta.json"
DTYPES = ("bfloat16", "float32")
_WIDTH_STEP = 64  # rows are padded to a multiple of this: few compiled shapes


class KVCacheError(data_lib.DatasetError):
  """A K/V cache that is missing, incomplete, or built for another target or drafter."""


def record_shape(cfg: ModelConfig, dcfg: DrafterConfig) -> tuple[int, int, int, int]:
  return (dcfg.num_draft_layers, 2, cfg.num_kv_heads, cfg.head_dim)


def bytes_per_token(cfg: ModelConfig, dcfg: DrafterConfig, dtype: str = "bfloat16") -> int:
  return int(np.prod(record_shape(cfg, dcfg))) * np.dtype(jnp.dtype(dtype)).itemsize


def _config(cfg, dcfg, fingerprint, dtype) -> dict:
  return {"fingerprint": fingerprint, "num_layers": cfg.num_layers,
          "num_draft_layers": dcfg.num_draft_layers, "split_layer": dcfg.split(cfg),
          "dtype": dtype, "record_shape": list(record_shape(cfg, dcfg))}


def _build_hint(data_dir) -> str:
  return (f"build it: python train.py --mode=cache_kv --config=<this config> "
          f"--workdir=<this workdir> (it caches {data_dir})")


def _read_meta(data_dir: pathlib.Path) -> dict | None:
  try:
    return json.loads((data_dir / _KV_META).read_text(encoding="utf-8"))
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise KVCacheError(f"{data_dir / _KV_META}: unreadable ({e}); delete it and kv.bin, then "
                       f"{_build_hint(data_dir)}") from None


def _check_config(data_dir, meta: dict, want: dict) -> None:
  for key, value in want.items():
    if meta.get(key) != value:
      got = meta.get(key)
      if key == "fingerprint":
        got, value = f"{str(got)[:12]}..", f"{value[:12]}.."
      raise KVCacheError(f"{data_dir}: the K/V cache was built for {key}={got} (this run: "
                         f"{key}={value}); delete {_KV} and {_KV_META} and rebuild them "
                         f"(python train.py --mode=cache_kv)")


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg", "dtype"))
def _records(target, tokens_BW, lens_B, *, cfg, dcfg, dtype):
  """[B, W, K, 2, kvh, hd] records of rows padded to W (padding has segment 0)."""
  w = tokens_BW.shape[1]
  pos = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), tokens_BW.shape)
  seg = (pos < lens_B[:, None]).astype(jnp.int32)
  k, v = drafter_lib.clean_kv(target, cfg, dcfg, tokens_BW, pos, seg)[1]  # [K, B, W, kvh, hd]
  return jnp.stack([k, v], axis=3).transpose(1, 2, 0, 3, 4, 5).astype(dtype)


def build(data_dir, cfg: ModelConfig, target, dcfg: DrafterConfig, fingerprint: str, *,
          dtype: str = "bfloat16", batch_rows: int = 8, progress: bool = True) -> dict:
  """Caches (or resumes caching) the K/V records of every committed row in `data_dir`.

  Raises KVCacheError if an existing cache was built for another target or
  drafter, or if the disk cannot hold what is left (checked before writing).
  Returns the committed kv_meta.
  """
  if dtype not in DTYPES:
    raise ValueError(f"K/V cache dtype must be one of {DTYPES}, got {dtype!r}")
  data_dir = pathlib.Path(data_dir)
  ds = data_lib.TokenDataset(data_dir)
  index = ds._index
  want = _config(cfg, dcfg, fingerprint, dtype)
  meta = _read_meta(data_dir)
  if meta is None:
    meta = {**want, "rows": 0}
  _check_config(data_dir, meta, want)
  done = int(meta.get("rows", 0))
  rec_bytes = bytes_per_token(cfg, dcfg, dtype)
  ends = index[:, 0] + index[:, 1] + index[:, 2]
  if not 0 <= done <= len(index):
    raise KVCacheError(f"{data_dir / _KV_META}: rows={done} is not in [0, {len(index)}] (the "
                       f"dataset's rows); delete it and {_KV}, then {_build_hint(data_dir)}")
  size = (data_dir / _KV).stat().st_size if (data_dir / _KV).exists() else 0
  whole = int(np.searchsorted(ends, size // rec_bytes, side="right"))  # rows fully on disk
  if whole < done:  # damaged after its commit (truncated): rebuild from the last whole row
    if progress:
      print(f"warning: {data_dir / _KV} holds the records of {whole} rows, {_KV_META} commits "
            f"{done}; caching again from row {whole}", file=sys.stderr)
    done = meta["rows"] = whole
  committed = int(index[done, 0]) if done < len(index) else int(ends.max(initial=0))
  todo = int(ends.max(initial=0)) - committed
  free = shutil.disk_usage(data_dir).free
  if todo * rec_bytes > free:
    raise KVCacheError(f"{data_dir}: the K/V cache needs {todo * rec_bytes / 2**30:.2f} GiB more "
                       f"({rec_bytes} bytes per token x {todo} tokens) but the disk has "
                       f"{free / 2**30:.2f} GiB free")
  with open(data_dir / _KV, "ab") as f:  # cut off records past the commit point
    f.truncate(committed * rec_bytes)
  if progress and todo:
    print(f"{data_dir}: caching K/V of rows {done}..{len(index)} ({todo} tokens, "
          f"{rec_bytes} bytes/token, {todo * rec_bytes / 2**30:.2f} GiB)", file=sys.stderr)
  bar = tqdm.tqdm(total=todo, unit="tok", file=sys.stderr, disable=not progress or not todo,
                  desc="cache_kv")
  t0 = time.perf_counter()
  window = 8 * batch_rows  # rows committed together; sorted by length inside, to pad little
  for start in range(done, len(index), window):
    rows = [ds[i]["tokens"] for i in range(start, min(start + window, len(index)))]
    out = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for group in (order[i:i + batch_rows] for i in range(0, len(order), batch_rows)):
      lens = np.array([len(rows[i]) for i in group], np.int32)
      width = -(-max(int(lens.max()), 1) // _WIDTH_STEP) * _WIDTH_STEP
      tokens = np.zeros((len(group), width), np.int32)
      for j, i in enumerate(group):
        tokens[j, :lens[j]] = rows[i]
      rec = np.asarray(jax.device_get(_records(target, tokens, lens, cfg=cfg, dcfg=dcfg,
                                               dtype=dtype)))
      for j, i in enumerate(group):
        out[i] = rec[j, :lens[j]]
      bar.update(int(lens.sum()))
    data_lib._append(data_dir / _KV, np.concatenate(out))
    meta["rows"] = start + len(rows)
    data_lib.write_json_atomic(data_dir / _KV_META, meta)
  bar.close()
  if progress and todo:
    dt = time.perf_counter() - t0
    print(f"{data_dir}: cached {todo} tokens in {dt:.0f} s ({todo / dt:.0f} tok/s)",
          file=sys.stderr)
  return meta


class KVStore:
  """Read access to a complete cache: `gather(offsets)` -> records (zeros where offset < 0)."""

  def __init__(self, data_dir, cfg: ModelConfig, dcfg: DrafterConfig, fingerprint: str):
    self.path = pathlib.Path(data_dir)
    meta = _read_meta(self.path)
    if meta is None:
      raise KVCacheError(f"{self.path}: no cached K/V for offline mode "
                         f"(config.data.offline=True); {_build_hint(self.path)}")
    self.dtype = meta.get("dtype")
    _check_config(self.path, meta, _config(cfg, dcfg, fingerprint, self.dtype))
    rows = len(data_lib.TokenDataset(self.path))
    if meta.get("rows") != rows:
      raise KVCacheError(f"{self.path}: the K/V cache covers {meta.get('rows')} of the "
                         f"dataset's {rows} rows; rerun python train.py --mode=cache_kv to "
                         f"finish it")
    self.shape = record_shape(cfg, dcfg)
    need = int(np.prod(self.shape)) * jnp.dtype(self.dtype).itemsize * int(
        data_lib.TokenDataset(self.path)._index.sum(axis=1).max(initial=0))
    size = (self.path / _KV).stat().st_size if (self.path / _KV).is_file() else 0
    if size < need:
      raise KVCacheError(f"{self.path / _KV}: {size} bytes, the {rows} cached rows need {need} "
                         f"(damaged after it was written); rerun python train.py "
                         f"--mode=cache_kv to cache the missing rows again")
    self.records = np.memmap(self.path / _KV, dtype=jnp.dtype(self.dtype), mode="r").reshape(
        (-1,) + self.shape)

  def gather(self, offsets: np.ndarray) -> np.ndarray:
    valid = offsets >= 0
    out = np.zeros(offsets.shape + self.shape, self.records.dtype)
    out[valid] = self.records[offsets[valid]]
    return out

  def attach(self, batch: dict) -> dict:
    """A packed batch with `token_offsets` -> the same batch with `kv` [B, S, K, 2, kvh, hd]."""
    batch = dict(batch)
    batch["kv"] = self.gather(batch.pop("token_offsets"))
    return batch


"""The training job behind `train.py`: data -> packed blocks -> train step -> checkpoint -> export.

`run(config, workdir)` starts from scratch or resumes from the latest complete
checkpoint in `workdir`, logs metrics as JSONL (process 0 only), saves on an
interval and on SIGTERM, and exports the drafter to `workdir/drafter` at the end.

With several processes (`train.py --multihost`), each reads the data shard of the
batch rows its devices hold (`data_shard`) and they assemble the global batch
(`global_batch`); the workdir must be shared, as orbax writes one checkpoint from
all of them; stopping (SIGTERM, time limit) is agreed each step (`any_process`).
"""
from __future__ import annotations

import functools
import json
import math
import pathlib
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import AbstractMesh

from flexdraft_jax import checkpoint as ckpt_lib
from flexdraft_jax import data as data_lib
from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax import kv_data
from flexdraft_jax import model as model_lib
from flexdraft_jax import sharding as sharding_lib
from flexdraft_jax import training
from flexdraft_jax import weights
from flexdraft_jax.drafter import DrafterConfig
from flexdraft_jax.model_config import ModelConfig, RopeScaling, default_dtype

GiB = 2 ** 30


# ----------------------------------------------------------------------------
# Config -> typed pieces
# ----------------------------------------------------------------------------
def _dtype(config) -> str:
  return config.dtype or default_dtype()


def arch_config(arch: dict, dtype: str) -> ModelConfig:
  arch = dict(arch)
  if arch.get("rope_scaling"):
    arch["rope_scaling"] = RopeScaling(**arch["rope_scaling"])
  return ModelConfig(**arch, dtype=dtype, param_dtype=dtype)


def drafter_config(config, cfg: ModelConfig) -> DrafterConfig:
  dcfg = DrafterConfig(**config.drafter.to_dict()).validate(cfg)
  if config.seq_len < dcfg.block_size + 1:
    raise ValueError(f"seq_len={config.seq_len} is below block_size + 1 = {dcfg.block_size + 1}")
  return dcfg


def optim_config(config) -> training.OptimConfig:
  o = config.optim.to_dict()
  o["total_steps"] = o["total_steps"] or config.num_steps
  return training.OptimConfig(**o)


def loss_config(config) -> training.LossConfig:
  lcfg = training.LossConfig(**config.loss.to_dict())
  if lcfg.labels not in ("data", "target_argmax"):
    raise ValueError(f"loss.labels must be 'data' or 'target_argmax', got {lcfg.labels!r}")
  return lcfg


def target_arch(cfg: ModelConfig) -> dict:
  return {f: getattr(cfg, f) for f in ckpt_lib.TARGET_FIELDS}


def load_target(config, mesh=None):
  """(cfg, params) of the target: real weights, or random ones for model='random'.

  With a mesh, an HF checkpoint folder is read straight into the params'
  shardings (`weights.load_hf_sharded`): each process reads only its devices'
  slices of the safetensors files.
  """
  dtype = _dtype(config)
  if mesh is not None and pathlib.Path(config.model).is_dir():
    return weights.load_hf_sharded(config.model, lambda p: sharding_lib.param_shardings(p, mesh),
                                   dtype, dtype)
  if config.model == "random":
    cfg = arch_config(config.random_model.to_dict(), dtype)
    # One compiled init rather than hundreds of small op-by-op compiles.
    return cfg, jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.key(config.seed))
  return weights.load_model(config.model, dtype=dtype)


def tokenizer_name(config) -> str:
  if config.model == "random" and not config.tokenizer:
    raise ValueError("model='random' needs config.tokenizer (e.g. 'smollm2-135m-instruct')")
  return config.tokenizer or config.model


def data_dirs(config, workdir) -> tuple[pathlib.Path, pathlib.Path]:
  root = pathlib.Path(workdir) / "data"
  return (pathlib.Path(config.data.train_dir or root / "train"),
          pathlib.Path(config.data.heldout_dir or root / "heldout"))


# ----------------------------------------------------------------------------
# Memory estimate (no allocation: shapes from jax.eval_shape)
# ----------------------------------------------------------------------------
def _device_bytes(shape, axes, mesh, itemsize: float) -> float:
  """Bytes on one device of an array laid out by the rules table (`sharding.spec_for`)."""
  parts = 1
  for entry in sharding_lib.spec_for(shape, axes, mesh):
    for name in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
      parts *= mesh.shape[name]
  return math.prod(shape) * itemsize / parts


def _sharded_bytes(tree, mesh) -> float:
  return sum(_device_bytes(leaf.shape, sharding_lib.logical_axes(path, leaf.shape), mesh,
                           leaf.dtype.itemsize)
             for path, leaf in jax.tree_util.tree_leaves_with_path(tree))


def memory_estimate(cfg: ModelConfig, dcfg: DrafterConfig, *, batch_size: int, seq_len: int,
                    anchors_per_seq: int, mesh_shape, decode_batch_size: int = 0,
                    decode_context: int = 0, offline: bool = False) -> dict:
  """Per-device GiB of the train step and of decoding on the mesh `mesh_shape`.

  Params come from `jax.eval_shape` and the rules table on an abstract mesh. The
  rest is an analytic estimate of the largest buffers; XLA's temporaries (weights
  gathered over fsdp, fusion scratch) are not counted, so leave some headroom.
  Activations are split by the batch over ('data', 'fsdp') and by heads, kv heads,
  MLP width and vocabulary over 'tensor', where those divide (like the params).

  train step: params, the draft's gradient and AdamW moments (f32), and
    act_clean_kv         keys and values of the frozen clean pass, every layer
                         (the scan stacks them; the deep layers' are read by the
                         mask path and kept for its backward pass); offline
                         (cached K/V in the batch): the K deep layers' only
    act_clean_attention  one clean layer's attention scores and probabilities
                         (f32, [S, S] per head); transient, before the mask
                         path; 0 offline (no clean pass)
    act_draft_layers     what the mask path's K layers keep for the backward pass
                         (`run_dual_layers` has no remat, so all K at once), per
                         slot: the residual stream 4x (input, normed, after
                         attention, normed), queries and attention output, the
                         slots' keys and values, the MLP's gate, up and product,
                         and the attention scores and probabilities over clean +
                         slot keys (f32)
    act_slot_logits      the mask slots' LM-head logits (f32 [M, V]), with their
                         gradient; twice that with calibration (calibrated copies)
    train_total = params + grads_and_adam + act_clean_kv
                  + max(act_clean_attention, act_draft_layers + act_slot_logits)
  decoding (the data build's generation, or serving on the same mesh):
    decode_kv_cache      `model.KVCache` of `decode_batch_size` rows of
                         `decode_context` tokens (rounded up to the engine's
                         capacity bucket), batch over ('data', 'fsdp') and kv
                         heads over 'tensor'; 0 when either is 0
    decode_total = target_params + the draft in the model dtype + decode_kv_cache
  total = max(train_total, decode_total): the two never hold memory at once.
  """
  from flexdraft_jax.engine import CAPACITY_BUCKET
  mesh = AbstractMesh(tuple(mesh_shape), sharding_lib.MESH_AXES)
  target = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  draft = jax.eval_shape(lambda t: drafter_lib.init_draft(cfg, dcfg, t, jax.random.key(0)), target)
  sharded = _sharded_bytes({"target": target, "draft": draft}, mesh)
  draft_b = _sharded_bytes({"draft": draft}, mesh)
  on_device = lambda shape, axes, itemsize: _device_bytes(shape, axes, mesh, itemsize) / GiB
  act = jnp.dtype(cfg.dtype).itemsize
  score = 8  # f32 attention scores and probabilities
  b, s, m = batch_size, seq_len, anchors_per_seq * dcfg.block_size
  n, kv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
  per_layer = (4 * on_device((b, m, d), ("batch", None, None), act)
               + 2 * on_device((b, m, n, hd), ("batch", None, "heads", None), act)
               + 2 * on_device((b, m, kv, hd), ("batch", None, "kv_heads", None), act)
               + 3 * on_device((b, m, cfg.intermediate_size), ("batch", None, "mlp"), act)
               + on_device((b, n, m, s + m), ("batch", "heads", None, None), score))
  out = {
      "target_params": (sharded - draft_b) / GiB,
      "draft_params": draft_b / GiB,
      "grads_and_adam": 3 * draft_b / GiB,
      "act_clean_kv": 2 * on_device((dcfg.num_draft_layers if offline else cfg.num_layers, b, s,
                                     kv, hd), ("layers", "batch", None, "kv_heads", None), act),
      "act_clean_attention": 0.0 if offline else on_device((b, n, s, s),
                                                           ("batch", "heads", None, None), score),
      "act_draft_layers": dcfg.num_draft_layers * per_layer,
      "act_slot_logits": (4 if dcfg.calib_rank else 2) * on_device(
          (b, m, cfg.vocab_size), ("batch", None, "vocab"), 4),
  }
  out["train_total"] = (out["target_params"] + out["draft_params"] + out["grads_and_adam"]
                        + out["act_clean_kv"]
                        + max(out["act_clean_attention"],
                              out["act_draft_layers"] + out["act_slot_logits"]))
  capacity = -(-decode_context // CAPACITY_BUCKET) * CAPACITY_BUCKET
  out["decode_kv_cache"] = 2 * on_device(
      (cfg.num_layers, decode_batch_size, kv, capacity, hd),
      ("layers", "batch", "kv_heads", None, None), act) if decode_batch_size else 0.0
  out["decode_total"] = (out["target_params"] + out["draft_params"] * act / 4
                         + out["decode_kv_cache"])
  out["total"] = max(out["train_total"], out["decode_total"])
  return out


def decode_shape(config) -> tuple[int, int]:
  """(rows, context tokens) of decoding: config.decode_batch_size / decode_context, where 0
  (the default) means the data build's: data.generate_batch_size rows of
  data.max_prompt_len + data.max_response_len tokens."""
  rows = config.get("decode_batch_size", 0) or config.data.generate_batch_size
  context = (config.get("decode_context", 0)
             or config.data.max_prompt_len + config.data.max_response_len)
  return rows, context


def check_memory(config, cfg: ModelConfig, dcfg: DrafterConfig, mesh_shape) -> dict:
  """`memory_estimate` for `config`; MemoryError when its total exceeds config.hbm_gib."""
  rows, context = decode_shape(config)
  est = memory_estimate(cfg, dcfg, batch_size=config.batch_size, seq_len=config.seq_len,
                        anchors_per_seq=config.anchors_per_seq, mesh_shape=mesh_shape,
                        decode_batch_size=rows, decode_context=context,
                        offline=bool(config.data.get("offline")))
  if config.hbm_gib and est["total"] > config.hbm_gib:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in est.items() if k != "total")
    if est["train_total"] >= est["decode_total"]:
      fix = "a smaller batch_size/seq_len/anchors_per_seq"
    else:
      fix = ("a smaller decode_batch_size/decode_context (or data.generate_batch_size/"
             "max_prompt_len/max_response_len)")
    raise MemoryError(f"estimated {est['total']:.1f} GiB per device on mesh {tuple(mesh_shape)} "
                      f"exceeds hbm_gib={config.hbm_gib} ({parts}); use more devices, a larger "
                      f"fsdp/tensor axis, or {fix}")
  return est


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
  if config.mesh == "auto":
    return (num_devices, 1, 1)
  try:
    shape = tuple(int(s) for s in str(config.mesh).split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3:
    raise ValueError(f"mesh must be 'auto' or 'data,fsdp,tensor' sizes, got {config.mesh!r}")
  return shape


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------
def generate_data(config, workdir, target=None, fingerprint=None) -> None:
  """Builds (or resumes) the self-distilled train and held-out sets (in one process),
  after the rows of config.data.archive when it is set."""
  if jax.process_count() > 1:
    raise ValueError("building the datasets needs a single process: run train.py --mode=generate "
                     "without --multihost first (into a directory every host can read), then "
                     "train with config.data.generate_if_missing=False")
  from flexdraft_jax.engine import Engine
  extract_data(config, workdir)  # the shipped rows first; the build resumes after them
  target = target or load_target(config)
  fingerprint = fingerprint or ckpt_lib.target_fingerprint(target_arch(target[0]), target[1])
  engine = Engine(config.model, target=target, tokenizer=tokenizer_name(config))
  d = config.data
  # Held-out first: it is small, so a build stopped early still leaves an eval set.
  train_dir, heldout_dir = data_dirs(config, workdir)
  for out, split, num in ((heldout_dir, "heldout", d.num_heldout_prompts),
                          (train_dir, "train", d.num_prompts)):
    data_lib.build_dataset(out, model=config.model, split=split, num_prompts=num,
                           max_prompt_len=d.max_prompt_len, max_response_len=d.max_response_len,
                           batch_size=d.generate_batch_size, responses=d.responses,
                           fingerprint=fingerprint, engine=engine,
                           progress=jax.process_index() == 0)


def extract_data(config, workdir) -> None:
  """Extracts the splits of config.data.archive (a shipped .npz; none when '') whose dataset
  dir is empty. Process 0 writes them and the others wait (the data dirs are shared).

  An extracted dataset resumes like a built one: --mode=generate adds prompts after it.
  """
  if not config.data.get("archive"):
    return
  if jax.process_index() == 0:
    for split, path in zip(("train", "heldout"), data_dirs(config, workdir)):
      if not (path / "meta.json").exists():
        meta = data_lib.extract_archive(config.data.archive, split, path)
        print(f"{path}: {meta['rows']} rows, {meta['tokens']} tokens from {config.data.archive}",
              file=sys.stderr)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("extract_data")


def checked_datasets(config, workdir, fingerprint: str) -> tuple[pathlib.Path, ...]:
  """The data dirs a run reads (train, and held-out when evaluating), each checked to be a
  built dataset of this target; DatasetError naming the one that is not."""
  train_dir, heldout_dir = data_dirs(config, workdir)
  paths = (train_dir, heldout_dir) if config.eval_every else (train_dir,)
  for path in paths:
    if not (path / "meta.json").exists():
      raise data_lib.DatasetError(
          f"no dataset at {path}; build it first: python train.py --mode=generate "
          f"--config=<this config> --workdir={workdir}")
    _check_dataset(path, fingerprint, config)
  return paths


def _check_dataset(path: pathlib.Path, fingerprint: str, config) -> None:
  meta = data_lib.TokenDataset(path).meta
  if meta.get("fingerprint") not in (None, fingerprint):
    raise data_lib.DatasetError(f"{path} was generated by another target (fingerprint "
                                f"{meta['fingerprint'][:12]}.. != {fingerprint[:12]}..)")


# ----------------------------------------------------------------------------
# Multi-process: each process feeds the batch rows its own devices hold
# ----------------------------------------------------------------------------
class DataShard(NamedTuple):
  index: int  # which of the `count` data shards this process reads
  count: int  # distinct row slices of the global batch across processes
  rows: int   # rows per process (batch_size / count)


def data_shard(mesh, batch_size: int) -> DataShard:
  """This process's slice of the global batch, which is split over ('data', 'fsdp').

  Every process must hold one contiguous, equally large slice of rows; processes
  whose devices hold the same rows (a mesh axis spanning processes that does not
  split the batch) read the same shard. One process: shard 0 of 1, all rows.
  """
  per = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % per:
    raise ValueError(f"batch_size={batch_size} must be a multiple of data*fsdp={per} "
                     f"(mesh {dict(mesh.shape)})")
  index_map = sharding_lib.batch_sharding(mesh, 1).devices_indices_map((batch_size,))
  held: dict[int, set[int]] = {}
  for device, (rows,) in index_map.items():
    held.setdefault(device.process_index, set()).update(range(batch_size)[rows])
  if set(held) != set(range(jax.process_count())):
    raise ValueError(f"the mesh {dict(mesh.shape)} uses devices of processes {sorted(held)} only; "
                     f"with {jax.process_count()} processes it must span every process "
                     f"({jax.device_count()} devices)")
  spans = {}
  for proc, rows in held.items():
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
      raise ValueError(f"process {proc} holds batch rows {sorted(rows)}, not one contiguous slice")
    spans[proc] = (lo, hi)
  distinct = sorted(set(spans.values()))
  if any(b[0] < a[1] for a, b in zip(distinct, distinct[1:])) or \
      len({hi - lo for lo, hi in distinct}) != 1:
    raise ValueError(f"the processes hold overlapping or unequal batch slices {distinct}; "
                     "use a mesh whose ('data', 'fsdp') axes split the batch evenly over processes")
  lo, hi = spans[jax.process_index()]
  return DataShard(distinct.index((lo, hi)), len(distinct), hi - lo)


def put_global(tree, shardings):
  """`tree`'s values (the same on every process) placed with `shardings`. With several
  processes each copies in only its own devices' shards, from a host copy (`jax.device_put`
  of host values would first all-gather every value to check that the processes agree)."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:  # e.g. loaded into its shards
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


def global_batch(local: dict, shardings: dict, batch_size: int) -> dict:
  """The global [batch_size, ...] arrays from each process's rows (its DataShard)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v, (batch_size,) + v.shape[1:])
          for k, v in local.items()}


def any_process(*flags: bool) -> tuple[bool, ...]:
  """Each flag OR-ed over processes, so that all take the same branch (a collective
  when there are several processes; every process must call it)."""
  if jax.process_count() == 1:
    return tuple(bool(f) for f in flags)
  gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
  return tuple(bool(f) for f in np.asarray(gathered).reshape(jax.process_count(), -1).any(0))


def to_host(tree):
  """Numpy copies of (possibly sharded) arrays; with several processes a collective
  that every process must call."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


_count_tokens = jax.jit(lambda seg: jnp.sum(seg > 0))


def _iterator(config, path, dcfg, seed, mesh, num_epochs=None, kv_store=None):
  shard = data_shard(mesh, config.batch_size)
  return data_lib.make_iterator(
      path, seq_len=config.seq_len, batch_size=shard.rows, block_size=dcfg.block_size,
      anchors_per_seq=config.anchors_per_seq, seed=seed, shard_index=shard.index,
      shard_count=shard.count, num_epochs=num_epochs, kv_store=kv_store)


def kv_stores(config, cfg, dcfg, fingerprint, paths) -> dict:
  """{path: kv_data.KVStore} in offline mode (config.data.offline), else {}."""
  if not config.data.get("offline"):
    return {}
  return {p: kv_data.KVStore(p, cfg, dcfg, fingerprint) for p in paths}


def cache_kv(config, workdir) -> None:
  """`--mode=cache_kv`: caches the deep layers' clean K/V of the train split (and the held-out
  split when evaluating) for offline mode, after extracting config.data.archive (or building
  the data, with data.generate_if_missing); resumable."""
  if jax.process_count() > 1:
    raise ValueError("caching K/V needs a single process: run train.py --mode=cache_kv without "
                     "--multihost first, into a directory every host can read")
  cfg, target = load_target(config)
  dcfg = drafter_config(config, cfg)
  fingerprint = ckpt_lib.target_fingerprint(target_arch(cfg), target)
  if config.data.generate_if_missing:  # extracts config.data.archive first
    generate_data(config, workdir, (cfg, target), fingerprint)
  else:
    extract_data(config, workdir)
  for path in checked_datasets(config, workdir, fingerprint):
    kv_data.build(path, cfg, target, dcfg, fingerprint, dtype=config.data.kv_dtype)


# ----------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------
class _Log:
  """metrics.jsonl (and stdout summaries), written by process 0 only."""

  def __init__(self, workdir: pathlib.Path):
    self.main = jax.process_index() == 0
    self.file = open(workdir / "metrics.jsonl", "a") if self.main else None

  def write(self, row: dict) -> None:
    if self.main:
      self.file.write(json.dumps(row) + "\n")
      self.file.flush()

  def close(self) -> None:
    if self.file:
      self.file.close()


def _host(metrics: dict) -> dict:
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    out[k] = v.round(4).tolist() if v.ndim else round(float(v), 5)
  return out


def evaluate(eval_fn, state, target, config, path, dcfg, sharding, kv_store=None) -> dict:
  """Mean metrics over `eval_batches` fixed held-out batches (same batches every time)."""
  it = _iterator(config, path, dcfg, seed=1234, mesh=sharding["tokens"].mesh, kv_store=kv_store)
  rows = []
  for _ in range(config.eval_batches):
    batch = global_batch(next(it), sharding, config.batch_size)
    rows.append(jax.device_get(eval_fn(state.draft, target, batch)))
  mean = jax.tree.map(lambda *a: np.mean(np.stack(a), axis=0), *rows)
  out = {f"eval_{k}": v for k, v in _host(mean).items()}
  out.update({f"eval_{k}": v for k, v in training.acceptance_proxies(mean).items()})
  return out


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains to config.num_steps (resuming if a checkpoint exists); returns the last metrics."""
  workdir = pathlib.Path(workdir).absolute()  # orbax wants absolute paths
  workdir.mkdir(parents=True, exist_ok=True)
  main = jax.process_index() == 0
  mesh = sharding_lib.make_mesh(mesh_shape(config, jax.device_count()))
  cfg, target = load_target(config, mesh)
  dcfg = drafter_config(config, cfg)
  lcfg, ocfg = loss_config(config), optim_config(config)
  est = check_memory(config, cfg, dcfg, mesh.devices.shape)
  fingerprint = ckpt_lib.target_fingerprint(target_arch(cfg), target)

  if config.get("init_from"):  # a resumed run restores over it
    draft = init_from_export(config.init_from, cfg, dcfg, fingerprint, jax.eval_shape(
        functools.partial(drafter_lib.init_draft, cfg, dcfg), target, jax.random.key(0)))
  else:
    draft = jax.jit(drafter_lib.init_draft, static_argnums=(0, 1))(
        cfg, dcfg, target, jax.random.key(config.seed + 1))
  train_dir, heldout_dir = data_dirs(config, workdir)
  if config.data.generate_if_missing:  # extracts config.data.archive first
    generate_data(config, workdir, (cfg, target), fingerprint)
  else:
    extract_data(config, workdir)
  stores = kv_stores(config, cfg, dcfg, fingerprint,
                     checked_datasets(config, workdir, fingerprint))

  tx = training.make_optimizer(ocfg, {"target": target, "draft": draft})
  state = training.init_state(tx, target, draft)
  it = _iterator(config, train_dir, dcfg, seed=config.seed, mesh=mesh, kv_store=stores.get(train_dir))
  batch0 = next(_iterator(config, train_dir, dcfg, seed=config.seed, mesh=mesh,
                          kv_store=stores.get(train_dir)))
  step_fn, st_sh, tg_sh, b_sh = training.compile_train_step(state, target, batch0, mesh, tx=tx,
                                                           cfg=cfg, dcfg=dcfg, lcfg=lcfg)
  target, state = put_global(target, tg_sh), put_global(state, st_sh)
  eval_fn = jax.jit(lambda d, t, b: training.loss_and_metrics(d, t, b, cfg=cfg, dcfg=dcfg,
                                                              lcfg=lcfg)[1])
  run_config = {**config.to_dict(), "fingerprint": fingerprint}
  log = _Log(workdir)
  with ckpt_lib.Checkpointer(workdir, run_config, config.save_every) as ckpt, \
       ckpt_lib.SigtermFlag() as sigterm:
    start = ckpt.latest_step() or 0
    if start:
      restored = ckpt.restore(state.as_dict(), it)
      state = training.TrainState(**restored)
      if main:
        print(f"resumed from step {start} in {ckpt.directory}", file=sys.stderr)
    elif main:
      print(f"target {config.model}: {cfg.num_layers} layers, d={cfg.hidden_size}; drafter "
            f"K={dcfg.num_draft_layers} B={dcfg.block_size} r={dcfg.calib_rank}; mesh "
            f"{dict(mesh.shape)}; est. {est['total']:.2f} GiB/device", file=sys.stderr)
    last = {}
    bar = tqdm.tqdm(total=config.num_steps, initial=start, unit="step", file=sys.stderr,
                    disable=not main)
    t_prev, s_prev, tokens = time.perf_counter(), start, 0
    t_start = t_prev
    for step in range(start + 1, config.num_steps + 1):
      batch = next(it)
      batch = global_batch(batch, b_sh, config.batch_size)
      tokens = tokens + _count_tokens(batch["segment_ids"])  # on device: no sync per step
      if config.time_limit_s and step > start + 1:
        jax.block_until_ready(metrics)  # the clock sees finished steps; one more stays queued
      state, metrics = step_fn(state, target, batch)
      if step % config.log_every == 0 or step == config.num_steps or step == start + 1:
        last = _host(metrics)
        dt = time.perf_counter() - t_prev
        last.update(training.acceptance_proxies(metrics), step=step, tokens_per_s=int(tokens) / dt,
                    step_time_s=dt / (step - s_prev))
        t_prev, s_prev, tokens = time.perf_counter(), step, 0
        if config.eval_every and (step % config.eval_every == 0 or step == config.num_steps):
          last.update(evaluate(eval_fn, state, target, config, heldout_dir, dcfg, b_sh,
                               stores.get(heldout_dir)))
        log.write(last)
        bar.set_postfix(loss=f"{last['loss']:.3f}", acc0=f"{last['acc'][0]:.2f}",
                        tau=f"{last['tau_proxy_parallel']:.2f}", refresh=False)
      bar.update(1)
      out_of_time = config.time_limit_s and time.perf_counter() - t_start > config.time_limit_s
      out_of_time, stop = any_process(out_of_time, sigterm.is_set())  # processes agree
      if out_of_time:  # a clean early end: final eval, save and export below
        if main:
          print(f"time_limit_s={config.time_limit_s} reached at step {step}", file=sys.stderr)
        if config.eval_every:
          last.update(evaluate(eval_fn, state, target, config, heldout_dir, dcfg, b_sh,
                               stores.get(heldout_dir)), step=step)
          log.write(last)
        break
      ckpt.maybe_save(step, state.as_dict(), it, force=stop)
      if stop:
        if main:
          print(f"SIGTERM: saved step {step}, exiting", file=sys.stderr)
        log.close()
        return last
    bar.close()
    ckpt.maybe_save(int(state.step), state.as_dict(), it, force=True)
  log.close()
  draft = to_host(state.draft)  # every process takes part; process 0 writes
  if main:
    path = export(config, workdir, draft, cfg, dcfg, fingerprint)
    print(f"exported drafter to {path}", file=sys.stderr)
  return last


def init_from_export(path, cfg: ModelConfig, dcfg: DrafterConfig, fingerprint: str,
                     like: dict) -> dict:
  """The params of the exported drafter in `path`, as the dtypes of `like` (a fresh draft's
  shapes and dtypes: f32 master weights).

  DrafterMismatchError when it was trained for another target (`checkpoint.load_drafter`,
  the check `decode.py` makes) or with another drafter config or param tree than `dcfg`.
  """
  meta, loaded = ckpt_lib.load_drafter(path, target_arch(cfg), fingerprint)
  theirs = {**DrafterConfig().to_dict(), **meta}  # exports older than a field have its default
  diffs = [f"{k}={theirs.get(k)!r}, this config has {v!r}" for k, v in dcfg.to_dict().items()
           if theirs.get(k) != v]
  if diffs:
    raise ckpt_lib.DrafterMismatchError(f"config.init_from={path}: the drafter was trained with "
                                        f"another drafter config: {'; '.join(diffs)}")
  shapes = lambda tree: {sharding_lib.path_str(p): tuple(x.shape)
                         for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  if shapes(loaded) != shapes(like):
    missing = sorted(set(shapes(like).items()) ^ set(shapes(loaded).items()))
    raise ckpt_lib.DrafterMismatchError(f"config.init_from={path}: its params differ from this "
                                        f"drafter's ({missing[0][0]} {missing[0][1]} ...)")
  return jax.tree.map(lambda x, ref: jnp.asarray(x, ref.dtype), loaded, like)


def export(config, workdir, draft, cfg: ModelConfig, dcfg: DrafterConfig, fingerprint: str):
  return ckpt_lib.export_drafter(pathlib.Path(workdir) / "drafter", jax.device_get(draft),
                                 dcfg.to_dict(), target_arch(cfg), fingerprint,
                                 dtype=config.export_dtype)

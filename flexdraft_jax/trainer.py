"""The training job behind `train.py`: data -> packed blocks -> train step -> checkpoint -> export.

`run(config, workdir)` starts from scratch or resumes from the latest complete
checkpoint in `workdir`, logs metrics as JSONL (process 0 only), saves on an
interval and on SIGTERM, and exports the drafter to `workdir/drafter` at the end.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.sharding import AbstractMesh

from flexdraft_jax import checkpoint as ckpt_lib
from flexdraft_jax import data as data_lib
from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax import model as model_lib
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


def load_target(config):
  """(cfg, params) of the target: real weights, or random ones for model='random'."""
  dtype = _dtype(config)
  if config.model == "random":
    cfg = arch_config(config.random_model.to_dict(), dtype)
    return cfg, model_lib.init_params(cfg, jax.random.key(config.seed))
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
def _sharded_bytes(tree, mesh) -> float:
  total = 0.0
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    spec = training.spec_for(leaf.shape, training.logical_axes(path, leaf.shape), mesh)
    parts = 1
    for entry in spec:
      for name in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
        parts *= mesh.shape[name]
    total += leaf.size * leaf.dtype.itemsize / parts
  return total


def memory_estimate(cfg: ModelConfig, dcfg: DrafterConfig, *, batch_size: int, seq_len: int,
                    anchors_per_seq: int, mesh_shape) -> dict:
  """Per-device GiB of a train step: params, optimizer, activations.

  Params come from `jax.eval_shape` and the rules table on an abstract mesh.
  Activations are an analytic estimate: the frozen clean pass's keys/values
  of every layer, and what the mask path keeps for its backward pass (per
  deep layer: the slot stream, q/k/v, MLP activations and attention
  probabilities; then the slot logits three times: logits, calibrated logits,
  their gradient).
  """
  mesh = AbstractMesh(tuple(mesh_shape), training.MESH_AXES)
  target = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  draft = jax.eval_shape(lambda t: drafter_lib.init_draft(cfg, dcfg, t, jax.random.key(0)), target)
  params = {"target": target, "draft": draft}
  sharded = _sharded_bytes(params, mesh)
  draft_b = _sharded_bytes({"draft": draft}, mesh)
  rows = batch_size / (mesh.shape["data"] * mesh.shape["fsdp"])
  tp = mesh.shape["tensor"]
  act = jnp.dtype(cfg.dtype).itemsize
  m = anchors_per_seq * dcfg.block_size
  kv = cfg.num_layers * 2 * rows * seq_len * cfg.num_kv_heads * cfg.head_dim * act / tp
  per_layer = rows * m * (6 * cfg.hidden_size + 3 * cfg.intermediate_size / tp) * act
  per_layer += rows * cfg.num_heads / tp * m * (seq_len + m) * 4
  logits = 3 * rows * m * cfg.vocab_size / tp * 4
  out = {
      "target_params": (sharded - draft_b) / GiB,
      "draft_params": draft_b / GiB,
      "grads_and_adam": 3 * draft_b / GiB,
      "activations": (kv + dcfg.num_draft_layers * per_layer + logits) / GiB,
  }
  out["total"] = sum(out.values())
  return out


def check_memory(config, cfg: ModelConfig, dcfg: DrafterConfig, mesh_shape) -> dict:
  est = memory_estimate(cfg, dcfg, batch_size=config.batch_size, seq_len=config.seq_len,
                        anchors_per_seq=config.anchors_per_seq, mesh_shape=mesh_shape)
  if config.hbm_gib and est["total"] > config.hbm_gib:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in est.items() if k != "total")
    raise MemoryError(f"estimated {est['total']:.1f} GiB per device on mesh {tuple(mesh_shape)} "
                      f"exceeds hbm_gib={config.hbm_gib} ({parts}); use more devices, a larger "
                      "fsdp/tensor axis, or a smaller batch_size/seq_len/anchors_per_seq")
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
  """Builds (or resumes) the self-distilled train and held-out sets."""
  from flexdraft_jax.engine import Engine
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


def _check_dataset(path: pathlib.Path, fingerprint: str, config) -> None:
  meta = data_lib.TokenDataset(path).meta
  if meta.get("fingerprint") not in (None, fingerprint):
    raise data_lib.DatasetError(f"{path} was generated by another target (fingerprint "
                                f"{meta['fingerprint'][:12]}.. != {fingerprint[:12]}..)")


def _iterator(config, path, dcfg, seed, num_epochs=None):
  return data_lib.make_iterator(
      path, seq_len=config.seq_len, batch_size=config.batch_size, block_size=dcfg.block_size,
      anchors_per_seq=config.anchors_per_seq, seed=seed, shard_index=jax.process_index(),
      shard_count=jax.process_count(), num_epochs=num_epochs)


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


def evaluate(eval_fn, state, target, config, path, dcfg, sharding) -> dict:
  """Mean metrics over `eval_batches` fixed held-out batches (same batches every time)."""
  it = _iterator(config, path, dcfg, seed=1234)
  rows = []
  for _ in range(config.eval_batches):
    batch = jax.device_put(next(it), sharding)
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
  cfg, target = load_target(config)
  dcfg = drafter_config(config, cfg)
  lcfg, ocfg = loss_config(config), optim_config(config)
  mesh = training.make_mesh(mesh_shape(config, jax.device_count()))
  est = check_memory(config, cfg, dcfg, mesh.devices.shape)
  fingerprint = ckpt_lib.target_fingerprint(target_arch(cfg), target)

  train_dir, heldout_dir = data_dirs(config, workdir)
  if config.data.generate_if_missing:
    generate_data(config, workdir, (cfg, target), fingerprint)
  for path in (train_dir, heldout_dir) if config.eval_every else (train_dir,):
    if not (path / "meta.json").exists():
      raise data_lib.DatasetError(
          f"no dataset at {path}; build it first: python train.py --mode=generate "
          f"--config=<this config> --workdir={workdir}")
    _check_dataset(path, fingerprint, config)

  draft = drafter_lib.init_draft(cfg, dcfg, target, jax.random.key(config.seed + 1))
  tx = training.make_optimizer(ocfg, {"target": target, "draft": draft})
  state = training.init_state(tx, target, draft)
  it = _iterator(config, train_dir, dcfg, seed=config.seed)
  batch0 = next(_iterator(config, train_dir, dcfg, seed=config.seed))
  step_fn, st_sh, tg_sh, b_sh = training.compile_train_step(state, target, batch0, mesh, tx=tx,
                                                           cfg=cfg, dcfg=dcfg, lcfg=lcfg)
  target = jax.device_put(target, tg_sh)
  state = jax.device_put(state, st_sh)
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
      tokens += int(np.sum(batch["segment_ids"] > 0))
      if config.time_limit_s and step > start + 1:
        jax.block_until_ready(metrics)  # the clock sees finished steps; one more stays queued
      state, metrics = step_fn(state, target, jax.device_put(batch, b_sh))
      if step % config.log_every == 0 or step == config.num_steps or step == start + 1:
        last = _host(metrics)
        dt = time.perf_counter() - t_prev
        last.update(training.acceptance_proxies(metrics), step=step, tokens_per_s=tokens / dt,
                    step_time_s=dt / (step - s_prev))
        t_prev, s_prev, tokens = time.perf_counter(), step, 0
        if config.eval_every and (step % config.eval_every == 0 or step == config.num_steps):
          last.update(evaluate(eval_fn, state, target, config, heldout_dir, dcfg, b_sh))
        log.write(last)
        bar.set_postfix(loss=f"{last['loss']:.3f}", acc0=f"{last['acc'][0]:.2f}",
                        tau=f"{last['tau_proxy_parallel']:.2f}", refresh=False)
      bar.update(1)
      out_of_time = config.time_limit_s and time.perf_counter() - t_start > config.time_limit_s
      if out_of_time:  # a clean early end: final eval, save and export below
        if main:
          print(f"time_limit_s={config.time_limit_s} reached at step {step}", file=sys.stderr)
        if config.eval_every:
          last.update(evaluate(eval_fn, state, target, config, heldout_dir, dcfg, b_sh), step=step)
          log.write(last)
        break
      ckpt.maybe_save(step, state.as_dict(), it, force=sigterm.is_set())
      if sigterm.is_set():
        if main:
          print(f"SIGTERM: saved step {step}, exiting", file=sys.stderr)
        log.close()
        return last
    bar.close()
    ckpt.maybe_save(int(state.step), state.as_dict(), it, force=True)
  log.close()
  if main:
    path = export(config, workdir, state.draft, cfg, dcfg, fingerprint)
    print(f"exported drafter to {path}", file=sys.stderr)
  return last


def export(config, workdir, draft, cfg: ModelConfig, dcfg: DrafterConfig, fingerprint: str):
  return ckpt_lib.export_drafter(pathlib.Path(workdir) / "drafter", jax.device_get(draft),
                                 dcfg.to_dict(), target_arch(cfg), fingerprint,
                                 dtype=config.export_dtype)

"""The training job behind `train.py`: data -> packed blocks -> train step -> checkpoint -> export.

`run(config, workdir)` starts from scratch or resumes from the newest checkpoint in
`workdir` that restores (`checkpoint.Checkpointer.restore_newest`), logs metrics as
JSONL (process 0 only), saves on an interval, and exports the drafter to
`workdir/drafter` at the end. SIGTERM saves and raises `Preempted` (train.py: exit
status 143, and how to resume).

With several processes (`train.py --multihost`), each reads the data shard of the
batch rows its devices hold and they assemble the global batch (`multihost`); the
workdir must be shared, as orbax writes one checkpoint from all of them; stopping
(SIGTERM, time limit) is agreed each step. The memory check before any work is
`train_memory`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from flexdraft_jax import checkpoint as ckpt_lib
from flexdraft_jax import cli
from flexdraft_jax import data as data_lib
from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax import kv_data
from flexdraft_jax import model as model_lib
from flexdraft_jax import multihost
from flexdraft_jax import sharding as sharding_lib
from flexdraft_jax import train_memory
from flexdraft_jax import train_config
from flexdraft_jax import training
from flexdraft_jax import weights
from flexdraft_jax.drafter import DrafterConfig
from flexdraft_jax.model_config import ModelConfig, RopeScaling, default_dtype


class Preempted(cli.Exit):
  """SIGTERM stopped the run after saving `step`; rerunning the same command resumes it."""

  def __init__(self, step: int, directory):
    super().__init__(f"SIGTERM: saved step {step} in {directory}; exiting with status "
                     f"{cli.EXIT_SIGTERM}. Run the same command again to resume.",
                     cli.EXIT_SIGTERM)
    self.step = step


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
  """config.drafter checked against the target (ConfigError, e.g. more draft layers than
  the target has: known only once the target is)."""
  try:
    dcfg = DrafterConfig(**config.drafter.to_dict()).validate(cfg)
  except (TypeError, ValueError) as e:
    raise train_config.ConfigError(f"config.drafter: {e}") from None
  if config.seq_len < dcfg.block_size + 1:
    raise train_config.ConfigError(f"seq_len={config.seq_len} is below block_size + 1 = "
                                   f"{dcfg.block_size + 1}")
  return dcfg


def check_memory(config, cfg: ModelConfig, dcfg: DrafterConfig, mesh_shape) -> dict:
  """`train_memory.check_memory`, its over-budget MemoryError as a ConfigError (the config's
  sizes or hbm_gib are what to change)."""
  try:
    return train_memory.check_memory(config, cfg, dcfg, mesh_shape)
  except MemoryError as e:
    raise train_config.ConfigError(f"config.hbm_gib: {e}") from None


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
    raise cli.UserError("building the datasets needs a single process: run train.py --mode=generate "
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


_count_tokens = jax.jit(lambda seg: jnp.sum(seg > 0))


def _iterator(config, path, dcfg, seed, mesh, num_epochs=None, kv_store=None):
  shard = multihost.data_shard(mesh, config.batch_size)
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
    raise cli.UserError("caching K/V needs a single process: run train.py --mode=cache_kv without "
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
    batch = multihost.global_batch(next(it), sharding, config.batch_size)
    rows.append(jax.device_get(eval_fn(state.draft, target, batch)))
  mean = jax.tree.map(lambda *a: np.mean(np.stack(a), axis=0), *rows)
  out = {f"eval_{k}": v for k, v in _host(mean).items()}
  out.update({f"eval_{k}": v for k, v in training.acceptance_proxies(mean).items()})
  return out


@dataclasses.dataclass
class _Job:
  """What a run sets up before its first step (`_prepare`)."""
  cfg: ModelConfig
  dcfg: DrafterConfig
  target: dict
  fingerprint: str
  mesh: jax.sharding.Mesh
  memory_gib: float
  heldout_dir: pathlib.Path
  stores: dict          # {data dir: kv_data.KVStore} in offline mode
  state: training.TrainState
  iterator: object      # the train split's grain iterator (checkpointed with the state)
  step_fn: object
  batch_sharding: dict
  eval_fn: object

  def evaluate(self, state, config) -> dict:
    return evaluate(self.eval_fn, state, self.target, config, self.heldout_dir, self.dcfg,
                    self.batch_sharding, self.stores.get(self.heldout_dir))


def _prepare(config, workdir: pathlib.Path) -> _Job:
  """Target, drafter (fresh or `init_from`), data (built or extracted, checked), optimizer
  and the compiled train step, all placed on the mesh."""
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
  iterator = lambda: _iterator(config, train_dir, dcfg, seed=config.seed, mesh=mesh,
                               kv_store=stores.get(train_dir))
  step_fn, st_sh, tg_sh, b_sh = training.compile_train_step(state, target, next(iterator()),
                                                           mesh, tx=tx, cfg=cfg, dcfg=dcfg,
                                                           lcfg=lcfg)
  eval_fn = jax.jit(lambda d, t, b: training.loss_and_metrics(d, t, b, cfg=cfg, dcfg=dcfg,
                                                              lcfg=lcfg)[1])
  return _Job(cfg=cfg, dcfg=dcfg, target=multihost.put_global(target, tg_sh),
              fingerprint=fingerprint, mesh=mesh, memory_gib=est["total"],
              heldout_dir=heldout_dir, stores=stores, state=multihost.put_global(state, st_sh),
              iterator=iterator(), step_fn=step_fn, batch_sharding=b_sh, eval_fn=eval_fn)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains to config.num_steps (resuming if a checkpoint exists); returns the last metrics."""
  workdir = pathlib.Path(workdir).absolute()  # orbax wants absolute paths
  workdir.mkdir(parents=True, exist_ok=True)
  main = jax.process_index() == 0
  job = _prepare(config, workdir)
  log = _Log(workdir)
  with ckpt_lib.Checkpointer(workdir, {**config.to_dict(), "fingerprint": job.fingerprint},
                             config.save_every) as ckpt, ckpt_lib.SigtermFlag() as sigterm:
    restored = ckpt.restore_newest(job.state.as_dict(), job.iterator)  # None: no checkpoint
    start = 0
    if restored is not None:
      start, state = restored
      job.state = training.TrainState(**state)
      if main:
        print(f"resumed from step {start} in {ckpt.directory}", file=sys.stderr)
    elif main:
      cfg, dcfg = job.cfg, job.dcfg
      print(f"target {config.model}: {cfg.num_layers} layers, d={cfg.hidden_size}; drafter "
            f"K={dcfg.num_draft_layers} B={dcfg.block_size} r={dcfg.calib_rank}; mesh "
            f"{dict(job.mesh.shape)}; est. {job.memory_gib:.2f} GiB/device", file=sys.stderr)
    last, stopped = _train(config, job, start, ckpt, sigterm, log)
    if stopped:
      log.close()
      raise Preempted(int(job.state.step), ckpt.directory)
    ckpt.maybe_save(int(job.state.step), job.state.as_dict(), job.iterator, force=True)
  log.close()
  draft = multihost.to_host(job.state.draft)  # every process takes part; process 0 writes
  if main:
    path = export(config, workdir, draft, job.cfg, job.dcfg, job.fingerprint)
    print(f"exported drafter to {path}", file=sys.stderr)
  return last


def _train(config, job: _Job, start: int, ckpt, sigterm, log) -> tuple[dict, bool]:
  """Steps start+1..num_steps (job.state advances), logging, evaluating and saving on their
  intervals; ends early at the time limit (evaluated) or on SIGTERM (saved). Returns the
  last metrics and whether SIGTERM stopped the run."""
  main = jax.process_index() == 0
  last, metrics = {}, None
  bar = tqdm.tqdm(total=config.num_steps, initial=start, unit="step", file=sys.stderr,
                  disable=not main)
  t_prev, s_prev, tokens = time.perf_counter(), start, 0
  t_start = t_prev
  for step in range(start + 1, config.num_steps + 1):
    batch = multihost.global_batch(next(job.iterator), job.batch_sharding, config.batch_size)
    tokens = tokens + _count_tokens(batch["segment_ids"])  # on device: no sync per step
    if config.time_limit_s and step > start + 1:
      jax.block_until_ready(metrics)  # the clock sees finished steps; one more stays queued
    job.state, metrics = job.step_fn(job.state, job.target, batch)
    if step % config.log_every == 0 or step == config.num_steps or step == start + 1:
      last = _host(metrics)
      dt = time.perf_counter() - t_prev
      last.update(training.acceptance_proxies(metrics), step=step, tokens_per_s=int(tokens) / dt,
                  step_time_s=dt / (step - s_prev))
      t_prev, s_prev, tokens = time.perf_counter(), step, 0
      if config.eval_every and (step % config.eval_every == 0 or step == config.num_steps):
        last.update(job.evaluate(job.state, config))
      log.write(last)
      bar.set_postfix(loss=f"{last['loss']:.3f}", acc0=f"{last['acc'][0]:.2f}",
                      tau=f"{last['tau_proxy_parallel']:.2f}", refresh=False)
    bar.update(1)
    out_of_time = config.time_limit_s and time.perf_counter() - t_start > config.time_limit_s
    out_of_time, stop = multihost.any_process(out_of_time, sigterm.is_set())  # processes agree
    if out_of_time:  # a clean early end: final eval, save and export after this
      if main:
        print(f"time_limit_s={config.time_limit_s} reached at step {step}", file=sys.stderr)
      if config.eval_every:
        last.update(job.evaluate(job.state, config), step=step)
        log.write(last)
      break
    ckpt.maybe_save(step, job.state.as_dict(), job.iterator, force=stop)
    if stop:  # run() raises Preempted, which says so
      return last, True
  bar.close()
  return last, False


def init_from_export(path, cfg: ModelConfig, dcfg: DrafterConfig, fingerprint: str,
                     like: dict) -> dict:
  """The params of the drafter in `path`, as the dtypes of `like` (a fresh draft's shapes and
  dtypes: f32 master weights): an export of ours, or the authors' FlexDraft release
  (`official`; its target is checked by architecture only, as it records no fingerprint).

  DrafterMismatchError when it was trained for another target (`checkpoint.load_drafter`,
  the check `decode.py` makes) or with another drafter config or param tree than `dcfg`
  (for the release: config.drafter's num_draft_layers, block_size and calib_rank must be
  its num_hidden_layers, block_size and anchor_bias_rank).
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
  """Writes the drafter, and the training data's response token counts beside it (its draft
  vocabulary at decode time, `drafter.restrict_vocab`)."""
  out = pathlib.Path(workdir) / "drafter"
  path = ckpt_lib.export_drafter(out, jax.device_get(draft), dcfg.to_dict(), target_arch(cfg),
                                 fingerprint, dtype=config.export_dtype)
  ckpt_lib.save_token_counts(out, data_lib.token_counts(data_dirs(config, workdir)[0],
                                                        cfg.vocab_size))
  return path

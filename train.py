r"""Trains a FlexDraft drafter for a frozen target (see configs/).

  python train.py --config=configs/tiny.py --workdir=/tmp/tiny
  python train.py --config=configs/smollm2_135m.py --workdir=runs/smollm2 --mode=generate
  python train.py --config=configs/smollm2_135m.py --workdir=runs/smollm2 --mode=cache_kv
  python train.py --config=configs/smollm2_135m.py --workdir=runs/smollm2 --config.data.offline=True
  python train.py --config=configs/smollm2_135m.py --workdir=runs/smollm2 \
      --config.num_steps=500 --config.optim.learning_rate=1e-3

A run resumes from the newest checkpoint in --workdir that restores. One run at a time
holds a workdir (a lock file, `workdir/.lock`). SIGTERM saves and exits with status 143;
run the same command to resume. Exit statuses: docs/TRAINING.md.

Several processes (hosts) train one model with --multihost, on a workdir they all
see, after the data is built by one process (--mode=generate). On a TPU pod every
host runs the same command; elsewhere each gets its id, e.g. on two machines:

  python train.py --config=... --workdir=/shared/run --multihost \
      --coordinator_address=host0:8476 --num_processes=2 --process_id=0   # =1 on host1
"""
from __future__ import annotations

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging

from flexdraft_jax import cli
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, data and the exported drafter.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "generate", "memory", "cache_kv"],
                          "train; generate = build the self-distilled datasets only; "
                          "memory = print the per-device memory estimate and exit; "
                          "cache_kv = cache the target's deep-layer K/V for "
                          "config.data.offline=True (resumable).")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False,
    "Call jax.distributed.initialize() first (TPU pods, multi-host). On a TPU pod or a "
    "supported cluster (SLURM, Open MPI, Kubernetes) it finds its peers itself; elsewhere give "
    "--coordinator_address (or JAX_COORDINATOR_ADDRESS), --num_processes and --process_id.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator (with --multihost).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (with --multihost).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes) "
                                   "(with --multihost).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from flexdraft_jax import train_config  # before any data, weights or compile
  config = _CONFIG.value
  try:  # ConfigError: one line, exit 2 (cli.guard)
    train_config.validate(config, _MODE.value)
  except OSError as e:  # the config file did not load (on first use); its last line says why
    raise cli.UserError(f"--config: {str(e).strip().splitlines()[-1].strip()}") from None
  if _MODE.value != "memory":  # fails at once on a file, an unwritable dir, a bad parent
    train_config.check_workdir(_WORKDIR.value)
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
  import jax
  if _MULTIHOST.value:
    try:
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except (ValueError, TypeError, RuntimeError) as e:  # no cluster, bad flags, no coordinator
      raise cli.UserError(f"--multihost: {e} (outside a TPU pod or a supported cluster, give "
                          "--coordinator_address, --num_processes and --process_id)") from None
  elif any(f.present for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id need --multihost")
  if _MODE.value == "memory":
    _memory(config, jax.device_count())
    return
  # One run per workdir, for the whole run (data, K/V cache, training, export): a second
  # is refused at once. Multi-host: process 0 holds it for the job.
  lock = cli.WorkdirLock(_WORKDIR.value) if jax.process_index() == 0 else None
  try:
    _run(config, jax)
  finally:
    if lock:
      lock.release()


def _memory(config, num_devices: int) -> None:
  """--mode=memory: the per-device estimate."""
  from flexdraft_jax import train_memory
  from flexdraft_jax import trainer
  cfg = (trainer.arch_config(config.model_arch.to_dict(), trainer._dtype(config))
         if "model_arch" in config else trainer.load_target(config)[0])
  dcfg = trainer.drafter_config(config, cfg)
  shape = trainer.mesh_shape(config, num_devices)
  est = trainer.check_memory(config, cfg, dcfg, shape)
  rows, context = train_memory.decode_shape(config)
  print(f"estimated GiB per device on mesh {shape} (data, fsdp, tensor): train step with "
        f"batch {config.batch_size} x {config.seq_len} tokens, decoding {rows} rows x "
        f"{context} tokens; without XLA temporaries (see train_memory.memory_estimate)")
  for k, v in est.items():
    print(f"  {k:20s} {v:8.2f}")


def _run(config, jax) -> None:
  """--mode=generate, cache_kv or train, under the workdir lock."""
  from flexdraft_jax import train_config
  from flexdraft_jax import trainer
  if _MODE.value == "generate":
    trainer.generate_data(config, _WORKDIR.value)
  elif _MODE.value == "cache_kv":
    trainer.cache_kv(config, _WORKDIR.value)
  else:
    train_config.check_devices(config, jax.device_count())
    last = trainer.run(config, _WORKDIR.value)  # SIGTERM: trainer.Preempted, exit 143
    if jax.process_count() > 1:  # each host's log says where it ended
      print(f"process {jax.process_index()} of {jax.process_count()} done: step "
            f"{last.get('step')} loss {last.get('loss')}", file=sys.stderr)


def _parse_error(error, argv) -> str | None:
  """One line for an error while parsing the flags that the user's input caused: an unknown
  --config.KEY (ml_collections raises AttributeError/KeyError), or any error raised by the
  --config file itself (a syntax error, an exception in its get_config); else None."""
  import traceback
  from flexdraft_jax import train_config
  if isinstance(error, (AttributeError, KeyError)):
    text = train_config.unknown_override(error, argv)
    if text:
      return text
  config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if not config:
    return None
  where = getattr(error, "filename", None), getattr(error, "lineno", None)
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if pathlib.Path(f.filename).resolve() == pathlib.Path(config).resolve()]
  if frames:
    where = frames[-1].filename, frames[-1].lineno
  if where[0] is None or pathlib.Path(where[0]).resolve() != pathlib.Path(config).resolve():
    return None
  return f"--config: {where[0]}:{where[1]}: {type(error).__name__}: {error.args[0] if error.args else error}"


# tests/cli_runner.py calls these two in process.
_parse_flags, _main = cli.wrap(main, "train.py", parse_error=((Exception,), _parse_error))

if __name__ == "__main__":
  app.run(_main, flags_parser=_parse_flags)

r"""Trains a FlexDraft drafter for a frozen target (see configs/).

  python train.py --config=configs/tiny.py --workdir=/tmp/tiny
  python train.py --config=configs/smollm2_135m.py --workdir=runs/smollm2 --mode=generate
  python train.py --config=configs/smollm2_135m.py --workdir=runs/smollm2 \
      --config.num_steps=500 --config.optim.learning_rate=1e-3

A run resumes from the latest checkpoint in --workdir; SIGTERM saves and exits.
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, data and the exported drafter.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "generate", "memory"],
                          "train; generate = build the self-distilled datasets only; "
                          "memory = print the per-device memory estimate and exit.")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() first (TPU pods, multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO
  import jax
  if _MULTIHOST.value:
    jax.distributed.initialize()
  from flexdraft_jax import data as data_lib
  from flexdraft_jax import resources
  from flexdraft_jax import trainer
  from flexdraft_jax import weights

  config = _CONFIG.value
  try:
    if _MODE.value == "memory":
      cfg = (trainer.arch_config(config.model_arch.to_dict(), trainer._dtype(config))
             if "model_arch" in config else trainer.load_target(config)[0])
      dcfg = trainer.drafter_config(config, cfg)
      shape = trainer.mesh_shape(config, jax.device_count())
      for k, v in trainer.check_memory(config, cfg, dcfg, shape).items():
        print(f"{k:16s} {v:8.2f} GiB per device")
    elif _MODE.value == "generate":
      trainer.generate_data(config, _WORKDIR.value)
    else:
      trainer.run(config, _WORKDIR.value)
  except (ValueError, MemoryError, FileNotFoundError, weights.WeightsError,
          resources.MissingResourceError, data_lib.DatasetError) as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)

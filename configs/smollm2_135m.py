"""SmolLM2-135M-Instruct (30 layers, d=576): the drafter `make demo` ships.

  python train.py --config=configs/smollm2_135m.py --workdir=runs/smollm2 --mode=generate
  python train.py --config=configs/smollm2_135m.py --workdir=runs/smollm2
"""
import pathlib

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.base_config()
  c.model = "smollm2-135m-instruct"
  c.drafter.update(num_draft_layers=6, block_size=16, calib_rank=256)
  c.data.num_prompts = 4000
  c.data.num_heldout_prompts = 64
  # Shipped self-distilled data (docs/TRAINING.md), extracted into empty data dirs.
  c.data.archive = str(pathlib.Path(__file__).resolve().parents[1] / "datasets"
                       / "smollm2-135m-instruct-sharegpt-self.npz")
  c.seq_len = 512
  c.batch_size = 4
  c.anchors_per_seq = 16
  c.optim.learning_rate = 5e-4
  c.num_steps = 2000
  return c

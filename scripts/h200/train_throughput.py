"""Train-step throughput of the SmolLM2-135M-shaped drafter job, without the real weights.

  python scripts/h200/train_throughput.py --out=train_throughput.json [--batch_size=32]

A random target with SmolLM2-135M's architecture (bf16) and random token rows
stand in for the model and data, so this needs no model file: the step's cost
depends on shapes only. It runs the real job (`trainer.run`) for --seconds and
reports the logged tokens/s and step time. Used by scripts/h200/run.sh.
"""
import json
import pathlib
import sys
import tempfile
import time

from absl import app, flags, logging
import numpy as np

from configs import smollm2_135m
from flexdraft_jax import data as data_lib
from flexdraft_jax import trainer

SMOLLM2_ARCH = dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_embeddings=True, max_position=8192)

_OUT = flags.DEFINE_string("out", "train_throughput.json", "JSON result file.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Packed rows per step.")
_ANCHORS = flags.DEFINE_integer("anchors_per_seq", 32, "Blocks per packed row.")
_SECONDS = flags.DEFINE_float("seconds", 30.0, "Training time after compilation.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Target compute dtype.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  root = pathlib.Path(tempfile.mkdtemp())
  rng = np.random.default_rng(0)
  rows = [(rng.integers(0, 49152, 120), rng.integers(0, 49152, 400)) for _ in range(512)]
  data_lib.write_rows(root / "train", rows, model="random", split="train")
  c = smollm2_135m.get_config()
  c.model, c.tokenizer, c.dtype = "random", "smollm2-135m-instruct", _DTYPE.value
  c.random_model = SMOLLM2_ARCH
  c.data.train_dir = str(root / "train")
  c.batch_size, c.anchors_per_seq = _BATCH.value, _ANCHORS.value
  c.eval_every, c.save_every, c.log_every = 0, 10 ** 9, 10
  c.num_steps, c.time_limit_s = 10 ** 6, _SECONDS.value
  start = time.perf_counter()
  trainer.run(c, root / "work")
  wall = time.perf_counter() - start
  logged = [json.loads(l) for l in open(root / "work" / "metrics.jsonl")][1:]  # [0]: step 1
  result = {
      "arch": "SmolLM2-135M (random weights)", "dtype": _DTYPE.value, "batch_size": _BATCH.value,
      "seq_len": c.seq_len, "anchors_per_seq": _ANCHORS.value,
      "drafter": c.drafter.to_dict(), "steps": logged[-1]["step"] if logged else None,
      "tokens_per_s": float(np.median([r["tokens_per_s"] for r in logged])) if logged else None,
      "step_time_s": float(np.median([r["step_time_s"] for r in logged])) if logged else None,
      "wall_s_incl_compile": wall}
  pathlib.Path(_OUT.value).write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result), file=sys.stderr)


if __name__ == "__main__":
  app.run(main)

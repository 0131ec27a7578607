"""Wall time of the SmolLM2 train step by part, as one JSON line on stdout:

  clean_pass  the frozen target over the packed batch (what offline mode would skip)
  loss_fwd    clean pass + mask path + LM head + losses
  train_step  loss_fwd + backward (draft only) + AdamW

  python scripts/train_step_profile.py [field=value ...]   # overrides of configs/smollm2_135m.py

Random tokens, one segment per row; best of two runs after a warm-up, compile time apart.
"""
import json
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import smollm2_135m  # noqa: E402
from flexdraft_jax import drafter as drafter_lib  # noqa: E402
from flexdraft_jax import model as model_lib  # noqa: E402
from flexdraft_jax import trainer, training  # noqa: E402


def _config(overrides):
  c = smollm2_135m.get_config()
  for key, value in (a.split("=", 1) for a in overrides):
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value)
  return c


def _batch(c, rng):
  b, s, a = c.batch_size, c.seq_len, c.anchors_per_seq
  anchors = np.stack([np.sort(rng.choice(s - 1, a, replace=False)) for _ in range(b)])
  return {"tokens": rng.integers(1, 49000, (b, s)).astype(np.int32),
          "segment_ids": np.ones((b, s), np.int32),
          "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)),
          "loss_mask": np.ones((b, s), bool), "anchors": anchors.astype(np.int32)}


def _time(fn, args):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))
  runs = []
  for _ in range(2):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - t0)
  return {"s": round(min(runs), 2), "compile_s": round(compile_s, 1)}


def main(argv):
  c = _config(argv)
  cfg, target = trainer.load_target(c)
  dcfg, lcfg = trainer.drafter_config(c, cfg), trainer.loss_config(c)
  draft = jax.jit(drafter_lib.init_draft, static_argnums=(0, 1))(cfg, dcfg, target,
                                                                 jax.random.key(1))
  tx = training.make_optimizer(trainer.optim_config(c), {"target": target, "draft": draft})
  state, batch = training.init_state(tx, target, draft), _batch(c, np.random.default_rng(0))

  def clean(target, batch):
    tokens = drafter_lib.Tokens.clean(batch["positions"], batch["segment_ids"])
    return model_lib.run_layers(cfg, target["layers"], model_lib.embed(target, cfg, batch["tokens"]),
                                batch["positions"], drafter_lib.visibility(tokens, tokens))[1]

  parts = {
      "clean_pass": (clean, (target, batch)),
      "loss_fwd": (lambda d, t, b: training.loss_and_metrics(d, t, b, cfg=cfg, dcfg=dcfg,
                                                             lcfg=lcfg)[0], (draft, target, batch)),
      "train_step": (lambda s, t, b: training.train_step(s, t, b, tx=tx, cfg=cfg, dcfg=dcfg,
                                                         lcfg=lcfg), (state, target, batch)),
  }
  out = {"config": {"batch_size": c.batch_size, "seq_len": c.seq_len,
                    "anchors_per_seq": c.anchors_per_seq, **c.drafter.to_dict()},
         "backend": jax.default_backend()}
  for name, (fn, args) in parts.items():
    out[name] = _time(fn, args)
    print(name, out[name], file=sys.stderr, flush=True)
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])

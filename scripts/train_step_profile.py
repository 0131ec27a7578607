"""Wall time of the SmolLM2 train step by part, as one JSON line on stdout:

  clean_pass          the frozen target over the packed batch (what offline mode skips)
  loss_fwd            clean pass + mask path + LM head + losses
  train_step          loss_fwd + backward (draft only) + AdamW
  loss_fwd_offline    the same without the clean pass: the batch carries cached K/V
  train_step_offline  (config.data.offline; kv_data), bf16 as the cache stores them

Each part also reports XLA's FLOP count (`gflop`, from the lowered program with the
target's layers unrolled, since cost analysis counts a scanned loop's body once).

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
from flexdraft_jax import kv_data  # noqa: E402
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


def _gflop(fn, args, unrolled_args):
  try:
    return round(jax.jit(fn).lower(*unrolled_args).cost_analysis()["flops"] / 1e9, 1)
  except Exception as e:  # noqa: BLE001 - a count is optional
    print(f"no FLOP count: {type(e).__name__}: {e}", file=sys.stderr)
    return None


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
  kv_shape = (c.batch_size, c.seq_len) + kv_data.record_shape(cfg, dcfg)
  offline = {**batch, "kv": jax.random.normal(jax.random.key(2), kv_shape, "bfloat16")}

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
  parts["loss_fwd_offline"] = (parts["loss_fwd"][0], (draft, target, offline))
  parts["train_step_offline"] = (parts["train_step"][0], (state, target, offline))
  # FLOP counts on unrolled layers; a train step's is its loss and draft gradient (AdamW's
  # elementwise update apart), since the optimizer state has no unrolled form.
  unrolled = {id(target): model_lib.unstack_layers(target), id(draft): model_lib.unstack_layers(draft)}
  grad = jax.value_and_grad(parts["loss_fwd"][0])
  flop_parts = {"train_step": (grad, (draft, target, batch)),
                "train_step_offline": (grad, (draft, target, offline))}
  out = {"config": {"batch_size": c.batch_size, "seq_len": c.seq_len,
                    "anchors_per_seq": c.anchors_per_seq, **c.drafter.to_dict()},
         "backend": jax.default_backend()}
  for name, (fn, args) in parts.items():
    out[name] = _time(fn, args)
    flop_fn, flop_args = flop_parts.get(name, (fn, args))
    out[name]["gflop"] = _gflop(flop_fn, flop_args, tuple(unrolled.get(id(a), a) for a in flop_args))
    print(name, out[name], file=sys.stderr, flush=True)
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])

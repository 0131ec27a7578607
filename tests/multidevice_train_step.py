"""Runs 3 train steps of a tiny drafter on several meshes of 8 simulated CPU devices.

Run by tests/test_training.py in a subprocess (the device count is fixed at JAX
start-up). Prints one JSON line: per mesh, the losses and the final draft params.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flexdraft_jax import drafter, model, sharding, training  # noqa: E402
from flexdraft_jax.model_config import ModelConfig  # noqa: E402


def main(meshes):
  cfg = ModelConfig(family="qwen3", vocab_size=128, hidden_size=32, intermediate_size=64,
                    num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
  dcfg = drafter.DrafterConfig(num_draft_layers=2, block_size=4, calib_rank=8)
  target = model.init_params(cfg, jax.random.key(0))
  draft0 = drafter.init_draft(cfg, dcfg, target, jax.random.key(1))
  rng = np.random.default_rng(0)
  b, s, a = 8, 32, 4
  batch = {"tokens": rng.integers(0, 128, (b, s)).astype(np.int32),
           "segment_ids": np.repeat(np.array([[1] * 20 + [2] * 12]), b, 0).astype(np.int32),
           "positions": np.repeat(np.array([list(range(20)) + list(range(12))]), b, 0).astype(np.int32),
           "loss_mask": np.ones((b, s), bool),
           "anchors": np.repeat(np.array([[3, 10, 22, 25]]), b, 0).astype(np.int32)}
  out = {}
  for shape in meshes:
    mesh = sharding.make_mesh(shape)
    tx = training.make_optimizer(training.OptimConfig(learning_rate=1e-2, warmup_steps=1,
                                                      total_steps=10),
                                 {"target": target, "draft": draft0})
    state = training.init_state(tx, target, draft0)
    fn, st_sh, tg_sh, b_sh = training.compile_train_step(state, target, batch, mesh, tx=tx, cfg=cfg,
                                                         dcfg=dcfg, lcfg=training.LossConfig())
    state = jax.device_put(jax.tree.map(np.asarray, state), st_sh)  # fresh buffers: donated
    tgt = jax.device_put(target, tg_sh)
    losses = []
    for _ in range(3):
      state, metrics = fn(state, tgt, jax.device_put(batch, b_sh))
      losses.append(float(metrics["loss"]))
    shards = {jax.tree_util.keystr(p): str(leaf.sharding.spec)
              for p, leaf in jax.tree_util.tree_leaves_with_path(state.draft)}
    out[str(shape)] = {"losses": losses, "shardings": shards,
                       "draft": [np.asarray(x).tolist() for x in jax.tree.leaves(state.draft)]}
  print(json.dumps(out))


if __name__ == "__main__":
  main([tuple(int(x) for x in m.split(",")) for m in sys.argv[1:]])

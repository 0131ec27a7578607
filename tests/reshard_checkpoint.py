"""Saves a train state under one mesh of 8 simulated CPU devices, restores it under others.

Run by tests/test_checkpoint.py in a subprocess (the device count is fixed at JAX
start-up):

  python tests/reshard_checkpoint.py <workdir> 8,1,1 2,2,2 1,1,8

Trains 2 steps on the first mesh, saves with `checkpoint.Checkpointer`, and takes a
3rd step there. Every other mesh restores the checkpoint, as `jax.ShapeDtypeStruct`s
carrying that mesh's shardings ("abstract") and, separately, into concrete arrays
already placed on it ("concrete", what `trainer.run` passes), then takes the 3rd
step. Prints one JSON line: per mesh and target kind, whether every restored leaf
equals the saved one bit for bit, the leaves whose sharding is not the mesh's,
how many leaves are split over several devices, and the 3rd step's loss.
"""
import json
import os
import sys

# LLVM -O0 compiles about a third faster; every mesh runs under the same flags.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flexdraft_jax import checkpoint as ckpt_lib  # noqa: E402
from flexdraft_jax import drafter, model, sharding, training  # noqa: E402
from flexdraft_jax.model_config import ModelConfig  # noqa: E402

CFG = ModelConfig(family="qwen3", vocab_size=128, hidden_size=32, intermediate_size=64,
                  num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
DCFG = drafter.DrafterConfig(num_draft_layers=2, block_size=4, calib_rank=8)


def _batch(seed):
  rng = np.random.default_rng(seed)
  b, s = 8, 32
  return {"tokens": rng.integers(0, 128, (b, s)).astype(np.int32),
          "segment_ids": np.repeat(np.array([[1] * 20 + [2] * 12]), b, 0).astype(np.int32),
          "positions": np.repeat(np.array([list(range(20)) + list(range(12))]), b, 0).astype(np.int32),
          "loss_mask": np.ones((b, s), bool),
          "anchors": np.repeat(np.array([[3, 10, 22, 25]]), b, 0).astype(np.int32)}


def main(workdir, meshes):
  target = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))
  draft0 = jax.jit(drafter.init_draft, static_argnums=(0, 1))(CFG, DCFG, target, jax.random.key(1))
  tx = training.make_optimizer(training.OptimConfig(learning_rate=1e-2, warmup_steps=1,
                                                    total_steps=10),
                               {"target": target, "draft": draft0})
  fresh = training.init_state(tx, target, draft0)

  def on_mesh(shape):
    mesh = sharding.make_mesh(shape)
    fn, st_sh, tg_sh, b_sh = training.compile_train_step(fresh, target, _batch(0), mesh, tx=tx,
                                                         cfg=CFG, dcfg=DCFG,
                                                         lcfg=training.LossConfig())
    step = lambda state, i: fn(state, jax.device_put(target, tg_sh), jax.device_put(_batch(i), b_sh))
    return step, st_sh

  step, st_sh = on_mesh(meshes[0])
  state = jax.device_put(jax.tree.map(np.asarray, fresh), st_sh)  # fresh buffers: donated
  for i in range(2):
    state, _ = step(state, i)
  with ckpt_lib.Checkpointer(workdir, {}, save_interval_steps=1) as ckpt:
    assert ckpt.maybe_save(2, state.as_dict(), force=True)
  saved = jax.tree.map(np.asarray, state.as_dict())
  _, metrics = step(state, 2)
  out = {str(tuple(meshes[0])): {"saved": {"loss3": float(metrics["loss"])}}}

  for shape in meshes[1:]:
    step, st_sh = on_mesh(shape)
    want_sh = st_sh.as_dict()
    targets = {
        "abstract": jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                 fresh.as_dict(), want_sh),
        "concrete": jax.device_put(jax.tree.map(np.zeros_like, saved), want_sh),
    }
    out[str(tuple(shape))] = {}
    for kind, abstract in targets.items():
      with ckpt_lib.Checkpointer(workdir, {}, save_interval_steps=1) as ckpt:
        restored = ckpt.restore(abstract)
      leaves = jax.tree_util.tree_leaves_with_path(restored)
      equal = all(np.array_equal(np.asarray(a), b) and np.asarray(a).dtype == b.dtype
                  for (_, a), b in zip(leaves, jax.tree.leaves(saved)))
      wrong = [jax.tree_util.keystr(p) for (p, a), sh in zip(leaves, jax.tree.leaves(want_sh))
               if not a.sharding.is_equivalent_to(sh, a.ndim)]
      split = sum(not a.sharding.is_fully_replicated for _, a in leaves)
      _, metrics = step(training.TrainState(**restored), 2)
      out[str(tuple(shape))][kind] = {"equal": equal, "wrong_sharding": wrong, "split": split,
                                      "loss3": float(metrics["loss"])}
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1], [tuple(int(x) for x in m.split(",")) for m in sys.argv[2:]])

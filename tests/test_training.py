"""Drafter training step: visibility, frozen target, optimizer state, sharding, memory fit.
The job around it (resume, train.py, ...): tests/test_train_job.py."""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fast_compile_env
from flexdraft_jax import drafter, model, sharding, train_memory, trainer, training
from flexdraft_jax.model_config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny(request):
  fam = request.param
  cfg = ModelConfig(family=fam, vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=fam == "qwen2",
                    qk_norm=fam == "qwen3", tie_embeddings=fam == "qwen3")
  target = model.init_params(cfg, jax.random.key(1))
  dcfg = drafter.DrafterConfig(num_draft_layers=2, block_size=4, calib_rank=8)
  draft = drafter.init_draft(cfg, dcfg, target, jax.random.key(2))
  # Move the draft away from its init (a copy of the target; w2 = 0).
  draft = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), draft)
  return cfg, dcfg, target, draft


def _batch(b=4, s=32):
  rng = np.random.default_rng(0)
  seg = np.array([1] * 20 + [2] * 10 + [0] * 2)
  pos = np.array(list(range(20)) + list(range(10)) + [0, 0])
  return {"tokens": rng.integers(1, 64, (b, s)).astype(np.int32),
          "segment_ids": np.tile(seg, (b, 1)).astype(np.int32),
          "positions": np.tile(pos, (b, 1)).astype(np.int32),
          "loss_mask": np.tile(seg > 0, (b, 1)),
          "anchors": np.tile([2, 9, 17, 21, -1], (b, 1)).astype(np.int32)}


def test_visibility_rules():
  clean = drafter.Tokens.clean(jnp.arange(4)[None])
  slots = drafter.Tokens.slots(jnp.array([[1, 2]]), 2)  # blocks at positions 2,3 and 3,4
  every = clean.concat(slots)
  m = np.asarray(drafter.visibility(every, every)[0]).astype(int)
  want = np.array([
      # c0 c1 c2 c3 | b0s0 b0s1 b1s0 b1s1
      [1, 0, 0, 0, 0, 0, 0, 0],  # clean tokens: causal, never a slot
      [1, 1, 0, 0, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0, 0, 0],
      [1, 1, 1, 1, 0, 0, 0, 0],
      [1, 1, 0, 0, 1, 1, 0, 0],  # block 0 (anchor 1): clean <= 1 and its own block
      [1, 1, 0, 0, 1, 1, 0, 0],
      [1, 1, 1, 0, 0, 0, 1, 1],  # block 1 (anchor 2)
      [1, 1, 1, 0, 0, 0, 1, 1],
  ])
  np.testing.assert_array_equal(m, want)
  np.testing.assert_array_equal(np.asarray(slots.pos[0]), [2, 3, 3, 4])
  other_seg = drafter.Tokens.clean(jnp.arange(4)[None], jnp.array([[1, 1, 2, 2]]))
  assert not np.asarray(drafter.visibility(other_seg, other_seg))[0, 2, 1]


@pytest.mark.parametrize("unroll", [False, True])
def test_mask_slots_leave_clean_logits_alone_and_match_training(tiny, unroll):
  cfg, dcfg, target, draft = tiny
  params = {"target": model.decoding_params(target, unroll),
            "draft": drafter.decoding_draft(draft, unroll)}
  toks = jax.random.randint(jax.random.key(4), (2, 10), 0, cfg.vocab_size)
  _, cache = model.forward(params["target"], cfg, toks[:, :6], cache=model.KVCache.zeros(cfg, 2, 32))
  anchors = jnp.array([[5, 6, 7], [5, 6, 7]])
  logits, h_dec, _ = drafter.mixed_pass(params, cfg, dcfg, toks[:, 6:], anchors, cache)
  plain, _ = model.forward(target, cfg, toks)
  np.testing.assert_allclose(logits, plain[:, 6:], atol=1e-5)
  # The packed training layout gives the same slot states as the decode layout,
  # also with another sequence packed in front.
  batch = {"tokens": toks, "segment_ids": jnp.ones_like(toks),
           "positions": jnp.broadcast_to(jnp.arange(10), (2, 10)), "anchors": anchors}
  h_tr, _ = drafter.train_outputs({"target": target, "draft": draft}, cfg, dcfg, batch)
  np.testing.assert_allclose(h_tr, h_dec, atol=1e-5)
  packed = {"tokens": jnp.concatenate([toks[:, 3:6], toks], 1),
            "segment_ids": jnp.concatenate([jnp.ones((2, 3), int), jnp.full((2, 10), 2)], 1),
            "positions": jnp.concatenate([jnp.broadcast_to(jnp.arange(3), (2, 3)),
                                          batch["positions"]], 1),
            "anchors": anchors + 3}
  h_pk, _ = drafter.train_outputs({"target": target, "draft": draft}, cfg, dcfg, packed)
  np.testing.assert_allclose(h_pk, h_tr, atol=1e-5)


def test_hidden_state_calibration_starts_as_identity_and_learns(tiny):
  """calib_target='hidden': zero output layer = the raw logits; its delta gets a gradient."""
  cfg, _, target, _ = tiny
  dcfg = drafter.DrafterConfig(num_draft_layers=2, block_size=4, calib_rank=8, calib_target="hidden")
  draft = drafter.init_draft(cfg, dcfg, target, jax.random.key(2))
  assert set(draft["calib"]) == {"w1", "b1", "w2h", "b2h"}
  params = {"target": target, "draft": draft}
  h = jax.random.normal(jax.random.key(4), (2, 3, cfg.hidden_size))
  bonus = jnp.array([[1, 2, 3], [4, 5, 6]])
  np.testing.assert_allclose(drafter.slot_logits(params, cfg, h, bonus),
                             drafter.slot_logits(params, cfg, h), rtol=1e-6, atol=1e-6)
  grads = jax.grad(lambda d: training.loss_and_metrics(
      d, target, _batch(), cfg=cfg, dcfg=dcfg, lcfg=training.LossConfig())[0])(draft)
  assert float(jnp.abs(grads["calib"]["w2h"]).max()) > 0
  specs = sharding.param_shardings({"target": target, "draft": draft},
                                   sharding.make_mesh((1, 1, 1)))
  assert "w2h" in specs["draft"]["calib"]


def test_every_path_is_labelled_and_unknown_paths_fail(tiny):
  cfg, dcfg, target, draft = tiny
  labels = training.label_params({"target": target, "draft": draft})
  assert set(jax.tree.leaves(labels["target"])) == {"frozen"}
  assert set(jax.tree.leaves(labels["draft"])) == {"trainable"}
  with pytest.raises(ValueError, match="no entry"):
    training.label_params({"target": {**target, "mystery": {"kernel": jnp.zeros(3)}}, "draft": draft})
  with pytest.raises(ValueError, match="neither"):
    training.label_params({"other": target})


def test_target_is_bit_identical_and_frozen_leaves_have_no_state(tiny):
  cfg, dcfg, target, draft = tiny
  tx = training.make_optimizer(training.OptimConfig(learning_rate=1e-2, warmup_steps=1,
                                                    total_steps=10),
                               {"target": target, "draft": draft})
  state = training.init_state(tx, target, draft)
  n_draft = sum(x.size for x in jax.tree.leaves(draft))
  n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  assert n_opt <= 2 * n_draft + 8  # AdamW's two moments of the draft, plus counters
  big_target = {x.shape for x in jax.tree.leaves(target) if x.size > 100}
  big_draft = {x.shape for x in jax.tree.leaves(draft)}
  assert not any(np.shape(x) in big_target - big_draft for x in jax.tree.leaves(state.opt_state))
  before = jax.tree.map(np.array, target)
  draft0 = jax.tree.map(np.array, draft)
  fn, st_sh, tg_sh, b_sh = training.compile_train_step(
      jax.tree.map(jnp.copy, state), target, _batch(), sharding.make_mesh("auto"), tx=tx, cfg=cfg,
      dcfg=dcfg, lcfg=training.LossConfig(slot_decay=0.8))
  state = jax.tree.map(jnp.copy, state)
  losses = []
  for _ in range(4):
    state, metrics = fn(state, target, _batch())
    losses.append(float(metrics["loss"]))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(target)):
    assert np.array_equal(a, np.asarray(b))
  moved = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(draft0),
                                                                jax.tree.leaves(state.draft))]
  assert all(moved), "every draft leaf gets gradient"
  assert losses[-1] < losses[1]


def test_slot_targets_respect_segments_and_loss_mask():
  batch = _batch(b=1)
  batch["loss_mask"][0, 22:] = False
  labels, valid = training.slot_targets({k: jnp.asarray(v) for k, v in batch.items()}, 4)
  np.testing.assert_array_equal(labels[0, 0], batch["tokens"][0, 3:7])
  np.testing.assert_array_equal(valid[0, 2], [True, True, False, False])  # anchor 17: seg ends at 20
  np.testing.assert_array_equal(valid[0, 3], [False] * 4)  # anchor 21: 22.. not in loss mask
  assert not valid[0, 4].any()  # no anchor


def test_meshes_agree_on_8_simulated_devices():
  out = subprocess.run([sys.executable, str(ROOT / "tests" / "multidevice_train_step.py"),
                        "1,1,1", "8,1,1", "2,2,2", "1,1,8"], capture_output=True, text=True,
                       timeout=900, env={**fast_compile_env(), "PYTHONPATH": str(ROOT)})
  assert out.returncode == 0, out.stderr[-3000:]
  runs = json.loads(out.stdout.strip().splitlines()[-1])
  ref = runs["(1, 1, 1)"]
  for name in ("(8, 1, 1)", "(2, 2, 2)", "(1, 1, 8)"):
    np.testing.assert_allclose(runs[name]["losses"], ref["losses"], rtol=1e-5)
    for a, b in zip(runs[name]["draft"], ref["draft"]):
      np.testing.assert_allclose(a, b, atol=1e-4)
  # The (2,2,2) mesh really shards: some draft leaf is split over fsdp and tensor.
  assert any("fsdp" in s and "tensor" in s for s in runs["(2, 2, 2)"]["shardings"].values())
  # (1,1,8): the calibration head is split on vocab (128) 8 ways; the draft projectors'
  # 4 heads / 2 kv heads are not divisible by 8 and stay replicated on 'tensor'.
  specs = runs["(1, 1, 8)"]["shardings"]
  assert specs["['calib']['w2']"] == str(jax.sharding.PartitionSpec(None, "tensor"))
  assert "tensor" not in specs["['layers']['q_proj']['kernel']"]


@pytest.mark.parametrize("name", ["qwen3_8b", "llama3_8b"])
def test_8b_configs_fit_their_mesh_and_a_single_chip_does_not(name):
  config = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
  cfg = trainer.arch_config(config.model_arch.to_dict(), config.dtype)
  dcfg = trainer.drafter_config(config, cfg)
  est = train_memory.check_memory(config, cfg, dcfg, trainer.mesh_shape(config, 1))
  _, fsdp, tp = trainer.mesh_shape(config, 1)
  assert 14 < est["target_params"] * fsdp * tp < 17  # ~8B params in bf16
  assert est["total"] <= config.hbm_gib
  with pytest.raises(MemoryError, match="exceeds hbm_gib"):
    train_memory.check_memory(config, cfg, dcfg, (1, 1, 1))


# ----------------------------------------------------------------------------
# The job: tiny config end to end, exact resume, SIGTERM, bad input
# ----------------------------------------------------------------------------

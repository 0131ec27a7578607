"""The per-device memory estimate: train-step activations, the decode KV cache, the check."""
import os
import pathlib
import subprocess
import sys

import pytest

from flexdraft_jax import train_memory, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
GiB = 2 ** 30


def _config(name):
  config = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
  cfg = trainer.arch_config(config.model_arch.to_dict(), config.dtype)
  return config, cfg, trainer.drafter_config(config, cfg)


@pytest.mark.parametrize("name", ["qwen3_8b", "llama3_8b"])
def test_8b_terms_match_their_shapes_on_the_pod_mesh(name):
  config, cfg, dcfg = _config(name)
  mesh = trainer.mesh_shape(config, 1)
  assert mesh == (4, 8, 1)
  est = train_memory.check_memory(config, cfg, dcfg, mesh)
  L, kv, hd, bf16, f32 = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 2, 4
  rows = config.batch_size // 32       # the batch over data x fsdp = 32 devices: 1 row each
  m = config.anchors_per_seq * dcfg.block_size
  s = config.seq_len
  assert est["act_clean_kv"] * GiB == pytest.approx(2 * L * rows * s * kv * hd * bf16)
  assert est["act_clean_attention"] * GiB == pytest.approx(rows * cfg.num_heads * s * s * 2 * f32)
  assert est["act_slot_logits"] * GiB == pytest.approx(4 * rows * m * cfg.vocab_size * f32)
  # Decoding defaults to the data build: 16 rows split 4 ways (16 % 32 != 0: not over fsdp),
  # 1024 + 2048 context tokens.
  assert train_memory.decode_shape(config) == (16, 3072)
  assert est["decode_kv_cache"] * GiB == pytest.approx(2 * L * 4 * kv * 3072 * hd * bf16)
  assert est["train_total"] == pytest.approx(
      est["target_params"] + est["draft_params"] + est["grads_and_adam"] + est["act_clean_kv"]
      + max(est["act_clean_attention"], est["act_draft_layers"] + est["act_slot_logits"]))
  assert est["decode_total"] < est["train_total"] == est["total"] <= config.hbm_gib


def test_tensor_axis_splits_heads_vocab_and_the_cache_and_the_batch_axis_splits_rows():
  _, cfg, dcfg = _config("qwen3_8b")
  kw = dict(batch_size=8, seq_len=1024, anchors_per_seq=8, decode_batch_size=8, decode_context=1000)
  one = train_memory.memory_estimate(cfg, dcfg, mesh_shape=(2, 1, 1), **kw)
  tp2 = train_memory.memory_estimate(cfg, dcfg, mesh_shape=(2, 1, 2), **kw)
  dp4 = train_memory.memory_estimate(cfg, dcfg, mesh_shape=(4, 1, 1), **kw)
  for key in ("act_clean_kv", "act_clean_attention", "act_slot_logits", "decode_kv_cache"):
    assert tp2[key] == pytest.approx(one[key] / 2), key
    assert dp4[key] == pytest.approx(one[key] / 2), key
  assert tp2["act_draft_layers"] < one["act_draft_layers"]  # the 4d residual stream is not split
  assert one["decode_kv_cache"] * GiB == pytest.approx(  # 1000 tokens: a 1024-slot cache
      2 * cfg.num_layers * 4 * cfg.num_kv_heads * 1024 * cfg.head_dim * 2)
  none = train_memory.memory_estimate(cfg, dcfg, mesh_shape=(2, 1, 1), **{**kw, "decode_batch_size": 0})
  assert none["decode_kv_cache"] == 0 and none["decode_total"] < one["decode_total"]


def test_decode_beyond_hbm_names_the_decode_knobs():
  config, cfg, dcfg = _config("llama3_8b")
  config.decode_batch_size, config.decode_context = 512, 32768
  assert train_memory.decode_shape(config) == (512, 32768)
  with pytest.raises(MemoryError, match="decode_batch_size/decode_context") as err:
    train_memory.check_memory(config, cfg, dcfg, trainer.mesh_shape(config, 1))
  # 16 rows per device (512 over data x fsdp = 32) x 32k tokens x 32 layers x 8 kv heads, k and v
  assert "decode_kv_cache 64.00" in str(err.value)


def test_memory_mode_prints_every_term():
  out = subprocess.run([sys.executable, str(ROOT / "train.py"),
                        f"--config={ROOT}/configs/qwen3_8b.py", "--workdir=unused", "--mode=memory"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "mesh (4, 8, 1)" in out.stdout and "decoding 16 rows x 3072 tokens" in out.stdout
  printed = {line.split()[0] for line in out.stdout.splitlines()[1:]}
  assert printed == {"target_params", "draft_params", "grads_and_adam", "act_clean_kv",
                     "act_clean_attention", "act_draft_layers", "act_slot_logits", "train_total",
                     "decode_kv_cache", "decode_total", "total"}

"""Qwen3-8B target on a TPU pod slice (the paper's setting: K = 10 of 36 layers).

`model` must point at a local HF checkpoint folder. `model_arch` repeats the
architecture so the memory check (`jax.eval_shape`, no weights) can run anywhere.
"""
import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.base_config()
  c.model = "/path/to/Qwen3-8B"
  c.dtype = "bfloat16"
  c.model_arch = ml_collections.ConfigDict(dict(
      family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
      num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
      qk_norm=True, tie_embeddings=False, max_position=40960))
  c.drafter = ml_collections.ConfigDict(dict(num_draft_layers=10, block_size=16, calib_rank=256))
  c.data.num_prompts = 100_000
  c.data.max_prompt_len = 1024
  c.data.max_response_len = 2048
  c.seq_len = 4096
  c.batch_size = 32     # one packed row per chip
  c.anchors_per_seq = 64
  c.num_steps = 20_000
  c.save_every = 500
  c.mesh = "4,8,1"       # a 32-chip v5e slice: data 4 x fsdp 8
  c.hbm_gib = 16.0       # TPU v5e
  return c

"""Qwen3-8B target on a TPU pod slice (the paper's setting: K = 10 of 36 layers).

`model` must point at a local HF checkpoint folder. `model_arch` repeats the
architecture so the memory check (`jax.eval_shape`, no weights) can run anywhere.
"""
import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.pod_slice_config()
  c.model = "/path/to/Qwen3-8B"
  c.model_arch = ml_collections.ConfigDict(dict(
      family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
      num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
      qk_norm=True, tie_embeddings=False, max_position=40960))
  c.drafter.update(num_draft_layers=10, block_size=16, calib_rank=256)
  return c

"""Llama-3.1-8B(-Instruct) target on a TPU pod slice.

`model` must point at a local HF checkpoint folder. `model_arch` repeats the
architecture so the memory check (`jax.eval_shape`, no weights) can run anywhere.
"""
import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  c = common.pod_slice_config()
  c.model = "/path/to/Llama-3.1-8B-Instruct"
  c.model_arch = ml_collections.ConfigDict(dict(
      family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
      num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
      tie_embeddings=False, max_position=131072,
      rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position=8192)))
  c.drafter.update(num_draft_layers=8, block_size=16, calib_rank=256)
  return c

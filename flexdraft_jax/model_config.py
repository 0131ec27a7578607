"""Typed, frozen description of a decoder-only target model.

Every module receives a `ModelConfig`, never a whole ConfigDict. It is hashable,
so it can be a static argument of `jax.jit`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

FAMILIES = ("llama", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling ("rope_type": "llama3")."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str                    # one of FAMILIES
  vocab_size: int
  hidden_size: int               # d
  intermediate_size: int         # MLP width
  num_layers: int                # L
  num_heads: int                 # query heads N
  num_kv_heads: int              # key/value heads K (GQA when K < N)
  head_dim: int                  # H
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False   # logits use the embedding table when True
  qkv_bias: bool = False         # Qwen2
  qk_norm: bool = False          # Qwen3: RMSNorm over head_dim on q and k
  max_position: int = 8192       # largest position the model was trained for
  param_dtype: str = "float32"   # storage dtype of the weights
  dtype: str = "float32"         # compute dtype of activations and matmuls

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

  @property
  def jnp_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)


def default_dtype() -> str:
  """f32 on CPU, bf16 on accelerators (the dtype policy)."""
  import jax
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"

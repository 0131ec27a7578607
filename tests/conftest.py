"""Shared fixtures: SmolLM2 (ours and transformers'), its tokenizer, MT-Bench prompts.

The SmolLM2 loads are slow on CPU (ours ~12 s, transformers' GGUF path ~40 s),
so each is done once per session and shared by every module that needs it.

The session has a fresh $XDG_CACHE_HOME, so decode.py's own caches (compiled
programs, measured cost tables) start empty and never leak between runs or
into the user's.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import pytest

from flexdraft_jax import prompts, resources

NUM_MTBENCH = 5
_session_cache: list[pathlib.Path] = []  # made by pytest_configure (not by scripts importing this)


def pytest_configure(config):
  """A fresh $XDG_CACHE_HOME for this process and every subprocess."""
  del config
  root = pathlib.Path(tempfile.mkdtemp(prefix="flexdraft-tests-cache-"))
  _session_cache.append(root)
  # Only $XDG_CACHE_HOME: decode.py runs (the CLI runner) keep their compilation cache and
  # cost tables there. The pytest process itself does not write a persistent XLA cache:
  # one full run aborted inside jax's cache write (compilation_cache.put_executable_and_time,
  # test_prefill, 2026-12-02), and an abort loses the whole suite.
  os.environ.update(XDG_CACHE_HOME=str(root))


def pytest_unconfigure(config):
  del config
  while _session_cache:
    shutil.rmtree(_session_cache.pop(), ignore_errors=True)


def fast_compile_env() -> dict:
  """os.environ with LLVM -O0 added to XLA_FLAGS, for a subprocess that computes every
  number it compares itself (as test_multihost's): the same tokens, and 2.4x less time for
  tests/multidevice_decode.py on two meshes (243 s -> 100 s on the 2-core machine)."""
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  return {**os.environ, "XLA_FLAGS": flags.strip()}


@pytest.fixture(scope="session")
def smollm2():
  """Our SmolLM2-135M-Instruct from the bundled Q4_1 GGUF, in f32: (cfg, params)."""
  from flexdraft_jax import weights
  return weights.load_model(resources.SMOLLM2_NAME, dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm2():
  """transformers' own GGUF loader on the same file, f32 torch (test-only reference)."""
  import torch
  from transformers import AutoModelForCausalLM
  path = resources.smollm2_gguf_path()
  model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                               dtype=torch.float32, local_files_only=True)
  return model.eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
  from flexdraft_jax import tokenizer
  return tokenizer.load_tokenizer(resources.SMOLLM2_NAME)


@pytest.fixture(scope="session")
def mtbench_prompt_ids(smollm2_tokenizer):
  """Chat-templated ids of the first MT-Bench questions (different lengths)."""
  from flexdraft_jax import tokenizer
  ids = [tokenizer.chat_prompt_ids(smollm2_tokenizer, q) for q in prompts.mtbench(NUM_MTBENCH)]
  assert len({len(i) for i in ids}) > 1, "want ragged prompts"
  return ids


def random_params(cfg, seed: int = 0):
  """`init_params`' tree (via `eval_shape`) filled with numpy random values, logits O(1):
  norm scales and biases are random too (not ones and zeros)."""
  import jax
  import numpy as np

  from flexdraft_jax import model as model_lib
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  rng = np.random.RandomState(seed)

  def randomize(path, s):
    name = jax.tree_util.keystr(path)
    noise = rng.standard_normal(s.shape).astype(np.float32)
    if "scale" in name:
      return 1.0 + 0.3 * noise
    if "bias" in name:
      return 0.3 * noise
    if "embedding" in name:  # std 0.3: tied logits are O(1) too
      return 0.3 * noise
    if "lm_head" in name:  # [d, V]
      fan_in = s.shape[0]
    elif "o_proj" in name:  # [L, N, H, d]
      fan_in = s.shape[1] * s.shape[2]
    else:  # [L, d, (heads, H) | F] or down_proj [L, F, d]
      fan_in = s.shape[1]
    return noise / np.sqrt(fan_in).astype(np.float32)

  params = jax.tree.map(jax.numpy.asarray, jax.tree_util.tree_map_with_path(randomize, shapes))
  assert jax.tree.structure(params) == jax.tree.structure(shapes)
  return params


@pytest.fixture(scope="session")
def tiny_model():
  """`make(family, seed=0) -> (cfg, params)`: a tiny random GQA model (memoized).

  The params tree is `init_params`' (via `eval_shape`), filled with numpy random
  values: norm scales and biases are random too (not ones and zeros) and logits
  are O(1). The sizes equal test_model_reference's tiny HF checkpoints
  (llama untied, qwen2 untied with q/k/v bias, qwen3 tied with q/k norm), so
  both share jit compilations, which dominate the run time on a small CPU.
  """
  import jax
  import numpy as np

  from flexdraft_jax import model as model_lib
  from flexdraft_jax.model_config import ModelConfig

  made = {}

  def make(family: str = "llama", seed: int = 0):
    if (family, seed) in made:
      return made[family, seed]
    cfg = ModelConfig(family=family, vocab_size=101, hidden_size=64, intermediate_size=96,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      rms_norm_eps=1e-6, max_position=256, tie_embeddings=family == "qwen3",
                      qkv_bias=family == "qwen2", qk_norm=family == "qwen3")
    params = random_params(cfg, seed)
    made[family, seed] = cfg, params
    return cfg, params

  return make

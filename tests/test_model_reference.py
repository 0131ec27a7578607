"""Our model vs transformers (tiny random HF checkpoints and SmolLM2), and KV-cache semantics.

XLA compiles take ~2 s each on a small CPU, so every call goes through two
jitted wrappers with fixed signatures and the token shapes are few: (2, 12)
without a cache, (2, 4) and (2, 1) with one. The tiny models of conftest have
the same configs as the HF checkpoints here, so they share those compilations.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import weights
from flexdraft_jax.model_config import ModelConfig, RopeScaling

ATOL = 1e-4
VOCAB = 101
SEQ = 12  # tokens of the no-cache passes
CAPACITY = 16
TINY_HF = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1)
_DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
# name -> (HF class, config overrides, the ModelConfig fields we must read)
VARIANTS = {
    "llama": ("LlamaForCausalLM", dict(rope_parameters=_DEFAULT_ROPE, tie_word_embeddings=False),
              dict(family="llama")),
    "llama3rope-tied": ("LlamaForCausalLM",
                        dict(rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True),
                        dict(family="llama", tie_embeddings=True,
                             rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))),
    "qwen2": ("Qwen2ForCausalLM", dict(rope_parameters=_DEFAULT_ROPE, tie_word_embeddings=False),
              dict(family="qwen2", qkv_bias=True)),
    "qwen3-tied": ("Qwen3ForCausalLM",
                   dict(rope_parameters=_DEFAULT_ROPE, tie_word_embeddings=True),
                   dict(family="qwen3", tie_embeddings=True, qk_norm=True)),
}


@jax.jit(static_argnames=("cfg",))
def _full(params, tokens, positions, *, cfg):
  """No-cache forward: logits [B, T, V]."""
  return model_lib.forward(params, cfg, tokens, positions)[0]


@jax.jit(static_argnames=("cfg",))
def _cached(params, tokens, cache, advance, *, cfg):
  """Cached forward at each row's length: (logits, new cache)."""
  return model_lib.forward(params, cfg, tokens, cache=cache, advance=advance)


def full(params, cfg, tokens, positions=None):
  tokens = np.asarray(tokens, np.int32)
  if positions is None:
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  return np.asarray(_full(params, tokens, np.asarray(positions, np.int32), cfg=cfg))


def cached(params, cfg, tokens, cache, advance=None):
  tokens = np.asarray(tokens, np.int32)
  if advance is None:
    advance = np.full(tokens.shape[0], tokens.shape[1])
  logits, cache = _cached(params, tokens, cache, np.asarray(advance, np.int32), cfg=cfg)
  return np.asarray(logits), cache


@pytest.fixture(autouse=True, scope="module")
def _exact_matmuls():
  """f32 matmuls at full precision (accelerators would otherwise use TF32/bf16 passes)."""
  with jax.default_matmul_precision("highest"):
    yield


def build_hf_model(variant: str, seed: int = 0):
  """A tiny random HF model in f32, with random (not 1/0) norm weights and biases."""
  arch, overrides, fields = VARIANTS[variant]
  torch.manual_seed(seed)
  config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
  config = config_cls(**TINY_HF, **overrides, attn_implementation="eager")
  model = getattr(transformers, arch)(config).to(torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.3 * torch.randn_like(p))
  tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  assert tied == fields.get("tie_embeddings", False)
  return model


def random_tokens(shape, seed=0, vocab=VOCAB):
  return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def hf_logits(model, tokens, **kw):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), **kw).logits.numpy()


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_checkpoint(request, tmp_path_factory):
  """(variant, HF model, (cfg, params) we load from its saved safetensors)."""
  variant = request.param
  model = build_hf_model(variant)
  folder = tmp_path_factory.mktemp(variant)
  model.save_pretrained(folder, safe_serialization=True)
  assert (folder / "model.safetensors").is_file()
  return variant, model, weights.load_hf(folder, dtype="float32", param_dtype="float32")


# ----------------------------------------------------------------------------
# (a) tiny random HF checkpoints
# ----------------------------------------------------------------------------
def test_hf_config_is_read(hf_checkpoint):
  variant, model, (cfg, params) = hf_checkpoint
  fields = VARIANTS[variant][2]
  assert cfg == ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                            rms_norm_eps=1e-6, max_position=256, **fields)
  assert ("lm_head" in params) == (not cfg.tie_embeddings)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  if cfg.qkv_bias:  # the randomized biases arrived, in [L, heads, H] layout
    want = model.model.layers[1].self_attn.k_proj.bias.detach().numpy().reshape(2, 16)
    np.testing.assert_array_equal(params["layers"]["attn"]["k_proj"]["bias"][1], want)


def test_hf_prefill_logits(hf_checkpoint):
  variant, model, (cfg, params) = hf_checkpoint
  tokens = random_tokens((2, SEQ), seed=1)
  ref = hf_logits(model, tokens)
  ours = full(params, cfg, tokens)
  assert ours.dtype == np.float32 and ours.shape == (2, SEQ, VOCAB)
  assert ref.std() > 0.3, "logits too small for the tolerance to mean anything"
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_hf_explicit_positions(hf_checkpoint):
  """Positions far from 0 (past Llama-3's original_max_position for the scaled variant)."""
  _, model, (cfg, params) = hf_checkpoint
  tokens = random_tokens((2, SEQ), seed=2)
  positions = np.stack([np.arange(SEQ) + 70, np.arange(SEQ) + 5]).astype(np.int32)
  ref = hf_logits(model, tokens, position_ids=torch.as_tensor(positions, dtype=torch.long))
  np.testing.assert_allclose(full(params, cfg, tokens, positions), ref, atol=ATOL, rtol=0)


def test_llama3_rope_scaling_matters():
  """The scaled variant's logits differ from unscaled RoPE: the reference tests have teeth."""
  scaled, plain = build_hf_model("llama3rope-tied"), build_hf_model("llama")
  plain.load_state_dict(scaled.state_dict(), strict=False)
  plain.lm_head.weight.data.copy_(scaled.model.embed_tokens.weight.data)
  tokens = random_tokens((2, SEQ), seed=1)
  assert np.abs(hf_logits(scaled, tokens) - hf_logits(plain, tokens)).max() > 100 * ATOL


def test_hf_cached_incremental_decode(hf_checkpoint):
  """Prefill 4 tokens, three 1-token steps, a 4-token step, a last 1-token step."""
  _, model, (cfg, params) = hf_checkpoint
  tokens = random_tokens((2, SEQ), seed=3)
  hf_cache = transformers.DynamicCache(config=model.config)
  cache = model_lib.KVCache.zeros(cfg, 2, CAPACITY)
  for lo, hi in [(0, 4), (4, 5), (5, 6), (6, 7), (7, 11), (11, 12)]:
    ref = hf_logits(model, tokens[:, lo:hi], past_key_values=hf_cache, use_cache=True)
    ours, cache = cached(params, cfg, tokens[:, lo:hi], cache)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0, err_msg=f"tokens [{lo}, {hi})")
    np.testing.assert_array_equal(cache.lengths, [hi, hi])
  np.testing.assert_allclose(ours[:, -1], hf_logits(model, tokens)[:, -1], atol=ATOL, rtol=0)


def test_hf_sharded_checkpoint(tmp_path):
  model = build_hf_model("qwen2", seed=4)
  model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not (tmp_path / "model.safetensors").exists()
  cfg, params = weights.load_hf(tmp_path, dtype="float32", param_dtype="float32")
  assert cfg.family == "qwen2" and "lm_head" in params
  tokens = random_tokens((2, SEQ), seed=5)
  np.testing.assert_allclose(full(params, cfg, tokens), hf_logits(model, tokens), atol=ATOL,
                             rtol=0)


def test_load_model_dispatches_to_hf_folder(tmp_path):
  model = build_hf_model("llama", seed=6)
  model.save_pretrained(tmp_path, safe_serialization=True)
  cfg, params = weights.load_model(str(tmp_path), dtype="float32")
  cfg2, params2 = weights.load_hf(tmp_path, dtype="float32", param_dtype="float32")
  assert cfg == cfg2 and cfg.family == "llama"
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  np.testing.assert_array_equal(
      params["lm_head"]["kernel"], model.lm_head.weight.detach().numpy().T)


# ----------------------------------------------------------------------------
# (b) SmolLM2 from the bundled GGUF vs transformers' GGUF loader
# ----------------------------------------------------------------------------
def test_smollm2_logits_match_transformers(smollm2, hf_smollm2, mtbench_prompt_ids):
  cfg, params = smollm2
  assert (cfg.family, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("llama", 30, 9, 3)
  assert cfg.tie_embeddings and cfg.dtype == "float32"
  prompt_BP, _ = generate_lib.pad_prompts(mtbench_prompt_ids, bucket=32)
  ours = full(params, cfg, prompt_BP)  # right padding is harmless under the causal mask
  worst = 0.0
  for i, ids in enumerate(mtbench_prompt_ids):
    ref = hf_logits(hf_smollm2, [ids])[0]
    mine = ours[i, :len(ids)]
    worst = max(worst, float(np.abs(mine - ref).max()))
    np.testing.assert_array_equal(mine.argmax(-1), ref.argmax(-1), err_msg=f"prompt {i}")
  assert worst < 1e-3, f"max |logit difference| {worst:.2e}"


# ----------------------------------------------------------------------------
# (c) cached decode == full forward; rollback
# ----------------------------------------------------------------------------
FAMILIES = ("llama", "qwen2", "qwen3")


@pytest.mark.parametrize("family", FAMILIES)
def test_ragged_incremental_decode_equals_full_forward(tiny_model, family):
  """Ragged prefill (advance < T for one row), 1-token steps, a 4-token step."""
  cfg, params = tiny_model(family)
  tokens = random_tokens((2, SEQ), seed=10)
  ref = full(params, cfg, tokens)
  assert ref.std() > 0.3
  lens = np.array([4, 2])
  cache = model_lib.KVCache.zeros(cfg, 2, CAPACITY)
  assert cache.capacity >= CAPACITY  # KVCache.zeros may round it up
  assert cache.k.shape == cache.v.shape == (2, 2, 2, cache.capacity, 16)  # [L, B, K, C, H]
  np.testing.assert_array_equal(cache.lengths, [0, 0])
  # Row 1's tokens 2, 3 are written but not counted: stale entries that must be masked.
  logits, cache = cached(params, cfg, tokens[:, :4], cache, advance=lens)
  np.testing.assert_array_equal(cache.lengths, lens)
  for b in range(2):
    np.testing.assert_allclose(logits[b, :lens[b]], ref[b, :lens[b]], atol=ATOL, rtol=0)
  rows = np.arange(2)
  for _ in range(3):
    logits, cache = cached(params, cfg, tokens[rows, lens][:, None], cache)
    np.testing.assert_allclose(logits[:, 0], ref[rows, lens], atol=ATOL, rtol=0)
    lens = lens + 1
    np.testing.assert_array_equal(cache.lengths, lens)
  chunk = np.stack([tokens[b, lens[b]:lens[b] + 4] for b in range(2)])
  logits, cache = cached(params, cfg, chunk, cache)
  for b in range(2):
    np.testing.assert_allclose(logits[b], ref[b, lens[b]:lens[b] + 4], atol=ATOL, rtol=0)
  lens = lens + 4
  np.testing.assert_array_equal(cache.lengths, lens)  # [11, 9]
  # The valid entries equal those of a chunked prefill of the same tokens.
  other = model_lib.KVCache.zeros(cfg, 2, CAPACITY)
  for lo in range(0, 12, 4):
    _, other = cached(params, cfg, tokens[:, lo:lo + 4], other)
  for b in range(2):
    for got, want in ((cache.k, other.k), (cache.v, other.v)):
      np.testing.assert_allclose(np.asarray(got)[:, b, :, :lens[b]],
                                 np.asarray(want)[:, b, :, :lens[b]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_rollback_masks_stale_entries(tiny_model, family):
  """Write extra tokens, move lengths back (by a different amount per row), write others."""
  cfg, params = tiny_model(family)
  prefix, extra, new = (random_tokens((2, 4), seed=s) for s in (20, 21, 22))
  last = random_tokens((2, 1), seed=23)
  assert (extra != new).any(axis=1).all()
  cache = model_lib.KVCache.zeros(cfg, 2, CAPACITY)
  _, cache = cached(params, cfg, prefix, cache)
  _, cache = cached(params, cfg, extra, cache)
  np.testing.assert_array_equal(cache.lengths, [8, 8])
  no_rollback, _ = cached(params, cfg, new, cache)
  keep = np.array([0, 2])  # row 0 drops all 4 extra tokens, row 1 keeps 2 of them
  cache = cache.replace(lengths=jnp.asarray(4 + keep, jnp.int32))
  logits, cache = cached(params, cfg, new, cache)
  np.testing.assert_array_equal(cache.lengths, 4 + keep + 4)
  step_logits, cache = cached(params, cfg, last, cache)
  np.testing.assert_array_equal(cache.lengths, 4 + keep + 5)
  seqs = [np.concatenate([prefix[b], extra[b, :keep[b]], new[b], last[b]]) for b in range(2)]
  padded = np.zeros((2, SEQ), np.int32)
  for b, s in enumerate(seqs):
    padded[b, :len(s)] = s
  fresh = full(params, cfg, padded)
  for b, s in enumerate(seqs):
    n = len(s)
    np.testing.assert_allclose(logits[b], fresh[b, n - 5:n - 1], atol=ATOL, rtol=0)
    np.testing.assert_allclose(step_logits[b, 0], fresh[b, n - 1], atol=ATOL, rtol=0)
  # Without the rollback the logits differ, so the check above has teeth.
  assert np.abs(no_rollback - logits).max() > 100 * ATOL

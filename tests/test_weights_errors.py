"""Checkpoints that cannot be loaded fail with a WeightsError that names the problem.

Tiny checkpoints are written here: HF safetensors folders with transformers,
and GGUF files with `gguf.GGUFWriter` (llama.cpp's tensor names and Q/K row
permutation), so each error case is a real file with one thing wrong.
"""
from __future__ import annotations

import dataclasses
import json

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from flexdraft_jax import resources, weights
from flexdraft_jax.model_config import RopeScaling
from flexdraft_jax.weights import WeightsError

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, VOCAB, LAYERS = 4, 2, 16, 64, 96, 101, 2


def _tiny_llama(seed=0, **overrides):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
      max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
      **overrides)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def hf_model():
  return _tiny_llama()


@pytest.fixture
def ckpt(hf_model, tmp_path):
  """A fresh, loadable tiny Llama safetensors folder (untied)."""
  folder = tmp_path / "ckpt"
  hf_model.save_pretrained(folder, safe_serialization=True)
  return folder


def _edit_config(folder, **changes):
  """Sets keys of config.json; a value of None deletes the key."""
  path = folder / "config.json"
  config = json.loads(path.read_text())
  config.update(changes)
  config = {k: v for k, v in config.items() if v is not None}
  path.write_text(json.dumps(config))


def _edit_tensors(folder, edit):
  path = folder / "model.safetensors"
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def _load(path):
  return weights.load_hf(path, dtype="float32", param_dtype="float32")


def test_control_checkpoint_loads(ckpt):
  cfg, params = _load(ckpt)
  assert cfg.family == "llama" and not cfg.tie_embeddings and "lm_head" in params
  assert issubclass(WeightsError, ValueError)


def test_bf16_checkpoint_loads(tmp_path):
  """Floating dtypes other than f32 are fine (the converse of the non-float error)."""
  model = _tiny_llama(seed=1).to(torch.bfloat16)
  model.save_pretrained(tmp_path, safe_serialization=True)
  _, params = _load(tmp_path)
  want = model.lm_head.weight.detach().float().numpy().T
  np.testing.assert_array_equal(params["lm_head"]["kernel"], want)


# ----------------------------------------------------------------------------
# HF safetensors folders
# ----------------------------------------------------------------------------
def test_missing_config_json(ckpt):
  (ckpt / "config.json").unlink()
  with pytest.raises(WeightsError, match="config.json is missing"):
    _load(ckpt)


def test_missing_folder(tmp_path):
  with pytest.raises(WeightsError, match="config.json is missing"):
    _load(tmp_path / "nowhere")


def test_no_safetensors_files(ckpt):
  (ckpt / "model.safetensors").unlink()
  with pytest.raises(WeightsError, match=r"no \*\.safetensors files"):
    _load(ckpt)


def test_index_names_missing_shard(hf_model, tmp_path):
  hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
  shard = weight_map["model.layers.1.mlp.down_proj.weight"]
  (tmp_path / shard).unlink()
  with pytest.raises(WeightsError, match=rf"names shard {shard}, which is missing"):
    _load(tmp_path)


def test_missing_tensor(ckpt):
  _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(WeightsError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is "
                                         "missing"):
    _load(ckpt)


def test_missing_lm_head_of_untied_model(ckpt):
  assert json.loads((ckpt / "config.json").read_text())["tie_word_embeddings"] is False
  _edit_tensors(ckpt, lambda t: t.pop("lm_head.weight"))
  with pytest.raises(WeightsError, match=r"lm_head\.weight"):
    _load(ckpt)


def test_unsupported_architecture(ckpt):
  _edit_config(ckpt, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(WeightsError, match="unsupported architecture 'GPT2LMHeadModel'"):
    _load(ckpt)


@pytest.mark.parametrize("changes, kind", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                           "original_max_position_embeddings": 64}), "yarn"),
    # transformers 4 style: rope_theta at the top, the scaling in rope_scaling
    (dict(rope_parameters=None, rope_theta=10000.0,
          rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
], ids=["yarn", "linear-v4"])
def test_unsupported_rope_type(ckpt, changes, kind):
  _edit_config(ckpt, **changes)
  with pytest.raises(WeightsError, match=f"unsupported rope scaling type '{kind}'"):
    _load(ckpt)


def test_transformers4_style_rope_config_is_read(ckpt):
  """The positive counterpart: a v4 config.json with Llama-3 scaling."""
  _edit_config(ckpt, rope_parameters=None, rope_theta=500000.0, rope_scaling={
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64})
  cfg, _ = _load(ckpt)
  assert cfg.rope_theta == 500000.0
  assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)


@pytest.mark.parametrize("flag", ["mlp_bias", "attention_bias"])
def test_unsupported_config_option(ckpt, flag):
  _edit_config(ckpt, **{flag: True})
  with pytest.raises(WeightsError, match=f"unsupported config option {flag}=true"):
    _load(ckpt)


@pytest.mark.parametrize("arch, changes", [
    ("Qwen3ForCausalLM", dict(attention_bias=True)),
    ("LlamaForCausalLM", dict(hidden_act="gelu_pytorch_tanh")),
], ids=["qwen3-attention_bias", "hidden_act"])
def test_config_options_we_cannot_honour(arch, changes):
  hf = dict(architectures=[arch], vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, hidden_act="silu")
  hf.update(changes)
  with pytest.raises(WeightsError, match=next(iter(changes))):
    weights.config_from_hf(hf, tie_embeddings=False, dtype="float32", param_dtype="float32")


def test_shape_mismatch(ckpt):
  name = "model.layers.0.self_attn.k_proj.weight"  # [KV_HEADS * HEAD_DIM, HIDDEN]
  _edit_tensors(ckpt, lambda t: t.update({name: t[name][:HEAD_DIM]}))
  with pytest.raises(WeightsError, match=rf"tensor {name} has shape \(16, 64\); the config "
                                         r"implies \(32, 64\)"):
    _load(ckpt)


def test_non_float_tensor(ckpt):
  name = "model.layers.0.input_layernorm.weight"
  _edit_tensors(ckpt, lambda t: t.update({name: np.arange(HIDDEN, dtype=np.int32)}))
  with pytest.raises(WeightsError, match=rf"tensor {name} has dtype int32"):
    _load(ckpt)


# ----------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------
_GGUF_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name):
  special = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
  if hf_name in special:
    return special[hf_name]
  _, _, i, rest = hf_name.split(".", 3)
  part, kind = rest.rsplit(".", 1)
  return f"blk.{i}.{_GGUF_PARTS[part]}.{kind}"


def _llama_cpp_permute(w, heads):
  """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of ours)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def write_gguf(path, hf_model, *, arch="llama", quant=None, extra_tensors=(), tokens=True,
               rope_scaling=None):
  """A GGUF of `hf_model` as llama.cpp writes it; `quant` = (hf tensor name, quant type)."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(LAYERS)
  w.add_context_length(256)
  w.add_embedding_length(HIDDEN)
  w.add_feed_forward_length(FFN)
  w.add_head_count(HEADS)
  w.add_head_count_kv(KV_HEADS)
  w.add_rope_dimension_count(HEAD_DIM)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-6)
  w.add_vocab_size(VOCAB)
  if tokens:
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
  if rope_scaling:
    w.add_rope_scaling_type(rope_scaling)
    w.add_rope_scaling_factor(2.0)
  for name, t in hf_model.state_dict().items():
    a = t.detach().float().numpy()
    if name.endswith("q_proj.weight"):
      a = _llama_cpp_permute(a, HEADS)
    elif name.endswith("k_proj.weight"):
      a = _llama_cpp_permute(a, KV_HEADS)
    if quant is not None and name == quant[0] and quant[1] == gguf.GGMLQuantizationType.I32:
      w.add_tensor(_gguf_name(name), np.arange(a.size, dtype=np.int32).reshape(a.shape))
    elif quant is not None and name == quant[0]:
      qtype = quant[1]
      block, type_size = gguf.GGML_QUANT_SIZES[qtype]
      raw = np.zeros((a.shape[0], a.shape[1] // block * type_size), np.uint8)  # any bytes
      w.add_tensor(_gguf_name(name), raw, raw_dtype=qtype)
    else:
      w.add_tensor(_gguf_name(name), np.ascontiguousarray(a, np.float32))
  for name, a in extra_tensors:
    w.add_tensor(name, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_crafted_gguf_loads_like_the_safetensors(hf_model, ckpt, tmp_path):
  """Control for the GGUF error cases: the same writer with nothing wrong loads exactly."""
  cfg_g, params_g = weights.load_gguf(write_gguf(tmp_path / "ok.gguf", hf_model), "float32",
                                      "float32")
  cfg_h, params_h = _load(ckpt)
  assert cfg_g.rms_norm_eps == pytest.approx(cfg_h.rms_norm_eps, rel=1e-6)  # GGUF stores f32
  assert dataclasses.replace(cfg_g, rms_norm_eps=cfg_h.rms_norm_eps) == cfg_h
  jax.tree.map(np.testing.assert_array_equal, params_g, params_h)
  cfg_m, _ = weights.load_model(str(tmp_path / "ok.gguf"), dtype="float32")
  assert cfg_m == cfg_g


def test_gguf_file_missing(tmp_path):
  with pytest.raises(WeightsError, match="GGUF file .*missing.gguf does not exist"):
    weights.load_gguf(tmp_path / "missing.gguf", "float32", "float32")
  with pytest.raises(WeightsError, match="does not exist"):  # load_model dispatches on .gguf
    weights.load_model(str(tmp_path / "missing.gguf"), dtype="float32")


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q8_1,
                                   gguf.GGMLQuantizationType.Q8_K], ids=lambda q: q.name)
def test_gguf_unreadable_quant_type(hf_model, tmp_path, qtype):
  path = write_gguf(tmp_path / "q.gguf", hf_model,
                    quant=("model.layers.1.mlp.gate_proj.weight", qtype))
  assert gguf.GGUFReader(path).get_tensor(0) is not None  # the file itself is readable
  with pytest.raises(WeightsError, match=rf"GGUF tensor blk\.1\.ffn_gate\.weight uses quant "
                                         rf"type {qtype.name}, which we cannot read"):
    weights.load_gguf(path, "float32", "float32")


def test_gguf_non_float_tensor(hf_model, tmp_path):
  """An I32 tensor: gguf cannot 'dequantize' it either, and we say which one."""
  path = write_gguf(tmp_path / "i.gguf", hf_model,
                    quant=("model.norm.weight", gguf.GGMLQuantizationType.I32))
  with pytest.raises(WeightsError, match=r"output_norm\.weight uses quant type I32"):
    weights.load_gguf(path, "float32", "float32")


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_gguf_unsupported_architecture(hf_model, tmp_path, arch):
  path = write_gguf(tmp_path / "a.gguf", hf_model, arch=arch)
  with pytest.raises(WeightsError, match=f"unsupported GGUF architecture '{arch}'"):
    weights.load_gguf(path, "float32", "float32")


def test_gguf_rope_scaling(hf_model, tmp_path):
  path = write_gguf(tmp_path / "r.gguf", hf_model, rope_scaling=gguf.RopeScalingType.LINEAR)
  with pytest.raises(WeightsError, match="GGUF rope scaling is not supported"):
    weights.load_gguf(path, "float32", "float32")


def test_gguf_rope_freqs_tensor(hf_model, tmp_path):
  path = write_gguf(tmp_path / "f.gguf", hf_model,
                    extra_tensors=[("rope_freqs.weight", np.ones(HEAD_DIM // 2, np.float32))])
  with pytest.raises(WeightsError, match="rope_freqs"):
    weights.load_gguf(path, "float32", "float32")


def test_gguf_without_tokenizer_tokens(hf_model, tmp_path):
  """llama.vocab_size suffices (the tokenizer's token list is only a fallback)."""
  path = write_gguf(tmp_path / "t.gguf", hf_model, tokens=False)
  cfg, _ = weights.load_gguf(path, "float32", "float32")
  assert cfg.vocab_size == VOCAB


# ----------------------------------------------------------------------------
# load_model
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nonexistent", "smollm2-135m", "no/such/folder"])
def test_load_model_unknown_name(name):
  with pytest.raises(WeightsError, match=f"--model='{name}' is neither "
                                         f"'{resources.SMOLLM2_NAME}'"):
    weights.load_model(name, dtype="float32")


def test_load_model_folder_without_config(tmp_path):
  with pytest.raises(WeightsError, match="config.json is missing"):
    weights.load_model(str(tmp_path), dtype="float32")

"""weights.load_hf_sharded: every shard read from safetensors slices equals the dense load."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from flexdraft_jax import weights

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _hf_folder(path, arch, tied, d=32, n=8, k=8, h=4, f=64, v=48, layers=2):
  """A random HF checkpoint folder (safetensors + config.json) with HF's tensor names."""
  rng = np.random.default_rng(0)
  t = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  tensors = {"model.embed_tokens.weight": t(v, d), "model.norm.weight": t(d)}
  if not tied:
    tensors["lm_head.weight"] = t(v, d)
  for i in range(layers):
    p = f"model.layers.{i}."
    tensors.update({p + "input_layernorm.weight": t(d), p + "post_attention_layernorm.weight": t(d),
                    p + "self_attn.q_proj.weight": t(n * h, d), p + "self_attn.k_proj.weight": t(k * h, d),
                    p + "self_attn.v_proj.weight": t(k * h, d), p + "self_attn.o_proj.weight": t(d, n * h),
                    p + "mlp.gate_proj.weight": t(f, d), p + "mlp.up_proj.weight": t(f, d),
                    p + "mlp.down_proj.weight": t(d, f)})
    if arch == "Qwen2ForCausalLM":
      tensors.update({p + f"self_attn.{x}_proj.bias": t((n if x == "q" else k) * h) for x in "qkv"})
    if arch == "Qwen3ForCausalLM":
      tensors.update({p + "self_attn.q_norm.weight": t(h), p + "self_attn.k_norm.weight": t(h)})
  path.mkdir()
  half = sorted(tensors)[: len(tensors) // 2]  # two shard files, with an index
  save_file({k: tensors[k] for k in half}, str(path / "a.safetensors"))
  save_file({k: tensors[k] for k in tensors if k not in half}, str(path / "b.safetensors"))
  (path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: "a.safetensors" if k in half else "b.safetensors" for k in tensors}}))
  (path / "config.json").write_text(json.dumps(dict(
      architectures=[arch], vocab_size=v, hidden_size=d, intermediate_size=f,
      num_hidden_layers=layers, num_attention_heads=n, num_key_value_heads=k, head_dim=h,
      tie_word_embeddings=tied, rms_norm_eps=1e-6)))
  return path


def test_sharded_load_equals_dense_load_on_8_devices(tmp_path):
  folders = [_hf_folder(tmp_path / "llama", "LlamaForCausalLM", tied=False),
             _hf_folder(tmp_path / "qwen2", "Qwen2ForCausalLM", tied=True),
             _hf_folder(tmp_path / "qwen3", "Qwen3ForCausalLM", tied=False)]
  r = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_load.py"), *map(str, folders)],
                     capture_output=True, text=True, timeout=600,
                     env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(r.stdout.strip().splitlines()[-1])
  assert len(res) == 6
  for name, row in res.items():
    assert row["split"] >= 5, (name, row)  # heads, kv heads, MLP, vocab really split


def test_missing_tensor_is_named(tmp_path):
  folder = _hf_folder(tmp_path / "m", "LlamaForCausalLM", tied=False)
  index = json.loads((folder / "model.safetensors.index.json").read_text())
  del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
  (folder / "model.safetensors.index.json").write_text(json.dumps(index))
  import jax
  from jax.sharding import SingleDeviceSharding
  one = lambda p: jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), p)
  with pytest.raises(weights.WeightsError, match="model.layers.1.mlp.up_proj.weight is missing"):
    weights.load_hf_sharded(folder, one, "float32", "float32")


def test_trainer_loads_an_hf_target_into_its_shardings(tmp_path):
  """train.py's path: with a mesh, an HF folder target comes back already placed."""
  import jax
  from configs import tiny
  from flexdraft_jax import multihost, sharding, trainer
  folder = _hf_folder(tmp_path / "q", "Qwen3ForCausalLM", tied=True)
  c = tiny.get_config()
  c.model, c.dtype = str(folder), "float32"
  mesh = sharding.make_mesh((1, 1, 1))
  cfg, params = trainer.load_target(c, mesh)
  _, dense = weights.load_hf(folder, "float32", "float32")
  want = sharding.param_shardings(params, mesh)
  for (path, leaf), sh, ref in zip(jax.tree_util.tree_leaves_with_path(params),
                                   jax.tree.leaves(want), jax.tree.leaves(dense)):
    assert leaf.sharding == sh, path
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))
  assert cfg.qk_norm and multihost.put_global(params, want) is not None

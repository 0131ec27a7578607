"""Loads target weights into our params tree, with no torch at run time.

Two sources share one converter that reads tensors by their HF names:
  * HF checkpoint folders: `config.json` + `*.safetensors` (sharded or not);
  * GGUF files (llama architecture): dequantized with `gguf`, llama.cpp's Q/K
    RoPE row permutation undone, tensor names mapped to HF names.
"""
from __future__ import annotations

import json
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax import gguf_file
from flexdraft_jax import resources
from flexdraft_jax.model_config import ModelConfig, RopeScaling, default_dtype

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}
GGUF_ARCHITECTURES = ("llama",)


class WeightsError(ValueError):
  """The checkpoint cannot be loaded as given; the message says why."""


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------
def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
  rope = dict(hf.get("rope_parameters") or {})        # transformers >= 5
  rope.update(hf.get("rope_scaling") or {})           # transformers 4
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind == "llama3":
    return theta, RopeScaling(
        factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position=int(rope["original_max_position_embeddings"]))
  raise WeightsError(f"unsupported rope scaling type {kind!r} (supported: default, llama3)")


def config_from_hf(hf: dict, tie_embeddings: bool, dtype: str, param_dtype: str) -> ModelConfig:
  archs = hf.get("architectures") or [hf.get("model_type", "?")]
  family = ARCHITECTURES.get(archs[0])
  if family is None:
    raise WeightsError(f"unsupported architecture {archs[0]!r}; supported: "
                       f"{', '.join(ARCHITECTURES)}")
  for flag in ("mlp_bias", "use_sliding_window"):
    if hf.get(flag):
      raise WeightsError(f"unsupported config option {flag}=true for {archs[0]}")
  if family != "qwen2" and hf.get("attention_bias"):
    raise WeightsError(f"unsupported config option attention_bias=true for {archs[0]}")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise WeightsError(f"unsupported activation hidden_act={act!r} (supported: silu)")
  theta, scaling = _rope_from_hf(hf)
  heads = hf["num_attention_heads"]
  return ModelConfig(
      family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rope_theta=theta,
      rope_scaling=scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_embeddings=tie_embeddings, qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
      max_position=hf.get("max_position_embeddings", 8192), dtype=dtype,
      param_dtype=param_dtype)


# ----------------------------------------------------------------------------
# Converter: HF tensor names -> params tree
# ----------------------------------------------------------------------------
Getter = Callable[[str], np.ndarray]


def convert(cfg: ModelConfig, get: Getter) -> dict:
  """Builds the params tree from a getter of HF-named [out, in] tensors."""
  d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  f, v = cfg.intermediate_size, cfg.vocab_size
  dt = cfg.jnp_param_dtype

  def tensor(name, shape):
    a = get(name)
    if not np.issubdtype(a.dtype, np.floating) and a.dtype != jnp.bfloat16:
      raise WeightsError(f"tensor {name} has dtype {a.dtype}; expected a floating type")
    if tuple(a.shape) != tuple(shape):
      raise WeightsError(f"tensor {name} has shape {tuple(a.shape)}; the config implies "
                         f"{tuple(shape)}")
    return np.asarray(a, np.float32)

  def layer(i):
    p = f"model.layers.{i}."
    attn = {
        "q_proj": {"kernel": tensor(p + "self_attn.q_proj.weight", (n * h, d)).T.reshape(d, n, h)},
        "k_proj": {"kernel": tensor(p + "self_attn.k_proj.weight", (k * h, d)).T.reshape(d, k, h)},
        "v_proj": {"kernel": tensor(p + "self_attn.v_proj.weight", (k * h, d)).T.reshape(d, k, h)},
        "o_proj": {"kernel": tensor(p + "self_attn.o_proj.weight", (d, n * h)).T.reshape(n, h, d)},
    }
    if cfg.qkv_bias:
      for name, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
        attn[name]["bias"] = tensor(p + f"self_attn.{name}.bias", (heads * h,)).reshape(heads, h)
    if cfg.qk_norm:
      attn["q_norm"] = {"scale": tensor(p + "self_attn.q_norm.weight", (h,))}
      attn["k_norm"] = {"scale": tensor(p + "self_attn.k_norm.weight", (h,))}
    return {
        "input_norm": {"scale": tensor(p + "input_layernorm.weight", (d,))},
        "attn": attn,
        "post_norm": {"scale": tensor(p + "post_attention_layernorm.weight", (d,))},
        "mlp": {"gate_proj": {"kernel": tensor(p + "mlp.gate_proj.weight", (f, d)).T},
                "up_proj": {"kernel": tensor(p + "mlp.up_proj.weight", (f, d)).T},
                "down_proj": {"kernel": tensor(p + "mlp.down_proj.weight", (d, f)).T}},
    }

  layers = [layer(i) for i in range(cfg.num_layers)]
  stacked = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs), dt), *layers)
  params = {"embed": {"embedding": jnp.asarray(tensor("model.embed_tokens.weight", (v, d)), dt)},
            "layers": stacked,
            "final_norm": {"scale": jnp.asarray(tensor("model.norm.weight", (d,)), dt)}}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": jnp.asarray(tensor("lm_head.weight", (v, d)).T, dt)}
  return params


# ----------------------------------------------------------------------------
# HF safetensors folders
# ----------------------------------------------------------------------------
def _safetensors_index(folder: pathlib.Path) -> dict[str, pathlib.Path]:
  index = folder / "model.safetensors.index.json"
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = {name: folder / file for name, file in weight_map.items()}
    for path in set(files.values()):
      if not path.is_file():
        raise WeightsError(f"{index} names shard {path.name}, which is missing")
    return files
  shards = sorted(folder.glob("*.safetensors"))
  if not shards:
    raise WeightsError(f"no *.safetensors files in {folder}")
  from safetensors import safe_open
  files = {}
  for path in shards:
    with safe_open(path, framework="numpy") as f:
      files.update({name: path for name in f.keys()})
  return files


def _open_hf(folder: pathlib.Path, dtype: str, param_dtype: str):
  """(cfg, handle): the folder's config, and name -> open safetensors file holding it."""
  from safetensors import safe_open
  cfg_path = folder / "config.json"
  if not cfg_path.is_file():
    raise WeightsError(f"{folder} is not an HF checkpoint folder: config.json is missing")
  hf = json.loads(cfg_path.read_text())
  files = _safetensors_index(folder)
  tied = "lm_head.weight" not in files
  if tied and hf.get("tie_word_embeddings") is False:
    raise WeightsError(f"config.json in {folder} says tie_word_embeddings=false, but the "
                       "checkpoint has no lm_head.weight")
  cfg = config_from_hf(hf, tie_embeddings=tied, dtype=dtype, param_dtype=param_dtype)
  handles = {}

  def handle(name):
    if name not in files:
      raise WeightsError(f"tensor {name} is missing from the checkpoint in {folder}")
    if files[name] not in handles:
      handles[files[name]] = safe_open(files[name], framework="flax")  # flax: reads bf16 too
    return handles[files[name]]

  return cfg, handle


def load_hf(folder: str | pathlib.Path, dtype: str, param_dtype: str):
  cfg, handle = _open_hf(pathlib.Path(folder), dtype, param_dtype)
  # convert() checks each tensor's dtype, then casts.
  return cfg, convert(cfg, lambda name: np.asarray(handle(name).get_tensor(name)))


def _hf_layout(cfg: ModelConfig) -> dict[str, tuple[str, tuple[tuple[int, tuple[int, ...]], ...]]]:
  """Our param path -> (HF tensor name, with {i} for the layer, and axis groups).

  Each group (hf_axis, sizes) says that our next len(sizes) axes come from one
  HF axis, split row-major into `sizes` (the inverse of `convert`'s transposes
  and reshapes). Layer params also have a leading layer axis.
  """
  d, n, k, h, f, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.intermediate_size, cfg.vocab_size)
  a, m = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
  out = {
      "embed/embedding": ("model.embed_tokens.weight", ((0, (v,)), (1, (d,)))),
      "final_norm/scale": ("model.norm.weight", ((0, (d,)),)),
      "layers/input_norm/scale": ("model.layers.{i}.input_layernorm.weight", ((0, (d,)),)),
      "layers/post_norm/scale": ("model.layers.{i}.post_attention_layernorm.weight", ((0, (d,)),)),
      "layers/attn/q_proj/kernel": (a + "q_proj.weight", ((1, (d,)), (0, (n, h)))),
      "layers/attn/k_proj/kernel": (a + "k_proj.weight", ((1, (d,)), (0, (k, h)))),
      "layers/attn/v_proj/kernel": (a + "v_proj.weight", ((1, (d,)), (0, (k, h)))),
      "layers/attn/o_proj/kernel": (a + "o_proj.weight", ((1, (n, h)), (0, (d,)))),
      "layers/mlp/gate_proj/kernel": (m + "gate_proj.weight", ((1, (d,)), (0, (f,)))),
      "layers/mlp/up_proj/kernel": (m + "up_proj.weight", ((1, (d,)), (0, (f,)))),
      "layers/mlp/down_proj/kernel": (m + "down_proj.weight", ((1, (f,)), (0, (d,)))),
  }
  if cfg.qkv_bias:
    for name, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
      out[f"layers/attn/{name}/bias"] = (a + f"{name}.bias", ((0, (heads, h)),))
  if cfg.qk_norm:
    out["layers/attn/q_norm/scale"] = (a + "q_norm.weight", ((0, (h,)),))
    out["layers/attn/k_norm/scale"] = (a + "k_norm.weight", ((0, (h,)),))
  if not cfg.tie_embeddings:
    out["lm_head/kernel"] = ("lm_head.weight", ((1, (d,)), (0, (v,))))
  return out


def _read_region(handle, name: str, groups, index: tuple[slice, ...]) -> np.ndarray:
  """Our-layout region `index` of HF tensor `name`, reading only the rows it needs."""
  hf_slices, spans, inner = [slice(None)] * len(groups), [], []
  axis = 0
  for hf_axis, sizes in groups:
    mine = index[axis:axis + len(sizes)]
    outer = mine[0].indices(sizes[0])
    block = int(np.prod(sizes[1:], dtype=np.int64))
    hf_slices[hf_axis] = slice(outer[0] * block, outer[1] * block)
    spans.append((outer[1] - outer[0],) + tuple(sizes[1:]))
    inner += [slice(None)] + list(mine[1:])  # outer axis done; inner axes are read whole
    axis += len(sizes)
  block = np.asarray(handle.get_slice(name)[tuple(hf_slices)], np.float32)
  block = block.transpose([g[0] for g in groups])  # HF axes in our group order
  return block.reshape(sum(spans, ()))[tuple(inner)]


def load_hf_sharded(folder: str | pathlib.Path, shardings_for: Callable, dtype: str,
                    param_dtype: str):
  """`(cfg, params)` from an HF folder, each array built directly in its shards.

  `shardings_for(abstract_params)` returns the params' shardings (for example
  `lambda p: training.param_shardings(p, mesh)`). Every device's shard is read
  from the safetensors files on its own (`jax.make_array_from_callback` with
  safetensors slices), so no process holds a whole tensor unless a shard is the
  whole tensor, and each process reads only what its devices hold.
  """
  from flexdraft_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  cfg, handle = _open_hf(pathlib.Path(folder), dtype, param_dtype)
  abstract = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  shardings = shardings_for(abstract)
  layout = _hf_layout(cfg)

  def build(path, leaf, sharding):
    key = "/".join(str(getattr(p, "key", p)) for p in path)
    if key not in layout:
      raise WeightsError(f"no HF tensor maps to param {key}")
    name, groups = layout[key]
    want = tuple(n for _, sizes in groups for n in sizes)
    stacked = key.startswith("layers/")
    if tuple(leaf.shape[stacked:]) != want:
      raise WeightsError(f"param {key} has shape {leaf.shape}; the HF layout implies {want}")

    def region(index):
      if not stacked:
        return _read_region(handle(name), name, groups, index).astype(leaf.dtype)
      rows = range(*index[0].indices(leaf.shape[0]))
      return np.stack([_read_region(handle(name.format(i=i)), name.format(i=i), groups, index[1:])
                       for i in rows]).astype(leaf.dtype)

    return jax.make_array_from_callback(leaf.shape, sharding, region)

  params = jax.tree_util.tree_map_with_path(build, abstract, shardings)
  return cfg, params


# ----------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------
_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
  base, kind = gguf_name.rsplit(".", 1)
  if base == "token_embd":
    return "model.embed_tokens." + kind
  if base == "output_norm":
    return "model.norm." + kind
  if base == "output":
    return "lm_head." + kind
  parts = base.split(".", 2)
  if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _GGUF_NAMES:
    hint = " (Llama-3 GGUF rope scaling is not supported)" if base == "rope_freqs" else ""
    raise WeightsError(f"unsupported GGUF tensor {gguf_name!r}{hint}")
  return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{kind}"


def _unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's convert permutation of q/k rows ([out, in])."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def load_gguf(path: str | pathlib.Path, dtype: str, param_dtype: str):
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightsError(f"GGUF file {path} does not exist")
  try:
    f = gguf_file.read(path)
  except ValueError as e:
    raise WeightsError(str(e)) from None
  meta = f.metadata
  arch = meta.get("general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise WeightsError(f"unsupported GGUF architecture {arch!r}; supported: "
                       f"{', '.join(GGUF_ARCHITECTURES)}")
  field = lambda key, default=None: meta.get(f"{arch}.{key}", default)
  tensors = {_hf_name(name): t for name, t in f.tensors.items()}
  heads, d = field("attention.head_count"), field("embedding_length")
  hf = {
      "architectures": ["LlamaForCausalLM"], "hidden_size": d,
      "intermediate_size": field("feed_forward_length"),
      "num_hidden_layers": field("block_count"), "num_attention_heads": heads,
      "num_key_value_heads": field("attention.head_count_kv", heads),
      "head_dim": field("rope.dimension_count", d // heads),
      "vocab_size": field("vocab_size", len(meta.get("tokenizer.ggml.tokens", ()))),
      "rope_theta": field("rope.freq_base", 10000.0),
      "rms_norm_eps": field("attention.layer_norm_rms_epsilon", 1e-5),
      "max_position_embeddings": field("context_length", 8192),
  }
  if field("rope.scaling.type") not in (None, "none"):
    raise WeightsError("GGUF rope scaling is not supported")
  cfg = config_from_hf(hf, tie_embeddings="lm_head.weight" not in tensors, dtype=dtype,
                       param_dtype=param_dtype)

  def get(name):
    if name not in tensors:
      raise WeightsError(f"tensor {name} is missing from {path}")
    t = tensors[name]
    try:
      a = t.dequantize()
    except (NotImplementedError, KeyError, ValueError) as e:
      raise WeightsError(f"GGUF tensor {t.name} uses quant type {t.qtype.name}, which "
                         f"we cannot read ({e})") from None
    if name.endswith(("q_proj.weight", "k_proj.weight")):
      a = _unpermute_rope(a, heads if "q_proj" in name else cfg.num_kv_heads)
    return a

  return cfg, convert(cfg, get)


def load_model(model: str = resources.SMOLLM2_NAME, dtype: str | None = None,
               param_dtype: str | None = None):
  """`(ModelConfig, params)` for a model name, a .gguf file or an HF folder."""
  dtype = dtype or default_dtype()
  param_dtype = param_dtype or dtype
  if model == resources.SMOLLM2_NAME:
    return load_gguf(resources.smollm2_gguf_path(), dtype, param_dtype)
  path = pathlib.Path(model)
  if path.suffix == ".gguf":
    return load_gguf(path, dtype, param_dtype)
  if path.is_dir():
    return load_hf(path, dtype, param_dtype)
  raise WeightsError(f"--model={model!r} is neither {resources.SMOLLM2_NAME!r}, a .gguf file, "
                     "nor an HF checkpoint folder (config.json + *.safetensors)")

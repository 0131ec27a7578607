"""Sharding: the one logical-axis rules table, and the shardings it gives.

Every param, batch and KV-cache array has logical axis names; one
table, `LOGICAL_RULES`, maps them to the mesh axes ('data', 'fsdp', 'tensor'),
for training (`training.compile_train_step`) and for decoding (`decode_shardings`, used
by `flex.compile_flex` and `generate.compile_generate` when given a mesh). A
dimension that a mesh axis does not divide stays replicated on that axis
(`spec_for`), so any mesh runs any model; it only shards less.

  array                                 logical axes                 mesh axes
  embed/embedding      [V, d]           vocab, embed                 tensor, fsdp
  lm_head/kernel       [d, V]           embed, vocab                 fsdp, tensor
  q_proj kernel        [d, N, H]        embed, heads, head_dim       fsdp, tensor, -
  k/v_proj kernel      [d, K, H]        embed, kv_heads, head_dim    fsdp, tensor, -
  q/k/v_proj bias      [N|K, H]         heads|kv_heads, head_dim     tensor, -
  o_proj kernel        [N, H, d]        heads, head_dim, embed       tensor, -, fsdp
  gate/up_proj kernel  [d, F]           embed, mlp                   fsdp, tensor
  down_proj kernel     [F, d]           mlp, embed                   tensor, fsdp
  norm scales, draft/mask               norm                         -
  calib w1 [2d, r], b1 [r]              norm, rank / rank            -
  calib w2 [r, V], b2 [V]               rank, vocab / vocab          -, tensor
  calib w2h [r, d], b2h [d] (hidden)    rank, norm / norm            -
  train batch          [B, S] / [B, A]  batch, (seq)                 (data, fsdp), -
  KV cache k/v         [L, B, K, C, H]  layers, batch, kv_heads,     -, (data, fsdp), tensor,
                                        cache_len, head_dim          -, -
  cache lengths [B]; prompts [B, P], prompt lengths [B], stop ids [B, S],
  generated tokens [B, M], num_new [B]  batch                        (data, fsdp)
  PRNG key, cost table, loop stats      (none)                       replicated

Layer params carry a leading "layers" axis [L, ...] (never sharded) when stacked
(training, and decoding on accelerators); the unrolled decoding layout
(`model.decoding_params`, `drafter.decoding_draft`: a tuple of per-layer trees)
matches the same path suffixes without it, so both layouts shard each layer
alike. The frozen target is sharded the same way in training and in decoding,
the draft and its AdamW moments like the draft params. So on a (1, 1, 8) mesh
decoding is tensor-parallel over heads, kv heads, MLP width and vocabulary, and
on an (8, 1, 1) mesh data-parallel over the rows of the batch.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Params = Any
MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. The one place that says how anything is sharded,
# in training and in decoding (the module docstring lists every array).
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),  # rows: train sequences, decoded prompts, cache rows
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("rank", None),
    ("seq", None),
    ("cache_len", None),          # KV cache slots
    ("panel", None),              # CPU-kernel panels (cpu_matmul.pack): replicated
    ("panel_in", None),
    ("panel_col", None),
)

# Logical axes of the KV cache buffers `model.KVCache.k/v` [L, B, K, C, H];
# its `lengths` [B] are ("batch",).
CACHE_AXES = ("layers", "batch", "kv_heads", "cache_len", "head_dim")

# Param path (regex on "a/b/c") -> logical axes, without the leading layer axis
# that stacked layers carry. Every path must match exactly one entry here, or
# `training.label_params` fails: a new param must be classified explicitly.
PARAM_AXES = (
    (r"embed/embedding", ("vocab", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    (r"(q_proj)/kernel", ("embed", "heads", "head_dim")),
    (r"(k_proj|v_proj)/kernel", ("embed", "kv_heads", "head_dim")),
    (r"q_proj/bias", ("heads", "head_dim")),
    (r"(k_proj|v_proj)/bias", ("kv_heads", "head_dim")),
    (r"o_proj/kernel", ("heads", "head_dim", "embed")),
    (r"(q_norm|k_norm)/scale", ("norm",)),
    (r"(input_norm|post_norm|final_norm)/scale", ("norm",)),
    (r"(gate_proj|up_proj)/kernel", ("embed", "mlp")),
    (r"down_proj/kernel", ("mlp", "embed")),
    (r"draft/mask", ("norm",)),
    (r"calib/w1", ("norm", "rank")),
    (r"calib/b1", ("rank",)),
    (r"calib/w2", ("rank", "vocab")),
    (r"calib/b2", ("vocab",)),
    (r"calib/w2h", ("rank", "norm")),   # calib_target='hidden': a delta on the slot state
    (r"calib/b2h", ("norm",)),
    # The draft vocabulary (drafter.restrict_vocab): its ids and the LM head's rows for them.
    (r"vocab/ids", ("vocab",)),
    (r"vocab/head/kernel", ("embed", "vocab")),
    # CPU decoding only (model.decoding_params / drafter.decoding_draft pack these).
    (r"((qkv|o_proj|gate_up|down_proj|head_packed|head)/packed|calib/w(1|2|2h)_packed)",
     ("panel", "panel_in", "panel_col")),
    (r"qkv/bias", ("panel",)),
)


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def logical_axes(path, shape) -> tuple:
  name = path_str(path)
  for pat, axes in PARAM_AXES:
    if re.search(pat + "$", name):
      extra = len(shape) - len(axes)
      if extra not in (0, 1):
        raise ValueError(f"param {name} has shape {shape}, expected axes {axes} (+ layers)")
      return ("layers",) * extra + axes
  raise ValueError(f"param {name!r} has no entry in sharding.PARAM_AXES")


def spec_for(shape, axes, mesh: Mesh) -> P:
  """PartitionSpec from logical axes via LOGICAL_RULES, dropping non-dividing mesh axes."""
  spec = nn.logical_to_mesh_axes(axes, LOGICAL_RULES)
  out = []
  for dim, entry in zip(shape, spec):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept, size = [], 1
    for n in names:
      if dim % (size * mesh.shape[n]) == 0:
        kept.append(n)
        size *= mesh.shape[n]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


def param_shardings(params: Params, mesh: Mesh) -> Params:
  return jax.tree_util.tree_map_with_path(
      lambda path, a: NamedSharding(mesh, spec_for(a.shape, logical_axes(path, a.shape), mesh)),
      params)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, spec_for((mesh.shape["data"] * mesh.shape["fsdp"],) + (1,) * (ndim - 1),
                                      ("batch",) + (None,) * (ndim - 1), mesh))


# ----------------------------------------------------------------------------
# Decoding shardings (the same rules table)
# ----------------------------------------------------------------------------
def check_mesh(mesh) -> None:
  """Raises ValueError unless `mesh` has the axes MESH_AXES, in that order."""
  if tuple(getattr(mesh, "axis_names", ())) != MESH_AXES:
    raise ValueError(f"decoding needs a mesh with axes {MESH_AXES} (sharding.make_mesh), "
                     f"got {mesh!r}")


def rows_sharding(batch: int, mesh: Mesh) -> NamedSharding:
  """Sharding of any decoding array with `batch` leading rows ([B] or [B, ...]):
  the rows on 'batch', every later dimension replicated. A batch that
  data * fsdp does not divide falls back like any other axis (`spec_for`)."""
  return NamedSharding(mesh, spec_for((batch,), ("batch",), mesh))


def cache_shardings(cache, mesh: Mesh):
  """A `model.KVCache` (or its `jax.eval_shape`) of NamedShardings: k and v by
  CACHE_AXES (rows on 'batch', kv heads on 'tensor'), lengths by rows."""
  if np.ndim(cache.k) != 5 or np.shape(cache.k) != np.shape(cache.v):
    raise ValueError(f"KV cache k/v must both be [L, B, K, C, H], got {np.shape(cache.k)} and "
                     f"{np.shape(cache.v)}")
  kv = NamedSharding(mesh, spec_for(np.shape(cache.k), CACHE_AXES, mesh))
  return cache.replace(k=kv, v=kv, lengths=rows_sharding(np.shape(cache.lengths)[0], mesh))


@dataclasses.dataclass(frozen=True)
class DecodeShardings:
  """NamedShardings of one decoding call (`decode_shardings`)."""
  params: Params             # the params tree given, one NamedSharding per leaf
  cache: Any                 # a model.KVCache of NamedShardings
  rows: NamedSharding        # every [B, ...] input and output: prompts, prompt lengths,
                             # stop ids, generated tokens, num_new
  replicated: NamedSharding  # the PRNG key, the cost table, the loop stats


def decode_shardings(params: Params, cache, mesh: Mesh) -> DecodeShardings:
  """Shardings for decoding over `mesh`, from the same `LOGICAL_RULES` as training.

  `params` is a target tree (`model.init_params` or `model.decoding_params`,
  stacked or unrolled layers) or `{'target': ..., 'draft': ...}` with the draft
  from `drafter.init_draft`/`decoding_draft`; leaves may be arrays or
  `jax.ShapeDtypeStruct`s. `cache` is a `model.KVCache` or its `eval_shape`,
  whose batch B sizes `rows`. The target is tensor-parallel on heads, kv heads,
  MLP width and vocab ('tensor') and split on the hidden size over 'fsdp'; the
  cache and all rows are split on B over ('data', 'fsdp') and the cache also on
  kv heads over 'tensor'. Non-dividing axes stay replicated.
  """
  check_mesh(mesh)
  return DecodeShardings(params=param_shardings(params, mesh), cache=cache_shardings(cache, mesh),
                         rows=rows_sharding(np.shape(cache.lengths)[0], mesh),
                         replicated=NamedSharding(mesh, P()))


def make_mesh(shape, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over the first data*fsdp*tensor devices;
  'auto' puts every device on 'data'."""
  devices = jax.devices() if devices is None else devices
  if shape == "auto":
    shape = (len(devices), 1, 1)
  shape = tuple(int(s) for s in shape)
  n = int(np.prod(shape))
  if len(shape) != 3 or n > len(devices) or min(shape) < 1:
    raise ValueError(f"mesh shape {shape} (data, fsdp, tensor) needs {n} devices, "
                     f"{len(devices)} are available")
  return Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES)



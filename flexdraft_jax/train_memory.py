"""Per-device memory of a training job before it allocates anything: `memory_estimate`
(params from `jax.eval_shape` placed by the rules table, analytic activations) and
`check_memory` (a MemoryError naming what to shrink when it exceeds config.hbm_gib)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import sharding as sharding_lib
from flexdraft_jax.drafter import DrafterConfig
from flexdraft_jax.model_config import ModelConfig

GiB = 2 ** 30


def _device_bytes(shape, axes, mesh, itemsize: float) -> float:
  """Bytes on one device of an array laid out by the rules table (`sharding.spec_for`)."""
  parts = 1
  for entry in sharding_lib.spec_for(shape, axes, mesh):
    for name in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
      parts *= mesh.shape[name]
  return math.prod(shape) * itemsize / parts


def _sharded_bytes(tree, mesh) -> float:
  return sum(_device_bytes(leaf.shape, sharding_lib.logical_axes(path, leaf.shape), mesh,
                           leaf.dtype.itemsize)
             for path, leaf in jax.tree_util.tree_leaves_with_path(tree))


def memory_estimate(cfg: ModelConfig, dcfg: DrafterConfig, *, batch_size: int, seq_len: int,
                    anchors_per_seq: int, mesh_shape, decode_batch_size: int = 0,
                    decode_context: int = 0, offline: bool = False) -> dict:
  """Per-device GiB of the train step and of decoding on the mesh `mesh_shape`.

  Params come from `jax.eval_shape` and the rules table on an abstract mesh. The
  rest is an analytic estimate of the largest buffers; XLA's temporaries (weights
  gathered over fsdp, fusion scratch) are not counted, so leave some headroom.
  Activations are split by the batch over ('data', 'fsdp') and by heads, kv heads,
  MLP width and vocabulary over 'tensor', where those divide (like the params).

  train step: params, the draft's gradient and AdamW moments (f32), and
    act_clean_kv         keys and values of the frozen clean pass, every layer
                         (the scan stacks them; the deep layers' are read by the
                         mask path and kept for its backward pass); offline
                         (cached K/V in the batch): the K deep layers' only
    act_clean_attention  one clean layer's attention scores and probabilities
                         (f32, [S, S] per head); transient, before the mask
                         path; 0 offline (no clean pass)
    act_draft_layers     what the mask path's K layers keep for the backward pass
                         (`run_dual_layers` has no remat, so all K at once), per
                         slot: the residual stream 4x (input, normed, after
                         attention, normed), queries and attention output, the
                         slots' keys and values, the MLP's gate, up and product,
                         and the attention scores and probabilities over clean +
                         slot keys (f32)
    act_slot_logits      the mask slots' LM-head logits (f32 [M, V]), with their
                         gradient; twice that with calibration (calibrated copies)
    train_total = params + grads_and_adam + act_clean_kv
                  + max(act_clean_attention, act_draft_layers + act_slot_logits)
  decoding (the data build's generation, or serving on the same mesh):
    decode_kv_cache      `model.KVCache` of `decode_batch_size` rows of
                         `decode_context` tokens (rounded up to the engine's
                         capacity bucket), batch over ('data', 'fsdp') and kv
                         heads over 'tensor'; 0 when either is 0
    decode_total = target_params + the draft in the model dtype + decode_kv_cache
  total = max(train_total, decode_total): the two never hold memory at once.
  """
  from flexdraft_jax.engine import CAPACITY_BUCKET
  mesh = AbstractMesh(tuple(mesh_shape), sharding_lib.MESH_AXES)
  target = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  draft = jax.eval_shape(lambda t: drafter_lib.init_draft(cfg, dcfg, t, jax.random.key(0)), target)
  sharded = _sharded_bytes({"target": target, "draft": draft}, mesh)
  draft_b = _sharded_bytes({"draft": draft}, mesh)
  on_device = lambda shape, axes, itemsize: _device_bytes(shape, axes, mesh, itemsize) / GiB
  act = jnp.dtype(cfg.dtype).itemsize
  score = 8  # f32 attention scores and probabilities
  b, s, m = batch_size, seq_len, anchors_per_seq * dcfg.block_size
  n, kv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
  per_layer = (4 * on_device((b, m, d), ("batch", None, None), act)
               + 2 * on_device((b, m, n, hd), ("batch", None, "heads", None), act)
               + 2 * on_device((b, m, kv, hd), ("batch", None, "kv_heads", None), act)
               + 3 * on_device((b, m, cfg.intermediate_size), ("batch", None, "mlp"), act)
               + on_device((b, n, m, s + m), ("batch", "heads", None, None), score))
  out = {
      "target_params": (sharded - draft_b) / GiB,
      "draft_params": draft_b / GiB,
      "grads_and_adam": 3 * draft_b / GiB,
      "act_clean_kv": 2 * on_device((dcfg.num_draft_layers if offline else cfg.num_layers, b, s,
                                     kv, hd), ("layers", "batch", None, "kv_heads", None), act),
      "act_clean_attention": 0.0 if offline else on_device((b, n, s, s),
                                                           ("batch", "heads", None, None), score),
      "act_draft_layers": dcfg.num_draft_layers * per_layer,
      "act_slot_logits": (4 if dcfg.calib_rank else 2) * on_device(
          (b, m, cfg.vocab_size), ("batch", None, "vocab"), 4),
  }
  out["train_total"] = (out["target_params"] + out["draft_params"] + out["grads_and_adam"]
                        + out["act_clean_kv"]
                        + max(out["act_clean_attention"],
                              out["act_draft_layers"] + out["act_slot_logits"]))
  capacity = -(-decode_context // CAPACITY_BUCKET) * CAPACITY_BUCKET
  out["decode_kv_cache"] = 2 * on_device(
      (cfg.num_layers, decode_batch_size, kv, capacity, hd),
      ("layers", "batch", "kv_heads", None, None), act) if decode_batch_size else 0.0
  out["decode_total"] = (out["target_params"] + out["draft_params"] * act / 4
                         + out["decode_kv_cache"])
  out["total"] = max(out["train_total"], out["decode_total"])
  return out


def decode_shape(config) -> tuple[int, int]:
  """(rows, context tokens) of decoding: config.decode_batch_size / decode_context, where 0
  (the default) means the data build's: data.generate_batch_size rows of
  data.max_prompt_len + data.max_response_len tokens."""
  rows = config.get("decode_batch_size", 0) or config.data.generate_batch_size
  context = (config.get("decode_context", 0)
             or config.data.max_prompt_len + config.data.max_response_len)
  return rows, context


def check_memory(config, cfg: ModelConfig, dcfg: DrafterConfig, mesh_shape) -> dict:
  """`memory_estimate` for `config`; MemoryError when its total exceeds config.hbm_gib."""
  rows, context = decode_shape(config)
  est = memory_estimate(cfg, dcfg, batch_size=config.batch_size, seq_len=config.seq_len,
                        anchors_per_seq=config.anchors_per_seq, mesh_shape=mesh_shape,
                        decode_batch_size=rows, decode_context=context,
                        offline=bool(config.data.get("offline")))
  if config.hbm_gib and est["total"] > config.hbm_gib:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in est.items() if k != "total")
    if est["train_total"] >= est["decode_total"]:
      fix = "a smaller batch_size/seq_len/anchors_per_seq"
    else:
      fix = ("a smaller decode_batch_size/decode_context (or data.generate_batch_size/"
             "max_prompt_len/max_response_len)")
    raise MemoryError(f"estimated {est['total']:.1f} GiB per device on mesh {tuple(mesh_shape)} "
                      f"exceeds hbm_gib={config.hbm_gib} ({parts}); use more devices, a larger "
                      f"fsdp/tensor axis, or {fix}")
  return est

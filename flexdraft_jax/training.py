"""Drafter training: param labels, the masked optimizer, the loss, sharding, the train step.

Only the drafter learns (ALGORITHM.md §2, "Trainable"). The whole param tree
`{'target', 'draft'}` is labelled leaf by leaf; `optax.multi_transform` gives
trainable leaves AdamW (warmup-cosine, clipping) and frozen ones `set_to_zero`,
which keeps no state. Gradients are taken of the draft subtree only, so the
target's zero updates are never used and XLA drops them.

Sharding (the rules table, `param_shardings`, `batch_sharding`) lives in
`sharding`; `compile_train_step` places the state, the target and the batch
by it, each optimizer moment like the param it tracks (`state_shardings`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax import sharding as sharding_lib
from flexdraft_jax.drafter import DrafterConfig
from flexdraft_jax.model_config import ModelConfig
from flexdraft_jax.sampling import argmax

Params = Any


def label_params(params: Params) -> Params:
  """'trainable' for the draft subtree, 'frozen' for the target's; unknown paths fail."""
  def label(path, _):
    name = sharding_lib.path_str(path)
    if not any(re.search(pat + "$", name) for pat, _ in sharding_lib.PARAM_AXES):
      raise ValueError(f"param {name!r} has no entry in sharding.PARAM_AXES; classify it")
    if name.startswith("draft/"):
      return "trainable"
    if name.startswith("target/"):
      return "frozen"
    raise ValueError(f"param {name!r} is neither under 'target' nor under 'draft'")
  return jax.tree_util.tree_map_with_path(label, params)


# ----------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 3e-4
  warmup_steps: int = 100
  total_steps: int = 1000
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95


def make_optimizer(ocfg: OptimConfig, params: Params) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, ocfg.learning_rate, max(1, ocfg.warmup_steps), max(ocfg.total_steps, ocfg.warmup_steps + 1),
      end_value=ocfg.learning_rate * 0.1)
  adamw = optax.chain(optax.clip_by_global_norm(ocfg.clip_norm),
                      optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, weight_decay=ocfg.weight_decay))
  return optax.multi_transform({"trainable": adamw, "frozen": optax.set_to_zero()},
                               label_params(params))


# ----------------------------------------------------------------------------
# Loss and metrics
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LossConfig:
  slot_decay: float = 1.0      # weight of slot j is slot_decay**j (1.0 = uniform)
  calib_weight: float = 1.0    # weight of the calibrated CE of slots >= 1
  labels: str = "data"         # 'data' (self-distilled tokens) or 'target_argmax' (ablation)


def slot_targets(batch: dict, block_size: int, clean_argmax=None):
  """Labels [B,A,Bs] and validity of slot j of anchor a (the token at a+1+j)."""
  tokens, seg, loss_mask, anchors = (batch["tokens"], batch["segment_ids"], batch["loss_mask"],
                                     batch["anchors"])
  s = tokens.shape[1]
  idx = anchors[..., None] + 1 + jnp.arange(block_size)  # [B,A,Bs]
  inside = (anchors[..., None] >= 0) & (idx < s)
  idx_c = jnp.clip(idx, 0, s - 1)
  take = lambda a: jnp.take_along_axis(a[:, None, :], idx_c, axis=2)
  anchor_seg = jnp.take_along_axis(seg, jnp.maximum(anchors, 0), axis=1)[..., None]
  valid = inside & (take(seg) == anchor_seg) & take(loss_mask)
  if clean_argmax is None:
    labels = take(tokens)
  else:  # the target's own next-token argmax at the previous position
    labels = jnp.take_along_axis(clean_argmax[:, None, :], jnp.clip(idx - 1, 0, s - 1), axis=2)
  return labels, valid


def loss_and_metrics(draft: Params, target: Params, batch: dict, *, cfg: ModelConfig,
                     dcfg: DrafterConfig, lcfg: LossConfig):
  params = {"target": target, "draft": draft}
  argmax_labels = lcfg.labels == "target_argmax"
  h, clean_logits = drafter_lib.train_outputs(params, cfg, dcfg, batch,
                                              with_clean_logits=argmax_labels)
  labels, valid = slot_targets(batch, dcfg.block_size,
                               argmax(clean_logits) if argmax_labels else None)
  bs = dcfg.block_size
  w = (lcfg.slot_decay ** jnp.arange(bs, dtype=jnp.float32)) * valid  # [B,A,Bs]
  z = drafter_lib.slot_logits(params, cfg, h)  # [B,A,Bs,V]
  ce = optax.softmax_cross_entropy_with_integer_labels(z, labels)
  denom = jnp.maximum(w.sum(), 1.0)
  loss = (ce * w).sum() / denom
  correct = argmax(z) == labels
  count = jnp.maximum(valid.sum((0, 1)), 1)
  metrics = {"ce": loss, "acc": (correct & valid).sum((0, 1)) / count, "valid_slots": valid.sum()}
  if "calib" in draft:
    zc = drafter_lib.calibrated_logits(params, cfg, h[:, :, 1:],
                                       jnp.broadcast_to(labels[:, :, :1], labels[:, :, 1:].shape),
                                       z[:, :, 1:])
    cec = optax.softmax_cross_entropy_with_integer_labels(zc, labels[:, :, 1:])
    loss_c = (cec * w[:, :, 1:]).sum() / jnp.maximum(w[:, :, 1:].sum(), 1.0)
    loss = loss + lcfg.calib_weight * loss_c
    metrics["ce_calib"] = loss_c
    metrics["acc_calib"] = ((argmax(zc) == labels[:, :, 1:]) & valid[:, :, 1:]).sum((0, 1)) / count[1:]
  metrics["loss"] = loss
  return loss, metrics


def acceptance_proxies(metrics: dict) -> dict:
  """Expected acceptance length 1 + sum_k prod_{i<=k} acc_i (ALGORITHM.md §3).

  sequential: drafts are slots 0..Bs-1, uncalibrated. parallel: the bonus is
  the target's and the drafts are slots 1..Bs-1, calibrated when present.
  """
  acc = np.asarray(metrics["acc"])
  par = np.asarray(metrics.get("acc_calib", acc[1:]))
  return {"tau_proxy_sequential": float(1 + np.cumprod(acc).sum()),
          "tau_proxy_parallel": float(1 + np.cumprod(par).sum())}


# ----------------------------------------------------------------------------
# Train state and step
# ----------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  step: jax.Array
  draft: Params
  opt_state: Any

  def as_dict(self) -> dict:
    return {"step": self.step, "draft": self.draft, "opt_state": self.opt_state}


def init_state(tx: optax.GradientTransformation, target: Params, draft: Params) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), draft=draft,
                    opt_state=tx.init({"target": target, "draft": draft}))


def train_step(state: TrainState, target: Params, batch: dict, *, tx, cfg, dcfg, lcfg):
  """One update of the draft params. The target is an argument, never updated."""
  grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
  (_, metrics), g_draft = grad_fn(state.draft, target, batch, cfg=cfg, dcfg=dcfg, lcfg=lcfg)
  grads = {"target": jax.tree.map(jnp.zeros_like, target), "draft": g_draft}
  updates, opt_state = tx.update(grads, state.opt_state, {"target": target, "draft": state.draft})
  metrics["grad_norm"] = optax.tree.norm(g_draft)
  draft = optax.apply_updates(state.draft, updates["draft"])
  return TrainState(step=state.step + 1, draft=draft, opt_state=opt_state), metrics


def state_shardings(tx: optax.GradientTransformation, state: TrainState, target: Params,
                    mesh: Mesh) -> TrainState:
  """Shardings for the train state: the draft by the rules table, each optimizer
  moment like the param it tracks (`optax.tree_utils.tree_map_params`)."""
  full = sharding_lib.param_shardings({"target": target, "draft": state.draft}, mesh)
  replicated = NamedSharding(mesh, P())
  # The AdamW moments exist for the draft only; the target's slots are MaskedNodes.
  masked = {"target": jax.tree.map(lambda _: optax.MaskedNode(), full["target"]),
            "draft": full["draft"]}
  opt_sh = optax.tree_utils.tree_map_params(tx, lambda _, sh: sh, state.opt_state, masked,
                                            transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, draft=full["draft"], opt_state=opt_sh)


def compile_train_step(state: TrainState, target: Params, batch: dict, mesh: Mesh, *, tx, cfg, dcfg,
                       lcfg):
  """jit with explicit in/out shardings over `mesh`; the state is donated."""
  st_sh = state_shardings(tx, state, target, mesh)
  tg_sh = sharding_lib.param_shardings({"target": target}, mesh)["target"]
  b_sh = {k: sharding_lib.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
  fn = jax.jit(lambda s, t, b: train_step(s, t, b, tx=tx, cfg=cfg, dcfg=dcfg, lcfg=lcfg),
               in_shardings=(st_sh, tg_sh, b_sh), out_shardings=(st_sh, None),
               donate_argnums=0)
  return fn, st_sh, tg_sh, b_sh

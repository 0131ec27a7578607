"""The authors' FlexDraft release format (`official`): loading, an independent reference, decoding.

A tiny random Qwen3 target is built with transformers, and a release folder is
written for it from the release's key names (a torch module named as the
release names its weights: draft layers as transformers' Qwen3 decoder layers,
the mask embedding, the calibration MLP). The reference draft logits come from a
PyTorch forward of the release's dual attention written here, on transformers'
Qwen3 modules: clean tokens take the target's q/k/v/o and q/k norms, mask slots
the draft copies, one softmax over the union, the target's norms and MLP.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from transformers.models.qwen3 import modeling_qwen3 as hf_qwen3

from flexdraft_jax import checkpoint
from flexdraft_jax import drafter
from flexdraft_jax import model as model_lib
from flexdraft_jax import official
from flexdraft_jax import trainer
from flexdraft_jax import weights
from flexdraft_jax.flex import FlexConfig

from test_flex import decoding, near_ties, run_ar, run_flex

ATOL = 1e-4
V, D, L, K, BLOCK, RANK = 101, 64, 3, 2, 4, 8  # target depth L, draft layers K: split 1
SPLIT = L - K
M = 12  # max_new_tokens of the greedy runs
TINY = dict(vocab_size=V, hidden_size=D, intermediate_size=96, num_hidden_layers=L,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
            initializer_range=0.1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


@pytest.fixture(autouse=True, scope="module")
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


class Release(torch.nn.Module):
  """The release's weights under its names (state_dict keys are the release's keys)."""

  def __init__(self, config, k: int, rank: int):
    super().__init__()
    self.layers = torch.nn.ModuleList(hf_qwen3.Qwen3DecoderLayer(config, i) for i in range(k))
    self.norm = hf_qwen3.Qwen3RMSNorm(config.hidden_size)
    self.mask_embedding = torch.nn.Parameter(torch.randn(config.hidden_size))
    self.anchor_bias_mlp = torch.nn.Sequential(
        torch.nn.Linear(2 * config.hidden_size, rank), torch.nn.SiLU(),
        torch.nn.Linear(rank, config.vocab_size))


def build(seed: int = 0):
  """(HF target, Release): random norms; draft attention = the target's deep layers' plus
  noise; a calibration MLP whose delta is O(1)."""
  torch.manual_seed(seed)
  config = transformers.Qwen3Config(**TINY, attn_implementation="eager")
  target = transformers.Qwen3ForCausalLM(config).to(torch.float32).eval()
  release = Release(config, K, RANK).eval()
  with torch.no_grad():
    for name, p in target.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
    for i, layer in enumerate(release.layers):
      for name, p in layer.self_attn.named_parameters():
        ref = target.model.layers[SPLIT + i].self_attn.get_parameter(name)
        p.copy_(ref + 0.5 * ref.std() * torch.randn_like(ref))
    release.mask_embedding.mul_(target.model.embed_tokens.weight.std())
    release.anchor_bias_mlp[0].weight.mul_(3.0)
    release.anchor_bias_mlp[2].weight.mul_(8.0)
  return target, release


def release_config(target) -> dict:
  hf = target.config.to_dict()
  hf.update(architectures=["FlexDraftBiasModel"], num_hidden_layers=K, num_target_layers=L,
            block_size=BLOCK, flexdraft_config={
                "target_layer_ids": list(range(SPLIT, L)), "enable_anchor_bias_logits": True,
                "anchor_bias_rank": RANK})
  return hf


def write_release(folder: pathlib.Path, release, config: dict, prefix: str = "",
                  shards: int = 1, dtype=torch.float32) -> pathlib.Path:
  """A release folder: config.json and safetensors (`shards` files with an index if > 1)."""
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(config))
  state = {prefix + k: v.detach().to(dtype).contiguous() for k, v in release.state_dict().items()}
  names = sorted(state)
  if shards == 1:
    safetensors.torch.save_file(state, folder / "model.safetensors")
    return folder
  weight_map = {}
  for s in range(shards):
    file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {n: state[n] for n in names[s::shards]}
    safetensors.torch.save_file(part, folder / file)
    weight_map.update(dict.fromkeys(part, file))
  (folder / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))
  return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(HF target, Release, target folder, release folder, (cfg, params) of our target)."""
  root = tmp_path_factory.mktemp("official")
  target, release = build()
  target.save_pretrained(root / "target", safe_serialization=True)
  folder = write_release(root / "release", release, release_config(target))
  cfg, params = weights.load_hf(root / "target", dtype="float32", param_dtype="float32")
  assert cfg.family == "qwen3" and "lm_head" in params and cfg.num_layers == L
  return target, release, root / "target", folder, (cfg, params)


def load(folder, cfg, dtype="float32"):
  return checkpoint.load_drafter(folder, dataclasses.asdict(cfg), None, dtype=dtype)


# ----------------------------------------------------------------------------
# The reference: the release's dual attention, in torch
# ----------------------------------------------------------------------------
def _attention(attn, x, cos, sin):
  """q [1,N,T,H], k, v [1,Kv,T,H] of `attn` (a Qwen3Attention) on normed x [1,T,d], RoPE'd."""
  shape = (*x.shape[:-1], -1, attn.head_dim)
  q = attn.q_norm(attn.q_proj(x).view(shape)).transpose(1, 2)
  k = attn.k_norm(attn.k_proj(x).view(shape)).transpose(1, 2)
  v = attn.v_proj(x).view(shape).transpose(1, 2)
  q, k = hf_qwen3.apply_rotary_pos_emb(q, k, cos, sin)
  return q, k, v


def _layer(target_layer, draft_attn, x, n_clean, cos, sin, allowed):
  """One layer over [clean; slots] (x [1,T,d]): the clean rows through the target's
  projectors, the slot rows through `draft_attn`'s, one softmax under `allowed` [T,T]."""
  ta = target_layer.self_attn
  h = target_layer.input_layernorm(x)
  qc, kc, vc = _attention(ta, h[:, :n_clean], cos[:, :n_clean], sin[:, :n_clean])
  q, k, v = qc, kc, vc
  if draft_attn is not None:
    qm, km, vm = _attention(draft_attn, h[:, n_clean:], cos[:, n_clean:], sin[:, n_clean:])
    q, k, v = torch.cat([qc, qm], 2), torch.cat([kc, km], 2), torch.cat([vc, vm], 2)
  groups = q.shape[1] // k.shape[1]
  k, v = hf_qwen3.repeat_kv(k, groups), hf_qwen3.repeat_kv(v, groups)
  scores = (q @ k.transpose(2, 3)) * ta.scaling
  scores = scores.masked_fill(~allowed, float("-inf"))
  out = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(*x.shape[:-1], -1)
  o = ta.o_proj(out[:, :n_clean])
  if draft_attn is not None:
    o = torch.cat([o, draft_attn.o_proj(out[:, n_clean:])], 1)
  x = x + o
  return x + target_layer.mlp(target_layer.post_attention_layernorm(x))


@torch.no_grad()
def reference_block(target, release, tokens, anchor: int, bonus: int):
  """(clean logits [a+1, V], slot logits [B, V], calibrated slot logits [B-1, V]) of one
  block anchored at clean position `anchor` of `tokens`: slot j at position anchor+1+j."""
  model, n = target.model, anchor + 1
  x = model.embed_tokens(torch.as_tensor(tokens[:n])[None])
  pos = torch.arange(n + BLOCK)[None]
  cos, sin = model.rotary_emb(x, pos)
  causal = torch.ones(n, n, dtype=torch.bool).tril()
  for layer in model.layers[:SPLIT]:
    x = _layer(layer, None, x, n, cos, sin, causal)
  # Clean rows see clean keys causally; slots see every clean key and their whole block.
  allowed = torch.zeros(n + BLOCK, n + BLOCK, dtype=torch.bool)
  allowed[:n, :n] = causal
  allowed[n:] = True
  x = torch.cat([x, release.mask_embedding.expand(1, BLOCK, -1)], 1)  # slots enter at the split
  for i, layer in enumerate(model.layers[SPLIT:]):
    x = _layer(layer, release.layers[i].self_attn, x, n, cos, sin, allowed)
  h = model.norm(x)
  logits = target.lm_head(h)[0]
  e = model.embed_tokens(torch.tensor([bonus])).expand(BLOCK - 1, -1)
  calibrated = logits[n + 1:] + release.anchor_bias_mlp(torch.cat([e, h[0, n + 1:]], -1))
  return logits[:n].numpy(), logits[n:].numpy(), calibrated.numpy()


@jax.jit(static_argnames=("cfg", "dcfg"))
def _ours(params, tokens_BT, anchors_BG, bonus_BG, *, cfg, dcfg):
  """(clean logits, raw slot logits [B,G,Bs,V], calibrated slots 1.. [B,G,Bs-1,V])."""
  cache = model_lib.KVCache.zeros(cfg, tokens_BT.shape[0], 32)
  logits, h, _ = drafter.mixed_pass(params, cfg, dcfg, tokens_BT, anchors_BG, cache)
  bonus = jnp.broadcast_to(bonus_BG[..., None], h.shape[:-2] + (dcfg.block_size - 1,))
  return (logits, drafter.slot_logits(params, cfg, h),
          drafter.slot_logits(params, cfg, h[:, :, 1:], bonus))


def test_draft_logits_match_the_release_reference(setup):
  target, release, _, folder, (cfg, params) = setup
  meta, draft = load(folder, cfg)
  dcfg = drafter.DrafterConfig(**meta)
  assert dcfg == drafter.DrafterConfig(num_draft_layers=K, block_size=BLOCK, calib_rank=RANK)
  drafter.check_params(draft, cfg, dcfg)
  rng = np.random.RandomState(1)
  tokens = rng.randint(0, V, (2, 9)).astype(np.int32)
  anchors = np.array([[8, 5], [8, 2]], np.int32)  # two groups per row
  bonus = rng.randint(0, V, (2, 2)).astype(np.int32)
  clean, raw, calibrated = map(np.asarray, _ours({"target": params, "draft": draft}, tokens,
                                                 anchors, bonus, cfg=cfg, dcfg=dcfg))
  for b in range(2):
    with torch.no_grad():  # the reference's clean path is transformers' own model
      hf = target(torch.as_tensor(tokens[b:b + 1], dtype=torch.long)).logits[0].numpy()
    for g in range(2):
      ref_clean, ref_raw, ref_cal = reference_block(target, release, tokens[b], anchors[b, g],
                                                    bonus[b, g])
      np.testing.assert_allclose(ref_clean, hf[:anchors[b, g] + 1], atol=ATOL, rtol=0)
      assert ref_raw.std() > 0.3 and np.abs(ref_cal - ref_raw[1:]).mean() > 0.3
      np.testing.assert_allclose(raw[b, g], ref_raw, atol=ATOL, rtol=0, err_msg=f"row {b} g {g}")
      np.testing.assert_allclose(calibrated[b, g], ref_cal, atol=ATOL, rtol=0)
    np.testing.assert_allclose(clean[b], hf, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------
# Greedy decoding with the imported drafter is AR's
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_greedy_flex_with_the_release_is_ar(setup, mode):
  _, _, _, folder, (cfg, target) = setup
  meta, draft = load(folder, cfg)
  dcfg = drafter.DrafterConfig(**meta)
  params = decoding(target, draft)
  rng = np.random.RandomState(7)
  prompts = [rng.randint(0, V, n).tolist() for n in (6, 11, 3)]
  want = run_ar(cfg, params["target"], prompts, M)
  fcfg = FlexConfig(mode=mode, verify_strategy="full", max_new_tokens=M)
  for batch in (1, 3):
    got, summary = run_flex(cfg, params, prompts[:batch], fcfg, dcfg=dcfg)
    near_ties(cfg, params["target"], prompts[:batch], want[:batch], got)
    assert summary["modes"][mode] == summary["steps"] > 0


# ----------------------------------------------------------------------------
# Formats, conversion, init_from
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("prefix,shards,dtype", [("model.", 1, torch.bfloat16),
                                                 ("", 3, torch.float16),
                                                 ("model.", 2, torch.float32)])
def test_prefixes_shards_and_dtypes_load_the_same(setup, tmp_path, prefix, shards, dtype):
  target, release, _, folder, (cfg, _) = setup
  other = write_release(tmp_path / "r", release, release_config(target), prefix, shards, dtype)
  _, want = load(folder, cfg)
  meta, got = load(other, cfg, dtype=None)
  stored = {torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16}.get(dtype, jnp.float32)
  assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(stored)}
  rounded = jax.tree.map(lambda x: x.astype(stored).astype(jnp.float32), want)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x.astype(jnp.float32), got),
               rounded)


def test_convert_then_load_gives_equal_params(setup, tmp_path):
  """The CLI writes our export with the fingerprint of the target it is given."""
  _, _, target_dir, folder, (cfg, params) = setup
  out = tmp_path / "export"
  done = subprocess.run([sys.executable, "-m", "flexdraft_jax.checkpoint", "convert", str(folder),
                         str(out), f"--model={target_dir}"], capture_output=True, text=True,
                        check=False)
  assert done.returncode == 0, done.stderr
  assert "no target fingerprint" in done.stderr
  arch = dataclasses.asdict(cfg)
  fingerprint = checkpoint.target_fingerprint(arch, params)
  meta_theirs, theirs = load(folder, cfg)
  meta_ours, ours = checkpoint.load_drafter(out, arch, fingerprint, dtype="float32")
  assert meta_ours == meta_theirs
  assert checkpoint.drafter_meta(out)["dtype"] == "float32"  # the release's own precision
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  # trainer.init_from_export reads the release itself the same way (as f32 master weights).
  dcfg = drafter.DrafterConfig(**meta_theirs)
  like = jax.eval_shape(lambda t: drafter.init_draft(cfg, dcfg, t, jax.random.key(0)), params)
  started = trainer.init_from_export(folder, cfg, dcfg, fingerprint, like)
  jax.tree.map(np.testing.assert_array_equal, started, theirs)


# ----------------------------------------------------------------------------
# Bad inputs: one line each
# ----------------------------------------------------------------------------
def _variant(setup, tmp_path, edit_config=None, edit_state=None):
  target, release, _, _, _ = setup
  config = release_config(target)
  if edit_config:
    edit_config(config)
  folder = write_release(tmp_path / "bad", release, config)
  if edit_state:
    state = safetensors.torch.load_file(folder / "model.safetensors")
    edit_state(state)
    safetensors.torch.save_file(state, folder / "model.safetensors")
  return folder


def _ids(ids, k=K):
  return lambda c: (c["flexdraft_config"].update(target_layer_ids=ids),
                    c.update(num_hidden_layers=k))


def _drop(name):
  return lambda s: s.pop(name)


def _reshape(name):
  return lambda s: s.update({name: torch.zeros(D + 1)})


BAD = {
    "architecture": (lambda c: c.update(hidden_size=96), None, official.ReleaseMismatchError,
                     "hidden_size=96, this target has hidden_size=64"),
    "depth": (lambda c: c.update(num_target_layers=4), None, official.ReleaseMismatchError,
              "num_target_layers=4, this target has num_layers=3"),
    "not_qwen3": (lambda c: c.update(model_type="llama"), None, official.ReleaseMismatchError,
                  "drafts for a qwen3 target"),
    "gap": (_ids([0, 2]), None, official.ReleaseError, "is not a contiguous run"),
    "not_last": (_ids([0, 1]), None, official.ReleaseError, "ending at the target's last layer 2"),
    "split_plus_k": (_ids([1, 2], k=3), None, official.ReleaseError,
                     "plus num_hidden_layers=3 draft layers is not the target's depth 3"),
    "no_ids": (lambda c: c["flexdraft_config"].pop("target_layer_ids"), None,
               official.ReleaseError, "target_layer_ids is None"),
    "missing": (None, _drop("layers.1.self_attn.k_norm.weight"), official.ReleaseError,
                "tensor layers.1.self_attn.k_norm.weight (or model.layers.1.self_attn.k_norm"),
    "shape": (None, _reshape("mask_embedding"), official.ReleaseError,
              "tensor mask_embedding in model.safetensors has shape (65,); the config implies "
              "(64,)"),
    "not_release": (lambda c: c.pop("flexdraft_config") and c.pop("num_target_layers"), None,
                    official.ReleaseError, "not a FlexDraft release"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_release_is_one_line(setup, tmp_path, case):
  edit_config, edit_state, error, text = BAD[case]
  folder = _variant(setup, tmp_path, edit_config, edit_state)
  with pytest.raises(error) as e:
    load(folder, setup[4][0])
  assert isinstance(e.value, checkpoint.DrafterFileError)
  assert text in str(e.value) and "\n" not in str(e.value)


def test_calibration_disabled_loads_rank_0_and_says_so_once(setup, tmp_path, capsys):
  folder = _variant(setup, tmp_path,
                    lambda c: c["flexdraft_config"].update(enable_anchor_bias_logits=False))
  cfg = setup[4][0]
  for _ in range(2):
    meta, draft = load(folder, cfg)
    assert meta["calib_rank"] == 0 and "calib" not in draft
    drafter.check_params(draft, cfg, drafter.DrafterConfig(**meta))
  err = capsys.readouterr().err
  assert err.count("calibration is disabled") == 1
  assert err.count("records no target fingerprint") == 1
  assert all(len(line) < 400 for line in err.splitlines())


def test_another_family_is_refused(setup, tiny_model):
  """The tiny Llama target (a different architecture) is refused before any tensor is read."""
  folder = setup[3]
  cfg, _ = tiny_model("llama")
  with pytest.raises(checkpoint.DrafterMismatchError, match="this target is 'llama'"):
    load(folder, cfg)


def test_convert_cli_refuses_in_one_line(setup, tmp_path):
  """A release for another target: exit 2 and one `error:` line, no traceback."""
  folder = _variant(setup, tmp_path, lambda c: c.update(num_key_value_heads=4))
  done = subprocess.run([sys.executable, "-m", "flexdraft_jax.checkpoint", "convert", str(folder),
                         str(tmp_path / "out"), f"--model={setup[2]}"], capture_output=True,
                        text=True, check=False)
  assert done.returncode == 2, done.stderr
  assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("python -m flexdraft_jax.checkpoint: error: ")
  assert "num_key_value_heads=4, this target has num_kv_heads=2" in last


def test_a_release_has_a_digest_for_the_cost_cache(setup, tmp_path):
  """Engine and the bench key their cost tables by the drafter's weights: a release folder
  (one or several shards) has a digest too, and another release another one."""
  from flexdraft_jax import cost_cache
  target, release, _, folder, _ = setup
  one = cost_cache.drafter_digest(folder)
  sharded = write_release(tmp_path / "s", release, release_config(target), shards=2)
  assert one and cost_cache.drafter_digest(sharded) not in ("", one)

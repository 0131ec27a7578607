"""The draft vocabulary: ranking by token counts, the restricted head and calibration,
token counts files and data."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexdraft_jax import checkpoint
from flexdraft_jax import data
from flexdraft_jax import drafter
from flexdraft_jax import engine
from flexdraft_jax import model as model_lib

DCFG = drafter.DrafterConfig(num_draft_layers=1, block_size=4, calib_rank=8)


def test_vocab_ids_rank_by_count_then_id():
  counts = np.array([5, 0, 7, 5, 1, 7, 0])
  np.testing.assert_array_equal(drafter.vocab_ids(counts, 3), [0, 2, 5])  # 7, 7, then 5 (id 0)
  np.testing.assert_array_equal(drafter.vocab_ids(counts, 5), [0, 2, 3, 4, 5])
  np.testing.assert_array_equal(drafter.vocab_ids(counts, 6), [0, 1, 2, 3, 4, 5])  # 0s by id
  with pytest.raises(ValueError, match="in \\[1, 7\\]"):
    drafter.vocab_ids(counts, 8)


def test_draft_vocab_ids_default_and_errors():
  counts = np.arange(100)
  assert drafter.draft_vocab_ids(None, None, 100) is None  # no counts: all tokens
  assert drafter.draft_vocab_ids(counts, 0, 100) is None
  assert drafter.draft_vocab_ids(counts, 100, 100) is None
  np.testing.assert_array_equal(drafter.draft_vocab_ids(counts, 3, 100), [97, 98, 99])
  # default size: a sixth of the vocabulary, rounded up to a multiple of 256, at most all
  assert drafter.default_draft_vocab(49152) == 8192
  assert drafter.default_draft_vocab(151936) == 25344
  assert drafter.default_draft_vocab(100) == 100
  assert drafter.draft_vocab_ids(counts, None, 100) is None
  assert drafter.draft_vocab_ids(np.arange(3000), None, 3000).shape == (512,)
  with pytest.raises(ValueError, match="token counts"):
    drafter.draft_vocab_ids(None, 10, 100)
  with pytest.raises(ValueError, match=">= 0"):
    drafter.draft_vocab_ids(counts, -1, 100)


@pytest.mark.parametrize("family,calib_target,pack", [
    ("llama", "logits", False), ("llama", "logits", True), ("qwen3", "logits", True),
    ("qwen3", "hidden", False), ("llama", "hidden", True)])
def test_restricted_slot_logits_are_the_full_logits_at_the_ids(tiny_model, family, calib_target,
                                                               pack):
  """Raw and calibrated slot logits over the draft vocabulary equal the full ones at its
  ids: untied and tied heads, both calibration targets, dense and packed (CPU kernel)."""
  cfg, target = tiny_model(family)
  dcfg = drafter.DrafterConfig(num_draft_layers=1, block_size=4, calib_rank=8,
                              calib_target=calib_target)
  draft = drafter.init_draft(cfg, dcfg, target, jax.random.key(1))
  w2 = "w2h" if calib_target == "hidden" else "w2"
  draft["calib"][w2] = 0.5 * jax.random.normal(jax.random.key(2), draft["calib"][w2].shape)
  draft["calib"]["b2h" if calib_target == "hidden" else "b2"] = jax.random.normal(
      jax.random.key(3), draft["calib"]["b2h" if calib_target == "hidden" else "b2"].shape)
  ids = np.array([0, 3, 17, 50, 99, 100])
  h = jax.random.normal(jax.random.key(4), (2, 3, cfg.hidden_size))
  bonus = jnp.array([[1, 5, 7], [9, 11, 13]])
  if pack and not model_lib.cpu_matmul.enabled():
    pytest.skip("the CPU matmul kernel is not built")
  full = {"target": model_lib.decoding_params(target, False, pack=pack),
          "draft": drafter.decoding_draft(draft, False, pack=pack)}
  sub = {"target": full["target"],
         "draft": drafter.decoding_draft(drafter.restrict_vocab(draft, target, cfg, ids), False,
                                         pack=pack)}
  assert ("packed" in sub["draft"]["vocab"]["head"]) == pack
  for b in (None, bonus):
    np.testing.assert_allclose(drafter.slot_logits(sub, cfg, h, b),
                               drafter.slot_logits(full, cfg, h, b)[..., ids],
                               rtol=1e-5, atol=1e-5)


def test_restrict_vocab_before_packing_only(tiny_model):
  cfg, target = tiny_model("llama")
  draft = drafter.decoding_draft(drafter.init_draft(cfg, DCFG, target, jax.random.key(0)), False,
                                 pack=True)
  if "w2" in draft["calib"]:
    pytest.skip("the CPU matmul kernel is not built: nothing was packed")
  with pytest.raises(ValueError, match="before decoding_draft"):
    drafter.restrict_vocab(draft, target, cfg, np.arange(5))


def test_token_counts_file(tmp_path):
  counts = np.array([3, 0, 9, 1])
  path = checkpoint.save_token_counts(tmp_path, counts)
  assert path.name == checkpoint.TOKEN_COUNTS_FILE and path.is_file()
  assert not list(tmp_path.glob("*.tmp*"))
  np.testing.assert_array_equal(checkpoint.load_token_counts(tmp_path, 4), counts)
  assert checkpoint.load_token_counts(tmp_path / "none", 4) is None
  with pytest.raises(checkpoint.DrafterFileError, match="this target has 5 tokens"):
    checkpoint.load_token_counts(tmp_path, 5)
  path.write_bytes(b"not an npz")
  with pytest.raises(checkpoint.DrafterFileError, match="corrupt"):
    checkpoint.load_token_counts(tmp_path, 4)


def test_with_draft_vocab(tmp_path, tiny_model):
  """The Engine's and the bench's resolution: counts beside the drafter give the default
  size (at least 256: all 101 tokens here, so no restriction) or the asked one; no counts and a
  size is an error that says how to make them."""
  cfg, target = tiny_model("llama")
  draft = drafter.init_draft(cfg, DCFG, target, jax.random.key(0))
  out, n = engine.with_draft_vocab(draft, target, cfg, tmp_path, None)
  assert n == 0 and "vocab" not in out
  with pytest.raises(ValueError, match="python -m flexdraft_jax.data token_counts"):
    engine.with_draft_vocab(draft, target, cfg, tmp_path, 10)
  checkpoint.save_token_counts(tmp_path, np.arange(cfg.vocab_size))
  out, n = engine.with_draft_vocab(draft, target, cfg, tmp_path / checkpoint.META_FILE, 10)
  assert n == 10 and out["vocab"]["ids"].tolist() == list(range(91, 101))
  assert out["vocab"]["head"]["kernel"].shape == (cfg.hidden_size, 10)
  assert out["calib"]["w2"].shape == (DCFG.calib_rank, 10)
  assert engine.with_draft_vocab(draft, target, cfg, tmp_path, None)[1] == 0  # 256 > 101


def test_response_token_counts(tmp_path):
  """Counts over the responses only, equal from a dataset directory and its archive."""
  rows = [([1, 2, 3], [4, 4, 5]), ([2], [1, 6, 6, 6])]
  data.write_rows(tmp_path / "train", rows)
  counts = data.token_counts(tmp_path / "train", 8)
  np.testing.assert_array_equal(counts, [0, 1, 0, 0, 2, 1, 3, 0])
  data.write_archive(tmp_path / "a.npz", {"train": tmp_path / "train"})
  np.testing.assert_array_equal(data.token_counts(tmp_path / "a.npz", 8), counts)
  with pytest.raises(data.DatasetError, match="'heldout' split"):
    data.token_counts(tmp_path / "a.npz", 8, split="heldout")

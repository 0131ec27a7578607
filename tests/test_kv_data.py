"""Offline mode: cached clean K/V give the online step's loss and gradients; the cache is
resumable and crash-safe like tokens.bin; a missing, stale or foreign cache is a clear error."""
import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexdraft_jax import data as data_lib
from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax import kv_data
from flexdraft_jax import model as model_lib
from flexdraft_jax import training
from flexdraft_jax.model_config import ModelConfig

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=8)
DCFG = drafter_lib.DrafterConfig(num_draft_layers=2, block_size=4, calib_rank=8)
FP = "f" * 64
SEQ = 48


@pytest.fixture(autouse=True, scope="module")
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def params():
  target = model_lib.init_params(CFG, jax.random.key(1))
  draft = drafter_lib.init_draft(CFG, DCFG, target, jax.random.key(2))
  draft = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), draft)
  return target, draft


def _rows(n, seed=0):
  """(prompt, response) rows of 4..24 tokens, so several pack into one row of SEQ, and every
  fourth of 60 tokens, cut to SEQ."""
  rng = np.random.default_rng(seed)
  return [(rng.integers(1, 64, 30 if i % 4 == 1 else rng.integers(2, 12)),
           rng.integers(1, 64, 30 if i % 4 == 1 else rng.integers(2, 12))) for i in range(n)]


def _dataset(path, n=10, seed=0):
  data_lib.write_rows(path, _rows(n, seed), model="random", split="train")
  return path


_loss_and_grad = jax.jit(jax.value_and_grad(
    lambda d, t, b: training.loss_and_metrics(d, t, b, cfg=CFG, dcfg=DCFG,
                                              lcfg=training.LossConfig(slot_decay=0.9))[0]))


def test_offline_loss_and_grads_equal_online(params, tmp_path):
  target, draft = params
  ds = _dataset(tmp_path / "ds")
  meta = kv_data.build(ds, CFG, target, DCFG, FP, dtype="float32", batch_rows=3, progress=False)
  assert meta["rows"] == 10
  assert (ds / "kv.bin").stat().st_size == (data_lib.TokenDataset(ds).meta["tokens"]
                                            * kv_data.bytes_per_token(CFG, DCFG, "float32"))
  store = kv_data.KVStore(ds, CFG, DCFG, FP)
  kw = dict(seq_len=SEQ, batch_size=2, block_size=DCFG.block_size, anchors_per_seq=4, seed=0)
  online, offline = data_lib.make_iterator(ds, **kw), data_lib.make_iterator(ds, kv_store=store, **kw)
  packed = cut = False
  for _ in range(3):
    a, b = next(online), next(offline)
    assert b.keys() == a.keys() | {"kv"} and b["kv"].shape == (2, SEQ) + kv_data.record_shape(CFG, DCFG)
    for key in a:  # the same packing, cut and anchors
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    packed |= bool((a["segment_ids"].max(axis=1) > 1).any())
    cut |= bool((a["positions"] == SEQ - 1).any())
    np.testing.assert_array_equal(b["kv"][a["segment_ids"] == 0], 0)
    (la, ga), (lb, gb) = _loss_and_grad(draft, target, a), _loss_and_grad(draft, target, b)
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)  # f32 sums in another order
  assert packed and cut  # the batches covered packing and cutting
  with pytest.raises(ValueError, match="clean logits need the clean pass"):
    drafter_lib.train_outputs({"target": target, "draft": draft}, CFG, DCFG, b,
                              with_clean_logits=True)


def test_cache_resumes_after_a_crash_and_after_the_dataset_grows(params, tmp_path):
  target, _ = params
  ref = _dataset(tmp_path / "ref", n=12)
  kv_data.build(ref, CFG, target, DCFG, FP, batch_rows=1, progress=False)  # two windows
  want = (ref / "kv.bin").read_bytes()
  assert len(want) == data_lib.TokenDataset(ref).meta["tokens"] * kv_data.bytes_per_token(CFG, DCFG)

  ds = tmp_path / "ds"
  data_lib.write_rows(ds, _rows(12)[:8], model="random", split="train")
  kv_data.build(ds, CFG, target, DCFG, FP, batch_rows=3, progress=False)
  # A crash mid-batch: records written past the commit point, meta not yet rewritten.
  meta = json.loads((ds / "kv_meta.json").read_text())
  meta["rows"] = 5
  (ds / "kv_meta.json").write_text(json.dumps(meta))
  with open(ds / "kv.bin", "ab") as f:
    f.write(b"\x7f" * 1000)
  with pytest.raises(kv_data.KVCacheError, match="covers 5 of the dataset's 8 rows; rerun"):
    kv_data.KVStore(ds, CFG, DCFG, FP)
  kv_data.build(ds, CFG, target, DCFG, FP, batch_rows=3, progress=False)
  data_lib.write_rows(ds, _rows(12)[8:], model="random", split="train")  # the dataset grows
  with pytest.raises(kv_data.KVCacheError, match="covers 8 of the dataset's 12 rows"):
    kv_data.KVStore(ds, CFG, DCFG, FP)
  kv_data.build(ds, CFG, target, DCFG, FP, batch_rows=5, progress=False)
  got = (ds / "kv.bin").read_bytes()
  assert len(got) == len(want)  # other batch shapes: equal up to f32 summation order in bf16
  as_f32 = lambda b: np.frombuffer(b, jnp.bfloat16).astype(np.float32)
  np.testing.assert_allclose(as_f32(got), as_f32(want), rtol=2e-2, atol=1e-3)
  kv_data.KVStore(ds, CFG, DCFG, FP)  # complete


def test_missing_foreign_and_oversized_caches_are_one_line_errors(params, tmp_path, monkeypatch):
  target, _ = params
  ds = _dataset(tmp_path / "ds", n=4)
  with pytest.raises(kv_data.KVCacheError, match=r"no cached K/V .*python train.py --mode=cache_kv"):
    kv_data.KVStore(ds, CFG, DCFG, FP)
  kv_data.build(ds, CFG, target, DCFG, FP, progress=False)
  other_k = drafter_lib.DrafterConfig(num_draft_layers=3, block_size=4, calib_rank=8)
  for call in (lambda: kv_data.KVStore(ds, CFG, other_k, FP),
               lambda: kv_data.build(ds, CFG, target, other_k, FP, progress=False)):
    with pytest.raises(kv_data.KVCacheError, match=r"built for num_draft_layers=2 \(this run: "
                                                   r"num_draft_layers=3\); delete kv.bin"):
      call()
  with pytest.raises(kv_data.KVCacheError, match=r"built for fingerprint=ffffffffffff\.\. \(this run: "
                                                 r"fingerprint=000000000000\.\.\)"):
    kv_data.KVStore(ds, CFG, DCFG, "0" * 64)
  with pytest.raises(kv_data.KVCacheError, match="built for dtype=bfloat16"):
    kv_data.build(ds, CFG, target, DCFG, FP, dtype="float32", progress=False)
  with pytest.raises(ValueError, match="dtype must be one of"):
    kv_data.build(ds, CFG, target, DCFG, FP, dtype="float16", progress=False)
  fresh = _dataset(tmp_path / "fresh", n=4)
  usage = collections.namedtuple("usage", "total used free")
  monkeypatch.setattr(kv_data.shutil, "disk_usage", lambda _: usage(1, 1, 1000))
  with pytest.raises(kv_data.KVCacheError, match=r"needs 0\.\d\d GiB more \(128 bytes per token x "
                                                 r"\d+ tokens\) but the disk has 0\.00 GiB free"):
    kv_data.build(fresh, CFG, target, DCFG, FP, progress=False)
  assert not (fresh / "kv_meta.json").exists()

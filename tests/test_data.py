"""Token datasets: building from SmolLM2, resuming, crash safety, and the grain pipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flexdraft_jax import data, prompts, resources

MAX_PROMPT = 64  # skips some of the first ShareGPT prompts; the rest share one compiled width
PIPE = dict(seq_len=32, batch_size=4, block_size=4, anchors_per_seq=3, seed=0)


@pytest.fixture(scope="module")
def engine():
  from flexdraft_jax.engine import Engine
  return Engine(resources.SMOLLM2_NAME)


def _rows(ds):
  return [ds[i] for i in range(len(ds))]


def test_build_self_resume_and_mismatch(engine, tmp_path, monkeypatch):
  calls, generate = [], engine.generate
  monkeypatch.setattr(engine, "generate",
                      lambda ps, **kw: calls.append(list(ps)) or generate(ps, **kw))
  kw = dict(max_prompt_len=MAX_PROMPT, max_response_len=8, batch_size=4, engine=engine,
            progress=False)
  ps = prompts.sharegpt("train", 8)
  kept = [p for p in ps if len(engine.encode(p)) <= MAX_PROMPT]
  first = [p for p in ps[:4] if p in kept]
  assert 0 < len(first) < 4 and len(kept) > len(first)

  meta = data.build_dataset(tmp_path, num_prompts=4, **kw)
  assert (meta["rows"], meta["skipped"], meta["prompts_done"]) == (len(first), 4 - len(first), 4)
  assert calls == [first]
  before = _rows(data.TokenDataset(tmp_path))

  meta = data.build_dataset(tmp_path, num_prompts=8, **kw)  # resumes: only the new prompts
  assert calls == [first, kept[len(first):]]
  assert (meta["rows"], meta["skipped"], meta["prompts_done"]) == (len(kept), 8 - len(kept), 8)
  assert {k: meta[k] for k in ("model", "split", "responses", "max_prompt_len", "max_response_len",
                               "vocab_size", "fingerprint")} == {
      "model": resources.SMOLLM2_NAME, "split": "train", "responses": "self",
      "max_prompt_len": MAX_PROMPT, "max_response_len": 8,
      "vocab_size": engine.cfg.vocab_size, "fingerprint": None}
  ds = data.TokenDataset(tmp_path)
  assert len(ds) == len(kept)
  want, _ = generate(kept, max_new_tokens=8, batch_size=4)
  for i, (prompt, completion) in enumerate(zip(kept, want)):
    ids, row = engine.encode(prompt), ds[i]
    assert 1 <= len(completion.token_ids) <= 8
    np.testing.assert_array_equal(row["tokens"], ids + completion.token_ids)
    np.testing.assert_array_equal(row["loss_mask"], np.arange(len(row["tokens"])) >= len(ids))
  for old, new in zip(before, ds):
    np.testing.assert_array_equal(old["tokens"], new["tokens"])
  assert meta["tokens"] == sum(len(r["tokens"]) for r in _rows(ds))

  assert data.build_dataset(tmp_path, num_prompts=8, **kw) == meta  # nothing left to do
  assert len(calls) == 2
  with pytest.raises(ValueError, match="max_response_len=8, .* max_response_len=16"):
    data.build_dataset(tmp_path, num_prompts=9, **{**kw, "max_response_len": 16})
  with pytest.raises(ValueError, match="split='train', .* split='heldout'"):
    data.build_dataset(tmp_path, num_prompts=9, split="heldout", **kw)
  with pytest.raises(ValueError, match="fingerprint=None, .* fingerprint='abc'"):
    data.build_dataset(tmp_path, num_prompts=9, fingerprint="abc", **kw)
  with pytest.raises(ValueError, match="responses must be one of"):
    data.build_dataset(tmp_path, responses="teacher", **kw)
  assert len(calls) == 2


def test_build_original_responses(engine, tmp_path):
  meta = data.build_dataset(tmp_path, num_prompts=4, responses="original",
                            max_prompt_len=MAX_PROMPT, max_response_len=80, batch_size=4,
                            engine=engine, progress=False)
  tok = engine.tokenizer
  pairs = [(p, r) for p, r in prompts.sharegpt_pairs("train", 4)
           if len(engine.encode(p)) <= MAX_PROMPT and r is not None]
  assert meta["responses"] == "original" and meta["rows"] == len(pairs) > 0
  replies = [tok.encode(r, add_special_tokens=False) for _, r in pairs]
  assert {len(r) > 79 for r in replies} == {True, False}  # one is cut, one is whole
  eot = tok.convert_tokens_to_ids("<|im_end|>")
  ds = data.TokenDataset(tmp_path)
  for i, ((prompt, _), reply) in enumerate(zip(pairs, replies)):
    np.testing.assert_array_equal(ds[i]["tokens"], engine.encode(prompt) + reply[:79] + [eot])


def test_sharegpt_pairs_match_prompts():
  pairs = prompts.sharegpt_pairs("heldout")
  assert [p for p, _ in pairs] == prompts.sharegpt("heldout")
  assert all(r is None or r.strip() for _, r in pairs)
  assert sum(r is not None for _, r in pairs) > 0.9 * len(pairs)


# ----------------------------------------------------------------------------
# Storage: write_rows / TokenDataset
# ----------------------------------------------------------------------------
def _synthetic(n: int, seed: int = 0):
  """Rows whose tokens are 1000 * row + position, so packed pieces name their row."""
  rng = np.random.default_rng(seed)
  lens = zip(rng.integers(1, 10, n), rng.integers(0, 14, n))
  return [(1000 * i + np.arange(p), 1000 * i + p + np.arange(r)) for i, (p, r) in enumerate(lens)]


def _check_rows(ds, rows):
  assert len(ds) == len(rows)
  for i, (prompt, response) in enumerate(rows):
    np.testing.assert_array_equal(ds[i]["tokens"], np.concatenate([prompt, response]))
    assert ds[i]["tokens"].dtype == np.int32
    np.testing.assert_array_equal(ds[i]["loss_mask"],
                                  [False] * len(prompt) + [True] * len(response))


def test_write_read_and_recover_from_a_crash(tmp_path):
  rows = _synthetic(10)
  data.write_rows(tmp_path, rows[:6], skipped=2, model="m")
  # A crash mid-commit: tokens and index rows past meta.json's count, and a torn index row.
  with open(tmp_path / "tokens.bin", "ab") as f:
    f.write(np.arange(50, dtype="<i4").tobytes())
  with open(tmp_path / "index.bin", "ab") as f:
    f.write(np.array([[0, 1, 1], [9999, 5, 5]], "<i8").tobytes() + b"\x01\x02")
  _check_rows(data.TokenDataset(tmp_path), rows[:6])  # readers ignore the uncommitted tail
  meta = data.write_rows(tmp_path, rows[6:], model="m")  # writers cut it off
  _check_rows(data.TokenDataset(tmp_path), rows)
  num_tokens = sum(len(p) + len(r) for p, r in rows)
  assert (tmp_path / "tokens.bin").stat().st_size == 4 * num_tokens
  assert (tmp_path / "index.bin").stat().st_size == 24 * len(rows)
  assert meta == {"model": "m", "rows": 10, "prompts_done": 12, "skipped": 2, "tokens": num_tokens}
  assert json.loads((tmp_path / "meta.json").read_text()) == meta
  with pytest.raises(ValueError, match="model='m', .* model='other'"):
    data.write_rows(tmp_path, rows, model="other")


def _truncate_tokens(path):
  with open(path / "tokens.bin", "ab") as f:
    f.truncate(8)


def _negative_length(path):
  index = np.fromfile(path / "index.bin", "<i8").reshape(-1, 3)
  index[1, 2] = -3
  index.tofile(path / "index.bin")


def test_archive_round_trip_and_errors(tmp_path):
  """write_archive / extract_archive: same rows and meta back; a resumed write appends to it."""
  train, heldout = _synthetic(9), _synthetic(3, seed=1)
  data.write_rows(tmp_path / "train", train, skipped=1, model="m")
  data.write_rows(tmp_path / "heldout", heldout, model="m")
  with open(tmp_path / "train" / "tokens.bin", "ab") as f:  # an uncommitted tail stays out
    f.write(np.arange(7, dtype="<i4").tobytes())
  metas = data.write_archive(tmp_path / "a.npz", {"train": tmp_path / "train",
                                                  "heldout": tmp_path / "heldout"})
  with np.load(tmp_path / "a.npz") as archive:
    assert archive["train_tokens"].dtype == np.uint16
  for split, rows in (("train", train), ("heldout", heldout)):
    meta = data.extract_archive(tmp_path / "a.npz", split, tmp_path / "x" / split)
    assert meta == metas[split] == data.TokenDataset(tmp_path / split).meta
    _check_rows(data.TokenDataset(tmp_path / "x" / split), rows)
  more = _synthetic(2, seed=2)
  assert data.write_rows(tmp_path / "x" / "train", more, model="m")["prompts_done"] == 12
  _check_rows(data.TokenDataset(tmp_path / "x" / "train"), train + more)

  with pytest.raises(data.DatasetError, match="already holds a dataset"):
    data.extract_archive(tmp_path / "a.npz", "train", tmp_path / "x" / "train")
  with pytest.raises(data.DatasetError, match="no 'eval' split"):
    data.extract_archive(tmp_path / "a.npz", "eval", tmp_path / "y")
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  with pytest.raises(data.DatasetError, match="not a dataset archive"):
    data.extract_archive(tmp_path / "bad.npz", "train", tmp_path / "z")
  data.write_rows(tmp_path / "big", [([70000], [1, 2])])
  with pytest.raises(data.DatasetError, match="do not fit"):
    data.write_archive(tmp_path / "b.npz", {"train": tmp_path / "big"})


@pytest.mark.parametrize("corrupt, match", [
    (_truncate_tokens, r"index.bin: row 0 ends past the 2 tokens of tokens.bin"),
    (_negative_length, r"index.bin: row 1 has a negative offset or length"),
    (lambda p: (p / "meta.json").write_text("{rows: 3"), r"meta.json: unreadable"),
    (lambda p: (p / "meta.json").write_text('{"rows": -1}'), r"meta.json: expected .* 'rows'"),
    (lambda p: (p / "meta.json").unlink(), r"no meta.json"),
    (lambda p: (p / "index.bin").unlink(), r"missing index.bin"),
    (lambda p: (p / "index.bin").write_bytes(b"\0" * 30), r"fewer than the 3 rows"),
])
def test_malformed_datasets(tmp_path, corrupt, match):
  data.write_rows(tmp_path, _synthetic(3))
  corrupt(tmp_path)
  with pytest.raises(data.DatasetError, match=match) as e:
    data.TokenDataset(tmp_path)
  assert str(tmp_path) in str(e.value)


def test_missing_and_empty_datasets(tmp_path):
  with pytest.raises(data.DatasetError, match="nope: no such dataset directory"):
    data.TokenDataset(tmp_path / "nope")
  data.write_rows(tmp_path, [])
  with pytest.raises(data.DatasetError, match="the dataset is empty"):
    data.TokenDataset(tmp_path)


# ----------------------------------------------------------------------------
# grain pipeline
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rows():
  return _synthetic(60)


@pytest.fixture(scope="module")
def dataset(rows, tmp_path_factory):
  path = tmp_path_factory.mktemp("synthetic")
  data.write_rows(path, rows)
  return path


def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("num", [3, 32])  # 32: every valid position, then -1 fill
def test_packed_batches(dataset, rows, num):
  seq_len = PIPE["seq_len"]
  batches = list(data.make_iterator(dataset, **{**PIPE, "anchors_per_seq": num}, num_epochs=1))
  seen = []
  for batch in batches:
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        "tokens": (np.int32, (4, seq_len)), "segment_ids": (np.int32, (4, seq_len)),
        "positions": (np.int32, (4, seq_len)), "loss_mask": (bool, (4, seq_len)),
        "anchors": (np.int32, (4, num))}
    for b in range(4):
      seg, pos, tok, mask = (batch[k][b]
                             for k in ("segment_ids", "positions", "tokens", "loss_mask"))
      pad = seg == 0
      assert not tok[pad].any() and not mask[pad].any() and not pos[pad].any()
      for s in np.unique(seg[~pad]):
        (where,) = np.nonzero(seg == s)
        np.testing.assert_array_equal(where, np.arange(where[0], where[-1] + 1))
        np.testing.assert_array_equal(pos[where], np.arange(len(where)))
        prompt, response = rows[tok[where[0]] // 1000]
        want = np.concatenate([prompt, response])[:seq_len]
        np.testing.assert_array_equal(tok[where], want)
        np.testing.assert_array_equal(mask[where], np.arange(len(want)) >= len(prompt))
        seen.append(tok[where[0]] // 1000)
      valid = np.flatnonzero((seg[:-1] == seg[1:]) & (seg[1:] > 0) & mask[1:])
      anchors = batch["anchors"][b]
      k = min(num, len(valid))
      assert (anchors[k:] == -1).all() and (np.diff(anchors[:k]) > 0).all()
      assert set(anchors[:k]) <= set(valid) if k < len(valid) else set(anchors[:k]) == set(valid)
  learnable = {i for i, (p, r) in enumerate(rows) if len(r) and len(p) < seq_len}
  assert len(seen) == len(set(seen)) and set(seen) <= learnable
  # What is missing is the last partial batch of bins, dropped.
  assert sum(min(seq_len, len(p) + len(r)) for i, (p, r) in enumerate(rows)
             if i in learnable - set(seen)) <= 3 * seq_len
  assert any((b["anchors"] == -1).any() for b in batches) == (num == 32)
  assert any((b["segment_ids"].max(axis=1) > 1).any() for b in batches)  # packing happens


def test_deterministic_and_seeded(dataset):
  a = _take(data.make_iterator(dataset, **PIPE), 6)
  b = _take(data.make_iterator(dataset, **PIPE), 6)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  c = _take(data.make_iterator(dataset, **{**PIPE, "seed": 1}), 6)
  assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


def test_state_round_trip(dataset):
  it = data.make_iterator(dataset, **PIPE)
  _take(it, 20)  # past the 60-row epoch: restoring needs the epoch and the RNG counters
  state = json.loads(json.dumps(it.get_state()))
  want = _take(it, 5)
  restored = data.make_iterator(dataset, **PIPE)
  restored.set_state(state)
  for x, y in zip(want, _take(restored, 5)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_orbax_checkpoint_args(dataset, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  it = data.make_iterator(dataset, **PIPE)
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(3, args=ocp.args.Composite(data=data.grain_checkpoint_args(it)))
    manager.wait_until_finished()
    restored = data.make_iterator(dataset, **PIPE)
    manager.restore(3, args=ocp.args.Composite(
        data=data.grain_checkpoint_args(restored, restore=True)))
  np.testing.assert_array_equal(next(it)["tokens"], next(restored)["tokens"])


def test_shards_are_disjoint(dataset):
  shards = [{int(t) // 1000 for batch in data.make_iterator(dataset, **PIPE, shard_index=i,
                                                            shard_count=2, num_epochs=1)
             for t in batch["tokens"][batch["segment_ids"] > 0]} for i in range(2)]
  assert shards[0] and shards[1] and not shards[0] & shards[1]
  assert {r % 2 for r in shards[0]} == {0} and {r % 2 for r in shards[1]} == {1}


@pytest.mark.parametrize("overrides, match", [
    ({"seq_len": 4}, r"seq_len=4 must be at least block_size \+ 1 \(block_size=4\)"),
    ({"block_size": 1}, r"block_size must be >= 2"),
    ({"anchors_per_seq": 0}, r"anchors_per_seq and batch_size must be >= 1"),
    ({"shard_index": 2, "shard_count": 2}, r"shard_index=2 is not in \[0, shard_count=2\)"),
])
def test_bad_pipeline_args(dataset, overrides, match):
  with pytest.raises(ValueError, match=match):
    data.make_iterator(dataset, **{**PIPE, **overrides})

"""Training data: (prompt, response) token rows on disk, and the grain pipeline over them.

A dataset is a directory, appended to one batch of rows at a time:

  tokens.bin  int32, each row's prompt tokens then its response tokens
  index.bin   int64 [n, 3], one (offset, prompt_len, response_len) per row
  meta.json   config (model, split, responses, max lengths, vocab size) and counts

Each batch writes and flushes its tokens, then its index rows, then rewrites
meta.json atomically; meta.json's `rows` is the commit point. Readers ignore
anything past it, and a writer cuts it off before appending, so a crash costs
at most the batch in flight, and rerunning `build_dataset` resumes after it.

`write_archive` / `extract_archive` turn built datasets into one compressed .npz
(uint16 tokens) and back, so a built dataset can ship with the code.

`make_iterator` reads a dataset with grain: shuffle, pack rows into fixed-width
sequences, sample anchor positions, batch; its state round-trips exactly.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import sys
import time
import zipfile
import zlib
from collections.abc import Iterable, Sequence

import grain
import numpy as np
import tqdm

from flexdraft_jax import cli
from flexdraft_jax import prompts as prompts_lib
from flexdraft_jax import resources
from flexdraft_jax import tokenizer as tokenizer_lib
from flexdraft_jax.engine import Engine

RESPONSE_MODES = ("self", "original")
_TOKENS, _INDEX, _META = "tokens.bin", "index.bin", "meta.json"
_ROW_BYTES = 3 * 8  # one index row: int64 (offset, prompt_len, response_len)
# What np.load raises for a file that is not a whole .npz: missing, truncated, corrupt.
_NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error)


class DatasetError(cli.UserError, ValueError):
  """A token dataset directory (or archive) that is missing, empty or malformed."""


# ----------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------
def _read_meta(path: pathlib.Path) -> dict:
  try:
    meta = json.loads((path / _META).read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise DatasetError(f"{path}: no {_META} (not a token dataset, or nothing committed)") from None
  except (OSError, ValueError) as e:
    raise DatasetError(f"{path / _META}: unreadable ({e})") from None
  if not isinstance(meta, dict) or not isinstance(meta.get("rows"), int) or meta["rows"] < 0:
    raise DatasetError(f"{path / _META}: expected an object with a row count 'rows'")
  return meta


def _committed_index(path: pathlib.Path, meta: dict) -> np.ndarray:
  """The [rows, 3] index rows meta.json commits, checked against tokens.bin."""
  for name in (_TOKENS, _INDEX):
    if not (path / name).is_file():
      raise DatasetError(f"{path}: missing {name}")
  rows = meta["rows"]
  if (path / _INDEX).stat().st_size < rows * _ROW_BYTES:
    raise DatasetError(f"{path / _INDEX}: holds fewer than the {rows} rows {_META} commits")
  index = np.fromfile(path / _INDEX, dtype="<i8", count=3 * rows).reshape(rows, 3)
  if (bad := np.flatnonzero((index < 0).any(axis=1))).size:
    raise DatasetError(f"{path / _INDEX}: row {bad[0]} has a negative offset or length")
  num_tokens = (path / _TOKENS).stat().st_size // 4
  if (bad := np.flatnonzero(index.sum(axis=1) > num_tokens)).size:
    raise DatasetError(f"{path / _INDEX}: row {bad[0]} ends past the {num_tokens} tokens of "
                       f"{_TOKENS}")
  return index


def write_json_atomic(path: pathlib.Path, obj: dict) -> None:
  """Writes `obj` to `path` through a temporary file and a rename (a commit point)."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
  os.replace(tmp, path)


def _append(path: pathlib.Path, array: np.ndarray) -> None:
  with open(path, "ab") as f:
    f.write(array.tobytes())
    f.flush()
    os.fsync(f.fileno())


def _open_for_append(out: pathlib.Path, config: dict) -> tuple[dict, int]:
  """(meta, committed token count) of `out`, created if new; uncommitted bytes are cut off.

  Config fields are recorded when first given and must match afterwards.
  """
  if (out / _META).exists():
    meta = _read_meta(out)
    for key, value in config.items():
      if key in meta and meta[key] != value:
        raise ValueError(f"{out}: the dataset was built with {key}={meta[key]!r}, this run asks "
                         f"for {key}={value!r}; use matching arguments or another out_dir")
    index = _committed_index(out, meta)
  else:
    out.mkdir(parents=True, exist_ok=True)
    meta, index = {"rows": 0, "prompts_done": 0, "skipped": 0, "tokens": 0}, np.zeros((0, 3))
  end = int(index.sum(axis=1).max(initial=0))
  for name, size in ((_TOKENS, 4 * end), (_INDEX, _ROW_BYTES * len(index))):
    with open(out / name, "ab") as f:
      f.truncate(size)
  return {**config, **meta}, end


def write_rows(out_dir: str | pathlib.Path, rows: Iterable[tuple[Sequence[int], Sequence[int]]],
               *, skipped: int = 0, **config) -> dict:
  """Appends `(prompt_ids, response_ids)` rows to the dataset in `out_dir` and commits them.

  `skipped` counts prompts consumed without a row, so that `prompts_done` =
  rows + skipped is where a resumed build continues. `config` fields (model,
  split, ...) are recorded in meta.json, or checked against it (ValueError
  naming the field). Returns the committed meta.
  """
  out = pathlib.Path(out_dir)
  meta, end = _open_for_append(out, config)
  parts = [np.asarray(x, dtype="<i4").reshape(-1) for row in rows for x in row]
  lens = np.array([len(x) for x in parts], np.int64).reshape(-1, 2)  # [n, (prompt, response)]
  ends = end + np.cumsum(lens.sum(axis=1))
  _append(out / _TOKENS, np.concatenate([np.zeros(0, "<i4"), *parts]))
  _append(out / _INDEX, np.column_stack([ends - lens.sum(axis=1), lens]).astype("<i8"))
  meta["rows"] += len(lens)
  meta["skipped"] += skipped
  meta["prompts_done"] = meta["rows"] + meta["skipped"]
  meta["tokens"] = int(ends[-1]) if len(ends) else end
  write_json_atomic(out / _META, meta)
  return meta


class TokenDataset:
  """Random access to a dataset's rows: `{'tokens': int32[n], 'loss_mask': bool[n]}`.

  `loss_mask` is True on the response tokens; the prompt is context. With
  `with_offsets`, rows also carry `token_offsets` int64[n]: each token's index
  in tokens.bin plus one (0 stays free for packing's padding), the key into an
  offline K/V cache (`kv_data`).
  """

  def __init__(self, path: str | pathlib.Path, with_offsets: bool = False):
    self.path = pathlib.Path(path)
    self.with_offsets = with_offsets
    if not self.path.is_dir():
      raise DatasetError(f"{self.path}: no such dataset directory")
    self.meta = _read_meta(self.path)
    self._index = _committed_index(self.path, self.meta)
    if not len(self._index):
      raise DatasetError(f"{self.path}: the dataset is empty (0 rows)")
    self._tokens = np.memmap(self.path / _TOKENS, dtype="<i4", mode="r")

  def __len__(self) -> int:
    return len(self._index)

  def response_token_counts(self, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in the responses, [vocab_size] int64 (what a drafter
    trained on this data learns to predict; `drafter.vocab_ids` ranks by it)."""
    return response_token_counts(self._tokens, self._index, vocab_size)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    offset, prompt_len, response_len = self._index[i]
    tokens = np.array(self._tokens[offset:offset + prompt_len + response_len], np.int32)
    row = {"tokens": tokens, "loss_mask": np.arange(len(tokens)) >= prompt_len}
    if self.with_offsets:
      row["token_offsets"] = np.arange(offset + 1, offset + 1 + len(tokens), dtype=np.int64)
    return row


def response_token_counts(tokens, index, vocab_size: int) -> np.ndarray:
  """Token counts [vocab_size] over the response spans of `index` rows (offset, prompt_len,
  response_len) of `tokens`."""
  index = np.asarray(index, np.int64).reshape(-1, 3)
  end = int(index.sum(axis=1).max(initial=0))
  starts = index[:, 0] + index[:, 1]
  edges = np.zeros(end + 1, np.int64)  # +1 where a response starts, -1 where it ends
  np.add.at(edges, starts, 1)
  np.add.at(edges, starts + index[:, 2], -1)
  response = np.cumsum(edges[:-1]) > 0
  return np.bincount(np.asarray(tokens[:end], np.int64)[response],
                     minlength=vocab_size)[:vocab_size].astype(np.int64)


def token_counts(source: str | pathlib.Path, vocab_size: int, split: str = "train") -> np.ndarray:
  """Response token counts of a dataset directory, or of split `split` of an archive."""
  source = pathlib.Path(source)
  if source.suffix != ".npz":
    return TokenDataset(source).response_token_counts(vocab_size)
  if not source.is_file():
    raise DatasetError(f"{source}: {'is a directory' if source.is_dir() else 'does not exist'}"
                       ", not a dataset archive")
  try:
    with np.load(source) as archive:
      tokens, index = archive[f"{split}_tokens"], archive[f"{split}_index"]
  except _NPZ_ERRORS as e:
    raise DatasetError(f"{source}: not a dataset archive with a {split!r} split "
                       f"({type(e).__name__}: {e})") from None
  return response_token_counts(tokens, index, vocab_size)


# ----------------------------------------------------------------------------
# Archives: built datasets in one compressed file, to ship them with the code
# ----------------------------------------------------------------------------
def write_archive(path: str | pathlib.Path, dirs: dict[str, str | pathlib.Path]) -> dict:
  """Writes the committed rows of each `{split: dataset dir}` to one .npz (tokens as uint16).

  Returns `{split: meta}`. DatasetError when a token id does not fit in 16 bits, or `path`
  cannot be written (checked before any dataset is read).
  """
  out = pathlib.Path(path)
  if out.is_dir():
    raise DatasetError(f"{out} is a directory; give the archive's file name (OUT.npz)")
  if not out.parent.is_dir():
    raise DatasetError(f"{out}: the folder {out.parent} does not exist")
  if not os.access(out.parent, os.W_OK):
    raise DatasetError(f"{out}: the folder {out.parent} is not writable")
  arrays, metas = {}, {}
  for split, directory in dirs.items():
    ds = TokenDataset(directory)
    end = int(ds._index.sum(axis=1).max())
    tokens = np.asarray(ds._tokens[:end])
    if tokens.min(initial=0) < 0 or tokens.max(initial=0) > np.iinfo(np.uint16).max:
      raise DatasetError(f"{directory}: token ids outside [0, 65535] do not fit an archive")
    arrays[f"{split}_tokens"] = tokens.astype("<u2")
    arrays[f"{split}_index"] = ds._index.astype("<i8")
    arrays[f"{split}_meta"] = np.frombuffer(json.dumps(ds.meta).encode(), np.uint8)
    metas[split] = ds.meta
  tmp = pathlib.Path(f"{path}.tmp.npz")
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)
  return metas


def extract_archive(path: str | pathlib.Path, split: str, out_dir: str | pathlib.Path) -> dict:
  """Writes split `split` of the archive at `path` as a dataset in `out_dir` (which must not
  hold one yet); meta.json is written last, so a crash leaves nothing committed."""
  out = pathlib.Path(out_dir)
  if (out / _META).exists():
    raise DatasetError(f"{out} already holds a dataset; extract into an empty directory")
  if not pathlib.Path(path).is_file():
    raise DatasetError(f"{path}: {'is a directory' if pathlib.Path(path).is_dir() else 'does not exist'}"
                       ", not a dataset archive")
  try:
    with np.load(path) as archive:
      if f"{split}_meta" not in archive:
        raise DatasetError(f"{path} has no {split!r} split (it has "
                           f"{sorted(k[:-5] for k in archive if k.endswith('_meta'))})")
      meta = json.loads(archive[f"{split}_meta"].tobytes())
      tokens, index = archive[f"{split}_tokens"], archive[f"{split}_index"]
  except _NPZ_ERRORS as e:  # truncated, corrupt or not an npz
    raise DatasetError(f"{path}: not a dataset archive ({type(e).__name__}: {e})") from None
  if not isinstance(meta, dict) or not isinstance(meta.get("rows"), int):
    raise DatasetError(f"{path}: the {split!r} split's meta is not a dataset's")
  out.mkdir(parents=True, exist_ok=True)
  for name, array in ((_TOKENS, tokens.astype("<i4")), (_INDEX, index.astype("<i8"))):
    with open(out / name, "wb") as f:
      f.write(array.tobytes())
  write_json_atomic(out / _META, meta)
  _committed_index(out, meta)  # the same checks as a built dataset
  return meta


# ----------------------------------------------------------------------------
# Building from ShareGPT
# ----------------------------------------------------------------------------
def _end_of_turn_id(tokenizer) -> int:
  """The stop token with which the chat template closes an assistant turn."""
  text = tokenizer.apply_chat_template([{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a"}], tokenize=False)
  stops = set(tokenizer_lib.stop_token_ids(tokenizer))
  eot = next((i for i in reversed(tokenizer.encode(text, add_special_tokens=False))
              if i in stops), None)
  if eot is None:
    raise ValueError(f"the chat template of {tokenizer.name_or_path!r} closes an assistant turn "
                     "with none of the stop tokens")
  return eot


def build_dataset(out_dir: str | pathlib.Path, *, model: str = resources.SMOLLM2_NAME,
                  split: str = "train", num_prompts: int | None = None, max_prompt_len: int = 256,
                  max_response_len: int = 256, batch_size: int = 16, responses: str = "self",
                  dtype: str | None = None, fingerprint: str | None = None,
                  engine: Engine | None = None, progress: bool = True) -> dict:
  """Writes the dataset of the first `num_prompts` ShareGPT `split` prompts, or resumes it.

  Prompts are first user turns in the chat template; ones over `max_prompt_len`
  tokens are skipped (and counted). Responses:
    "self":     the target's greedy reply, up to `max_response_len` tokens (the
                last is its stop token if it stopped).
    "original": ShareGPT's first reply, cut to `max_response_len - 1` tokens and
                closed with the template's end-of-turn token; prompts without a
                reply are skipped.
  `engine` reuses a loaded `Engine(model)` (e.g. for train and held-out sets).
  Returns the final meta.
  """
  if responses not in RESPONSE_MODES:
    raise ValueError(f"responses must be one of {RESPONSE_MODES}, got {responses!r}")
  if min(max_prompt_len, max_response_len, batch_size) < 1:
    raise ValueError("max_prompt_len, max_response_len and batch_size must be >= 1")
  pairs = prompts_lib.sharegpt_pairs(split, num_prompts)
  out = pathlib.Path(out_dir)
  config = dict(model=str(model), fingerprint=fingerprint, split=split, responses=responses,
                max_prompt_len=max_prompt_len, max_response_len=max_response_len)
  meta = write_rows(out, [], **config)  # checks out_dir before the model loads
  todo = pairs[meta["prompts_done"]:]
  if not todo:
    return meta
  engine = engine or Engine(model, dtype=dtype)
  config["vocab_size"] = engine.cfg.vocab_size
  eot = _end_of_turn_id(engine.tokenizer) if responses == "original" else None
  start, new_tokens = time.perf_counter(), 0
  batch, skipped = [], 0
  with tqdm.tqdm(total=len(pairs), initial=meta["prompts_done"], unit="prompt", file=sys.stderr,
                 disable=not progress) as bar:
    for n, (prompt, reply) in enumerate(todo, 1):
      ids = engine.encode(prompt)
      if len(ids) > max_prompt_len or (responses == "original" and reply is None):
        skipped += 1
      else:
        batch.append((prompt, ids, reply))
      if len(batch) < batch_size and n < len(todo):
        continue
      replies = []
      if responses == "original":
        replies = [engine.tokenizer.encode(r, add_special_tokens=False)[:max_response_len - 1]
                   + [eot] for _, _, r in batch]
      elif batch:
        # One prompt bucket (max_prompt_len) keeps it to one compile for the whole build.
        completions, _ = engine.generate([p for p, _, _ in batch], max_new_tokens=max_response_len,
                                         batch_size=batch_size, prompt_bucket=max_prompt_len)
        replies = [c.token_ids for c in completions]
      meta = write_rows(out, [(ids, r) for (_, ids, _), r in zip(batch, replies)],
                        skipped=skipped, **config)
      new_tokens += sum(len(r) for r in replies)
      bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.1f}", refresh=False)
      bar.update(len(batch) + skipped)
      batch, skipped = [], 0
  if progress:
    print(f"{out}: {meta['rows']} rows, {meta['tokens']} tokens, {meta['skipped']} prompts "
          f"skipped; {new_tokens} response tokens in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)
  return meta


# ----------------------------------------------------------------------------
# grain pipeline
# ----------------------------------------------------------------------------
def _truncate(example: dict, *, seq_len: int) -> dict:
  return {k: v[:seq_len] for k, v in example.items()}


def _has_targets(example: dict) -> bool:
  """Whether some token after the first is a loss token (so an anchor exists)."""
  return bool(example["loss_mask"][1:].any())


def _unpack_names(row: dict) -> dict:
  out = {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"],
         "positions": row["tokens_positions"], "loss_mask": row["loss_mask"]}
  if "token_offsets" in row:  # back to tokens.bin indices; padding -> -1
    out["token_offsets"] = row["token_offsets"] - 1
  return out


def _with_anchors(row: dict, rng: np.random.Generator, *, num: int) -> dict:
  """Adds `anchors` [num]: distinct sorted a with a+1 a loss token of a's segment; -1 fill."""
  seg, mask = row["segment_ids"], row["loss_mask"]
  valid = np.flatnonzero((seg[:-1] == seg[1:]) & mask[1:])  # padding is never in loss_mask
  k = min(num, len(valid))
  anchors = np.full(num, -1, np.int32)
  anchors[:k] = np.sort(rng.choice(valid, k, replace=False))
  return {**row, "anchors": anchors}


def make_iterator(path: str | pathlib.Path, *, seq_len: int, batch_size: int, block_size: int,
                  anchors_per_seq: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                  num_epochs: int | None = None, kv_store=None) -> grain.DatasetIterator:
  """Packed, anchored batches of the dataset at `path`, as numpy dicts:

    tokens      int32 [B, S]  0 on padding
    segment_ids int32 [B, S]  1, 2, ... per packed row, 0 on padding
    positions   int32 [B, S]  position within its own sequence
    loss_mask   bool  [B, S]  response tokens
    anchors     int32 [B, A]  sorted distinct a with a+1 a loss token of the same
                              segment, uniform at random; -1 fill when fewer exist

  Rows are shuffled per epoch (`num_epochs=None` repeats forever), cut to
  `seq_len`, and first-fit packed into `batch_size` bins; rows with nothing to
  learn are dropped, as is a final partial batch. This process reads rows
  `shard_index::shard_count`. Everything is a function of `seed` and grain's
  iterator state (`get_state` / `set_state`).

  With `kv_store` (a `kv_data.KVStore` of this dataset: offline mode) batches
  also hold `kv` [B, S, K, 2, kv_heads, head_dim], each token's cached clean
  keys/values (zeros on padding). Cutting keeps a row's prefix and packing
  restarts positions per row, so every token's position is the one its record
  was computed at.
  """
  if block_size < 2:
    raise ValueError(f"block_size must be >= 2, got {block_size}")
  if seq_len < block_size + 1:
    raise ValueError(f"seq_len={seq_len} must be at least block_size + 1 (block_size={block_size})")
  if anchors_per_seq < 1 or batch_size < 1:
    raise ValueError(f"anchors_per_seq and batch_size must be >= 1, got {anchors_per_seq} and "
                     f"{batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count})")
  ds = grain.MapDataset.source(TokenDataset(path, with_offsets=kv_store is not None))
  ds = ds[shard_index::shard_count]
  if not len(ds):
    raise DatasetError(f"{path}: shard {shard_index} of {shard_count} has no rows")
  ds = ds.shuffle(seed=seed).repeat(num_epochs).map(functools.partial(_truncate, seq_len=seq_len))
  ds = ds.filter(_has_targets).to_iter_dataset()
  lengths = {"tokens": seq_len, "loss_mask": seq_len}
  if kv_store is not None:
    lengths["token_offsets"] = seq_len
  ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths,
                                                  num_packing_bins=batch_size, seed=seed)
  ds = ds.map(_unpack_names).random_map(functools.partial(_with_anchors, num=anchors_per_seq),
                                        seed=seed)
  ds = ds.batch(batch_size, drop_remainder=True)
  if kv_store is not None:
    ds = ds.map(kv_store.attach)
  return iter(ds)


def grain_checkpoint_args(iterator: grain.DatasetIterator, *, restore: bool = False):
  """Orbax args that save (or restore into) `iterator`, e.g. as an `ocp.args.Composite` item."""
  args = grain.checkpoint.CheckpointRestore if restore else grain.checkpoint.CheckpointSave
  return args(iterator)


PROG = "python -m flexdraft_jax.data"
_USAGE = (f"usage: {PROG} OUT.npz SPLIT=DIR [SPLIT=DIR ...]   or   {PROG} token_counts "
          "DRAFTER_DIR DATASET_DIR|ARCHIVE.npz")


def _main(argv: Sequence[str]) -> int:
  """python -m flexdraft_jax.data OUT.npz SPLIT=DIR [SPLIT=DIR ...]: write_archive;
  python -m flexdraft_jax.data token_counts DRAFTER_DIR DATA (a dataset dir or archive):
  writes the drafter's token counts (its draft vocabulary, `drafter.restrict_vocab`).
  Errors of the user's input raise cli.UserError (`main`: one line, exit status 2)."""
  if argv[:1] == ["token_counts"]:
    return _write_token_counts(argv[1:])
  pairs = [a.split("=", 1) for a in argv[1:]]
  if len(argv) < 2 or not argv[0].endswith(".npz") or any(len(p) != 2 or not all(p)
                                                           for p in pairs):
    raise cli.UserError(_USAGE)
  if len({split for split, _ in pairs}) != len(pairs):
    raise cli.UserError(f"each split once: {' '.join(argv[1:])}")
  metas = write_archive(argv[0], dict(pairs))
  for split, meta in metas.items():
    print(f"{argv[0]}: {split} {meta['rows']} rows, {meta['tokens']} tokens "
          f"({meta.get('prompts_done')} prompts done)")
  print(f"{argv[0]}: {os.path.getsize(argv[0]) / 2**20:.1f} MiB")
  return 0


def _write_token_counts(args: Sequence[str]) -> int:
  from flexdraft_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if len(args) != 2:
    raise cli.UserError(_USAGE)
  meta = checkpoint.drafter_meta(args[0])
  vocab = meta.get("target", {}).get("vocab_size") if isinstance(meta.get("target"), dict) else None
  if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
    raise cli.UserError(f"{checkpoint.meta_file(args[0])}: target.vocab_size must be a "
                        f"positive integer, got {vocab!r}")
  counts = token_counts(args[1], vocab)
  path = checkpoint.save_token_counts(args[0], counts)
  print(f"{path}: {int(counts.sum())} response tokens, {int((counts > 0).sum())} distinct")
  return 0


main = cli.guard(_main, PROG)  # one line and exit status 2 for the user's errors

if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

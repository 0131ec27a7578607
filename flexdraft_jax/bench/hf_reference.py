"""HF transformers' greedy `generate` as a reference (torch imported only here)."""
from __future__ import annotations

import pathlib
import time
from typing import Sequence

from absl import logging

from flexdraft_jax import resources
from flexdraft_jax.bench.workload import (
    GroupRun, Groups, ModeResult, Workload, median_wall)


class HfReference:
  """HF transformers' greedy `generate` on the same checkpoint, torch on CPU."""

  def __init__(self, model: str, dtype: str, num_threads: int | None = None):
    import torch  # pylint: disable=g-import-not-at-top
    from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top

    self.torch = torch
    if num_threads:
      torch.set_num_threads(num_threads)
    torch_dtype = getattr(torch, dtype)
    if model == resources.SMOLLM2_NAME or model.endswith(".gguf"):
      path = (resources.smollm2_gguf_path() if model == resources.SMOLLM2_NAME
              else pathlib.Path(model))
      hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch_dtype, local_files_only=True)
    else:
      hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype, local_files_only=True)
    self.model = hf.eval()
    self.dtype = dtype
    self.num_threads = torch.get_num_threads()
    self.version = torch.__version__

  def _batch(self, group: list[list[int]], pad_id: int):
    width = max(len(p) for p in group)
    ids = self.torch.full((len(group), width), pad_id, dtype=self.torch.long)
    mask = self.torch.zeros((len(group), width), dtype=self.torch.long)
    for r, p in enumerate(group):  # left padding
      ids[r, width - len(p):] = self.torch.tensor(p)
      mask[r, width - len(p):] = 1
    return ids, mask

  def _generate(self, ids, mask, work: Workload, max_new_tokens: int):
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=work.pad_id)
    if work.ignore_eos:
      kwargs["min_new_tokens"] = max_new_tokens
    else:
      kwargs["eos_token_id"] = work.eos_ids
    with self.torch.inference_mode():
      return self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)

  def run(self, work: Workload, groups: Groups) -> ModeResult:
    result = ModeResult(groups=[])
    start = time.perf_counter()
    self._generate(*self._batch(groups[0], work.pad_id), work, 2)  # warm-up
    logging.info("hf: warm-up %.2f s", time.perf_counter() - start)
    for gi, group in enumerate(groups):
      ids, mask = self._batch(group, work.pad_id)
      wall, out = median_wall(lambda: self._generate(ids, mask, work, work.max_new_tokens),
                               work.repeats)
      gen = out[:, ids.shape[1]:].tolist()
      rows = []
      for row in gen:
        stop = next((i for i, t in enumerate(row) if t in work.eos_ids), None)
        rows.append(row if work.ignore_eos or stop is None else row[:stop + 1])
      run = GroupRun(tokens=rows, new_tokens=sum(len(r) for r in rows),
                     steps=max(len(gen[0]) - 1, 0), wall_s=wall)
      result.groups.append(run)
      logging.info("hf: batch=%d group %d/%d: %d tokens, %.2f s (%.1f tok/s)", len(group),
                   gi + 1, len(groups), run.new_tokens, wall, run.new_tokens / wall)
    return result


def _first_stop(tokens: list[int], eos_ids: Sequence[int]) -> int:
  return next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))


def compared_length(ours: list[int], hf: list[int], eos_ids: Sequence[int],
                    ignore_eos: bool) -> int:
  """How many leading tokens `same_tokens` compares."""
  if ignore_eos:
    return min(_first_stop(ours, eos_ids), _first_stop(hf, eos_ids))
  return max(len(ours), len(hf))


def same_tokens(ours: list[int], hf: list[int], eos_ids: Sequence[int], ignore_eos: bool) -> bool:
  """Whether two greedy continuations agree.

  With `ignore_eos`, HF is barred from emitting EOS (min_new_tokens) while we
  emit it and go on, so only the tokens before the first EOS are compared.
  """
  if ignore_eos:
    n = compared_length(ours, hf, eos_ids, ignore_eos)
    return ours[:n] == hf[:n]
  return ours == hf

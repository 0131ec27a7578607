"""Prompts in, text and stats out: tokenizer + weights + the jitted generate loop.

`Engine` loads a target once and serves batches of prompts. Compilation is done
ahead of time per shape bucket (batch, padded prompt width, cache capacity) and
timed apart from decoding, so tokens/s never includes compile time.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np

from flexdraft_jax import generate as generate_lib
from flexdraft_jax import model as model_lib
from flexdraft_jax import tokenizer as tokenizer_lib
from flexdraft_jax import weights
from flexdraft_jax.sampling import SamplingConfig

PROMPT_BUCKET = 64     # prompts are right-padded to a multiple of this
CAPACITY_BUCKET = 256  # cache capacity is rounded up to a multiple of this


@dataclasses.dataclass
class Stats:
  new_tokens: int = 0
  decode_s: float = 0.0    # wall time of the jitted calls, compile excluded
  compile_s: float = 0.0
  forward_passes: int = 0  # decode steps after prefill, summed over batches

  @property
  def tokens_per_s(self) -> float:
    return self.new_tokens / self.decode_s if self.decode_s else 0.0


@dataclasses.dataclass
class Completion:
  prompt: str
  text: str
  token_ids: list[int]


class Engine:
  """A loaded target model with its tokenizer, ready to generate."""

  def __init__(self, model: str, dtype: str | None = None, chat_template: bool = True,
               unroll_layers: bool | None = None, *, target=None, tokenizer: str | None = None):
    """`unroll_layers` (default: on CPU) runs layers from per-layer param trees.

    XLA:CPU copies each layer's weights out of the stacked [L, ...] arrays on
    every scan step; unrolled decoding measured ~3x faster at batch 1 here.
    `target=(cfg, params)` serves already loaded (or random) weights, with the
    tokenizer of `tokenizer` (default: `model`'s).
    """
    self.cfg, params = target if target is not None else weights.load_model(model, dtype=dtype)
    self.params = model_lib.decoding_params(params, unroll_layers)
    self.tokenizer = tokenizer_lib.load_tokenizer(tokenizer or model)
    self.chat_template = chat_template and bool(self.tokenizer.chat_template)
    self.stop_ids = tokenizer_lib.stop_token_ids(self.tokenizer)
    self._compiled = {}

  def encode(self, prompt: str) -> list[int]:
    if self.chat_template:
      return tokenizer_lib.chat_prompt_ids(self.tokenizer, prompt)
    return self.tokenizer.encode(prompt)

  def _executable(self, batch, width, capacity, max_new_tokens, sampling, on_token, stats):
    key = (batch, width, capacity, max_new_tokens, sampling, on_token)
    if key not in self._compiled:
      start = time.perf_counter()
      self._compiled[key] = generate_lib.compile_generate(
          self.params, self.cfg, batch, width, capacity, len(self.stop_ids),
          max_new_tokens=max_new_tokens, sampling=sampling, on_token=on_token)
      stats.compile_s += time.perf_counter() - start
    return self._compiled[key]

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               on_token: Callable | None = None) -> tuple[list[Completion], Stats]:
    """Generates for all prompts, `batch_size` rows at a time."""
    stats = Stats()
    ids = [self.encode(p) for p in prompts]
    longest = max(len(i) for i in ids)
    if longest + max_new_tokens > self.cfg.max_position:
      raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} "
                       f"exceeds the model's {self.cfg.max_position} positions")
    key = jax.random.key(seed)
    out = []
    for start in range(0, len(ids), batch_size):
      chunk = ids[start:start + batch_size]
      chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # a short last batch repeats a row
      prompt_bp, lens = generate_lib.pad_prompts(chunk, PROMPT_BUCKET)
      capacity = -(-(prompt_bp.shape[1] + max_new_tokens) // CAPACITY_BUCKET) * CAPACITY_BUCKET
      fn = self._executable(batch_size, prompt_bp.shape[1], capacity, max_new_tokens, sampling,
                            on_token, stats)
      cache = model_lib.KVCache.zeros(self.cfg, batch_size, capacity)
      stops = generate_lib.stop_matrix(self.stop_ids, batch_size)
      key, sub = jax.random.split(key)
      jax.block_until_ready(cache)
      t0 = time.perf_counter()
      tokens, num_new, steps, _ = jax.block_until_ready(fn(self.params, cache, prompt_bp, lens,
                                                           stops, sub))
      stats.decode_s += time.perf_counter() - t0
      tokens, num_new = np.asarray(tokens), np.asarray(num_new)
      stats.forward_passes += int(steps)
      for row, prompt in enumerate(prompts[start:start + batch_size]):
        toks = tokens[row, :num_new[row]].tolist()
        stats.new_tokens += len(toks)
        out.append(Completion(prompt=prompt, text=self.decode(toks), token_ids=toks))
    return out, stats

  def decode(self, token_ids: list[int]) -> str:
    return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class StreamPrinter:
  """Host callback for `on_token`: prints row 0's text as its tokens commit."""

  def __init__(self, tokenizer, out=sys.stdout):
    self.tokenizer, self.out = tokenizer, out
    self.ids: list[int] = []
    self.printed = 0

  def __call__(self, tokens_B, active_B):
    if not bool(active_B[0]):
      return
    self.ids.append(int(tokens_B[0]))
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    if not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
      self.out.write(text[self.printed:])
      self.out.flush()
      self.printed = len(text)

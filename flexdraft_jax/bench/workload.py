"""What the runners decode (`Workload`) and what they return (`ModeResult`)."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Generator

from absl import logging
import jax

from flexdraft_jax import cost_cache
from flexdraft_jax import drafter as drafter_lib
from flexdraft_jax import planner
from flexdraft_jax.model_config import ModelConfig

PROMPT_BUCKET = 64  # prompts are right-padded to a multiple of this (one executable per width)


@dataclasses.dataclass
class Workload:
  """What every runner decodes: a loaded target and chat-templated prompt ids."""
  cfg: ModelConfig
  params: Any
  prompt_ids: list[list[int]]
  eos_ids: list[int]            # the tokenizer's stop ids
  stop_ids: list[int]           # the ids we actually stop at ([-1]: none, with --ignore_eos)
  pad_id: int
  max_new_tokens: int
  repeats: int
  ignore_eos: bool
  verify_strategy: str = "cumulative_product"
  dcfg: drafter_lib.DrafterConfig | None = None
  draft: Any = None             # decoding draft params (None: pld/ar only)
  costs: dict[int, planner.CostTable] = dataclasses.field(default_factory=dict)  # per batch
  auto_costs: tuple | None = None  # (setup key, acceptance model): measure tables on first use

  def cost_table(self, batch: int) -> planner.CostTable | None:
    """The given table of this batch size, or one measured and cached (`cost_cache`)."""
    if batch not in self.costs and self.auto_costs is not None:
      self.costs[batch] = cost_cache.table_for({"target": self.params, "draft": self.draft},
                                               self.cfg, self.dcfg, batch, *self.auto_costs)
    return self.costs.get(batch)


@dataclasses.dataclass
class GroupRun:
  """One group of prompts decoded as one batch."""
  tokens: list[list[int]]       # generated ids per row (without padding)
  new_tokens: int               # summed over rows
  steps: int                    # forward passes after prefill
  wall_s: float                 # median over repeats, prefill included, compile excluded


@dataclasses.dataclass
class ModeResult:
  """A runner's result for one batch size: all its groups, in order."""
  groups: list[GroupRun]
  compile_s: float = 0.0
  # Mode-specific columns merged into the row (e.g. acceptance for speculative modes).
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def new_tokens(self) -> int:
    return sum(g.new_tokens for g in self.groups)

  @property
  def steps(self) -> int:
    return sum(g.steps for g in self.groups)

  @property
  def wall_s(self) -> float:
    return sum(g.wall_s for g in self.groups)

  @property
  def tokens_per_s(self) -> float:
    return self.new_tokens / self.wall_s if self.wall_s else 0.0

  @property
  def ms_per_step(self) -> float:
    return 1e3 * self.wall_s / self.steps if self.steps else 0.0


Groups = list[list[list[int]]]
Runner = Callable[[Workload, Groups], Generator]  # see runners: yields calls, returns a ModeResult


def median_wall(call: Callable[[], Any], repeats: int) -> tuple[float, Any]:
  """Median seconds of `call()` over `repeats` runs, and its last output."""
  walls, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(call())
    walls.append(time.perf_counter() - start)
  return statistics.median(walls), out



def make_groups(prompt_ids: list[list[int]], b: int, by_length: bool = False) -> Groups:
  """The prompts cut into consecutive groups of b (a short last group is left out).

  `by_length`: sorted by length first, as `Engine.generate` batches them, so a group pads
  to a width near its own rows' lengths; but longest first (Engine: shortest first), so
  that the prompts left out are the shortest, never the long ones."""
  if by_length:
    prompt_ids = sorted(prompt_ids, key=len, reverse=True)
  n = len(prompt_ids) // b
  if n * b < len(prompt_ids):
    logging.info("batch %d: timing %d group(s), the last %d prompt(s) are left out", b, n,
                 len(prompt_ids) - n * b)
  return [prompt_ids[i * b:(i + 1) * b] for i in range(n)]

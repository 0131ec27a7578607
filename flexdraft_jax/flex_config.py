"""The static side of flex decoding: its configuration (`FlexConfig`), the verify widths
it compiles, and which step kinds and branches an executable carries (from a cost
table, `planner`). `flex.py` runs the loop; these are re-exported there."""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from flexdraft_jax import drafter
from flexdraft_jax import planner
from flexdraft_jax import prefill as prefill_lib
from flexdraft_jax import speculation
from flexdraft_jax.planner import PARALLEL, SEQUENTIAL
from flexdraft_jax.sampling import SamplingConfig

MODES = ("ar", "parallel", "sequential", "flex", "pld")
STRATEGIES = ("min_confidence", "cumulative_product", "expected_throughput", "full")
PARALLEL_PASSES = ("auto", "single", "split")  # see FlexConfig.parallel_pass
VERIFY_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # static verify widths (see `verify_buckets`)
# 'flex' without a cost table: parallel while at most this many rows are active, else
# sequential (the paper finds parallel best at batch <= 2 on Qwen3-8B/A100). A measured
# cost table (`planner.CostTable`) replaces this rule.
FLEX_BATCH_THRESHOLD = 2
DRAFTED = (PARALLEL, SEQUENTIAL)  # the kinds that run the draft layers


@dataclasses.dataclass(frozen=True)
class FlexConfig:
  mode: str = "flex"                             # one of MODES
  verify_strategy: str = "cumulative_product"    # one of STRATEGIES (thresholds: no table)
  verify_threshold: float = 0.01                 # t of min_confidence / cumulative_product
  max_new_tokens: int = 128
  sampling: SamplingConfig = SamplingConfig()
  prefill_chunk: int = prefill_lib.DEFAULT_CHUNK  # most prompt tokens per prefill pass
  # How a parallel step runs its slot groups (the drafts are the same either way):
  # 'single' is ALGORITHM.md's one pass with all w+1 groups; 'split' verifies first, then
  # runs group acc's block alone through the deep layers, anchored at its last cached token:
  # 16 slots instead of (w+1) x 16 for a second, deep-layers-only pass. 'auto': split on
  # CPU, where slot compute dominates a step; single elsewhere (`parallel_pass`). The
  # planner's self-measured cost tables (`cost_cache`) are timed with the default.
  parallel_pass: str = "auto"
  # Token trees (ALGORITHM.md §4): the most nodes a step's drafts hold, root included. 0
  # ('auto'): a tree as large as the block; 1: chains (node i after node i-1); N: at most N
  # nodes, one of the verify widths. Nodes come best first, so the verify width (the
  # planner's or the strategy's) picks how many of them a step verifies.
  tree_nodes: int = 0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if self.verify_strategy not in STRATEGIES:
      raise ValueError(f"verify_strategy must be one of {STRATEGIES}, got {self.verify_strategy!r}")
    if not 0.0 < self.verify_threshold <= 1.0:
      raise ValueError(f"verify_threshold must be in (0, 1], got {self.verify_threshold}")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.prefill_chunk < 1:
      raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
    if self.tree_nodes < 0 or self.tree_nodes > drafter.TREE_BITS:
      raise ValueError(f"tree_nodes must be 0 (auto), 1 (chains) or a verify width up to "
                       f"{drafter.TREE_BITS}, got {self.tree_nodes}")
    if self.tree_nodes > 1 and self.mode in ("ar", "pld"):
      raise ValueError(f"token trees (tree_nodes={self.tree_nodes}) need a drafter's mode "
                       f"(parallel, sequential or flex), not {self.mode!r}")
    if self.parallel_pass not in PARALLEL_PASSES:
      raise ValueError(f"parallel_pass must be one of {PARALLEL_PASSES}, got "
                       f"{self.parallel_pass!r}")


def parallel_pass(fcfg: FlexConfig) -> str:
  """fcfg.parallel_pass with 'auto' resolved for the default backend: 'split' on CPU (measured
  2026-12-04, SmolLM2 at batch 1: a parallel step at width 4 cost 61.5 ms single, against
  22 ms for an ar step), 'single' elsewhere (on the H200 at batch 1 a single pass costs the
  same with or without its 16-slot groups)."""
  if fcfg.parallel_pass != "auto":
    return fcfg.parallel_pass
  return "split" if jax.default_backend() == "cpu" else "single"


def parse_tree_nodes(text: str) -> int:
  """A --tree_nodes value: 'auto' -> 0 (FlexConfig's), or a positive node count (1: chains).
  ValueError, in one line, otherwise."""
  text = str(text).strip().lower()
  if text == "auto":
    return 0
  try:
    n = int(text)
  except ValueError:
    n = 0
  if n < 1:
    raise ValueError(f"--tree_nodes must be 'auto', 1 (chains) or a positive node count, "
                     f"got {text!r}")
  return n


def tree_shape(fcfg: FlexConfig, block_size: int) -> tuple[int, int]:
  """(nodes, branch): the most nodes of a step's drafts (root included) and of children per
  node (1: chains). ValueError where tree_nodes is not a verify width of this block size."""
  if fcfg.tree_nodes == 1:
    return block_size, 1
  nodes = fcfg.tree_nodes or min(block_size, drafter.TREE_BITS)
  if nodes not in verify_buckets(block_size):
    raise ValueError(f"tree_nodes must be 0 (auto), 1 (chains) or one of the verify widths "
                     f"{verify_buckets(block_size)} of block size {block_size}, got "
                     f"{fcfg.tree_nodes}")
  return nodes, min(speculation.MAX_BRANCH, nodes - 1) if nodes > 2 else 1


def verify_buckets(block_size: int) -> tuple[int, ...]:
  """Static verify widths: the VERIFY_BUCKETS below block_size, then block_size."""
  return tuple(v for v in VERIFY_BUCKETS if v < block_size) + (block_size,)


def compiled_kinds(fcfg: FlexConfig, batch: int, block_size: int, costs=None) -> tuple[int, ...]:
  """The step kinds an executable of this mode, batch size and cost table carries.

  A fixed mode has its own (`planner.mode_kinds`). Flex with a table keeps the
  kinds whose steady-state tokens per ms come near the best kind's
  (`planner.compiled_kinds`): when that is ar alone, flex is the plain AR loop.
  Flex without a table uses parallel at batch <= FLEX_BATCH_THRESHOLD (no step
  could pick sequential), else both. The tokens are the same either way.
  """
  if fcfg.mode != "flex":
    return planner.mode_kinds(fcfg.mode)
  if costs is None:
    return (PARALLEL,) if batch <= FLEX_BATCH_THRESHOLD else DRAFTED
  widths = (block_size,) if fcfg.verify_strategy == "full" else verify_buckets(block_size)
  return planner.compiled_kinds(costs, widths)


def table_for_mode(fcfg: FlexConfig, block_size: int, costs):
  """`costs` if it can plan this mode's steps, else None (the threshold rules). Flex plans
  with any table; a fixed mode needs a measured time for each of its widths, which a
  self-measured table skips when they cannot beat ar (`cost_cache.measure_step_ms`)."""
  if costs is None or fcfg.mode == "flex":
    return costs
  ms = np.asarray(costs.step_ms)
  ok = all(np.isfinite(ms[k, c]) for k, _, c in branches(fcfg, block_size,
                                                          planner.mode_kinds(fcfg.mode)))
  return costs if ok else None


def branches(fcfg: FlexConfig, block_size: int, kinds, only=None) -> list[tuple[int, int, int]]:
  """(kind, width, cost-table column) of each branch an executable with `kinds` carries
  (`only`: the one (kind, width))."""
  if only is not None:
    return [(only[0], only[1], verify_buckets(block_size).index(only[1]))]
  nodes = tree_shape(fcfg, block_size)[0]  # a tree's node budget caps the verify width
  widths = (nodes,) if fcfg.verify_strategy == "full" else verify_buckets(nodes)
  return [(k, w, verify_buckets(block_size).index(w)) for k in sorted(kinds)
          for w in planner.kind_widths(k, widths)]

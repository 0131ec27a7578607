"""flexdraft_jax: FlexDraft speculative decoding in JAX/Flax.

Importing the package sets one XLA default before JAX's backend starts (XLA reads
$XLA_FLAGS on its first compile): XLA:CPU's legacy loop emitters instead of its MLIR
fusion emitters (`--xla_cpu_use_fusion_emitters=false`). Measured on the 2-vCPU machine
(2026-12-04, `bench --modes=ar,parallel,sequential --batch_sizes=1,4`): compiles 30-40%
faster (the SmolLM2 parallel loop 20.0 -> 13.8 s, the tiny test models' step programs
6.0 -> 3.6 s for four), step times within noise of each other. The flag only concerns
XLA:CPU. A value the user puts in $XLA_FLAGS wins; FLEXDRAFT_XLA_DEFAULTS=0 leaves
$XLA_FLAGS alone.
"""
from __future__ import annotations

import importlib.metadata
import os

XLA_DEFAULTS = {"xla_cpu_use_fusion_emitters": "false"}
_TESTED_JAXLIB = (0, 10)  # the flag's oldest jaxlib we ran; an unknown flag aborts XLA


def _jaxlib_version() -> tuple[int, ...]:
  try:
    return tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return ()


def apply_xla_defaults(environ=os.environ) -> None:
  """Add XLA_DEFAULTS' flags to environ["XLA_FLAGS"] unless set there already."""
  if environ.get("FLEXDRAFT_XLA_DEFAULTS", "1") == "0" or _jaxlib_version() < _TESTED_JAXLIB:
    return
  flags = environ.get("XLA_FLAGS", "")
  extra = [f"--{k}={v}" for k, v in XLA_DEFAULTS.items() if f"--{k}=" not in flags]
  if extra:
    environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


apply_xla_defaults()

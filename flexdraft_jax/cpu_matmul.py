"""A small-row matmul kernel for XLA:CPU, called through `jax.ffi`.

XLA:CPU's dot costs far more for a few rows than the weights' memory traffic
(30 SmolLM2 layers: 30 ms at T=1, 100 ms at T=16), which is what speculative
decoding needs to be cheap. `csrc/cpu_matmul.cc` streams pre-packed weights
once per call with AVX2 + FMA on two threads, so its cost stays near the
memory bound for small T.

- `pack(w_KN)` lays a [K, N] weight out as panels [ceil(N/16), K, 16] (once,
  in `model.decoding_params` / `drafter.decoding_draft`, for CPU decoding).
- `dense(x_TK, packed, n)` is x @ w: the kernel for at most `max_rows()` rows
  when the kernel path is on, otherwise (more rows, other backends, no
  library) an XLA dot on the unpacked weight. `x` may have leading axes.
- `FLEXDRAFT_MATMUL=auto|kernel|xla` (default auto) picks the path: auto uses
  the kernel when the library is built (`make install`) and the CPU has AVX2 +
  FMA; `kernel` insists (the scalar loop where AVX2 is missing, an error if the
  library is missing); `xla` never uses it. The kernel takes AVX-512F where the
  CPU has it (FLEXDRAFT_MATMUL_SIMD=avx2 stops at AVX2, =0 forces the scalar
  loop). `FLEXDRAFT_MATMUL_LIB` points at
  another library file, `FLEXDRAFT_MATMUL_THREADS` sets the thread count
  (default 2) and `FLEXDRAFT_MATMUL_MAX_ROWS` the cut-over.
- `FLEXDRAFT_MATMUL_WEIGHTS=f16` (opt-in) packs weights as float16, widened to
  f32 in the kernel: half the memory traffic, but not bit-identical to f32
  (see tests/test_cpu_matmul.py for its tolerance).

The path in use is said once on stderr.
"""
from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
from jax import lax

PANEL = 16  # columns per packed panel (csrc/cpu_matmul.cc: kPanel)
# Rows up to which the kernel serves a matmul. Above it `dense` unpacks the panels for
# XLA's dot, and that transpose of every weight costs about 170 ms per SmolLM2 pass, so the
# kernel is measured against unpack + dot (30 layers' projections, weights passed as
# arguments, 2-vCPU dev machine, 2026-12-03): T = 16: 25 vs 203 ms, 64: 109 vs 270,
# 256: 357 vs 464, 512: 721 vs 699, 1024: 1450 vs 1229 (XLA's dot on dense weights:
# 40, 102, 311, 569, 1049). Decoding steps and a batch-1 prefill chunk stay on the kernel.
DEFAULT_MAX_ROWS = 256
LIBRARY = pathlib.Path(__file__).parent / "_cpu" / "libflexdraft_matmul.so"
# Packed weight dtype -> (FFI target name, handler symbol in the library).
_TARGETS = {jnp.float32: ("flexdraft_matmul_f32", "FlexdraftMatmulF32"),
            jnp.float16: ("flexdraft_matmul_f16", "FlexdraftMatmulF16")}
MODES = ("auto", "kernel", "xla")
ABI = 2  # the handlers' operands (x, w, layer): csrc/cpu_matmul.cc flexdraft_matmul_abi


class KernelUnavailableError(RuntimeError):
  """FLEXDRAFT_MATMUL=kernel, but the library cannot be loaded."""


def mode() -> str:
  m = os.environ.get("FLEXDRAFT_MATMUL", "auto").strip().lower() or "auto"
  if m not in MODES:
    raise ValueError(f"FLEXDRAFT_MATMUL={m!r}; expected one of {MODES}")
  return m


def library_path() -> pathlib.Path:
  return pathlib.Path(os.environ.get("FLEXDRAFT_MATMUL_LIB", LIBRARY))


def max_rows() -> int:
  """The cut-over: the kernel serves at most this many rows, XLA's dot more."""
  return int(os.environ.get("FLEXDRAFT_MATMUL_MAX_ROWS", DEFAULT_MAX_ROWS))


def threads() -> int:
  return max(1, int(os.environ.get("FLEXDRAFT_MATMUL_THREADS", 2)))


ISAS = ("scalar", "AVX2+FMA", "AVX-512")  # the kernel's paths, by the library's numbering


def simd_requested() -> int:
  """The best path the kernel may use: FLEXDRAFT_MATMUL_SIMD=0 forces the scalar loop
  (tests of the fallback), =avx2 stops short of AVX-512; default: the CPU's best."""
  v = os.environ.get("FLEXDRAFT_MATMUL_SIMD", "").strip().lower()
  return {"0": 0, "scalar": 0, "avx2": 1}.get(v, 2)


def weight_dtype():
  w = os.environ.get("FLEXDRAFT_MATMUL_WEIGHTS", "f32").strip().lower()
  if w not in ("f32", "f16"):
    raise ValueError(f"FLEXDRAFT_MATMUL_WEIGHTS={w!r}; expected f32 or f16")
  return jnp.float16 if w == "f16" else jnp.float32


@functools.cache
def _open(path: str):
  """The library at `path` with its FFI targets registered (once per path), or None."""
  try:
    lib = ctypes.CDLL(path)
    handlers = {name: jax.ffi.pycapsule(getattr(lib, symbol)) for name, symbol in _TARGETS.values()}
    lib.flexdraft_matmul_configure  # pylint: disable=pointless-statement
    if lib.flexdraft_matmul_abi() != ABI:
      return None
  except (OSError, AttributeError):  # missing, or built from another version of the source
    return None
  for name, handler in handlers.items():
    jax.ffi.register_ffi_target(name, handler, platform="cpu")
  return lib


_applied: dict[str, tuple[tuple[int, int], int]] = {}  # path -> ((threads, max isa), isa used)


def _load(path: str, threads: int, simd: int):
  """(library, index in ISAS in use), configured for `threads` and at most `simd`;
  None if unloadable.

  The setting is global to the process, read by the kernel when it runs.
  """
  lib = _open(path)
  if lib is None:
    return None
  applied = _applied.get(path)
  if applied is None or applied[0] != (threads, simd):
    applied = (threads, simd), int(lib.flexdraft_matmul_configure(int(simd), threads))
    _applied[path] = applied
  return lib, applied[1]


@functools.cache
def _announce(message: str) -> None:
  print(f"flexdraft_jax: CPU matmul path: {message}", file=sys.stderr, flush=True)


def status() -> tuple[bool, str]:
  """(kernel in use, why) for the current environment; says it once on stderr."""
  on, why = _status(mode(), jax.default_backend())
  _announce(why)
  return on, why


def _status(m: str, backend: str) -> tuple[bool, str]:
  if m == "xla":
    return False, "XLA dot (FLEXDRAFT_MATMUL=xla)"
  if backend != "cpu":
    return False, f"XLA dot (backend {backend})"
  path = library_path()
  loaded = _load(str(path), threads(), simd_requested())
  if loaded is None:
    if m == "kernel":
      raise KernelUnavailableError(
          f"FLEXDRAFT_MATMUL=kernel but {path} cannot be loaded; build it with `make install`")
    return False, f"XLA dot (kernel library {path} not built: run `make install`)"
  if not loaded[1] and m == "auto":
    return False, ("XLA dot (no AVX2/FMA/F16C on this CPU, or FLEXDRAFT_MATMUL_SIMD=0; "
                   "FLEXDRAFT_MATMUL=kernel forces the scalar kernel)")
  return True, (f"kernel ({ISAS[loaded[1]]}, {threads()} thread(s), up to {max_rows()} rows; "
                "XLA dot above)")


def enabled() -> bool:
  """Whether decoding params should be packed for the kernel."""
  return status()[0]


# ----------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------
def pack(w_KN: jax.Array, dtype=None) -> jax.Array:
  """[..., K, N] -> panels [..., ceil(N/16), K, 16] (columns past N are zero). A stack of
  weights ([L, K, N], a scan's layers) packs each one."""
  dtype = weight_dtype() if dtype is None else dtype
  *lead, k, n = w_KN.shape
  p = -(-n // PANEL)
  w = jnp.pad(w_KN, [(0, 0)] * len(lead) + [(0, 0), (0, p * PANEL - n)])
  return jnp.moveaxis(w.reshape(*lead, k, p, PANEL), -2, -3).astype(dtype)


def unpack(packed_PKC: jax.Array, n: int) -> jax.Array:
  """Inverse of `pack` for one weight: [K, n] (in the packed dtype)."""
  p, k, c = packed_PKC.shape
  return jnp.transpose(packed_PKC, (1, 0, 2)).reshape(k, p * c)[:, :n]


# ----------------------------------------------------------------------------
# The matmul
# ----------------------------------------------------------------------------
def require_library() -> None:
  """Loads the library and registers its FFI targets; KernelUnavailableError if it cannot."""
  if _load(str(library_path()), threads(), simd_requested()) is None:
    raise KernelUnavailableError(f"{library_path()} cannot be loaded; build it with `make install`")


def kernel_matmul(x_TK: jax.Array, packed: jax.Array, n: int, layer=None) -> jax.Array:
  """x [T, K] f32 @ packed weight -> [T, n] f32 via the FFI kernel (no fallback).

  `packed` is one weight [P, K, 16], or a stack [L, P, K, 16] with `layer` (an int or a
  traced scalar) picking one: the kernel reads that layer's panels in place.
  """
  require_library()
  target, _ = _TARGETS.get(jnp.dtype(packed.dtype).type, (None, None))
  if target is None:
    raise TypeError(f"packed weights must be float32 or float16, got {packed.dtype}")
  if packed.ndim not in (3, 4) or (packed.ndim == 4) != (layer is not None):
    raise ValueError(f"packed weights {packed.shape} want a layer index exactly when stacked "
                     f"(4-D), got layer={layer}")
  if x_TK.ndim != 2 or x_TK.shape[1] != packed.shape[-2]:
    raise ValueError(f"x {x_TK.shape} does not match packed weights {packed.shape}")
  out = jax.ShapeDtypeStruct((x_TK.shape[0], n), jnp.float32)
  index = jnp.asarray(0 if layer is None else layer, jnp.int32)
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
      x_TK.astype(jnp.float32), packed, index)


def dense(x: jax.Array, packed: jax.Array, n: int, layer=None) -> jax.Array:
  """x [..., K] @ w [K, n] with w packed (`pack`): [..., n] in x's dtype.

  `packed` may be a stack [L, P, K, 16] with `layer` picking one (`kernel_matmul`).
  The kernel when it is on and the rows (product of x's leading axes, static)
  are at most `max_rows()`; an XLA dot on the unpacked weight otherwise.
  """
  *lead, k = x.shape
  rows = 1
  for d in lead:
    rows *= d
  if 0 < rows <= max_rows() and enabled():
    y = kernel_matmul(x.reshape(rows, k), packed, n, layer)
  else:
    one = packed if layer is None else lax.dynamic_index_in_dim(packed, layer, keepdims=False)
    w = unpack(one, n).astype(jnp.float32)
    y = jnp.dot(x.reshape(rows, k).astype(jnp.float32), w, preferred_element_type=jnp.float32)
  return y.reshape(*lead, n).astype(x.dtype)

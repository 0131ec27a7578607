"""The CPU matmul cost curve c(T): XLA's dot against the `cpu_matmul` kernel.

  python -m flexdraft_jax.matmul_bench --out=bench_out/matmul_curve.json

Times one jitted pass through the dense projections of 30 SmolLM2-135M layers
(d=576, 9 query / 3 kv heads of 64, MLP 1536; the LM head over a 49152 vocab
is timed on its own) on T rows, T in --rows, for each path in one run, with
the paths interleaved per repeat so that load from other processes hits both
alike. The XLA path is today's decoding layout (separate q/k/v and gate/up
dots on [K, N] weights); the kernel path is the layout `model.decoding_params`
packs (q|k|v and gate|up fused). Reports medians (and minima, for a shared
CPU) and the issue-13 ratios: c(4)/c(1), c(16)/c(1), c(16) / XLA's c(16) and
c(1) / XLA's c(1).
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from flexdraft_jax import cpu_matmul

_OUT = flags.DEFINE_string("out", "bench_out/matmul_curve.json", "JSON output path")
_ROWS = flags.DEFINE_list("rows", ["1", "2", "4", "8", "16", "32", "64"], "row counts T")
_RUNS = flags.DEFINE_integer("runs", 15, "timed calls per (path, T); the median is kept")
_LAYERS = flags.DEFINE_integer("layers", 30, "decoder layers")
_F16 = flags.DEFINE_bool("f16", True, "also time the kernel with f16 weight storage")
_AVX2 = flags.DEFINE_bool("avx2", True, "also time the kernel's AVX2 path where it would "
                          "use AVX-512 (FLEXDRAFT_MATMUL_SIMD=avx2)")

D, NQ, NKV, H, F, V = 576, 9, 3, 64, 1536, 49152


def layer_weights(rng: np.random.RandomState) -> dict:
  w = lambda k, n: (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
  return {"q": w(D, NQ * H), "k": w(D, NKV * H), "v": w(D, NKV * H), "o": w(NQ * H, D),
          "gate": w(D, F), "up": w(D, F), "down": w(F, D)}


def packed_layer(lw: dict, dtype) -> dict:
  pk = lambda *ws: cpu_matmul.pack(jnp.concatenate([jnp.asarray(w) for w in ws], axis=1), dtype)
  return {"qkv": pk(lw["q"], lw["k"], lw["v"]), "o": pk(lw["o"]), "gate_up": pk(lw["gate"], lw["up"]),
          "down": pk(lw["down"])}


def xla_pass(layers, x_TD):
  dot = lambda a, w: jnp.dot(a, w, preferred_element_type=jnp.float32)
  for lw in layers:
    q, k, v = dot(x_TD, lw["q"]), dot(x_TD, lw["k"]), dot(x_TD, lw["v"])
    x_TD = x_TD + dot(q + jnp.tile(k + v, (1, NQ // NKV)), lw["o"])
    x_TD = x_TD + dot(jax.nn.silu(dot(x_TD, lw["gate"])) * dot(x_TD, lw["up"]), lw["down"])
  return x_TD


def kernel_pass(layers, x_TD):
  mm = lambda a, w, n: cpu_matmul.kernel_matmul(a, w, n)
  for lw in layers:
    qkv = mm(x_TD, lw["qkv"], (NQ + 2 * NKV) * H)
    q, k, v = jnp.split(qkv, [NQ * H, (NQ + NKV) * H], axis=1)
    x_TD = x_TD + mm(q + jnp.tile(k + v, (1, NQ // NKV)), lw["o"], D)
    gu = mm(x_TD, lw["gate_up"], 2 * F)
    x_TD = x_TD + mm(jax.nn.silu(gu[:, :F]) * gu[:, F:], lw["down"], D)
  return x_TD


def time_ms(fn, *args, runs: int) -> list[float]:
  jax.block_until_ready(fn(*args))  # compile + warm
  out = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append((time.perf_counter() - start) * 1e3)
  return out


def ratios(c: dict, ref: dict) -> dict:
  r = {}
  if 1 in c and 4 in c:
    r["c4_over_c1"] = c[4] / c[1]
  if 1 in c and 16 in c:
    r["c16_over_c1"] = c[16] / c[1]
  if 16 in c and 16 in ref:
    r["c16_over_xla_c16"] = c[16] / ref[16]
  if 1 in c and 1 in ref:
    r["c1_over_xla_c1"] = c[1] / ref[1]
  return r


def _paths(host, head):
  """({path: (layers fn, layer weights, head fn, head weights)}, {path: kernel ISA}): XLA's
  dot and the kernel (also forced to AVX2 with --avx2, and with f16 weights with --f16).
  FLEXDRAFT_MATMUL_SIMD takes the ISA before each timing."""
  paths = {
      "xla": (jax.jit(xla_pass), tuple({k: jnp.asarray(w) for k, w in lw.items()} for lw in host),
              jax.jit(lambda w, x: jnp.dot(x, w, preferred_element_type=jnp.float32)),
              jnp.asarray(head)),
      "kernel": (jax.jit(kernel_pass), tuple(packed_layer(lw, jnp.float32) for lw in host),
                 jax.jit(lambda w, x: cpu_matmul.kernel_matmul(x, w, V)),
                 cpu_matmul.pack(jnp.asarray(head), jnp.float32)),
  }
  isa = {"xla": "", "kernel": ""}
  if _AVX2.value:
    paths["kernel_avx2"], isa["kernel_avx2"] = paths["kernel"], "avx2"
  if _F16.value:
    paths["kernel_f16"] = (paths["kernel"][0], tuple(packed_layer(lw, jnp.float16) for lw in host),
                           paths["kernel"][2], cpu_matmul.pack(jnp.asarray(head), jnp.float16))
    isa["kernel_f16"] = ""
  return paths, isa


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  on, why = cpu_matmul.status()
  try:
    cpu_matmul.require_library()
  except cpu_matmul.KernelUnavailableError as e:
    raise app.UsageError(f"{e} ({why})") from None
  load_before = os.getloadavg()
  rows = [int(t) for t in _ROWS.value]
  rng = np.random.RandomState(0)
  host = [layer_weights(rng) for _ in range(_LAYERS.value)]
  head = (rng.standard_normal((D, V)) / np.sqrt(D)).astype(np.float32)
  paths, isa = _paths(host, head)

  def use(p):
    os.environ["FLEXDRAFT_MATMUL_SIMD"] = isa[p]
    cpu_matmul.require_library()
  del host
  samples = {p: {t: [] for t in rows} for p in paths}
  head_samples = {p: {t: [] for t in rows} for p in paths}
  errors = {}
  x_by_t = {t: jnp.asarray(np.random.RandomState(t).standard_normal((t, D)).astype(np.float32) * 0.1)
            for t in rows}
  for t in rows:  # correctness against XLA, once per T
    ref = np.asarray(paths["xla"][0](paths["xla"][1], x_by_t[t]))
    for p, (fn, w, _, _) in paths.items():
      use(p)
      got = np.asarray(fn(w, x_by_t[t]))
      errors.setdefault(p, {})[t] = float(np.abs(got - ref).max() / np.abs(ref).max())
  repeats = 3  # interleave paths: each repeat times every (T, path) for runs // repeats calls
  for _ in range(repeats):
    for t in rows:
      for p, (fn, w, head_fn, head_w) in paths.items():
        use(p)
        samples[p][t] += time_ms(fn, w, x_by_t[t], runs=max(1, _RUNS.value // repeats))
        head_samples[p][t] += time_ms(head_fn, head_w, x_by_t[t], runs=max(1, _RUNS.value // repeats))
  med = {p: {t: statistics.median(s) for t, s in by_t.items()} for p, by_t in samples.items()}
  best = {p: {t: min(s) for t, s in by_t.items()} for p, by_t in samples.items()}
  head_med = {p: {t: statistics.median(s) for t, s in by_t.items()} for p, by_t in head_samples.items()}
  result = {
      "what": f"{_LAYERS.value} SmolLM2-135M layers of dense projections, f32 activations [T, {D}]",
      "rows": rows,
      "layers_ms": {p: [med[p][t] for t in rows] for p in paths},
      "lm_head_ms": {p: [head_med[p][t] for t in rows] for p in paths},
      "ratios": {p: ratios(med[p], med["xla"]) for p in paths},
      # The least-disturbed call of each point, for a CPU shared with other jobs.
      "layers_min_ms": {p: [best[p][t] for t in rows] for p in paths},
      "ratios_of_min": {p: ratios(best[p], best["xla"]) for p in paths},
      "max_rel_error_vs_xla": errors,
      "kernel_status": why,
      "kernel_isa": {p: i or "best" for p, i in isa.items()},
      "kernel_in_models": on,
      "threads": cpu_matmul.threads(),
      "runs_per_point": len(samples["xla"][rows[0]]),
      "loadavg_before": load_before,
      "loadavg_after": os.getloadavg(),
  }
  out = pathlib.Path(_OUT.value)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  for p in paths:
    print(f"{p:>10} layers ms: " + " ".join(f"T={t}:{med[p][t]:.1f}" for t in rows))
    print(f"{p:>10} head ms:   " + " ".join(f"T={t}:{head_med[p][t]:.1f}" for t in rows))
    print(f"{p:>10} layers min ms: " + " ".join(f"T={t}:{best[p][t]:.1f}" for t in rows))
    print(f"{p:>10} ratios: " + json.dumps({k: round(v, 3) for k, v in result["ratios"][p].items()}))
    print(f"{p:>10} ratios of min: " +
          json.dumps({k: round(v, 3) for k, v in result["ratios_of_min"][p].items()}))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)

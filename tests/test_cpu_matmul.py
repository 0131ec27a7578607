"""The CPU matmul kernel (`cpu_matmul`, csrc/cpu_matmul.cc) against XLA's dot.

Shapes of SmolLM2 and of the tiny test models, ragged row counts, the scalar
fallback and the f16 opt-in; tiny Llama / Qwen2 / Qwen3 logits (against HF)
and SmolLM2 greedy decoding with the kernel on and off; the fallback when
the library or the compiler is missing; no KV-cache copies inside
while_loop + switch/cond with a donated cache.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexdraft_jax import cpu_matmul, generate, model
from flexdraft_jax.model_config import ModelConfig
from flexdraft_jax.sampling import SamplingConfig
from tests import test_cache_copies as cc

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5  # relative to the largest |entry| of the reference

pytestmark = pytest.mark.skipif(
    not cpu_matmul.library_path().is_file() or jax.default_backend() != "cpu",
    reason="the CPU matmul kernel is not built (make install) or the backend is not CPU")


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
  """Every test runs with the kernel forced on unless it says otherwise."""
  monkeypatch.setenv("FLEXDRAFT_MATMUL", "kernel")
  for var in ("FLEXDRAFT_MATMUL_LIB", "FLEXDRAFT_MATMUL_SIMD", "FLEXDRAFT_MATMUL_WEIGHTS",
              "FLEXDRAFT_MATMUL_MAX_ROWS", "FLEXDRAFT_MATMUL_THREADS"):
    monkeypatch.delenv(var, raising=False)
  with jax.default_matmul_precision("highest"):
    yield
  cpu_matmul.require_library()  # re-applies the default configuration (SIMD, 2 threads)


def _xla(x, w):
  return np.asarray(jnp.dot(jnp.asarray(x), jnp.asarray(w), preferred_element_type=jnp.float32))


def _kernel(x, packed, n):
  """The kernel alone. It runs with the process-wide setting last applied by
  `cpu_matmul.require_library()` / `status()`, not the one at trace time."""
  return np.asarray(jax.jit(cpu_matmul.kernel_matmul, static_argnums=2)(jnp.asarray(x), packed, n))


def _check(got, ref):
  assert got.shape == ref.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=0, atol=RTOL * np.abs(ref).max())


def _random(shape, seed, scale=1.0):
  return (np.random.RandomState(seed).standard_normal(shape) * scale).astype(np.float32)


# (K, N) of every dense projection: SmolLM2-135M (q|k|v fused, o, gate|up fused,
# down, LM head, calibration w1 / w2 at r=256) and conftest's tiny models
# (d=64, 4x16 / 2x16 heads, MLP 96, vocab 101, calibration r=8).
SMOLLM2_SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152), (1152, 256),
                  (256, 49152)]
TINY_SHAPES = [(64, 128), (64, 64), (64, 192), (96, 64), (64, 101), (128, 8), (8, 101)]


# The kernel's instruction-set caps (FLEXDRAFT_MATMUL_SIMD): the CPU's best (AVX-512 where
# present), AVX2, scalar. A cap above what the CPU has runs its best path again.
ISAS = {"best": "", "avx2": "avx2", "scalar": "0"}


@pytest.mark.parametrize("isa", ["best", "avx2"])
@pytest.mark.parametrize("k,n", SMOLLM2_SHAPES + TINY_SHAPES)
def test_kernel_equals_xla_dot_for_every_model_shape(k, n, isa, monkeypatch):
  monkeypatch.setenv("FLEXDRAFT_MATMUL_SIMD", ISAS[isa])
  cpu_matmul.require_library()
  w = _random((k, n), 0, 1 / np.sqrt(k))
  packed = cpu_matmul.pack(jnp.asarray(w))
  assert packed.shape == (-(-n // 16), k, 16) and packed.dtype == jnp.float32
  np.testing.assert_array_equal(cpu_matmul.unpack(packed, n), w)
  for t in (1, 3, 16, 17, 64):
    x = _random((t, k), t)
    _check(_kernel(x, packed, n), _xla(x, w))


@pytest.mark.parametrize("isa", list(ISAS))
def test_ragged_row_counts(isa, monkeypatch):
  """T = 1..70: every row-group split (AVX2 groups of at most 6 rows, AVX-512 of 24) and a
  ragged last panel."""
  monkeypatch.setenv("FLEXDRAFT_MATMUL_SIMD", ISAS[isa])
  cpu_matmul.require_library()
  k, n = 96, 101
  w = _random((k, n), 1)
  packed = cpu_matmul.pack(jnp.asarray(w))
  for t in range(1, 71):
    x = _random((t, k), t)
    _check(_kernel(x, packed, n), _xla(x, w))


def test_stacked_weights_take_a_layer_index(monkeypatch):
  """A stack [L, P, K, 16] with a traced layer index (a scan's) = that layer's weight, on
  the kernel and on XLA's dot above the cut-over; a bad index is the kernel's error."""
  k, n = 96, 101
  ws = np.stack([_random((k, n), 10 + i) for i in range(3)])
  stack = cpu_matmul.pack(jnp.asarray(ws))
  assert stack.shape == (3, -(-n // cpu_matmul.PANEL), k, cpu_matmul.PANEL)
  np.testing.assert_array_equal(stack[1], cpu_matmul.pack(jnp.asarray(ws[1])))
  run = jax.jit(lambda x, p, i: cpu_matmul.dense(x, p, n, i))
  for t in (1, 5, cpu_matmul.max_rows() + 3):  # the last: XLA's dot on the unpacked layer
    x = _random((t, k), t)
    for i in range(3):
      _check(np.asarray(run(jnp.asarray(x), stack, i)), _xla(x, ws[i]))
  with pytest.raises(ValueError, match="layer index exactly when stacked"):
    cpu_matmul.kernel_matmul(jnp.ones((1, k)), stack, n)
  with pytest.raises(Exception, match="layer 3 outside a stack of 3"):
    jax.block_until_ready(run(jnp.ones((1, k)), stack, 3))


def test_dense_takes_leading_axes_and_cuts_over_to_xla(monkeypatch):
  k, n = 64, 101
  w = _random((k, n), 2)
  packed = cpu_matmul.pack(jnp.asarray(w))
  # A new function per call: the path is chosen when tracing (jit caches traces per function).
  hlo = lambda x: jax.jit(lambda x, p: cpu_matmul.dense(x, p, n)).lower(x, packed).as_text()
  small, big = _random((2, 3, k), 3), _random((3, cpu_matmul.max_rows(), k), 4)
  assert "flexdraft_matmul_f32" in hlo(small)
  assert "flexdraft_matmul" not in hlo(big)  # 3 * max_rows rows: XLA's dot on unpacked weights
  for x in (small, big):
    _check(np.asarray(cpu_matmul.dense(jnp.asarray(x), packed, n)), _xla(x, w))
  monkeypatch.setenv("FLEXDRAFT_MATMUL", "xla")
  assert "flexdraft_matmul" not in hlo(small)
  _check(np.asarray(cpu_matmul.dense(jnp.asarray(small), packed, n)), _xla(small, w))


def test_scalar_fallback_equals_xla(monkeypatch):
  monkeypatch.setenv("FLEXDRAFT_MATMUL_SIMD", "0")
  monkeypatch.setenv("FLEXDRAFT_MATMUL_THREADS", "1")
  assert cpu_matmul.status() == (
      True, f"kernel (scalar, 1 thread(s), up to {cpu_matmul.max_rows()} rows; XLA dot above)")
  for k, n, t in ((96, 101, 7), (576, 960, 2), (64, 16, 1)):
    w = _random((k, n), k)
    x = _random((t, k), t)
    _check(_kernel(x, cpu_matmul.pack(jnp.asarray(w)), n), _xla(x, w))
  monkeypatch.setenv("FLEXDRAFT_MATMUL", "auto")  # auto never picks the scalar loop
  assert not cpu_matmul.enabled()


@pytest.mark.parametrize("simd", ["", "avx2", "0"])
def test_f16_weights_equal_xla_on_the_rounded_weights(monkeypatch, simd):
  """The opt-in f16 storage is exact widening: equal to f32 math on f16-rounded weights."""
  monkeypatch.setenv("FLEXDRAFT_MATMUL_SIMD", simd)
  monkeypatch.setenv("FLEXDRAFT_MATMUL_WEIGHTS", "f16")
  cpu_matmul.require_library()  # applies the cap (traces are cached, the setting is not)
  k, n = 576, 200
  w = _random((k, n), 5, 1 / np.sqrt(k))
  packed = cpu_matmul.pack(jnp.asarray(w))
  assert packed.dtype == jnp.float16
  rounded = w.astype(np.float16).astype(np.float32)
  for t in (1, 9):
    x = _random((t, k), t)
    _check(_kernel(x, packed, n), _xla(x, rounded))


# ----------------------------------------------------------------------------
# Models: logits and decoding with the kernel on and off
# ----------------------------------------------------------------------------
@jax.jit(static_argnames=("cfg",))
def _logits(params, tokens, *, cfg):
  return model.forward(params, cfg, tokens)[0]


@jax.jit(static_argnames=("cfg",))
def _decode_steps(params, tokens, *, cfg):
  """Prefill 5 tokens, then one token at a time: logits [B, T-5, V] of the single steps."""
  cache = model.KVCache.zeros(cfg, tokens.shape[0], 16)
  _, cache = model.forward(params, cfg, tokens[:, :5], cache=cache)
  out = []
  for i in range(5, tokens.shape[1]):
    logits, cache = model.forward(params, cfg, tokens[:, i:i + 1], cache=cache)
    out.append(logits)
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3-tied"])
def test_tiny_model_logits_match_hf_with_the_kernel(variant, tmp_path, monkeypatch):
  from flexdraft_jax import weights
  monkeypatch.setenv("FLEXDRAFT_MATMUL_MAX_ROWS", "64")  # the 24-row pass through the kernel too
  from tests import test_model_reference as ref
  hf = ref.build_hf_model(variant)
  hf.save_pretrained(tmp_path, safe_serialization=True)
  cfg, params = weights.load_hf(tmp_path, dtype="float32", param_dtype="float32")
  dense = model.decoding_params(params, unroll_layers=True, pack=False)
  tokens = ref.random_tokens((2, 12), seed=1)
  want = ref.hf_logits(hf, tokens)
  off = np.asarray(_logits(dense, tokens, cfg=cfg))
  assert want.std() > 0.3
  for unroll in (True, False):  # per-layer panels, and a scan over stacked panels
    packed = model.decoding_params(params, unroll_layers=unroll, pack=True)
    attn = packed["layers"][0]["attn"] if unroll else packed["layers"]["attn"]
    assert "head_packed" in packed and "qkv" in attn
    assert "lm_head" not in packed  # replaced, not kept next to its packing
    assert "flexdraft_matmul_f32" in _logits.lower(packed, tokens, cfg=cfg).as_text()
    on = np.asarray(_logits(packed, tokens, cfg=cfg))
    np.testing.assert_allclose(on, want, atol=ref.ATOL, rtol=0)
    np.testing.assert_allclose(on, off, atol=1e-5 * np.abs(off).max(), rtol=0)
    # Single-token steps (the decode shape) against the full pass.
    steps = np.asarray(_decode_steps(packed, tokens, cfg=cfg))
    np.testing.assert_allclose(steps, want[:, 5:], atol=ref.ATOL, rtol=0)


def test_decoding_params_pack_by_default_only_with_the_kernel(tiny_model, monkeypatch):
  """With the kernel: packed, and the layers stay stacked (a scan) unless asked to unroll.
  Without it: dense, unrolled on CPU (XLA's scan would copy each layer's weights)."""
  cfg, params = tiny_model("qwen2")
  default = model.decoding_params(params)
  assert "head_packed" in default and not isinstance(default["layers"], tuple)
  assert default["layers"]["attn"]["qkv"]["packed"].shape[0] == cfg.num_layers
  assert isinstance(model.decoding_params(params, unroll_layers=True)["layers"], tuple)
  assert "head_packed" in model.decoding_params(params, unroll_layers=True)
  monkeypatch.setenv("FLEXDRAFT_MATMUL", "xla")
  unpacked = model.decoding_params(params)
  assert "head_packed" not in unpacked and "q_proj" in unpacked["layers"][0]["attn"]


def test_scan_over_packed_stacks_copies_no_weights(tiny_model):
  """The scan's layer reads its panels in place: no op of the compiled step makes a
  per-layer panel array (a slice of a stack would), and the kernel gets the whole stack."""
  cfg, params = tiny_model("llama")
  packed = model.decoding_params(params, unroll_layers=False, pack=True)
  cache = jax.eval_shape(lambda: model.KVCache.zeros(cfg, 1, 128))
  step = jax.jit(lambda p, c, t: model.forward(p, cfg, t, cache=c)[0])
  text = step.lower(packed, cache, jnp.zeros((1, 1), jnp.int32)).compile().as_text()
  assert "flexdraft_matmul_f32" in text
  for leaf in jax.tree.leaves(packed["layers"]):
    if leaf.ndim == 4:  # a packed stack [L, P, K, 16]
      one = "f32[" + ",".join(map(str, leaf.shape[1:])) + "]"
      assert one not in text, f"a {one} layer panel is materialised"
      assert "f32[" + ",".join(map(str, leaf.shape)) + "]" in text


def test_drafter_passes_equal_with_the_kernel_on_and_off(tiny_model, monkeypatch):
  """Mask-slot projections and the calibration MLP through the kernel (decoding_draft)."""
  from flexdraft_jax import drafter
  monkeypatch.setenv("FLEXDRAFT_MATMUL_MAX_ROWS", "64")  # 20-row mixed passes
  cfg, target = tiny_model("qwen3")
  dcfg = drafter.DrafterConfig(num_draft_layers=1, block_size=4, calib_rank=8)
  draft = drafter.init_draft(cfg, dcfg, target, jax.random.key(1))
  draft["calib"]["w2"] = jax.random.normal(jax.random.key(2), draft["calib"]["w2"].shape) * 0.1

  @jax.jit
  def run(params, toks):
    _, cache = model.forward(params["target"], cfg, toks[:, :6], cache=model.KVCache.zeros(cfg, 2, 32))
    logits, h, _ = drafter.mixed_pass(params, cfg, dcfg, toks[:, 6:], jnp.array([[6, 7], [6, 7]]),
                                      cache)
    bonus = jnp.broadcast_to(toks[:, -1:, None], h.shape[:3])
    return logits, drafter.slot_logits(params, cfg, h, bonus)

  toks = jax.random.randint(jax.random.key(3), (2, 8), 0, cfg.vocab_size)
  both = lambda pack, unroll: {"target": model.decoding_params(target, unroll, pack=pack),
                               "draft": drafter.decoding_draft(draft, unroll, pack=pack)}
  off = run(both(False, True), toks)
  for unroll in (True, False):
    on = both(True, unroll)
    layer0 = on["draft"]["layers"][0] if unroll else on["draft"]["layers"]
    assert "w2_packed" in on["draft"]["calib"] and "qkv" in layer0
    assert "flexdraft_matmul_f32" in run.lower(on, toks).as_text()
    for a, b in zip(run(on, toks), off):
      np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)


def test_smollm2_greedy_is_token_identical_with_the_kernel(smollm2, mtbench_prompt_ids):
  cfg, params = smollm2
  prompts = mtbench_prompt_ids[:2]
  prompt_BP, lens = generate.pad_prompts(prompts, bucket=16)
  stops = generate.stop_matrix([2], len(prompts))

  def greedy(pack):  # the kernel on the default (stacked) layout against unrolled XLA dots
    p = model.decoding_params(params, unroll_layers=None if pack else True, pack=pack)
    cache = model.KVCache.zeros(cfg, len(prompts), prompt_BP.shape[1] + 32)
    tokens, num_new, _, _ = generate.generate(p, cache, prompt_BP, lens, stops, jax.random.key(0),
                                              cfg=cfg, max_new_tokens=32, sampling=SamplingConfig())
    return np.asarray(tokens), np.asarray(num_new)

  (on, n_on), (off, n_off) = greedy(True), greedy(False)
  np.testing.assert_array_equal(n_on, n_off)
  np.testing.assert_array_equal(on, off)


# ----------------------------------------------------------------------------
# Fallbacks: no library, no compiler
# ----------------------------------------------------------------------------
_DECODE_TINY = """
import jax, numpy as np
from flexdraft_jax import cpu_matmul, generate, model
from flexdraft_jax.model_config import ModelConfig
from flexdraft_jax.sampling import SamplingConfig
cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
params = model.decoding_params(model.init_params(cfg, jax.random.key(0)))
prompt, lens = generate.pad_prompts([[1, 2, 3]], bucket=4)
tokens, num_new, _, _ = generate.generate(
    params, model.KVCache.zeros(cfg, 1, 16), prompt, lens, generate.stop_matrix([-1], 1),
    jax.random.key(0), cfg=cfg, max_new_tokens=4, sampling=SamplingConfig())
print("packed" if "head_packed" in params else "dense", np.asarray(tokens).tolist())
"""


def _run_python(code, **env):
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True,
                        text=True, timeout=300)


def test_missing_library_falls_back_to_xla(tmp_path):
  gone = str(tmp_path / "nowhere" / "libflexdraft_matmul.so")
  r = _run_python(_DECODE_TINY, FLEXDRAFT_MATMUL="auto", FLEXDRAFT_MATMUL_LIB=gone)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.startswith("dense [[")
  said = [l for l in r.stderr.splitlines() if "CPU matmul path" in l]
  assert len(said) == 1 and "XLA dot" in said[0] and "make install" in said[0], r.stderr[-2000:]
  ok = _run_python(_DECODE_TINY, FLEXDRAFT_MATMUL="auto")
  assert ok.returncode == 0 and ok.stdout.startswith("packed [[")
  assert ok.stdout.split(" ", 1)[1] == r.stdout.split(" ", 1)[1]  # same tokens
  forced = _run_python(_DECODE_TINY, FLEXDRAFT_MATMUL="kernel", FLEXDRAFT_MATMUL_LIB=gone)
  assert forced.returncode != 0 and "KernelUnavailableError" in forced.stderr


def test_make_builds_the_kernel_and_survives_a_missing_compiler(tmp_path):
  # -o: treat the venv stamp as up to date, so make never reinstalls the venv here.
  make = lambda lib, *extra: subprocess.run(
      ["make", "-o", ".venv/.installed", f"KERNEL={lib}", *extra, str(lib)], cwd=ROOT,
      capture_output=True, text=True, timeout=300)
  broken = make(tmp_path / "a" / "lib.so", "CXX=/nonexistent/g++")
  assert broken.returncode == 0 and "will use XLA's dot" in broken.stderr
  assert not (tmp_path / "a" / "lib.so").exists()
  built = make(tmp_path / "b" / "lib.so")
  assert built.returncode == 0, built.stderr
  r = _run_python(_DECODE_TINY, FLEXDRAFT_MATMUL="kernel",
                  FLEXDRAFT_MATMUL_LIB=str(tmp_path / "b" / "lib.so"))
  assert r.returncode == 0 and r.stdout.startswith("packed [["), r.stderr[-2000:]


# ----------------------------------------------------------------------------
# Control flow and donation: no cache copies
# ----------------------------------------------------------------------------
CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)


def _switch_loop_hlo(pack: bool) -> tuple[str, str]:
  """A decode-like loop: while_loop { switch(width 1 | width 2) + cond(head) } with the
  cache donated and written outside the branches, as flex.py does."""
  params = jax.eval_shape(lambda: model.decoding_params(
      model.init_params(CFG, jax.random.key(0)), True, pack=pack))
  cache = jax.eval_shape(lambda: model.KVCache.zeros(CFG, 2, 256))

  def step(params, cache, tok_B, i):
    def width(t):
      def branch(c):
        toks = jnp.broadcast_to(tok_B[:, None], (2, t))
        logits, (k, v) = model.clean_pass(params, CFG, toks, model.next_positions(c, t),
                                          jnp.broadcast_to(model.causal_mask(t), (2, t, t)), c)
        return logits[:, 0], k[:, :, :1], v[:, :, :1]  # [L, B, 1, K, H] in both branches
      return branch
    logits, k, v = jax.lax.switch(i % 2, [width(1), width(2)], cache)
    logits = jax.lax.cond(i % 3 == 0, lambda l: l * 2.0, lambda l: l, logits)
    return cache.append((k, v), jnp.ones((2,), jnp.int32)), jnp.argmax(logits, -1).astype(jnp.int32)

  @jax.jit(donate_argnums=1)
  def loop(params, cache):
    def body(carry):
      c, tok, i = carry
      c, tok = step(params, c, tok, i)
      return c, tok, i + 1
    return jax.lax.while_loop(lambda c: c[2] < 8, body, (cache, jnp.zeros((2,), jnp.int32), 0))[0]

  text = loop.lower(params, cache).compile().as_text()
  return text, ",".join(str(d) for d in cache.k.shape)


def test_kernel_in_while_switch_cond_adds_no_cache_copies():
  text_on, dims = _switch_loop_hlo(pack=True)
  text_off, _ = _switch_loop_hlo(pack=False)
  assert "flexdraft_matmul_f32" in text_on and "flexdraft_matmul" not in text_off
  on, off = cc.cache_copies(text_on, dims), cc.cache_copies(text_off, dims)
  assert len(on) <= len(off), "\n".join(on)


def test_generate_loop_with_the_kernel_adds_no_cache_copies():
  """generate's loop (test_cache_copies' model) copies the cache no more with the kernel."""
  cache = jax.eval_shape(lambda: model.KVCache.zeros(cc.CFG, 3, 256))
  dims = ",".join(str(d) for d in cache.k.shape)

  def copies(pack, unroll):
    params = jax.eval_shape(lambda: model.decoding_params(
        model.init_params(cc.CFG, jax.random.key(0)), unroll, pack=pack))
    text = generate.compile_generate(params, cc.CFG, 3, 16, 256, 1, max_new_tokens=8,
                                     sampling=SamplingConfig()).as_text()
    assert ("flexdraft_matmul_f32" in text) == pack
    return cc.cache_copies(text, dims)

  for unroll in (True, False):  # per-layer panels, and the scan over packed stacks
    on, off = copies(True, unroll), copies(False, unroll)
    assert len(on) <= len(off), "\n".join(on)


def test_xla_defaults_are_added_once_and_yield_to_the_user():
  import flexdraft_jax
  assert "--xla_cpu_use_fusion_emitters=false" in os.environ["XLA_FLAGS"]  # this process
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  flexdraft_jax.apply_xla_defaults(env)
  flexdraft_jax.apply_xla_defaults(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                      "--xla_cpu_use_fusion_emitters=false"]
  mine = {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=true"}
  flexdraft_jax.apply_xla_defaults(mine)
  assert mine["XLA_FLAGS"] == "--xla_cpu_use_fusion_emitters=true"
  off = {"FLEXDRAFT_XLA_DEFAULTS": "0"}
  flexdraft_jax.apply_xla_defaults(off)
  assert "XLA_FLAGS" not in off

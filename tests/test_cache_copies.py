"""The compiled AR loop must not copy the KV cache per step (HLO inspection)."""
import re

import jax
import pytest

from flexdraft_jax import generate, model
from flexdraft_jax.model_config import ModelConfig
from flexdraft_jax.sampling import SamplingConfig

CFG = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)


def _compiled_hlo(batch: int, capacity: int, unroll: bool) -> tuple[str, str]:
  params = jax.eval_shape(lambda: model.init_params(CFG, jax.random.key(0)))
  if unroll:
    params = jax.eval_shape(model.unstack_layers, params)
  cache = jax.eval_shape(lambda: model.KVCache.zeros(CFG, batch, capacity))
  text = generate.compile_generate(params, CFG, batch, 16, capacity, 1, max_new_tokens=8,
                                  sampling=SamplingConfig()).as_text()
  dims = ",".join(str(d) for d in cache.k.shape)
  return text, dims


# Known cost of the unrolled (CPU) path: XLA copies the cache once for the
# per-layer chunk loops and once for the in-place write, per k and v buffer, in
# each loop that writes it: the decode loop (per step) and the chunked prefill
# loop (per prompt chunk, prefill.clean_chunks). Counted per computation.
_ALLOWED_COPIES = {False: 0, True: 4}
_LOOPS_WITH_COPIES = {False: 0, True: 2}
# Any instruction that produces a whole-cache array, other than parameters, loop plumbing
# and the in-place dynamic-update-slice, is a copy.
ALLOWED = ("parameter(", "get-tuple-element(", "tuple(", "dynamic-update-slice(", "while(",
           "bitcast(", "fusion(", "broadcast(", "call(", "conditional(", "constant(")


def cache_copy(line: str, dims: str) -> bool:
  """Whether an HLO line makes a cache-sized f32[dims] array that is not in ALLOWED."""
  m = re.match(rf"\s*(ROOT )?%\S+ = f32\[{dims}\]\S* (\S+)", line)
  return bool(m) and not m.group(2).startswith(ALLOWED)


def cache_copies(text: str, dims: str) -> list[str]:
  """The cache copies of a compiled program's HLO text (`cache_copy`), shortened."""
  return [line.strip()[:160] for line in text.splitlines() if cache_copy(line, dims)]


@pytest.mark.parametrize("unroll", [False, True])
def test_cache_sized_buffers_are_not_copied(unroll):
  text, dims = _compiled_hlo(batch=3, capacity=256, unroll=unroll)
  offenders, computation = {}, None  # copies per computation
  for line in text.splitlines():
    head = re.match(r"^(ENTRY )?(%\S+) ", line)
    if head:
      computation = head.group(2)
    if cache_copy(line, dims):
      offenders.setdefault(computation, []).append(line.strip()[:160])
  report = "\n".join(f"{c}: {l}" for c, lines in offenders.items() for l in lines)
  assert len(offenders) <= _LOOPS_WITH_COPIES[unroll], report
  assert all(len(lines) <= _ALLOWED_COPIES[unroll] for lines in offenders.values()), report


@pytest.mark.parametrize("unroll", [False, True])
def test_no_fusion_rewrites_the_whole_cache(unroll):
  # A fusion whose result is cache-sized and which is not an in-place update
  # (e.g. transpose + scatter, the naive vmap write) copies the cache.
  text, dims = _compiled_hlo(batch=3, capacity=256, unroll=unroll)
  for name, body in re.findall(r"\n(%\S+) \(([^\n]*)\) -> f32\[" + dims + r"\]", text):
    comp = text[text.index(name + " ("):]
    comp = comp[:comp.index("\n}")]
    assert "dynamic-update-slice" in comp or "dynamic_update_slice" in comp, comp[:600]


def test_row_writes_agree_between_the_cpu_loop_and_the_accelerator_scatter():
  import numpy as np
  buf = jax.random.normal(jax.random.key(0), (3, 4, 2, 16, 8))
  new = jax.random.normal(jax.random.key(1), (2, 4, 2, 5, 8))  # fewer layers than the buffer
  starts = jax.numpy.array([0, 3, 11, 7], jax.numpy.int32)
  loop = jax.jit(lambda b, n, s: model.write_rows(b, n, s, per_row=True))(buf, new, starts)
  scat = jax.jit(lambda b, n, s: model.write_rows(b, n, s, per_row=False))(buf, new, starts)
  np.testing.assert_array_equal(loop, scat)
  np.testing.assert_array_equal(scat[2], buf[2])          # untouched layer
  np.testing.assert_array_equal(scat[:2, 2, :, 11:16], new[:, 2])
  np.testing.assert_array_equal(scat[:2, 2, :, :11], buf[:2, 2, :, :11])


@pytest.mark.parametrize("parallel_pass", ["single", "split"])
def test_flex_loop_of_every_kind_copies_no_cache(parallel_pass):
  """The flex loop with all four kinds (stacked layers): its passes only read the cache
  inside lax.switch / lax.cond, so nothing cache-sized is copied, with either parallel pass."""
  from flexdraft_jax import drafter, flex  # pylint: disable=g-import-not-at-top
  dcfg = drafter.DrafterConfig(num_draft_layers=2, block_size=4, calib_rank=8)

  def decoding():
    target = model.init_params(CFG, jax.random.key(0))
    draft = drafter.init_draft(CFG, dcfg, target, jax.random.key(1))
    return {"target": model.decoding_params(target, False),
            "draft": drafter.decoding_draft(draft, False)}

  fcfg = flex.FlexConfig(mode="flex", max_new_tokens=8, parallel_pass=parallel_pass)
  text = flex.compile_flex(jax.eval_shape(decoding), CFG, dcfg, 3, 16, 256, 1, fcfg=fcfg,
                           kinds=(0, 1, 2, 3)).as_text()
  dims = ",".join(str(d) for d in jax.eval_shape(lambda: model.KVCache.zeros(CFG, 3, 256)).k.shape)
  copies = cache_copies(text, dims)
  assert "conditional(" in text and not copies, "\n".join(copies)

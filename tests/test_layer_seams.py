"""The seams the drafter builds on: split layer ranges and the layer's parts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexdraft_jax import attention
from flexdraft_jax import model
from flexdraft_jax.model_config import ModelConfig


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny(request):
  fam = request.param
  cfg = ModelConfig(family=fam, vocab_size=64, hidden_size=32, intermediate_size=48,
                    num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8,
                    qkv_bias=fam == "qwen2", qk_norm=fam == "qwen3")
  return cfg, model.init_params(cfg, jax.random.key(1))


@pytest.mark.parametrize("unstack", [False, True])
def test_split_layer_ranges_equal_the_whole_stack(tiny, unstack):
  cfg, params = tiny
  if unstack:
    params = model.unstack_layers(params)
  tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, cfg.vocab_size)
  x = model.embed(params, cfg, tokens)
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  mask = jnp.broadcast_to(model.causal_mask(7), (2, 7, 7))
  whole, (k, _) = model.run_layers(cfg, params["layers"], x, pos, mask)
  mid, (k0, _) = model.run_layers(cfg, params["layers"], x, pos, mask, first=0, last=3)
  out, (k1, _) = model.run_layers(cfg, params["layers"], mid, pos, mask, first=3)
  np.testing.assert_allclose(out, whole, atol=1e-5)
  np.testing.assert_allclose(jnp.concatenate([k0, k1]), k, atol=1e-5)
  assert k0.shape[0] == 3 and k1.shape[0] == 1


def test_layer_parts_compose_to_the_layer(tiny):
  cfg, params = tiny
  layer = model.DecoderLayer(cfg)
  p = {"params": model.layer_slice(params["layers"], 0)}
  x = jax.random.normal(jax.random.key(3), (2, 5, cfg.hidden_size))
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  mask = jnp.broadcast_to(model.causal_mask(5), (2, 5, 5))
  want, _ = layer.apply(p, x, pos, mask)

  def by_parts(mdl, x):
    q, k, v = mdl.attn.project(mdl.input_norm(x), pos)
    return mdl.finish(x, attention.attend(q, k, v, mask))

  got = layer.apply(p, x, method=by_parts)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # A mask that hides everything but self changes the output: the mask is used.
  eye = jnp.broadcast_to(jnp.eye(5, dtype=bool), (2, 5, 5))
  other, _ = layer.apply(p, x, pos, eye)
  assert not np.allclose(other[:, 1:], want[:, 1:], atol=1e-4)


@pytest.mark.parametrize("unstack", [False, True])
def test_empty_layer_range_is_the_identity(tiny, unstack):
  cfg, params = tiny
  if unstack:
    params = model.unstack_layers(params)
  x = jax.random.normal(jax.random.key(5), (2, 3, cfg.hidden_size))
  pos = jnp.broadcast_to(jnp.arange(3), (2, 3))
  out, (k, v) = model.run_layers(cfg, params["layers"], x, pos, model.causal_mask(3), first=2, last=2)
  np.testing.assert_array_equal(out, x)
  assert k.shape == (0, 2, 3, cfg.num_kv_heads, cfg.head_dim) and v.shape == k.shape

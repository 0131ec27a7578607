"""One flex loop step at a time, for measuring (the planner's cost tables, `cost_cache`;
scripts/step_costs.py, scripts/op_profile.py): the loop state after the prompt, and one
step of a given kind and verify width as its own small program."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flexdraft_jax.flex import FlexState, _Loop


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg", "fcfg", "kinds"),
                   donate_argnames=("cache",))
def prefill_state(params, cache, prompt_BP, prompt_lens_B, stop_ids_BS, key, *, cfg, dcfg, fcfg,
                  kinds):
  """The loop state after the prompt pass (what `timed_step` starts from)."""
  loop = _Loop(params, cfg, dcfg, fcfg, kinds, None, prompt_BP, prompt_lens_B, stop_ids_BS)
  return loop.prefill(cache, key)


@functools.partial(jax.jit, static_argnames=("cfg", "dcfg", "fcfg", "kind", "width"),
                   donate_argnames=("state",))
def timed_step(params, state: FlexState, prompt_BP, prompt_lens_B, stop_ids_BS, *, cfg, dcfg,
               fcfg, kind: int, width: int):
  """One loop step of `kind` at verify `width` (a program of that one branch), from `state`
  rewound to the prompt (cache lengths, output): every call costs a step at that context."""
  loop = _Loop(params, cfg, dcfg, fcfg, (kind,), None, prompt_BP, prompt_lens_B, stop_ids_BS,
               only=(kind, width))
  state = state.replace(cache=state.cache.replace(lengths=prompt_lens_B),
                        num_new=jnp.zeros_like(state.num_new), done=jnp.zeros_like(state.done),
                        tokens=jnp.full_like(state.tokens, -1))
  return loop.step(state, jnp.int32(0))

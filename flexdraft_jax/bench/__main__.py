r"""Decoding throughput benchmark: AR, speculative modes and HF transformers.

  python -m flexdraft_jax.bench --modes=ar,pld,parallel,sequential,flex --batch_sizes=1,4 \
    --drafter=workdir/drafter --out_dir=bench_out
  python -m flexdraft_jax.bench --batch_sizes=1 --profile   # + a decode-step breakdown

For each batch size b, the prompts (chat-templated with our tokenizer) are cut
into consecutive groups of b and decoded greedily as ragged batches. Each
executable is compiled ahead of time (timed apart), run once to warm up, then
each group is timed `--repeats` times and the median kept. By default both
sides generate exactly `--max_new_tokens` tokens per row (`--ignore_eos`), so
tokens/s compares the same work.

Modes (`MODES`): `ar` (the plain jitted loop; always run, as the reference),
and `parallel`, `sequential`, `flex`, `pld` (`flex.flex_generate` in that mode,
`pld` = prompt lookup, no drafter). Without `--drafter`, a random drafter
(`--random_drafter_layers`, `--block_size`) is exported to out_dir/random_drafter
and used (header `random_drafter: true`): speeds are then a lower bound. Each
mode's greedy tokens must equal AR's token for token; a mode that differs gets
`lossless: false` and null speed columns.

Writes `out_dir/bench.json` {"header", "rows"}, one row per (mode, batch_size):
tokens_per_s, tau (committed tokens per row-step, bonus included), speedup_vs_ar,
forward_passes (prefill included), mean_verify_len (mean static verify width of
the steps), mode_histogram ({parallel, sequential, pld} steps), compile_s,
lossless, plus ms_per_step, new_tokens, steps, wall_s and the HF columns;
`out_dir/throughput.png` (tokens/s vs batch size per mode), `out_dir/ar_profile.json`
with `--profile`, and prints a table.

  python -m flexdraft_jax.bench --calibrate --drafter=workdir/drafter --batch_sizes=1,2,4,8

instead measures the flex policy's cost table (`planner.CostTable`) and writes
`out_dir/costs.json` (`flex.save_costs`), which `--costs` here and in decode.py
read:
- step_ms: one step of each kind at each batch size and verify width w in
  `flex.verify_buckets(block_size)`. A parallel step is one mixed pass over w
  clean tokens with w+1 groups; a sequential step is a target pass over w
  tokens then a mixed pass over 1 token with one group (cache writes included;
  verify and drafting math excluded). Each is jitted on its own over a zero
  cache whose rows hold the typical mid-generation length (mean prompt +
  max_new_tokens / 2), in rounds that alternate it with the ar step
  (`cost_cache.measure_step_ms`; `--profile_runs` does not apply).
- tau: the committed tokens per row-step of the parallel and of the sequential
  mode, from decoding the prompts in each mode at the smallest batch size.
Calibrate on other prompts than the ones you then time (e.g. the held-out
ShareGPT split for MT-Bench), so that flex does not learn the test set, then
pass `--costs=out_dir/costs.json` to time the modes with that table (`make
bench` does both). `--no_calibration` is the calibration-MLP ablation: the
drafter decodes without it (only parallel steps use it).
"""
from absl import app
from absl import flags

from flexdraft_jax import cli
from flexdraft_jax.bench import driver
from flexdraft_jax.bench import options

flags.adopt_module_key_flags(options)  # --help lists the benchmark's flags

# One line and exit status 2 for a user error, not the usage text (tests/cli_runner.py
# calls these two in process).
_parse_flags, _main = cli.wrap(driver.main, driver.PROG)

if __name__ == "__main__":
  app.run(_main, flags_parser=_parse_flags)

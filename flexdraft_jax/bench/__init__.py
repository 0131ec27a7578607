"""Decoding throughput benchmark: `python -m flexdraft_jax.bench` (flags: see `__main__`).

One concern per module, in the order a run uses them:
- `options`: the absl flags, `Options` and `validate`;
- `workload`: `Workload` (target, prompts, drafter) and the results (`ModeResult`);
- `runners`: the timed modes (`run_ar`, `run_flex`; `MODES`), timed in interleaved
  rounds (`time_interleaved`);
- `hf_reference`: HF transformers' greedy `generate` (torch imported only there);
- `ties`: the lossless check against AR (`TIE_EPS`, `check_ties`, `make_row`);
- `calibration`: the flex cost table (`calibrate`);
- `profiling`: the AR decode-step breakdown (`profile_step`);
- `report`: the table, the plot and the JSON header;
- `driver`: `run(Options)` and the CLI `main`.
"""

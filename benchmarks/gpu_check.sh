#!/usr/bin/env bash
# GPU figures in one run of under 5 minutes on a single GPU (docs/BENCHMARKS.md, "GPU check"):
#   1. bf16 training tokens/s and MFU of a GPT-2-small-size model (preset base: 12 x 768) under ZeRO-2,
#      text prompts, on the bundled MovieLens sample;
#   2. the step time of sampled-softmax training (loss=sampled, 8,192 negatives + in-batch, logQ) with a
#      1M-item catalogue (a synthetic log, benchmarks/synthetic_log.py);
#   3. the headline recipe of docs/RESULTS.md's Amazon section (configs/sequential.yaml) on
#      Toys_and_Games: wall time to the end of training and its test NDCG@10 / HR@10 (history excluded).
# Prints one summary table and writes it, with every log, under OUT.
#
#   bash benchmarks/gpu_check.sh [OUT]          # on the GPU machine, from the repository root
#   SMALL=1 bash benchmarks/gpu_check.sh /tmp/x # the same steps at toy sizes on a CPU (checks the script)
#
# Installs only what the machine lacks: the Python packages recgpt imports that are missing are
# installed from the wheels in $WHEELS (default .whl: a copy of ../shared/gpu-wheels) into .site, with
# no index and no dependencies (a machine without network). Toys_and_Games.txt is read from $DATA
# (default ../shared/datasets, else .data). Without DuckDB the shards are built by the reference engine
# (--engine python: the same records). Ray is not needed: runs go through torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
DATA=${DATA:-../shared/datasets}
[ -f "$DATA/Toys_and_Games.txt" ] || DATA=.data
SMALL=${SMALL:-0}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD/.site:$PWD:${PYTHONPATH:-}"
START=$(date +%s)
log() { echo "[gpu_check $(($(date +%s) - START)) s] $*"; }

# ------------------------------------------------------------------ 0. what the machine lacks
missing=$($PY - <<'EOF'
import importlib.util
need = ["deepspeed", "omegaconf", "webdataset", "braceexpand", "hjson", "pydantic", "fsspec", "yaml"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  log "installing from $WHEELS what is missing: $missing"
  $PY -m pip install -q --no-index --no-deps --target .site "$WHEELS"/*.whl
fi
ENGINE=local
$PY -c "import duckdb" 2>/dev/null || ENGINE=python
$PY - <<'EOF' | tee "$OUT/machine.txt"
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU run)"
print(f"torch {torch.__version__}, {gpu}")
EOF
RECGPT=("$PY" -m launcher)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m launcher)

if [ "$SMALL" = 1 ]; then
  BASE=(model.preset=tiny train.precision=fp32) ; STEPS=6 ; INTER=20000 ; ITEMS=5000 ; NEG=256 ; PREC=fp32
  RECIPE=(train.epochs=0 train.max_steps=20 train.eval_interval=10 train.checkpoint_interval=10)
else
  BASE=(model.preset=base train.precision=bf16) ; STEPS=60 ; INTER=3000000 ; ITEMS=1000000 ; NEG=8192 ; PREC=bf16
  RECIPE=()
fi

# ------------------------------------------------------------------ 1. GPT-2-small, ZeRO-2, bf16
log "1/3 GPT-2-small-size model, ZeRO-2, text prompts"
"${RECGPT[@]}" shards build data/ml-latest-small.zip --out "$OUT/ml" --engine "$ENGINE" > "$OUT/ml_build.log" 2>&1
"${TORCHRUN[@]}" train --config configs/tiny.yaml "data.shards=$OUT/ml" "train.output_dir=$OUT/gpt2" \
  "${BASE[@]}" model.prompt=text zero.stage=2 train.micro_batch_size=64 "train.max_steps=$STEPS" \
  train.log_interval=10 train.eval_interval=0 train.checkpoint_interval=0 logging.progress=plain \
  > "$OUT/gpt2.log" 2>&1

# ------------------------------------------------------------------ 2. 1M-item sampled softmax
log "2/3 sampled softmax over $ITEMS items"
"$PY" benchmarks/synthetic_log.py --interactions "$INTER" --items "$ITEMS" --out "$OUT/log.parquet" \
  > "$OUT/synthetic.log" 2>&1
"${RECGPT[@]}" shards build "$OUT/log.parquet" --out "$OUT/big" --engine "$ENGINE" > "$OUT/big_build.log" 2>&1
"${TORCHRUN[@]}" train --config configs/tiny.yaml "data.shards=$OUT/big" "train.output_dir=$OUT/big_run" \
  "train.precision=$PREC" train.loss=sampled "train.num_negatives=$NEG" train.micro_batch_size=128 \
  train.max_steps=50 train.log_interval=10 train.eval_interval=0 train.checkpoint_interval=0 \
  logging.progress=plain > "$OUT/big_run.log" 2>&1

# ------------------------------------------------------------------ 3. the headline recipe on Toys
log "3/3 configs/sequential.yaml on Toys_and_Games"
"${RECGPT[@]}" shards build "$DATA/Toys_and_Games.txt" --out "$OUT/toys" --engine "$ENGINE" > "$OUT/toys_build.log" 2>&1
t0=$(date +%s)
"${TORCHRUN[@]}" train --config configs/sequential.yaml "data.shards=$OUT/toys" "train.output_dir=$OUT/toys_run" \
  data.num_workers=2 "${RECIPE[@]}" > "$OUT/toys_run.log" 2>&1
echo $(($(date +%s) - t0)) > "$OUT/toys_wall_s"
"${RECGPT[@]}" evaluate --checkpoint "$OUT/toys_run" --best --split test eval.exclude_seen=true \
  > "$OUT/toys_test.log" 2>&1

# ------------------------------------------------------------------ summary
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
def train_records(run):
    return [r for r in map(json.loads, (out / run / "train_log.jsonl").read_text().splitlines())
            if r["kind"] == "train"]
def steady(run, key):
    recs = train_records(run)[1:] or train_records(run)  # the first window holds the warm-up
    vals = [r[key] for r in recs if key in r]
    return statistics.median(vals) if vals else float("nan")
test = json.loads([l for l in (out / "toys_test.log").read_text().splitlines() if l.startswith("{")][-1])
final = json.loads((out / "toys_run" / "metrics.json").read_text())
print((out / "machine.txt").read_text().strip())
print("| check | figure |\n|---|---|")
print(f"| GPT-2-small size, ZeRO-2, bf16, text: tokens/s | {steady('gpt2', 'tokens_per_s'):,.0f} |")
print(f"| GPT-2-small size, ZeRO-2, bf16, text: MFU | {steady('gpt2', 'mfu'):.1%} |")
print(f"| GPT-2-small size: step time (ms) | {1e3 * steady('gpt2', 'step_time_s'):.1f} |")
print(f"| sampled softmax, {json.loads((out / 'big' / 'manifest.json').read_text())['num_items']:,} items: "
      f"step time (ms) | {1e3 * steady('big_run', 'step_time_s'):.1f} |")
print(f"| configs/sequential.yaml on Toys: training wall time (s, launch to exit) | "
      f"{int((out / 'toys_wall_s').read_text())} (steps {final['step']}, best {final['best_checkpoint']}) |")
print(f"| configs/sequential.yaml on Toys: test NDCG@10 / HR@10 (history excluded) | "
      f"{test['ndcg@10']:.4f} / {test['hr@10']:.4f} |")
EOF
log "done: $OUT/summary.md"

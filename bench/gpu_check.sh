#!/usr/bin/env bash
# bench/gpu_check.sh — every check that needs a GPU, as one prepared script (about 3–5 minutes).
#
#   bash bench/gpu_check.sh --prepare   # here, with the project's venv: wheels into .whl/, shards in data/processed
#   bash bench/gpu_check.sh             # on the GPU machine, from the repository root
#
# The GPU machine needs only Python 3.12 and a CUDA build of PyTorch: what else ctclab's CUDA path
# imports (pydantic, mlflow-skinny with a file store, Levenshtein, fast-ctc-decode) comes from the
# wheels in .whl/, and the default corpus's shards from data/processed (both made by --prepare; carry
# both). It runs the CUDA tests, bench/train_speed.py over 28,539 utterances shaped like
# train-clean-100, batch 64 vs 256 and stride 2 vs 4 at 256, side by side (ctclab's own Trainer.epoch and DataLoader,
# over a shard written once to /tmp/ctclab-bench-shards), a profile of batch-64 steps, the
# LSTM in fp32 vs under autocast, compile vs eager, and the default train → evaluate stages on CUDA,
# then appends one dated line per figure, with the card's name, to bench/RESULTS.md (and copies it,
# with the logs, to $OUT when that is set).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

if [ "${1:-}" = "--prepare" ]; then
    set -e
    PY=${PYTHON:-.venv/bin/python}
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir .whl
    # what the GPU image lacks; --no-deps: everything else there is already installed (ruamel.yaml: params.yaml
    # read as DVC reads it; pandas: mlflow.pyfunc,
    # which logs the trained model; psutil and nvidia-ml-py: MLflow system metrics with the GPU figures)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        Levenshtein==0.27.5 rapidfuzz==3.14.6 fast-ctc-decode==0.3.7 \
        mlflow-skinny==3.17.2 databricks-sdk==0.162.0 google-auth==2.63.0 pyasn1==0.6.5 pyasn1-modules==0.4.2 \
        cachetools==7.3.3 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 opentelemetry-api==1.45.2 \
        opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 opentelemetry-proto==1.45.2 \
        typing-extensions==4.16.0 importlib-metadata==9.1.0 sqlparse==0.6.1 python-dotenv==1.2.4 ruamel.yaml==0.19.1 \
        fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 psutil==7.2.2 nvidia-ml-py==13.615.71 pandas==3.1.1 python-dateutil==2.9.0.post0 six==1.17.0
    [ -f data/processed/meta.json ] || "$PY" -m ctclab run -s preprocess
    du -sh .whl data/processed
    exit 0
fi

OUT_DIR=${OUT:-$REPO/bench/gpu_check_out}
mkdir -p "$OUT_DIR"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ctclab-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/ctclab-site
fi
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# mlflow-skinny has no sqlite store: a file store. GitPython warns twice per run where git is missing.
export MLFLOW_TRACKING_URI=file:/tmp/ctclab-gpu-mlruns MLFLOW_ALLOW_FILE_STORE=true GIT_PYTHON_REFRESH=quiet
CARD=$(python3 -c 'import torch; print(torch.cuda.get_device_name(0))') || { echo "no CUDA device"; exit 1; }
TORCH=$(python3 -c 'import torch; print(torch.__version__)')
DAY=$(date -u +%F)
echo "gpu_check: $CARD, torch $TORCH, $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
record() { echo "| $DAY | $CARD | torch $TORCH | $1 |" | tee -a bench/RESULTS.md; }

# 1. the CUDA tests
timeout 240 python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT_DIR/cuda_tests.log" | tail -15
record "CUDA tests (tests/test_cuda.py): $(grep -E '[0-9]+ (passed|failed)' "$OUT_DIR/cuda_tests.log" | tail -1)"

# 2. training speed at train-clean-100 scale, side by side in one run each (bench/train_speed.py: the
# `base` and `versus` rows of epoch 1; `row LOG CONFIG` formats one)
row() { awk -v c="$2" '$1 == c && $2 == "1" {print $3 " s/epoch, " $4 " utt/s, in Trainer.step " $5 " s (other " $6 "), padding " $7 ", peak " $9 " GiB"}' "$1"; }
secs() { awk -v c="$2" '$1 == c && $2 == "1" {print $3 " s (" $4 " utt/s)"}' "$1"; }
last() { tail -1 "$1" | grep -E '^train_speed: ' || echo 'FAILED (see log)'; }
LOG=$OUT_DIR/train_speed_b64_vs_b256.log
timeout 300 python3 bench/train_speed.py --device cuda --batch-size 64 --versus train.batch_size=256 --goal 2 2>&1 \
    | tee "$LOG" | tail -5
record "bench/train_speed.py (ctclab's Trainer) A3 (6.9 M) 28,539 synthetic-shape utt, batch 64, bf16: $(row "$LOG" base)"
record "bench/train_speed.py (ctclab's Trainer) A3 (6.9 M) 28,539 synthetic-shape utt, batch 256, bf16: $(row "$LOG" versus); $(last "$LOG")"
# fewer steps instead of a larger batch: stride 4 halves the LSTM's sequential steps (a different model)
LOG=$OUT_DIR/train_speed_b256_stride2_vs_4.log
timeout 180 python3 bench/train_speed.py --device cuda --batch-size 256 --versus model.conv_lstm.stride=4 2>&1 \
    | tee "$LOG" | tail -3
record "bench/train_speed.py A3 with model.stride 4, 28,539 synthetic-shape utt, batch 256, bf16: $(row "$LOG" versus) (stride 2: $(secs "$LOG" base)); $(last "$LOG")"
# where a batch-64 step's time goes, and what running the LSTM under autocast would change (30 steps each)
LOG=$OUT_DIR/lstm_autocast_b64.log
timeout 120 python3 bench/train_speed.py --device cuda --utterances 1920 --warmup 3 --profile 5 --lstm-autocast --goal 1 \
    2>&1 | grep -vi warn | tee "$LOG" | grep -E "cudnn_rnn|Self CUDA time total|^train_speed"
record "bench/train_speed.py b64, 1,920 utt: LSTM in fp32 $(secs "$LOG" base) vs under autocast $(secs "$LOG" versus); $(last "$LOG")"
# train.compile: the same 30 steps with the non-recurrent parts compiled (off by default unless this wins)
LOG=$OUT_DIR/compile_b64.log
timeout 180 python3 bench/train_speed.py --device cuda --utterances 1920 --warmup 5 --versus train.compile=true --goal 1 \
    2>&1 | grep -vi warn | tee "$LOG" | tail -2
record "bench/train_speed.py b64, 1,920 utt: eager $(secs "$LOG" base) vs train.compile $(secs "$LOG" versus); $(last "$LOG")"

# 3. the default pipeline's train → evaluate on CUDA, all 15 epochs (a PER sanity check against the CPU's)
PROJ=/tmp/ctclab-gpu-project
rm -rf "$PROJ" && mkdir -p "$PROJ/data"
ln -s "$REPO/data/processed" "$PROJ/data/processed"
python3 - "$REPO/params.yaml" "$PROJ/params.yaml" <<'EOF'
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))
p["train"].update(device="cuda")
yaml.safe_dump(p, open(sys.argv[2], "w"), sort_keys=False)
EOF
PATHS="--data data/processed --models models --metrics metrics"  # as dvc.yaml's train and evaluate cmds pass them
(cd "$PROJ" && timeout 150 python3 "$REPO/pipeline/train.py" $PATHS && timeout 60 python3 "$REPO/pipeline/evaluate.py" $PATHS) \
    2>&1 | tr '\r' '\n' | grep -v "batch/s" | tee "$OUT_DIR/pipeline.log" | tail -6
record "default pipeline (1,200 utt, A3 h=128, the CPU default's params) 15 epochs on CUDA: $(grep -E '^epoch 15/15' "$OUT_DIR/pipeline.log" | sed 's/^epoch 15\/15: //') ; $(grep '^evaluate:' "$OUT_DIR/pipeline.log" || echo 'evaluate FAILED')"
cp bench/RESULTS.md "$OUT_DIR/RESULTS.md"

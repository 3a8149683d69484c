#!/usr/bin/env bash
# bench/gpu_check.sh — every check that needs a GPU, as one prepared call of at most 9 minutes.
#
#   bash bench/gpu_check.sh --prepare    # here, with the project's venv: the wheels the GPU machine lacks, into .whl/
#   bash bench/gpu_check.sh              # on the GPU machine, from the repository root (carry .whl)
#   bash bench/gpu_check.sh --rehearse   # here, on the CPU at a tiny size: every step, the same commands
#                                        # (tests/test_bench.py runs it; its figures go to $OUT_DIR only)
#
# The GPU machine has Python 3.12 and a CUDA build of PyTorch, but no DVC, no MLflow and no network:
# what else ctclab imports (pydantic, mlflow-skinny with a file store, Levenshtein, fast-ctc-decode,
# espeakng-loader and kaldi-native-fbank for the corpus) comes from the wheels in .whl/. In order:
#   1. the CUDA tests (tests/test_cuda.py);
#   2. the embedded corpus at HW3P2's size (28,539 / 2,703 / 2,620 utterances, generated on every
#      core) through the pipeline's own stages: dvc.yaml's cmds, in its order, in a project folder
#      (no DVC there), A3 at the write-up's size with the large-batch recipe below, 8 epochs on CUDA; then
#      its epoch time, GPU utilisation and memory (MLflow's system metrics) and dev PER;
#   3. the DDP path on NCCL: the same training for one epoch under torchrun with one process;
#   4. the speed levers, each side by side with batch 256 through the product's Trainer
#      (bench/train_speed.py): batch 1024 on 28,539 train-clean-100-shaped utterances (the ≤ 8 s
#      goal), then stride 4, the LSTM under autocast, CUDA graphs (captured before timing) and
#      torch.compile on an eighth of them;
# and appends one dated line per figure, with the card's name and its log, to bench/RESULTS.md.
# $OUT (or bench/gpu_check_out) gets RESULTS.md and gpu_check_logs.tar.gz (unpack it into bench/logs:
# the lines link logs/gpu_check-<date>/<step>.log); the data, store and shards stay in /tmp. Each
# step has its own timeout, cut to what is left of 520 s (GPU_CHECK_BUDGET_S): a slow step costs only
# itself, and the steps that no longer fit are skipped (their lines say so). Run it with timeout_s 600.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

if [ "${1:-}" = "--prepare" ]; then
    set -e
    PY=${PYTHON:-.venv/bin/python}
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir .whl
    # what the GPU image lacks; --no-deps: everything else there is already installed (ruamel.yaml: params.yaml
    # read as DVC reads it; mlflow.pyfunc, which logs the trained model, needs pandas, which is there;
    # psutil and nvidia-ml-py, there too, give MLflow's system metrics their GPU figures)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        Levenshtein==0.27.5 rapidfuzz==3.14.6 fast-ctc-decode==0.3.7 espeakng-loader==0.2.4 kaldi-native-fbank==1.23.0 \
        mlflow-skinny==3.17.2 databricks-sdk==0.162.0 google-auth==2.63.0 pyasn1==0.6.5 pyasn1-modules==0.4.2 \
        cachetools==7.3.3 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 opentelemetry-api==1.45.2 \
        opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 opentelemetry-proto==1.45.2 \
        typing-extensions==4.16.0 importlib-metadata==9.1.0 sqlparse==0.6.1 python-dotenv==1.2.4 ruamel.yaml==0.19.1 \
        fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
    du -sh .whl
    exit 0
fi

if [ "${1:-}" = "--rehearse" ]; then  # the CPU, tiny sizes, figures to $OUT_DIR only
    MODE=rehearse DEVICE=cpu PY=${PYTHON:-$REPO/.venv/bin/python}
    OUT_DIR=${OUT:-$(mktemp -d)}; WORK=$OUT_DIR/work RESULTS=$OUT_DIR/RESULTS.md
    SIZES="24 6 6" WORDS="2 4" CORPUS_WORKERS=2 EPOCHS=2 WARMUP=1 HIDDEN=32 LAYERS=1
    SPEED_UTT=12 LEVER_UTT=12 B=4 B_LARGE=8 SPEED_FLAGS="--warmup 0 --hidden 16" GOAL=0 T=4
else
    MODE=gpu DEVICE=cuda PY=python3
    OUT_DIR=${OUT:-$REPO/bench/gpu_check_out} WORK=/tmp/ctclab-gpu-check RESULTS=bench/RESULTS.md
    SIZES="28539 2703 2620" WORDS="3 7" CORPUS_WORKERS=$(nproc) EPOCHS=8 WARMUP=1 HIDDEN=256 LAYERS=4
    SPEED_UTT=28539 LEVER_UTT=3567 B=256 B_LARGE=1024 SPEED_FLAGS="--warmup 5" GOAL=1 T=1
fi
DAY=$(date -u +%F)
LOGS=$WORK/logs/gpu_check-$DAY
rm -rf "$WORK" && mkdir -p "$OUT_DIR" "$LOGS"
if [ "$MODE" = gpu ] && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ctclab-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/ctclab-site
fi
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# mlflow-skinny has no sqlite store: a file store. GitPython warns twice per run where git is missing.
STORE=$WORK/mlruns
export MLFLOW_TRACKING_URI=file:$STORE MLFLOW_ALLOW_FILE_STORE=true GIT_PYTHON_REFRESH=quiet
if [ "$MODE" = gpu ]; then
    CARD=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))') || { echo "no CUDA device"; exit 1; }
else
    CARD="CPU rehearsal ($(nproc) cores)"
fi
TORCH=$("$PY" -c 'import torch; print(torch.__version__)')
echo "gpu_check ($MODE): $CARD, torch $TORCH, $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
said() {  # LOG PATTERN: the log's last line matching PATTERN, else why there is none
    grep -E "$2" "$1" | tail -1 | grep . || { grep -q '^gpu_check: out of time' "$1" && echo 'skipped: out of time'; } \
        || echo 'FAILED (see log)'
}
record() {  # the figure, the log it comes from
    echo "| $DAY | $CARD | torch $TORCH | $1 ([log](logs/gpu_check-$DAY/$2)) |" | tee -a "$RESULTS"; }
# a step's timeout (longer in a rehearsal, on a busy CPU), cut to what is left of the call's budget: past
# it a step is skipped, so the call still ends with RESULTS.md and the logs
START=$(date +%s) BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$MODE" = gpu ] && echo 520 || echo 1800)}
limit() {
    local left=$((START + BUDGET - $(date +%s))) want=$(($1 * T))
    if [ "$left" -lt 15 ]; then echo "gpu_check: out of time (budget ${BUDGET} s), skipped: ${*:2}"; return 124; fi
    timeout $((want < left ? want : left)) "${@:2}"
}

# 1. the CUDA tests (they skip on the CPU)
limit 90 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -p no:randomly 2>&1 \
    | tee "$LOGS/cuda_tests.log" | tail -3
record "CUDA tests (tests/test_cuda.py): $(said "$LOGS/cuda_tests.log" '[0-9]+ (passed|failed|skipped)')" cuda_tests.log

# 2. the embedded corpus at HW3P2's size through the pipeline's stages (dvc.yaml's cmds, in order)
PROJ=$WORK/project
rm -rf "$PROJ" && mkdir -p "$PROJ" && ln -s "$REPO/pipeline" "$REPO/src" "$REPO/dvc.yaml" "$PROJ/"
read -r N_TRAIN N_DEV N_TEST <<< "$SIZES"; read -r MIN_WORDS MAX_WORDS <<< "$WORDS"
# A3 as the write-up has it; batch 256 with the large-batch recipe of experiments/reports/large_batch.md
# (4x the batch: 2x the lr after a linear warmup)
"$PY" - "$REPO/params.yaml" "$PROJ/params.yaml" <<EOF || exit 1
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))
p["data"]["synthetic"].update(train=$N_TRAIN, dev=$N_DEV, test=$N_TEST, min_words=$MIN_WORDS, max_words=$MAX_WORDS,
                              workers=$CORPUS_WORKERS)
p["model"]["conv_lstm"].update(hidden=$HIDDEN, embed_dim=$HIDDEN, lstm_layers=$LAYERS, stride=2)
p["model"]["conv_lstm"]["dropout"]["lstm"] = 0.4
p["train"].update(device="$DEVICE", batch_size=$B, lr=0.004, warmup_epochs=$WARMUP, epochs=$EPOCHS, loader_workers=2)
yaml.safe_dump(p, open(sys.argv[2], "w"), sort_keys=False)
EOF
stage_cmd() { "$PY" -c "import sys, yaml; print(yaml.safe_load(open('dvc.yaml'))['stages'][sys.argv[1]]['cmd'])" "$1" \
    | sed "s|^python |$PY |"; }
declare -A STAGE_LIMIT=([validate]=30 [fetch]=200 [preprocess]=60 [train]=120 [evaluate]=45 [submit]=45)
PIPELINE_OK=1
for stage in validate fetch preprocess train evaluate submit; do
    started=$(date +%s)
    (cd "$PROJ" && limit "${STAGE_LIMIT[$stage]}" $(stage_cmd $stage)) 2>&1 | tr '\r' '\n' \
        | grep -v -E "batch/s|utt/s\]" > "$LOGS/pipeline_$stage.log"
    status=${PIPESTATUS[0]}
    echo "$stage: exit $status in $(($(date +%s) - started)) s; $(tail -1 "$LOGS/pipeline_$stage.log")" | tee -a "$LOGS/pipeline.log"
    [ "$status" = 0 ] || { PIPELINE_OK=0; break; }
done
if [ "$PIPELINE_OK" = 1 ]; then
    SUMMARY=$("$PY" - "$PROJ" <<'EOF'
import json, statistics, sys
from pathlib import Path
import mlflow
proj = Path(sys.argv[1])
ev = json.loads((proj / "metrics/eval.json").read_text())
run = mlflow.search_runs(experiment_names=["ctclab"], order_by=["start_time DESC"], max_results=1, output_format="list")[0]
client = mlflow.MlflowClient()
def history(key):
    return [m.value for m in client.get_metric_history(run.info.run_id, key)]
epochs = history("epoch_seconds")
util, mem = history("system/gpu_0_utilization_percentage"), history("system/gpu_0_memory_usage_megabytes")
gpu = (f"GPU utilisation {statistics.mean(util):.0f} % mean, memory {max(mem) / 1024:.1f} GiB peak (MLflow system "
       "metrics)") if util else "no GPU system metrics"
print(f"{len(epochs)} epochs at {statistics.median(epochs):.1f} s median (first {epochs[0]:.1f} s); {gpu}; "
      f"dev greedy {ev['dev_lev_greedy']:.3f} (PER {ev['dev_per_greedy']:.1%}), beam({ev['beam_width']}) "
      f"{ev['dev_lev_beam']:.3f} (PER {ev['dev_per_beam']:.1%})")
EOF
)
    record "pipeline at HW3P2 size (embedded corpus $N_TRAIN/$N_DEV/$N_TEST utt, A3 h=$HIDDEN x$LAYERS, batch $B, lr 4e-3, warmup $WARMUP) fetch → submit on $DEVICE: ${SUMMARY:-summary FAILED}; stage times: $(sed -E 's/: exit 0 in ([0-9]+ s).*/ \1/' "$LOGS/pipeline.log" | paste -sd, -)" pipeline.log
else
    record "pipeline at HW3P2 size: FAILED at $(tail -1 "$LOGS/pipeline.log")" pipeline.log
fi

# 3. the DDP path on NCCL (gloo on the CPU): one epoch under torchrun with one process
if [ "$PIPELINE_OK" = 1 ]; then
    mkdir -p "$PROJ/ddp" && "$PY" - "$PROJ/params.yaml" "$PROJ/ddp/params.yaml" <<'EOF'
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))
p["train"].update(epochs=1, warmup_epochs=0)
yaml.safe_dump(p, open(sys.argv[2], "w"), sort_keys=False)
EOF
    ln -s "$PROJ/data" "$REPO/pipeline" "$REPO/src" "$PROJ/ddp/"
    (cd "$PROJ/ddp" && limit 60 "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 pipeline/train.py \
        --data data/processed --models models --metrics metrics) 2>&1 | tr '\r' '\n' | grep -v "batch/s" \
        > "$LOGS/ddp_nccl.log"
    BACKEND=$("$PY" -c "import mlflow, sys; r = mlflow.search_runs(experiment_names=['ctclab'], order_by=['start_time DESC'],
max_results=1, output_format='list')[0]; print(r.data.tags.get('process_group'), r.data.tags.get('world_size'))" 2>/dev/null)
    record "DDP under torchrun, 1 process, 1 epoch of the same training: process group ${BACKEND% *}, world size ${BACKEND#* }; $(grep -E '^epoch 1/1' "$LOGS/ddp_nccl.log" | sed 's/^epoch 1\/1: //') $(grep -q '^train: best' "$LOGS/ddp_nccl.log" || echo FAILED)" ddp_nccl.log
fi

# 4. the speed levers, side by side with batch 256 (bench/train_speed.py: the `versus` row of epoch 1)
row() { awk -v c="$2" '$1 == c && $2 == "1" {print $3 " s/epoch, " $4 " utt/s, padding " $7 ", peak " $9 " GiB"}' "$1"; }
last() { said "$1" '^train_speed: '; }
lever() {  # name, utterances, timeout, goal, --versus overrides…
    local log=$LOGS/train_speed_$1.log
    limit "$3" "$PY" bench/train_speed.py --device "$DEVICE" --utterances "$2" --batch-size "$B" $SPEED_FLAGS \
        --shards "$WORK/shards" --goal "$4" --versus "${@:5}" 2>&1 | grep -vi warn > "$log"
    record "bench/train_speed.py $2 train-clean-100-shaped utt, batch $B vs ${*:5}: base $(row "$log" base); versus $(row "$log" versus)$(grep -m1 'CUDA graphs captured' "$log" | sed 's/^/; /'); $(last "$log")" "train_speed_$1.log"
}
lever b1024 "$SPEED_UTT" 120 "$(awk -v g=$GOAL 'BEGIN{print g * 1.5}')" train.batch_size=$B_LARGE
lever stride4 "$LEVER_UTT" 45 "$GOAL" model.conv_lstm.stride=4
lever lstm_autocast "$LEVER_UTT" 45 "$GOAL" train.lstm_autocast=true
# CUDA graphs: every shape is captured before the timed epoch (its seconds are in the line). No
# effect on the CPU, so not rehearsed.
[ "$MODE" = gpu ] && lever cuda_graphs "$LEVER_UTT" 120 "$GOAL" train.cuda_graphs=true
[ "$MODE" = gpu ] && lever compile "$LEVER_UTT" 90 "$GOAL" train.compile=true  # inductor on the CPU needs a compiler

[ "$MODE" = gpu ] && cp "$RESULTS" "$OUT_DIR/RESULTS.md"
tar czf "$OUT_DIR/gpu_check_logs.tar.gz" -C "$WORK/logs" .
echo "gpu_check ($MODE): done; RESULTS.md and gpu_check_logs.tar.gz in $OUT_DIR"

#!/usr/bin/env bash
# The structured suite on the device machine, from the repository root there, with what pack.sh put in .dev/.
#   bash benchmarks/device/run_grid.sh store          # call 1 (carry .dev/part1): keep part 1, check the machine
#   bash benchmarks/device/run_grid.sh grid SECONDS   # call 2 (carry .dev/part2): join, then lr selection and grid
# `grid` runs one process per (task, method group), each `--what lr --resume` then `--what grid --resume` (seed 0
# of every row first), all stopped SECONDS after the start; a run cut short is lost, every finished one is
# recorded. Runs already in benchmarks/results/structured/ (landed earlier) are skipped and their learning-rate
# selection reused. Results: $OUT/structured/{accuracy,lr_selection}.{json,md} and accuracy.png (every process
# merged by `bench_structured.py --what publish`), $OUT/run_grid.log, $OUT/worker_logs.tar.gz.
# Environment (defaults in brackets):
#   OUT       where the results go (set by the device tool)
#   TASKS     [the five generated tasks]
#   METHOD_GROUPS [probe,adapter4,full,adapter mimi,mimi_paper adapter_plus,lora,adalora]
#             space-separated groups of
#             --methods, one process each per task; a learning-rate family stays in one group (adapter4 and
#             adapter choose one rate together)
#   NUM_WORKERS [0] DataLoader workers per process (15 processes already fill 16 cores); THREADS [cores /
#             processes] torch CPU threads per process; SNAPSHOT_S [120] how often the merged table is refreshed
#             in $OUT while the runs go on (what comes back should the call be stopped at its limit)
#   STEPS [lr grid] the bench_structured.py --what steps each process runs, in order ("grid": the rows at the
#             learning rates already selected, else at each family's default)
#   SMOKE=1   pass --smoke (a random ViT, few images, one task: the local check of this script)
#   PYTHON [python3]  SITE [/tmp/site] wheels installed here  STASH [/tmp/peft_mimi_dev] part 1 kept here
#   CACHE [/tmp/peft_mimi_cache] the PEFT_MIMI_CACHE of the runs  RESULTS [/tmp/peft_mimi_grid] per-process outputs
#   (on a machine still warm, a later `grid` call continues from RESULTS)
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?OUT is not set: the folder whose files come back}"
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
STASH=${STASH:-/tmp/peft_mimi_dev}
CACHE=${CACHE:-/tmp/peft_mimi_cache}
RESULTS=${RESULTS:-/tmp/peft_mimi_grid}
TASKS=${TASKS:-dsprites_location dsprites_orientation clevr_distance norb_azimuth norb_elevation}
METHOD_GROUPS=${METHOD_GROUPS:-probe,adapter4,full,adapter mimi,mimi_paper adapter_plus,lora,adalora}
NUM_WORKERS=${NUM_WORKERS:-0}
STEPS=${STEPS:-lr grid}
SNAPSHOT_S=${SNAPSHOT_S:-120}
read -r -a TASK_LIST <<<"$TASKS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

part1_dir() {  # part 1 as carried in this call, else as stored by an earlier call on this machine
    local dir
    for dir in .dev/part1 "$STASH/part1"; do
        if [[ -d "$dir/checkpoint" ]]; then echo "$dir"; return; fi
    done
    echo "part 1 is neither in .dev/part1 nor in $STASH/part1: the machine was given back after the call that" \
         "stored it; run 'store' (carry .dev/part1) and this call again, one right after the other" >&2
    return 1
}

install_wheels() {  # the packages the image lacks, into SITE (once per machine)
    local wheels=("$1"/wheels/*.whl)
    if [[ ! -f "$SITE/.installed" ]] || [[ "$(ls "$1"/wheels)" != "$(cat "$SITE/.installed")" ]]; then
        # the wheels are for the device's Python 3.12; naming it lets the local check install them under another
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            --python-version 3.12 --only-binary=:all: "${wheels[@]}"
        ls "$1"/wheels >"$SITE/.installed"
    fi
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

describe_machine() {
    nvidia-smi -L 2>/dev/null || log "no nvidia-smi"
    "$PYTHON" - <<'EOF'
import importlib.metadata as md, platform, sys, torch
names = ("torch", "transformers", "peft", "accelerate", "datasets", "pyarrow", "huggingface_hub", "safetensors",
         "aenum", "dill", "multiprocess", "numpy", "scikit-learn", "matplotlib", "fsspec")
print(f"python {platform.python_version()} ({sys.executable}); cuda: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
versions = []
for name in names:
    try:
        versions.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        versions.append(f"{name} MISSING")
print("; ".join(versions))
import aenum, datasets, peft, peft_mimi  # noqa: F401,E401  (fails here, not in 15 processes)
EOF
}

check_pools() {  # every task's pool loads from $1 without being generated
    PEFT_MIMI_CACHE=$1 "$PYTHON" - "${TASK_LIST[@]}" <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
import structured_tasks as st
for name in sys.argv[1:]:
    path = st.cache_root() / f"{st.TASKS[name].pool}-v{st.VERSION}"
    if not (path / "dataset_dict.json").is_file():
        sys.exit(f"pool of {name} is not in {path}: pack.sh copies it")
    split = st.load_task(name)
    print(f"{name}: {len(split['train'])} train, {len(split['test'])} test images")
EOF
}

store() {
    local part1=.dev/part1
    [[ -d $part1/checkpoint ]] || { echo "carry .dev/part1 in this call" >&2; exit 1; }
    local manifest=("$part1"/checkpoint/*.manifest.json)
    local first
    first=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["parts"][0]["sha256"])' "${manifest[0]}")
    local part=${manifest[0]%.manifest.json}.1
    [[ "$(sha256sum "$part" | cut -d' ' -f1)" == "$first" ]] || { echo "$part is damaged: pack again" >&2; exit 1; }
    rm -rf "$STASH/part1" && mkdir -p "$STASH" && cp -a "$part1" "$STASH/part1"
    log "part 1 checked and kept in $STASH/part1 ($(du -sh "$STASH/part1" | cut -f1))"
    install_wheels "$part1"
    describe_machine
    check_pools "$part1"
    check_config "$part1"
    log "ready for: bash benchmarks/device/run_grid.sh grid SECONDS (carry .dev/part2)"
}

prepare_cache() {  # CACHE = the joined checkpoint and the pools (joined once per machine)
    local part1=$1 part2=.dev/part2
    local manifest=("$part1"/checkpoint/*.manifest.json)
    local name
    name=$(basename "${manifest[0]}" .manifest.json)
    mkdir -p "$CACHE/structured"
    if [[ ! -f "$CACHE/$name/.joined" ]]; then
        [[ -d $part2/checkpoint ]] || { echo "carry .dev/part2 in this call" >&2; exit 1; }
        rm -rf "${CACHE:?}/$name"
        "$PYTHON" benchmarks/device/checkpoint_parts.py unpack "${manifest[0]}" "$part1/checkpoint" \
            "$part2/checkpoint" --out "$CACHE/$name/model.safetensors"
        cp "$part2/checkpoint/$name"/*.json "$CACHE/$name/"
        touch "$CACHE/$name/.joined"
    fi
    local pool
    for pool in "$part1"/structured/*; do
        [[ -e "$CACHE/structured/$(basename "$pool")" ]] || cp -a "$pool" "$CACHE/structured/"
    done
    export PEFT_MIMI_CACHE=$CACHE
}

check_config() {  # this transformers reads the checkpoint's config (the weights travel in the next call)
    local dir=("$1"/checkpoint/*/)
    "$PYTHON" - "${dir[0]}" <<'EOF'
import sys
from transformers import AutoConfig, AutoModel
config = AutoConfig.from_pretrained(sys.argv[1])
model = AutoModel.from_config(config)
print(f"{sys.argv[1]}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters "
      f"(transformers reads the config of {config.transformers_version})")
EOF
}

check_backbone() {  # the joined checkpoint loads as the runs load it
    "$PYTHON" - <<'EOF'
import os, sys, time
sys.path.insert(0, "benchmarks")
import bench_structured, common
started = time.time()
model, _ = common.load_model(bench_structured.BACKBONE, 2)
print(f"{bench_structured.BACKBONE}: {sum(p.numel() for p in model.parameters()):,} parameters, loaded in "
      f"{time.time() - started:.1f} s from {os.environ['PEFT_MIMI_CACHE']}")
EOF
}

worker() {  # $1 task, $2 comma-separated methods, $3 deadline (epoch seconds): lr selection, then the grid
    local task=$1 methods=$2 deadline=$3 what rc left
    local out="$RESULTS/$task-${methods//,/-}"
    local list
    IFS=, read -r -a list <<<"$methods"
    local args=(--tasks "$task" --methods "${list[@]}" --num-workers "$NUM_WORKERS" --threads "$THREADS"
                --out "$out" --merge benchmarks/results/structured/accuracy.json
                benchmarks/results/structured/lr_selection.json)
    [[ -n ${SMOKE:-} ]] && args+=(--smoke)
    for what in $STEPS; do
        left=$((deadline - $(date +%s)))
        if ((left < 10)); then
            echo "no time left for --what $what"
            return 0
        fi
        rc=0
        timeout -k 15 "$left" "$PYTHON" benchmarks/bench_structured.py --what "$what" --resume "${args[@]}" || rc=$?
        if ((rc == 124 || rc == 137)); then
            echo "--what $what stopped at the deadline"
            return 0
        elif ((rc != 0)); then
            echo "--what $what failed (exit $rc)"
            return "$rc"
        fi
    done
    echo "learning rates and grid complete"
}

merge_results() {  # every process's records (and those landed earlier) in one table: $OUT/structured/
    shopt -s nullglob
    local merge=(benchmarks/results/structured/accuracy.json benchmarks/results/structured/lr_selection.json
                 "$RESULTS"/*/accuracy.json "$RESULTS"/*/lr_selection.json)
    local publish=(--what publish --out "$OUT/structured" --tasks "${TASK_LIST[@]}" --merge "${merge[@]}")
    [[ -n ${SMOKE:-} ]] && publish+=(--smoke)
    "$PYTHON" benchmarks/bench_structured.py "${publish[@]}"
}

snapshot_loop() {  # merge_results every SNAPSHOT_S seconds until the file $1 appears
    local next=$(($(date +%s) + SNAPSHOT_S))
    until [[ -e $1 ]]; do
        sleep 2
        if (($(date +%s) >= next)); then
            merge_results >/dev/null 2>&1 || true
            next=$(($(date +%s) + SNAPSHOT_S))
        fi
    done
}

grid() {
    local budget=${1:?usage: run_grid.sh grid SECONDS}
    local started deadline part1
    started=$(date +%s)
    deadline=$((started + budget))
    part1=$(part1_dir)
    install_wheels "$part1"
    prepare_cache "$part1"
    describe_machine
    check_pools "$CACHE"
    check_backbone
    read -r -a groups <<<"$METHOD_GROUPS"
    local n=$((${#groups[@]} * ${#TASK_LIST[@]}))
    THREADS=${THREADS:-$(( $(nproc) / n > 0 ? $(nproc) / n : 1 ))}
    log "$n processes (${#TASK_LIST[@]} tasks x ${#groups[@]} method groups), $THREADS threads and $NUM_WORKERS" \
        "loader workers each, until $(date -u -d "@$deadline" +%H:%M:%S) ($((deadline - $(date +%s))) s from now)"
    mkdir -p "$RESULTS/logs"
    rm -f "$RESULTS/stop"
    snapshot_loop "$RESULTS/stop" &
    local snapshots=$!
    local pids=() names=() task group i status=0
    for task in "${TASK_LIST[@]}"; do
        for group in "${groups[@]}"; do
            worker "$task" "$group" "$deadline" >>"$RESULTS/logs/$task-${group//,/-}.log" 2>&1 &
            pids+=($!)
            names+=("$task-${group//,/-}")
        done
    done
    for i in "${!pids[@]}"; do
        if wait "${pids[$i]}"; then
            log "${names[$i]}: $(tail -n 1 "$RESULTS/logs/${names[$i]}.log")"
        else
            log "${names[$i]} FAILED; its log ends:"
            tail -n 20 "$RESULTS/logs/${names[$i]}.log"
            status=1
        fi
    done
    touch "$RESULTS/stop"
    wait "$snapshots" || true
    log "runs finished on this machine, every call (seconds each):"
    grep -h '^\[lr\]\|^\[grid\]' "$RESULTS"/logs/*.log || echo "none"
    merge_results || status=1
    tar -C "$RESULTS" -czf "$OUT/worker_logs.tar.gz" logs
    "$PYTHON" - "$OUT/structured" <<'EOF'
import json, sys
from collections import Counter
from pathlib import Path
for name in ("lr_selection", "accuracy"):
    path = Path(sys.argv[1]) / f"{name}.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    by = Counter((r["task"], r["device"]) for r in runs)
    print(f"{name}.json: {len(runs)} runs; " + "; ".join(f"{t} on {d}: {n}" for (t, d), n in sorted(by.items())))
EOF
    log "done in $(($(date +%s) - started)) s; $OUT holds: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
    return $status
}

main() {
    case ${1:-} in
        store) store ;;
        grid) grid "${2:-}" ;;
        *) echo "usage: run_grid.sh store | grid SECONDS" >&2; return 2 ;;
    esac
}

# a pipeline, not `exec > >(tee …)`: the script returns only once the log is written
main "$@" 2>&1 | tee -a "$OUT/run_grid.log"

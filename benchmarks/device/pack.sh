#!/usr/bin/env bash
# Build .dev/ (ignored) with what the device machine needs for the structured suite and does not have, in two
# folders that travel in two calls (each under the 64 MiB a call may carry, the working tree included):
#   .dev/part1/  wheels/ (Python packages missing there), structured/<pool>-v<N>/ (the generated pools but elpv),
#                checkpoint/<dinov2 dir>.1 (the first part of the packed checkpoint), .manifest.json, <dinov2 dir>/
#   .dev/part2/  checkpoint/<dinov2 dir>.2, .manifest.json and <dinov2 dir>/ (the checkpoint's json files)
# Runs here, on a machine with pip access and the cached checkpoint and pools (see README.md beside this file).
#   bash benchmarks/device/pack.sh
# Environment: PYTHON (default .venv/bin/python, else python3), PEFT_MIMI_CACHE (default ~/.cache/peft_mimi).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# the packages the device image lacks (datasets and its dill/multiprocess, aenum) or may hold in another version
# than the one this code is tested with (peft); one version of each, for the device's Python 3.12
WHEELS=(aenum==3.1.17 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2)
LIMIT=$((64 * 1024 * 1024))

# where the checkpoint and the pools are cached, and which pools the device runs (every generated one: elpv's
# images are a real data set that stays here)
read -r CKPT POOLS_DIR POOLS < <(nice -n 19 "$PYTHON" - <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
import structured_tasks
from peft_mimi.backbones.dinov2_onnx import CHECKPOINT_DIRNAME, cache_root
pools = sorted({f"{t.pool}-v{structured_tasks.VERSION}" for t in structured_tasks.TASKS.values() if t.generator})
print(cache_root() / CHECKPOINT_DIRNAME, structured_tasks.cache_root(), ",".join(pools))
EOF
)
if [[ ! -f "$CKPT/model.safetensors" || ! -f "$CKPT/config.json" ]]; then
    echo "no DINOv2 checkpoint at $CKPT: create it once with" >&2
    echo "  $PYTHON -c 'from peft_mimi.backbones import load_backbone; load_backbone(\"dinov2-s14\")'" >&2
    exit 1
fi
IFS=, read -r -a POOLS <<<"$POOLS"
for pool in "${POOLS[@]}"; do
    if [[ ! -f "$POOLS_DIR/$pool/dataset_dict.json" ]]; then
        echo "pool $pool is not cached in $POOLS_DIR: generate it once with" >&2
        echo "  $PYTHON benchmarks/structured_tasks.py --tasks <a task of that pool>" >&2
        exit 1
    fi
done

grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >>.git/info/exclude
rm -rf .dev/part1 .dev/part2
mkdir -p .dev/part1/wheels .dev/part1/structured .dev/part1/checkpoint .dev/part2/checkpoint

nice -n 19 "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .dev/part1/wheels "${WHEELS[@]}"
for pool in "${POOLS[@]}"; do cp -a "$POOLS_DIR/$pool" .dev/part1/structured/; done

name=$(basename "$CKPT")
beside=$(du -sb .dev/part1 | cut -f1)
nice -n 19 "$PYTHON" benchmarks/device/checkpoint_parts.py pack "$CKPT/model.safetensors" \
    ".dev/part1/checkpoint/$name" --balance-against "$beside"
mv ".dev/part1/checkpoint/$name.2" .dev/part2/checkpoint/
cp ".dev/part1/checkpoint/$name.manifest.json" .dev/part2/checkpoint/
for part in part1 part2; do  # the json files in both: call 1 checks that the device's transformers reads them
    mkdir ".dev/$part/checkpoint/$name"
    cp "$CKPT"/*.json ".dev/$part/checkpoint/$name/"
done

# the proof that the parts are enough: join them aside and compare with the original
check=$(mktemp -d)
trap 'rm -rf "$check"' EXIT
nice -n 19 "$PYTHON" benchmarks/device/checkpoint_parts.py unpack ".dev/part1/checkpoint/$name.manifest.json" \
    .dev/part1/checkpoint .dev/part2/checkpoint --out "$check/model.safetensors" >/dev/null
original=$(sha256sum "$CKPT/model.safetensors" | cut -d' ' -f1)
joined=$(sha256sum "$check/model.safetensors" | cut -d' ' -f1)
if [[ "$original" != "$joined" ]]; then
    echo "the joined checkpoint differs from $CKPT/model.safetensors" >&2
    exit 1
fi
echo "joined checkpoint checked: sha256 $joined"

# what each call carries: the working tree (tracked and untracked-not-ignored files) plus its part
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -L --printf='%s\n' 2>/dev/null \
    | awk '{s += $1} END {print s + 0}')
status=0
for part in part1 part2; do
    size=$(du -sb ".dev/$part" | cut -f1)
    total=$((tree + size))
    awk -v p="$part" -v s="$size" -v t="$tree" 'BEGIN { m = 2^20
        printf ".dev/%s: %5.1f MiB + working tree %5.1f MiB = %5.1f MiB of 64\n", p, s / m, t / m, (s + t) / m }'
    if ((total > LIMIT)); then
        echo "  too large for one call: make the working tree smaller" >&2
        status=1
    fi
done
exit $status

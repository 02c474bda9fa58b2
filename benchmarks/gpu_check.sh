#!/usr/bin/env bash
# The issue-13 GPU check, in one call: 2:4 semi-structured sparsity, then the structured-pruning speedup
# benchmark (sweep, verification per dtype, latency target), everything saved into $OUT as it goes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; OUT defaults to benchmarks/results
#
# Needs torch, torchvision, transformers and matplotlib on the machine; structprune runs from this tree
# (PYTHONPATH), Torch-Pruning from the wheels in .whl/ if that folder is there. Every step has a
# `timeout`, and the whole script stops starting new steps once GPU_CHECK_BUDGET_S (default 540 s = 9 min)
# is spent, so partial results always come back. Each Python step rewrites its JSON after every item.
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/benchmarks/results}"
mkdir -p "$OUT"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
START=$(date +%s)
export PYTHONUNBUFFERED=1
export TQDM_DISABLE=1  # no progress bars in the logs

# A folder of our own (not a shared /tmp/site that something else may be using).
SITE="${GPU_CHECK_SITE:-/tmp/structprune-gpu-check-site}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
export PYTHONPATH="$REPO:${PYTHONPATH:-}"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME SECONDS COMMAND...: run COMMAND under `timeout`, capped by what is left of the budget, and
# keep its output in $OUT/NAME.log (besides printing it).
step() {
    local name="$1" limit="$2"
    shift 2
    local remaining
    remaining=$(left)
    if (( remaining < 30 )); then
        echo "== $name: skipped, budget spent" | tee -a "$OUT/gpu_check.log"
        return
    fi
    (( limit > remaining )) && limit=$remaining
    echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)" | tee -a "$OUT/gpu_check.log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - START ))s" | tee -a "$OUT/gpu_check.log"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cusparselt', torch.backends.cusparselt.is_available(), torch.cuda.get_device_capability())"
} 2>&1 | tee "$OUT/gpu_check.log"

CARD="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z' 'a-z' \
    | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')"
CARD="${CARD:-unknown}"

# Order: the quick, decisive checks first; the latency target (slowest, newest API) gets what is left.
step semi_structured 90 python3 benchmarks/semi_structured.py --json "$OUT/semi_structured_${CARD}_$(date +%F).json"
step verify 60 python3 benchmarks/gpu_speedup.py --only verify --out "$OUT"
step sweep 230 python3 benchmarks/gpu_speedup.py --only sweep --budget-s 180 --tp-timeout-s 15 --out "$OUT"
REST=$(( $(left) - 10 ))
step latency "$REST" python3 benchmarks/gpu_speedup.py --only latency --budget-s $(( REST - 35 )) --out "$OUT"
echo "== done after $(( $(date +%s) - START ))s" | tee -a "$OUT/gpu_check.log"
ls -la "$OUT"

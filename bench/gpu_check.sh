#!/usr/bin/env bash
# GPU check for a lent H100/H200, in at most 8 minutes: install the carried wheels (liger-kernel,
# cut-cross-entropy), run `pytest -m gpu tests/`, then the GPU benchmark set in three parts by priority (the
# "Must show" shape first, so a time-out loses the least), then the report. Everything lands in $OUT, at most
# 8 files: gpu-tests.log, bench.log, bench-1.json, bench-2.json, bench-3.json, and the report (.md + 2 PNGs).
#
# From the session (device tool), with the wheels downloaded into .whl/ as bench/README.md says:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Locally on any CUDA machine: OUT=/tmp/gpu-out bash bench/gpu_check.sh
#
# Not `set -e`: a failing step must not stop the later ones. Each step's exit status is logged, and the
# script's own status is non-zero if any step failed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
OUT=${OUT:-$REPO/bench-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${BENCH_BUDGET_S:-450}   # whole script (a step may overrun its limit by 20 s before it is killed)
BENCH_SET=${BENCH_SET:-gpu}       # `BENCH_SET=smoke` tries the script's flow on any machine
LOG=$OUT/bench.log
START=$SECONDS
FAILED=0
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

log() { echo "[gpu_check t=$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# step NAME TIMEOUT_S LOGFILE CMD...: run with a time limit (SIGINT first, so pytest still writes its JSON),
# append output to LOGFILE, record the exit status.
step() {
    local name=$1 limit=$2 logfile=$3
    shift 3
    log "start $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" >>"$logfile" 2>&1
    local rc=$?
    log "end $name: exit $rc"
    # pytest: 5 = nothing collected (no such tests) is not a failure of this script.
    if [[ $rc -ne 0 && $rc -ne 5 ]]; then FAILED=1; fi
    return 0
}

remaining() { echo $((BUDGET_S - (SECONDS - START))); }

# 1. Carried wheels (no index on that machine): into /tmp/site, ahead of everything on the path.
if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 60 "$LOG" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
    log "no .whl/*.whl carried: liger and cce will be skipped unless installed"
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi

# 2. What machine and software this is.
describe_environment() {
    nvidia-smi || true
    "$PY" -c '
import importlib.metadata as md, torch
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print("torch", torch.__version__, "cuda", torch.version.cuda, device)
for dist in ("triton", "liger-kernel", "cut-cross-entropy", "pytest-benchmark", "pytest-timeout", "matplotlib"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
import aam_fast
print("aam_fast", aam_fast.__version__, aam_fast.__file__)
'
}
export -f describe_environment
export PY
step environment 60 "$LOG" bash -c describe_environment

# 3. The GPU tests of the package.
step gpu-tests 100 "$OUT/gpu-tests.log" "$PY" -m pytest -m gpu tests/ -q -ra -p no:cacheprovider

# 4. Benchmarks, in three parts by priority. pytest-timeout (on that image) bounds any one case.
per_case=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then per_case=(--timeout=120); fi
bench() {
    local part=$1 limit=$2 selection=$3
    if ((limit < 30)); then
        log "skip bench part $part: ${limit}s left"
        return 0
    fi
    step "bench-$part" "$limit" "$LOG" "$PY" -m pytest bench/ --benchmark-only --bench-set "$BENCH_SET" -q -ra \
        -p no:cacheprovider "${per_case[@]}" -k "$selection" --benchmark-json="$OUT/bench-$part.json"
}
CORE='test_logprobs and N8192-D4096-V128256'
NEXT='(test_grpo and B8xT1024) or P4xT1024 or N4096-D4096-V128256 or N16384-D4096-V128256'
bench 1 "$(( $(remaining) < 160 ? $(remaining) : 160 ))" "$CORE"
bench 2 "$(( $(remaining) - 130 < 150 ? $(remaining) - 130 : 150 ))" "not ($CORE) and ($NEXT)"
bench 3 "$(( $(remaining) - 25 ))" "not ($CORE) and not ($NEXT)"

# 5. The report, from whichever parts wrote their JSON.
jsons=()
for f in "$OUT"/bench-[123].json; do [[ -s $f ]] && jsons+=("$f"); done
if ((${#jsons[@]})); then
    step report 60 "$LOG" "$PY" -m bench.report "${jsons[@]}" --out "$OUT"
else
    log "no benchmark JSON written: no report"
    FAILED=1
fi
log "done in $((SECONDS - START))s; files: $(ls "$OUT" | tr '\n' ' ')"
exit $FAILED

#!/usr/bin/env bash
# GPU check for a lent H100/H200, in at most 7.5 minutes (BENCH_BUDGET_S=450), so a 15-minute lease leaves room
# for a second try: install the carried wheels (liger-kernel, cut-cross-entropy); check every provider's log-probs
# and gradients at the main shape against float32 (bench/check_providers.py) before anything is timed; run
# `pytest -m gpu tests/` with every error figure printed and collected; then the GPU benchmark set in three parts
# by priority (the "Must show" shape first, so a time-out loses the least); then the report. Everything lands in
# $OUT, 8 files at most: bench.log (all steps, every figure), errors.json (the provider check's figures and the GPU
# tests'), bench-1.json, bench-2.json, bench-3.json (or fewer parts), and the report (.md and two PNGs).
#
# From the session (device tool), with the wheels downloaded into .whl/ as bench/README.md says:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# A second, shorter try (about 4 minutes: checks and the must-show shape only):
#   run(command="BENCH_PARTS=1 BENCH_BUDGET_S=240 bash bench/gpu_check.sh", carry=[".whl"], timeout_s=300)
# Locally on any CUDA machine: OUT=/tmp/gpu-out bash bench/gpu_check.sh
#
# The end-to-end cases against TRL (bench/e2e: train-rm beside RewardTrainer, train-grpo beside GRPOTrainer, bf16
# autocast, a Qwen2-0.5B-shaped model built from a config with random weights, bench/e2e/synthetic.py) are a second
# call of their own, as they need TRL's wheels too (bench/README.md) and their own files in $OUT (bench.log,
# e2e-rm.json, e2e-grpo.json):
#   run(command="BENCH_MODE=e2e bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
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
BENCH_PARTS=${BENCH_PARTS:-3}     # 1: only the must-show shape; 2: and the next priority; 3: everything
CHECK_SHAPE=${CHECK_SHAPE:-8192,4096,128256}
BENCH_MODE=${BENCH_MODE:-kernels}   # kernels: checks and microbenchmarks; e2e: the end-to-end cases against TRL
E2E_SHAPE=${E2E_SHAPE:-qwen2-0.5b}  # bench/e2e/synthetic.py's shapes (`tiny` tries the flow on any machine)
E2E_DEVICE=${E2E_DEVICE:-cuda}
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

# E2E mode: whole training runs of both stages beside TRL's trainers on one built model, then stop.
if [[ $BENCH_MODE == e2e ]]; then
    ASSETS=/tmp/e2e-assets
    step e2e-assets 120 "$LOG" "$PY" -m bench.e2e.synthetic --out "$ASSETS" --shape "$E2E_SHAPE"
    dtype=bfloat16
    [[ $E2E_DEVICE == cpu ]] && dtype=float32
    common=(--device "$E2E_DEVICE" --dtype "$dtype" --source "$ASSETS/pairs.jsonl")
    step e2e-rm "$(( ($(remaining) - 20) * 2 / 3 ))" "$LOG" "$PY" -m bench.e2e.reward_model --model "$ASSETS/model" \
        "${common[@]}" --steps 16 --json "$OUT/e2e-rm.json"
    step e2e-grpo "$(( $(remaining) - 20 ))" "$LOG" "$PY" -m bench.e2e.grpo --policy "$ASSETS/model" "${common[@]}" \
        --max-prompt-tokens 512 --json "$OUT/e2e-grpo.json"
    [[ -s $OUT/e2e-rm.json && -s $OUT/e2e-grpo.json ]] || FAILED=1
    log "done in $((SECONDS - START))s; files: $(ls "$OUT" | tr '\n' ' ')"
    exit $FAILED
fi

# 3. Every provider's values and gradients at the main shape against float32, before any timing.
step provider-check 120 "$LOG" "$PY" -m bench.check_providers --shape "$CHECK_SHAPE" --out "$OUT/providers.json"

# 4. The GPU tests of the package: -rP prints the passing tests' output (their error figures), which also go to
#    gpu-errors.jsonl.
export AAM_FAST_GPU_ERRORS=$OUT/gpu-errors.jsonl
step gpu-tests 100 "$LOG" "$PY" -m pytest -m gpu tests/ -q -rA -rP -p no:cacheprovider
# one file for both (the 8-file limit on what comes back)
"$PY" - "$OUT" <<'PYEOF' >>"$LOG" 2>&1
import json, os, sys
out = sys.argv[1]
merged = {}
for key, name in (("provider_check", "providers.json"), ("gpu_tests", "gpu-errors.jsonl")):
    path = os.path.join(out, name)
    if os.path.exists(path):
        with open(path) as handle:
            merged[key] = json.load(handle) if name.endswith(".json") else [json.loads(x) for x in handle if x.strip()]
        os.remove(path)
with open(os.path.join(out, "errors.json"), "w") as handle:
    json.dump(merged, handle, indent=1, sort_keys=True)
print("errors.json:", ", ".join(merged) or "nothing recorded")
PYEOF

# 5. Benchmarks, in three parts by priority. pytest-timeout (on that image) bounds any one case. Each part gets
#    what is left minus what the report needs; part 3 only runs after part 2 has had its turn.
per_case=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then per_case=(--timeout=120); fi
REPORT_S=25
bench() {
    local part=$1 limit=$2 selection=$3
    if ((limit < 30)); then
        log "skip bench part $part: ${limit}s left"
        return 0
    fi
    step "bench-$part" "$limit" "$LOG" "$PY" -m pytest bench/ --benchmark-only --bench-set "$BENCH_SET" -q -ra \
        -p no:cacheprovider "${per_case[@]}" -k "$selection" --benchmark-json="$OUT/bench-$part.json"
}
cap() { local want=$1 left=$(( $(remaining) - REPORT_S )); echo $(( left < want ? left : want )); }
CORE='test_logprobs and N8192-D4096-V128256'
NEXT='(test_grpo and B8xT1024) or P4xT1024 or N4096-D4096-V128256 or N16384-D4096-V128256'
bench 1 "$(cap 160)" "$CORE"
if ((BENCH_PARTS >= 2)); then bench 2 "$(cap 150)" "not ($CORE) and ($NEXT)"; fi
if ((BENCH_PARTS >= 3)); then bench 3 "$(cap 100000)" "not ($CORE) and not ($NEXT)"; fi

# 6. The report, from whichever parts wrote their JSON.
jsons=()
for f in "$OUT"/bench-[123].json; do [[ -s $f ]] && jsons+=("$f"); done
if ((${#jsons[@]})); then
    step report "$REPORT_S" "$LOG" "$PY" -m bench.report "${jsons[@]}" --out "$OUT"
else
    log "no benchmark JSON written: no report"
    FAILED=1
fi
log "done in $((SECONDS - START))s; files: $(ls "$OUT" | tr '\n' ' ')"
exit $FAILED

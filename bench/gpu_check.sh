#!/usr/bin/env bash
# The GPU check: one call of at most 8 minutes (BENCH_BUDGET_S=470) on a lent H100/H200 that cannot abort and loses
# at most the running part. In order, each part writing its JSON into $OUT as it ends (bench/README.md has the
# budget of each):
#   1. phases.json       the phase profile at the main shape (bench/phase_profile.py): each kernel and cuBLAS product
#                        timed alone with CUDA events, the tile configs the autotuner chose, whether a fallback
#                        fired, the workspace of each mode;
#   2. correctness.json  every provider's log-probs and gradients against float32 at N=16384 (several chunks) and at
#                        ragged shapes (bench/check_providers.py; rewritten after each provider);
#   3. providers.json    the benchmarks at the main shape (N=8192, D=4096, V=128256 bf16; GRPO 8 x 1024): aam-triton,
#                        its local-loss mode, aam-triton-filter, Liger, CCE, torch's linear_cross_entropy, and the
#                        bare bf16 products (each case's floor);
#   4. gpu-tests.json    tests/test_gpu.py and the two-process determinism test, autotuning pinned
#                        (AAM_FAST_AUTOTUNE=0);
#   then the report of providers.json (.md and two PNGs), and bench.log with every step's output: 8 files.
# Test and benchmark files are named (no folder-wide collection): a missing optional package (liger-kernel,
# cut-cross-entropy) skips its provider with the reason recorded.
#
# From the session (device tool), with the wheels in .whl/ (bench/README.md):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Rehearsal on any CPU machine (tiny shapes, the Triton interpreter; every step, every file, well under a minute):
#   PYTHON=.venv/bin/python BENCH_SET=smoke bash bench/gpu_check.sh
# The end-to-end cases against TRL (bench/e2e) are a call of their own (TRL's wheels too):
#   run(command="BENCH_MODE=e2e bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Not `set -e`: a failing step must not stop the later ones. Each step's exit status is logged, and the script's own
# status is non-zero if any step failed.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
OUT=${OUT:-$REPO/bench-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET_S=${BENCH_BUDGET_S:-470}   # the whole script (a step may overrun its limit by 10 s before it is killed)
BENCH_SET=${BENCH_SET:-gpu}       # smoke: tiny shapes, on CPU under the Triton interpreter (the rehearsal)
BENCH_MODE=${BENCH_MODE:-kernels} # kernels: the four parts above; e2e: the end-to-end cases against TRL
E2E_SHAPE=${E2E_SHAPE:-qwen2-0.5b}
E2E_DEVICE=${E2E_DEVICE:-cuda}
LOG=$OUT/bench.log
START=$SECONDS
FAILED=0
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

if [[ $BENCH_SET == smoke ]]; then
    DTYPE=float32                      # the interpreter mis-multiplies bfloat16 in tl.dot
    PROFILE_SHAPE=32,16,96
    PROFILE_CALLS=1
    PROFILE_SECONDS=0.01
    CHECK_SHAPES="40,16,157"
    CHECK_CHUNK_MB=0.02                # 32-row chunks: the check crosses a chunk boundary as N=16384 does on a GPU
    BENCH_SELECT="N40-D16-V157 or B2xT20"
    BENCH_ROUNDS=(--bench-max-rounds 1)
    DEVICE_ARGS=(--device cpu)
    BENCH_DEVICE=(--bench-device cpu)
    export TRITON_INTERPRET=1
else
    DTYPE=bfloat16
    PROFILE_SHAPE=8192,4096,128256
    PROFILE_CALLS=3
    PROFILE_SECONDS=1
    CHECK_SHAPES="16384,4096,128256;8191,4096,128257"
    CHECK_CHUNK_MB=""
    BENCH_SELECT="N8192-D4096-V128256 or B8xT1024"
    BENCH_ROUNDS=()
    DEVICE_ARGS=()
    BENCH_DEVICE=()
fi
PROVIDERS=aam-triton,aam-triton-local,aam-triton-filter,liger,cce,torch-lce

log() { echo "[gpu_check t=$((SECONDS - START))s] $*" | tee -a "$LOG"; }
remaining() { echo $((BUDGET_S - (SECONDS - START))); }
# cap WANT: WANT seconds, or what is left of the budget after RESERVE seconds for the later parts.
cap() { local want=$1 reserve=${2:-0} left; left=$(( $(remaining) - reserve )); echo $(( left < want ? left : want )); }

# step NAME TIMEOUT_S CMD...: run with a time limit (SIGINT first, so pytest still writes its JSON), output appended
# to the log, the exit status recorded. pytest's 5 (nothing collected) is no failure.
step() {
    local name=$1 limit=$2
    shift 2
    if ((limit < 5)); then
        log "skip $name: ${limit}s left"
        FAILED=1
        return 0
    fi
    log "start $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    log "end $name: exit $rc"
    if [[ $rc -ne 0 && $rc -ne 5 ]]; then FAILED=1; fi
    return 0
}

# 0. Carried wheels (no index on that machine): into /tmp/site, ahead of everything on the path.
WHEELS=${WHEELS_DIR:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
    log "no $WHEELS/*.whl carried: liger and cce are skipped unless the image has them"
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi

# The versions without importing torch (the profile records the device as torch sees it).
describe_environment() {
    nvidia-smi 2>/dev/null || echo "no nvidia-smi"
    "$PY" -c '
import importlib.metadata as md, platform
print("python", platform.python_version())
for dist in ("torch", "triton", "liger-kernel", "cut-cross-entropy", "transformers", "datasets", "peft",
             "pytest-benchmark", "pytest-timeout", "matplotlib"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
'
}
export -f describe_environment
export PY
step environment 30 bash -c describe_environment

# E2E mode: whole training runs of both stages beside TRL's trainers on one built model, then stop.
if [[ $BENCH_MODE == e2e ]]; then
    ASSETS=/tmp/e2e-assets
    step e2e-assets 120 "$PY" -m bench.e2e.synthetic --out "$ASSETS" --shape "$E2E_SHAPE"
    dtype=bfloat16
    [[ $E2E_DEVICE == cpu ]] && dtype=float32
    common=(--device "$E2E_DEVICE" --dtype "$dtype" --source "$ASSETS/pairs.jsonl")
    step e2e-rm "$(( ($(remaining) - 20) * 2 / 3 ))" "$PY" -m bench.e2e.reward_model --model "$ASSETS/model" \
        "${common[@]}" --steps 16 --json "$OUT/e2e-rm.json"
    step e2e-grpo "$(( $(remaining) - 20 ))" "$PY" -m bench.e2e.grpo --policy "$ASSETS/model" "${common[@]}" \
        --max-prompt-tokens 512 --json "$OUT/e2e-grpo.json"
    [[ -s $OUT/e2e-rm.json && -s $OUT/e2e-grpo.json ]] || FAILED=1
    log "done in $((SECONDS - START))s; files: $(ls "$OUT" | tr '\n' ' ')"
    exit $FAILED
fi

# 1. Phase profile (autotuning on: its first calls compile and tune what the later parts reuse from Triton's cache).
step phase-profile "$(cap 90 300)" "$PY" -m bench.phase_profile --shape "$PROFILE_SHAPE" --dtype "$DTYPE" \
    --seconds "$PROFILE_SECONDS" --min-calls "$PROFILE_CALLS" --out "$OUT/phases.json" "${DEVICE_ARGS[@]}"

# 2. Correctness against float32 before anything is timed.
step correctness "$(cap 120 200)" env ${CHECK_CHUNK_MB:+AAM_FAST_TRITON_CHUNK_MB=$CHECK_CHUNK_MB} \
    "$PY" -m bench.check_providers --shapes "$CHECK_SHAPES" --dtype "$DTYPE" --providers "$PROVIDERS" \
    --out "$OUT/correctness.json" "${DEVICE_ARGS[@]}"

# 3. The providers at the main shape (pytest-timeout, where the image has it, bounds any one case).
per_case=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then per_case=(--timeout=90); fi
step providers "$(cap 150 110)" "$PY" -m pytest bench/test_bench_logprobs.py bench/test_bench_grpo.py \
    --benchmark-only --bench-set "$BENCH_SET" "${BENCH_DEVICE[@]}" "${BENCH_ROUNDS[@]}" --bench-providers "$PROVIDERS" \
    -k "$BENCH_SELECT" -q -ra -p no:cacheprovider "${per_case[@]}" --benchmark-json="$OUT/providers.json"

# 4. The GPU tests with autotuning pinned; each test's error figures go to gpu-tests.jsonl as it ends.
export AAM_FAST_GPU_ERRORS=$OUT/gpu-tests.jsonl
step gpu-tests "$(cap 120 25)" env AAM_FAST_AUTOTUNE=0 "$PY" -m pytest tests/test_gpu.py \
    "tests/test_triton_tuning.py::test_pinned_autotuning_gives_the_same_bits_in_two_processes" \
    -q -rA -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml"
"$PY" -m bench.gpu_tests_json "$OUT/gpu-tests.xml" "$OUT/gpu-tests.jsonl" --out "$OUT/gpu-tests.json" >>"$LOG" 2>&1 \
    || FAILED=1

# 5. The report of the providers' benchmarks.
if [[ -s $OUT/providers.json ]]; then
    step report "$(cap 25)" "$PY" -m bench.report "$OUT/providers.json" --out "$OUT"
else
    log "no providers.json written: no report"
    FAILED=1
fi
for part in phases correctness providers gpu-tests; do
    [[ -s $OUT/$part.json ]] || { log "missing $part.json"; FAILED=1; }
done
log "done in $((SECONDS - START))s (exit $FAILED); files: $(ls "$OUT" | tr '\n' ' ')"
exit $FAILED

#!/usr/bin/env bash
# usage: bench/gpu_suite.sh OUT_DIR [--smoke] [--only STEP,STEP,...]
#
# The GPU suite: one command that, on a machine with one NVIDIA GPU (sized for an H200, no network),
# installs the project, runs the real-GPU tests and every benchmark, and leaves all results under
# OUT_DIR, in at most 8 minutes:
#
#   OUT_DIR/summary.txt       each step's status and headline numbers (also printed last)
#   OUT_DIR/summary.json      the same, machine-readable
#   OUT_DIR/versions.txt      python, torch, CUDA device, numba, numba-cuda, mpi4py, transformers
#   OUT_DIR/steps.tsv         one line per step: name, status, exit status, seconds, budget, log, note
#   OUT_DIR/logs/STEP.log     each step's output
#   OUT_DIR/tests_*.xml       JUnit XML of the test runs
#   OUT_DIR/layer_*.json      bench_layer.py's numbers; gpu_kernels.json bench/gpu_kernels.py's; cost_model.json
#                             bench_cost_model.py's
#   OUT_DIR/train/STEP/       history.json and config.toml of each training run
#   OUT_DIR/results.tar.gz    all of the above in one file (the device tool brings back 8 files at most)
#
# --only STEP,...: run only the named steps (names as in steps.tsv; install and versions always run),
# e.g. to rerun what failed within a short GPU lease: --only tests_gpu,dispatch,alltoall
#
# --smoke: the same steps on a CPU-only machine at tiny sizes (--device cpu; the CUDA kernels in
# numba's CUDA simulator where a script supports it, else skipped with the reason), 1-2 ranks, in
# about 2 minutes (at most 150 s); tests/test_gpu_suite.py runs it in CI so the suite does not rot.
#
# Every step runs under `timeout` with its own budget (in each section's title; they add up to 540 s
# with the summary's 5 s; the probes between steps take a few seconds more),
# its exit status is recorded, and a failure does not stop the next steps. On top of the budgets a
# whole-suite deadline (SUITE_BUDGET_S, default 470 s; 150 s with --smoke) shortens the last steps
# or skips them, so the suite always ends in time. The numbers are not checked: the summary shows them.
#
# Environment: PYTHON (default python3) is the interpreter used for everything (the test passes
# .venv/bin/python); SUITE_BUDGET_S overrides the deadline; SUITE_LAUNCHER=mpi|torch overrides the
# launcher found for the multi-rank steps. On the GPU machine it is
# /opt/torch/.venv/bin/python3 with torch, numba, numba-cuda, mpi4py, transformers and pytest but
# possibly no mpirun: then the multi-rank benchmarks run under torchrun instead
# (python -m torch.distributed.run), and the cost model, which launches mpirun only, is skipped.
set -u

usage() { echo "usage: $0 OUT_DIR [--smoke] [--only STEP,STEP,...]" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 4 ]; then usage; fi
OUT=""; SMOKE=0; ONLY=""; WANT_ONLY=0
for arg in "$@"; do
    if [ $WANT_ONLY = 1 ]; then ONLY=",$arg,"; WANT_ONLY=0; continue; fi
    case "$arg" in
        --smoke) SMOKE=1 ;;
        --only) WANT_ONLY=1 ;;
        -h|--help) usage ;;
        -*) usage ;;
        *) [ -z "$OUT" ] || usage; OUT=$arg ;;
    esac
done
[ -n "$OUT" ] && [ $WANT_ONLY = 0 ] || usage

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
mkdir -p "$OUT/logs" "$OUT/train" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && ! python3 -c "import torch" 2>/dev/null && [ -x /opt/torch/.venv/bin/python3 ]; then
    PY=/opt/torch/.venv/bin/python3        # the GPU machine's interpreter, where python3 on the PATH is another one
fi
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac   # a relative path: from here on absolute
if [ $SMOKE = 1 ]; then MODE=smoke; BUDGET=${SUITE_BUDGET_S:-150}; else MODE=full; BUDGET=${SUITE_BUDGET_S:-470}; fi
SCRATCH=$(mktemp -d)                      # training checkpoints (GBs on the large model) stay out of OUT_DIR
trap 'rm -rf "$SCRATCH"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1   # the GPU machine runs as root (Open MPI refuses otherwise)
: > "$OUT/steps.tsv"
rm -f "$OUT"/tests_*.xml "$OUT"/layer_*.json "$OUT/gpu_kernels.json" "$OUT/cost_model.json" "$OUT/summary.txt"
START_MS=$(date +%s%3N)

elapsed_s() { echo $(( ($(date +%s%3N) - START_MS) / 1000 )); }
say() { echo "[gpu_suite $(elapsed_s)s] $*"; }

# record NAME STATUS RC SECONDS BUDGET LOG NOTE  ->  one line of steps.tsv
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$OUT/steps.tsv"; }

skip() {   # skip NAME REASON
    record "$1" skipped "" 0 "" "" "$2"
    say "$1: skipped: $2"
}

# step NAME BUDGET_S COMMAND...: run COMMAND under timeout (the smaller of its budget and what is left of
# the suite's), output to logs/NAME.log, and record its status; never fails the script.
step() {
    local name=$1 budget=$2; shift 2
    case "$name" in install|versions) ;; *)
        if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then skip "$name" "not named by --only"; return 1; fi ;;
    esac
    local left=$(( BUDGET - $(elapsed_s) - 5 ))          # 5 s kept for the summary
    if [ "$left" -lt 5 ]; then skip "$name" "the suite's ${BUDGET} s budget is spent"; return 1; fi
    [ "$budget" -le "$left" ] || budget=$left
    say "$name (at most ${budget}s): $*"
    local log="logs/$name.log" t0 rc status seconds
    t0=$(date +%s%3N)
    timeout --kill-after=5 "$budget" "$@" > "$OUT/$log" 2>&1 < /dev/null
    rc=$?
    seconds=$(( ($(date +%s%3N) - t0) / 1000 ))
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    record "$name" "$status" "$rc" "$seconds" "$budget" "$log" ""
    say "$name: $status (exit $rc, ${seconds}s)"
    if [ $rc != 0 ]; then tail -n 4 "$OUT/$log" | sed 's/^/    | /'; fi
    return $rc
}

# The options every benchmark script understands: pass --engine only where --help lists it (their
# command-line interface is being migrated; read it at run time rather than assume it).
accepts() { timeout 60 "$PY" "bench/$1" --help 2>/dev/null | grep -q -- "$2"; }

say "mode $MODE, output $OUT, python $PY, budget ${BUDGET}s"

# ---- 1. install without network (budget 20 s), versions (10 s) ------------------------------------------
# --no-deps --no-index: the GPU machine has every dependency but no network; --no-build-isolation:
# use the installed setuptools instead of downloading one. If pip cannot install (an old setuptools),
# a symlink tree maps the package like pyproject.toml does, on PYTHONPATH.
imports() { (cd / && "$PY" -c "import fastmoe_edu.backends, fastmoe_edu.distributed" >/dev/null 2>&1); }
if [ $SMOKE = 1 ] && imports; then
    skip install "smoke mode: fastmoe_edu already imports in $PY"
elif ! step install 20 "$PY" -m pip install --no-deps --no-index --no-build-isolation -e . || ! imports; then
    SRC=$SCRATCH/src
    mkdir -p "$SRC/fastmoe_edu" && ln -sf "$ROOT"/fastmoe_edu/* "$SRC/fastmoe_edu/" && ln -sfn "$ROOT/backends" "$SRC/fastmoe_edu/backends"
    export PYTHONPATH="$SRC:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1   # cwd's fastmoe_edu/ would shadow it
    say "pip install failed: using the source tree through PYTHONPATH ($SRC)"
fi
step versions 10 "$PY" bench/gpu_suite_summary.py versions
cp "$OUT/logs/versions.log" "$OUT/versions.txt"
if command -v nvidia-smi >/dev/null; then
    { echo; echo "nvidia-smi:"; timeout 20 nvidia-smi 2>&1 | head -n 20; } >> "$OUT/versions.txt"
fi

HAS_GPU=0
if [ $SMOKE = 0 ] && timeout 60 "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    HAS_GPU=1
fi
NO_GPU="torch sees no CUDA GPU here (use --smoke on a CPU-only machine)"
LAUNCHER=${SUITE_LAUNCHER:-$(timeout 60 "$PY" bench/gpu_suite_summary.py launcher 2>>"$OUT/versions.txt")}
[ "$LAUNCHER" = mpi ] || LAUNCHER=torch
say "GPU: $([ $HAS_GPU = 1 ] && echo yes || echo no); launcher for the multi-rank steps: $LAUNCHER"

# ---- 2. tests (GPU tests 90 s) -------------------------------------------------------------------------
# -m gpu: the real-GPU variants (they skip without a GPU): each CUDA kernel and the whole layer on CUDA
# tensors against the reference, float32/float64/bfloat16 (26 s on the H200 in 2026-11, most of it numba-cuda compiling
# kernels). The CPU-target backend tests are CI's (.ci/run; over 45 s here, mostly numba compiling):
# smoke mode runs a few of them and a few CUDA-simulator cases (tests/cudasim_check.py).
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
step tests_gpu 90 "${PYTEST[@]}" -m gpu tests/ --durations=5 --junitxml="$OUT/tests_gpu.xml"
if [ $SMOKE = 1 ]; then
    step tests_backends 60 "${PYTEST[@]}" tests/test_backends.py -m "not gpu" -k "numba-cpu and softmax_top_k" \
        --junitxml="$OUT/tests_backends.xml"
    step cudasim_kernels 20 env NUMBA_ENABLE_CUDASIM=1 "$PY" tests/cudasim_check.py \
        integer-random float-random-float32 layer-softmax_top_k-swiglu-float32
else
    skip tests_backends "the CPU-target backend tests run in CI (.ci/run); the CUDA kernels are tests_gpu's"
fi

# ---- 3. dispatch kernels vs copy_ bandwidth (30 s) -------------------------------------------------------
# 262144 tokens × 1024 float32: a 1 GiB input and a 2 GiB dispatched buffer, far past the H200's caches.
if [ $HAS_GPU = 1 ]; then
    step dispatch 30 "$PY" bench/bench_dispatch.py --device cuda --tokens 262144 --d-model 1024 --repeats 10
elif [ $SMOKE = 1 ]; then
    say "dispatch: numba_cuda runs only on CUDA tensors in bench_dispatch.py: the CPU target here"
    step dispatch 20 "$PY" bench/bench_dispatch.py --device cpu --tokens 256 --d-model 32 --experts 4 --repeats 1
else
    skip dispatch "$NO_GPU"
fi

# ---- 3b. issue 27's kernel experiment (45 s): copy-kernel variants, dispatch bytes ÷ copy_, host µs per
# launch, CUDA-graph capture with sync debug mode "error", the bias-gradient and ranking re-checks ----------
if [ $HAS_GPU = 1 ]; then
    step gpu_kernels 45 "$PY" bench/gpu_kernels.py --repeats 5 --json "$OUT/gpu_kernels.json"
elif [ $SMOKE = 1 ]; then
    step gpu_kernels 20 env NUMBA_ENABLE_CUDASIM=1 "$PY" bench/gpu_kernels.py --smoke
else
    skip gpu_kernels "$NO_GPU"
fi

# ---- 4. the MoE layer forward + backward, bfloat16 and float32 (55 s each) -------------------------------
# --config all: dispatch-heavy, FastMoE's (T 4096, d 1024, h 4096, GELU, E 64, k 2) and Qwen3-30B-A3B's
# expert shape (T 32768, d 2048, h 768 SwiGLU, E 128, k 8), with the HF Mixtral block as a peer.
for dtype in bfloat16 float32; do
    if [ $HAS_GPU = 1 ]; then
        step "layer_$dtype" 55 "$PY" bench/bench_layer.py --device cuda --dtype "$dtype" --config all \
            --repeats 3 --loop-tokens 16 --peak-size 8192 --json "$OUT/layer_$dtype.json"
    elif [ $SMOKE = 1 ]; then
        step "layer_$dtype" 30 "$PY" bench/bench_layer.py --device cpu --dtype "$dtype" --config all \
            --tokens 64 --experts 8 --d-model 64 --d-hidden 128 --repeats 1 --loop-tokens 2 --peak-size 128 \
            --json "$OUT/layer_$dtype.json"
    else
        skip "layer_$dtype" "$NO_GPU"
    fi
done

# ---- 5. training tokens/s, reference vs numba: default, large, large in bfloat16 (135 s for the six) -----
# tokens/s is read from each run's history.json (median after warm-up) by the summary.
TRAIN=(--progress=false --eval_interval=0 --eval_iters=1 --sample_tokens=0)
if [ $HAS_GPU = 1 ]; then
    TRAIN+=(--device=cuda); DEFAULT=(--max_steps=60)
    LARGE=(--max_steps=20 --d_model=1024 --n_head=16 --n_layer=4 --d_hidden=1024 --num_experts=8 --seq_len=256 --batch_size=64)
else
    TRAIN+=(--device=cpu); DEFAULT=(--max_steps=4)
    LARGE=(--max_steps=3 --d_model=96 --n_head=4 --batch_size=8)
fi
LARGE_BF16=("${LARGE[@]}" --dtype=bfloat16)                # mixed precision: autocast, float32 master weights
if [ $HAS_GPU = 1 ] || [ $SMOKE = 1 ]; then
    for size in default large large_bf16; do
        for backend in reference numba; do
            name=train_${size}_$backend
            case $size in
                default) extra=("${DEFAULT[@]}") ;;
                large) extra=("${LARGE[@]}") ;;
                *) extra=("${LARGE_BF16[@]}") ;;
            esac
            if [ $backend = numba ]; then budget=25; else budget=20; fi       # numba compiles its kernels first
            step "$name" $budget "$PY" -m fastmoe_edu.train "${TRAIN[@]}" \
                "${extra[@]}" --backend=$backend --out_dir="$SCRATCH/$name"
            mkdir -p "$OUT/train/$name"
            cp "$SCRATCH/$name/history.json" "$SCRATCH/$name/config.toml" "$OUT/train/$name/" 2>/dev/null
            rm -rf "${SCRATCH:?}/$name"
        done
    done
else
    for name in train_{default,large,large_bf16}_{reference,numba}; do
        skip "$name" "$NO_GPU"
    done
fi

# ---- 6. CPU multi-rank: all-to-all α/β (25 s), strong scaling (40 s), cost model (35 s) -------------------
# 1..8 ranks on the GPU machine's 16 cores: no oversubscription. CUDA_VISIBLE_DEVICES= keeps the ranks
# off the GPU. Each script launches mpirun (or torchrun with --engine torch) itself.
CPU_ONLY=(env CUDA_VISIBLE_DEVICES=)
engine_for() {   # engine_for SCRIPT: the --engine option for this launcher, if the script takes one
    if accepts "$1" "--engine"; then echo "--engine $LAUNCHER"; fi
}
if [ $SMOKE = 1 ]; then
    A2A=(--ranks 2 --repeats 1); SCALING=(--ranks 1 2 --steps 2 --warmup 1); COST=(--ranks 1 2)
else
    A2A=(--ranks 2 4 8 --repeats 10); SCALING=(--ranks 1 2 4 8 --steps 6 --warmup 2); COST=(--ranks 1 2 4 8)
fi
# shellcheck disable=SC2046  # engine_for's words are meant to split
step alltoall 25 "${CPU_ONLY[@]}" "$PY" bench/bench_alltoall.py "${A2A[@]}" $(engine_for bench_alltoall.py)
# shellcheck disable=SC2046
step scaling 40 "${CPU_ONLY[@]}" "$PY" bench/bench_scaling.py "${SCALING[@]}" --backend numba $(engine_for bench_scaling.py)
if [ "$LAUNCHER" = mpi ] || accepts bench_cost_model.py "--engine"; then
    # shellcheck disable=SC2046
    step cost_model 35 "${CPU_ONLY[@]}" "$PY" bench/bench_cost_model.py "${COST[@]}" --json "$OUT/cost_model.json" \
        $([ "$LAUNCHER" = mpi ] || echo "--engine torch")
else
    skip cost_model "bench_cost_model.py launches mpirun only (no --engine option), and the launcher here is torchrun (see versions.txt)"
fi

# ---- summary (5 s) -----------------------------------------------------------------------------------------
printf '{"mode": "%s", "budget_s": %s, "elapsed_s": %s, "launcher": "%s", "gpu": %s}\n' \
    "$MODE" "$BUDGET" "$(elapsed_s)" "$LAUNCHER" "$HAS_GPU" > "$OUT/suite.json"
if ! timeout 30 "$PY" bench/gpu_suite_summary.py summary "$OUT" > "$OUT/logs/summary.log" 2>&1; then
    { echo "summary helper failed (logs/summary.log); the steps:"; cat "$OUT/steps.tsv"; } > "$OUT/summary.txt"
fi
tar -czf "$SCRATCH/results.tar.gz" -C "$OUT" --exclude=results.tar.gz . && mv "$SCRATCH/results.tar.gz" "$OUT/"
echo
cat "$OUT/summary.txt"
# Exit status: 1 if a step failed or timed out (skipped steps do not count), else 0.
! cut -f2 "$OUT/steps.tsv" | grep -qx -e failed -e timeout

#!/usr/bin/env bash
# One-shot check of nnunetv2_ext on a CUDA GPU: versions, the WKV kernel's build and self-check,
# the CUDA tests, the WKV benchmark and the network benchmark at realistic 3d_fullres plans.
#
#   benchmarks/gpu_check.sh [--cpu-smoke] [--steps LIST] [--budget SECONDS] [--step-timeout SECONDS]
#                           [OUT_DIR]
#
# Run from anywhere; the repository is this script's parent folder; PYTHON names the interpreter (default python). Every output goes under OUT_DIR
# (default ./gpu_check_<UTC date and time>; it must not exist yet): one log per step in logs/, the
# WKV benchmark in bench_wkv/ (on CUDA also call_cost.md, the op's fixed cost per call), the network benchmark in networks/, and summary.md, which is also
# printed at the end. A step that fails or times out is recorded and the others still run; the
# whole run stays within --budget seconds (default 480 = 8 minutes) and each step within its own
# limit (--step-timeout caps them all). --steps runs only some of the steps, comma-separated, in
# their fixed order: environment,wkv_selfcheck,tests,bench_wkv,wkv_glsp,wkv_ncu,wkv_chunks,wkv_depths,
# plans,networks (by default all but wkv_glsp, wkv_ncu, wkv_chunks and wkv_depths; networks needs plans;
# the short WKV steps come before the network benchmark, the longest, so that a budget too small for all
# drops the network figures rather than the kernel's). wkv_ncu profiles one forward +
# backward of the kernel at GLSP's largest sequence on default 3d_fullres plans (B=2, T=32768, C=128)
# with Nsight Compute (benchmarks/wkv_ncu.py: DRAM bytes, L2 hit rate, occupancy, cycles per
# instruction per kernel) for the automatic chunk length and 32; wkv_chunks times the kernel there for
# the automatic and several forced chunk lengths (CUDA_WKV_CHUNK), to tune the automatic rule (about 2 minutes);
# wkv_depths times it (T=4096 and 32768, C=128) for the default depth of its loads ahead (phases 1 and 2;
# phase 3 loads by blocks of checkpoints, whatever the depth) and for
# CUDA_WKV_ROWS_AHEAD=1 and 4 (two more builds, made beside the self-check's; about 2 minutes); wkv_glsp times
# it at each of GLSP's calls on those plans (T = 32768, 4096, 512, 64 at C = 128, 256, 320, 320; under a
# minute). On CUDA the WKV benchmarks also give the bandwidth of calls issued back to back (as in training)
# and, like the network benchmark, profile calls / one training step (--profile): each
# kernel's device time, so the host overhead and the slowest kernels show. Exit status: 0 all
# steps passed, 1 a step failed or timed out, 2 no GPU or bad arguments.
#
# A machine without nnU-Net and without a package index (the lent GPU machine) first installs it from
# wheels fetched elsewhere: benchmarks/gpu_env.py (docs/gpu.md, "Preparing the GPU machine").
#
# --cpu-smoke runs the same steps on the CPU with tiny sizes (a 16^3 patch, short sequences, the
# networks with the WKV op's PyTorch path): it checks the script, not the GPU.
#
# Network benchmark: `nnunetv2-ext benchmark` on synthetic nnU-Net plans as nnU-Net's planner
# writes them for an isotropic 3d_fullres dataset: patch 128^3, widths min(32 * 2^s, 320),
# batch 2, for nnUNetTrainer, nnUNetTrainerGLSP and nnUNetTrainerPVTGDLA; CUDA steps under
# float16 autocast as nnU-Net trains, and with torch.compile when the benchmark offers --compile.
set -u

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

ALL_STEPS=environment,wkv_selfcheck,tests,bench_wkv,wkv_glsp,wkv_ncu,wkv_chunks,wkv_depths,plans,networks
STEPS_WANTED=environment,wkv_selfcheck,tests,bench_wkv,plans,networks
SMOKE=0
BUDGET=480
STEP_CAP=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) SMOKE=1 ;;
        --budget|--step-timeout)
            if [ $# -lt 2 ] || ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
                echo "gpu_check.sh: $1 needs a whole number of seconds > 0" >&2; exit 2
            fi
            if [ "$1" = --budget ]; then BUDGET=$2; else STEP_CAP=$2; fi
            shift ;;
        --steps)
            if [ $# -lt 2 ]; then echo "gpu_check.sh: --steps needs a list, e.g. plans,networks" >&2; exit 2; fi
            for step in ${2//,/ }; do
                if [[ ",$ALL_STEPS," != *",$step,"* ]]; then
                    echo "gpu_check.sh: unknown step '$step' in --steps (known: $ALL_STEPS)" >&2; exit 2
                fi
            done
            STEPS_WANTED=$2
            shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *)
            if [ -n "$OUT" ]; then echo "gpu_check.sh: only one OUT_DIR, got '$OUT' and '$1'" >&2; exit 2; fi
            OUT=$1 ;;
    esac
    shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
OUT=${OUT:-./gpu_check_$(date -u +%Y%m%d_%H%M%S)}
if [ -e "$OUT" ]; then
    echo "gpu_check.sh: $OUT already exists; give a new folder so that results of two runs never mix" >&2
    exit 2
fi

if [ "$SMOKE" = 0 ]; then
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "gpu_check.sh: no CUDA GPU is visible to PyTorch ($PY: torch.cuda.is_available() is False" \
             "or torch is missing). Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch," \
             "or add --cpu-smoke to test this script on the CPU." >&2
        exit 2
    fi
    DEVICE=cuda
else
    DEVICE=cpu
fi

mkdir -p "$OUT/logs" || { echo "gpu_check.sh: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
STEPS="$OUT/steps.tsv"
START=$(date +%s)
FAILED=0
cd "$REPO" || exit 2

# publish FILE.partial as FILE once complete (flushed to disk, then renamed)
publish() { sync "$1.partial" 2>/dev/null; mv -f "$1.partial" "$1"; }

# run_step NAME LIMIT_SECONDS COMMAND...: if NAME is wanted, runs COMMAND (a program or a function of
# this script) with its output in logs/NAME.log, at most min(LIMIT, --step-timeout, budget left)
# seconds, and appends "NAME<TAB>status<TAB>seconds" to steps.tsv.
run_step() {
    local name=$1 limit=$2 status rc t0 left log="$OUT/logs/$1.log"
    shift 2
    [[ ",$STEPS_WANTED," == *",$name,"* ]] || return 0
    left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$name" = networks ] && ! grep -q "^plans	ok	" "$STEPS" 2>/dev/null; then
        printf '%s\tSKIPPED (needs the plans step)\t0\n' "$name" >> "$STEPS"
        FAILED=1
        echo "== $name: skipped, needs the plans step"
        return 1
    fi
    if [ "$left" -lt 5 ]; then
        printf '%s\tSKIPPED (budget of %ss used up)\t0\n' "$name" "$BUDGET" >> "$STEPS"
        FAILED=1
        echo "== $name: skipped, budget used up"
        return 1
    fi
    [ "$STEP_CAP" -gt 0 ] && [ "$STEP_CAP" -lt "$limit" ] && limit=$STEP_CAP
    [ "$left" -lt "$limit" ] && limit=$left
    echo "== $name (at most ${limit}s) -> logs/$name.log"
    t0=$(date +%s)
    { echo "\$ $*"; echo; } > "$log.partial"
    declare -F "$1" > /dev/null && set -- bash -c '"$@"' _ "$@"  # a function of this script
    timeout --kill-after=10 "$limit" "$@" >> "$log.partial" 2>&1 < /dev/null
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    publish "$log"
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$STEPS"
    echo "   $status ($(( $(date +%s) - t0 ))s)"
    [ "$rc" = 0 ] || { FAILED=1; tail -n 5 "$log" | sed 's/^/   | /'; }
    return "$rc"
}

environment() {
    date -u '+date: %Y-%m-%d %H:%M:%S UTC'
    echo "host: $(uname -n), $(uname -sr), load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
    echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)" \
         "($(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) files changed)"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory,pcie.link.gen.max \
            --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    command -v nvcc > /dev/null && nvcc --version | tail -n 2
    "$PY" - <<'EOF'
import platform, torch, cuda_wkv
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA (torch build) {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, cuda_wkv {cuda_wkv.__version__}, torch threads {torch.get_num_threads()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
if torch.cuda.is_available():  # the memory bandwidth a plain copy reaches: the ceiling for the WKV figures
    free = torch.cuda.mem_get_info()[0]
    n = min(2**29, free // 16)  # two tensors of at most 2 GiB each, at most half the free memory
    src = torch.empty(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    moved = 2 * src.numel() * src.element_size()
    print(f"device-to-device copy of {moved / 2 / 2**30:.2f} GiB: {moved / sorted(times)[len(times) // 2] / 1e9:.0f} GB/s "
          f"(bytes read + written, median of 10 after one warm-up)")
    del src, dst
EOF
}

# nnU-Net folders for the synthetic plans: nnUNet_preprocessed/Dataset999_Bench/{nnUNetPlans,dataset}.json
write_plans() {
    "$PY" - "$1" "$2" "$3" <<'EOF'
import json, os, sys
sys.path.insert(0, 'benchmarks')
from bench_networks import plans_dict, synthetic_configuration, with_patch

root, patch, max_width = sys.argv[1], [int(p) for p in sys.argv[2].split('x')], int(sys.argv[3])
configuration = with_patch(synthetic_configuration([1.0, 1.0, 1.0], min(32, max_width), max_width), patch)
plans = plans_dict(configuration)
dataset = {'channel_names': {'0': 'CT'}, 'labels': {'background': 0, 'c1': 1, 'c2': 2},
           'numTraining': 5, 'file_ending': '.nii.gz'}
for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
    os.makedirs(os.path.join(root, var), exist_ok=True)
folder = os.path.join(root, 'nnUNet_preprocessed', plans['dataset_name'])
os.makedirs(folder, exist_ok=True)
for name, content in (('nnUNetPlans.json', plans), ('dataset.json', dataset)):
    path = os.path.join(folder, name)
    with open(path + '.partial', 'w') as f:
        json.dump(content, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + '.partial', path)
arch = configuration['architecture']['arch_kwargs']
print(f"{folder}: patch {configuration['patch_size']}, strides {arch['strides']}, "
      f"widths {arch['features_per_stage']}, batch {configuration['batch_size']}")
EOF
}

network_benchmark() {
    local compile=()
    if ! nnunetv2-ext benchmark --help 2>/dev/null | grep -q -- '--compile'; then
        echo "torch.compile: not measured (this nnunetv2-ext benchmark has no --compile option)"
    elif [ "$SMOKE" = 1 ]; then
        # the smoke run checks the steps, not inductor on a CPU (minutes per network)
        compile=(--no-compile)
        echo "torch.compile: off in the CPU smoke run (--no-compile)"
    else
        compile=(--compile)
        echo "torch.compile: on (--compile)"
    fi
    nnUNet_raw="$OUT/nnUNet/nnUNet_raw" nnUNet_preprocessed="$OUT/nnUNet/nnUNet_preprocessed" \
        nnUNet_results="$OUT/nnUNet/nnUNet_results" \
        nnunetv2-ext benchmark -d 999 -c 3d_fullres --device "$DEVICE" "${compile[@]}" --profile "$@"
}

wkv_selfcheck() {
    "$PY" -m cuda_wkv.selfcheck --device "$DEVICE" --dtype float32 &&
        "$PY" -m cuda_wkv.selfcheck --device "$DEVICE" --dtype float64
}

# wkv_bench BENCH_WKV_ARGS...: the WKV sweep into bench_wkv/, then on CUDA what one call costs there
# (bench_wkv/call_cost.md: the op's fixed host costs, which a small T cannot hide)
wkv_bench() {
    "$PY" benchmarks/bench_wkv.py --out-dir "$OUT/bench_wkv" "$@" || return 1
    [ "$DEVICE" = cuda ] || return 0
    "$PY" benchmarks/bench_wkv.py --device cuda --call-cost --repeat 5 > "$OUT/bench_wkv/call_cost.md.part" &&
        mv "$OUT/bench_wkv/call_cost.md.part" "$OUT/bench_wkv/call_cost.md" && cat "$OUT/bench_wkv/call_cost.md"
}

# wkv_chunks BENCH_WKV_ARGS...: bench_wkv.py once per chunk length (automatic first: no CUDA_WKV_CHUNK,
# not even the caller's), each into bench_wkv_chunks/<length>/, printing the first table row of each
wkv_chunks() {
    local len chunk
    for len in auto 32 64 128 256 512 1024 2048; do
        echo "== CUDA_WKV_CHUNK=$len"
        if [ "$len" = auto ]; then chunk=(-u CUDA_WKV_CHUNK); else chunk=("CUDA_WKV_CHUNK=$len"); fi
        env "${chunk[@]}" "$PY" benchmarks/bench_wkv.py --out-dir "$OUT/bench_wkv_chunks/$len" "$@" || return 1
        grep -h -m 1 -E '^\| [0-9]' "$OUT/bench_wkv_chunks/$len"/wkv_*.md
        grep -h -E '^kernel fwd(\+bwd)?, T=' "$OUT/bench_wkv_chunks/$len"/wkv_*.md || true  # --profile
    done
}

# wkv_ncu SHAPE_ARGS...: Nsight Compute on one forward + backward of the kernel (benchmarks/wkv_ncu.py), for the
# automatic chunk length and CUDA_WKV_CHUNK=32 (short chunks: the rows a rescan reads twice may stay in the
# L2), each into wkv_ncu/<length>/: report.ncu-rep, ncu's details and raw pages as details.csv and raw.csv (every
# metric collected, stall reasons included), table.md (per kernel)
wkv_ncu() {
    local ncu len chunk dir opts page rc=0
    if [ "$DEVICE" != cuda ]; then
        echo "no GPU: the workload alone on the CPU kernel (ncu profiles CUDA kernels; this checks the script)"
        "$PY" benchmarks/wkv_ncu.py workload --device cpu "$@"
        return
    fi
    ncu=$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | sort -V | tail -n 1)
    [ -z "$ncu" ] && [ -x /usr/local/cuda/bin/ncu ] && ncu=/usr/local/cuda/bin/ncu
    if [ -z "$ncu" ]; then
        echo "ncu (Nsight Compute) not found on PATH, in /opt/nvidia/nsight-compute/*/ or /usr/local/cuda/bin"
        return 1
    fi
    echo "ncu: $ncu, $("$ncu" --version | tail -n 1)"
    mapfile -t opts < <("$PY" benchmarks/wkv_ncu.py ncu-args)
    if [ "${#opts[@]}" = 0 ]; then echo "benchmarks/wkv_ncu.py ncu-args printed no options"; return 1; fi
    # built outside ncu, which would follow nvcc's processes, and outside the profiles
    "$PY" -c "$BUILD_KERNEL" || { echo "the CUDA kernel cannot be built or loaded (see above)"; return 1; }
    for len in $NCU_CHUNKS; do  # every profile before any table: a table that fails costs no profile
        echo "== CUDA_WKV_CHUNK=$len: profiling"
        dir="$OUT/wkv_ncu/$len"
        mkdir -p "$dir"
        if [ "$len" = auto ]; then chunk=(-u CUDA_WKV_CHUNK); else chunk=("CUDA_WKV_CHUNK=$len"); fi
        env "${chunk[@]}" LC_ALL=C "$ncu" "${opts[@]}" -f -o "$dir/report" \
            "$PY" benchmarks/wkv_ncu.py workload --device cuda "$@" || { rc=1; continue; }
        for page in details raw; do
            { LC_ALL=C "$ncu" --import "$dir/report.ncu-rep" --csv --page "$page" > "$dir/$page.csv.partial" &&
                mv "$dir/$page.csv.partial" "$dir/$page.csv"; } || rc=1
        done
    done
    for len in $NCU_CHUNKS; do
        dir="$OUT/wkv_ncu/$len"
        [ -f "$dir/details.csv" ] || continue
        echo "== CUDA_WKV_CHUNK=$len"
        { "$PY" benchmarks/wkv_ncu.py table "$dir/details.csv" "$@" > "$dir/table.md.partial" &&
            mv "$dir/table.md.partial" "$dir/table.md" && cat "$dir/table.md"; } || rc=1
    done
    return "$rc"
}

# wkv_depths BENCH_WKV_ARGS...: bench_wkv.py once per depth of the CUDA kernel's loads ahead (the default,
# 8, first: no CUDA_WKV_ROWS_AHEAD, not even the caller's; 1 = each row loaded one step ahead, the
# nearest to the first GPU run's kernel; each other depth is a build of its own, ~1 min, made beforehand
# by prebuild_depths on CUDA), each into bench_wkv_depths/<depth>/
wkv_depths() {
    local depth ahead
    for depth in default 1 4; do
        echo "== CUDA_WKV_ROWS_AHEAD=$depth"
        if [ "$depth" = default ]; then ahead=(-u CUDA_WKV_ROWS_AHEAD); else ahead=("CUDA_WKV_ROWS_AHEAD=$depth"); fi
        env "${ahead[@]}" "$PY" benchmarks/bench_wkv.py --out-dir "$OUT/bench_wkv_depths/$depth" "$@" || return 1
        grep -h -E '^\| [0-9]' "$OUT/bench_wkv_depths/$depth"/wkv_*.md  # time rows, then bandwidth rows
        grep -h -E '^kernel fwd(\+bwd)?, T=' "$OUT/bench_wkv_depths/$depth"/wkv_*.md || true  # --profile
    done
}

# wkv_glsp CALLS BENCH_WKV_ARGS...: bench_wkv.py (kernel only) at each of GLSP's calls of the op, CALLS a list of
# T:C (on default 3d_fullres plans -- 128^3 patch, batch 2, widths min(32 * 2^s, 320) -- its branch runs from
# stage 2 down: T = 32768, 4096, 512, 64 at C = 128, 256, 320, 320), each into bench_wkv_glsp/T<T>_C<C>/,
# printing its bandwidth rows (one call, back to back) and its profile lines
wkv_glsp() {
    local calls=$1 call T C
    shift
    for call in $calls; do
        T=${call%%:*} C=${call##*:}
        echo "== T=$T C=$C"
        "$PY" benchmarks/bench_wkv.py --out-dir "$OUT/bench_wkv_glsp/T${T}_C$C" --T "$T" --C "$C" --backends kernel \
            "$@" || return 1
        grep -h -E '^\| [0-9]' "$OUT/bench_wkv_glsp/T${T}_C$C"/wkv_*.md  # time row, then bandwidth row
        grep -h -E '^kernel fwd(\+bwd)?, T=' "$OUT/bench_wkv_glsp/T${T}_C$C"/wkv_*.md || true  # --profile
    done
}

# prebuild_depths: the CUDA kernels that wkv_depths times besides the default (a build each, ~1 min of one
# core), built beside the self-check's build and waited for before anything is timed, each at most 240 s
# (the self-check step's limit) so that the wait is bounded; logs/prebuild_depths.log
prebuild_depths() {
    local depth log="$OUT/logs/prebuild_depths.log"
    for depth in 1 4; do
        CUDA_WKV_ROWS_AHEAD=$depth timeout --kill-after=10 240 "$PY" -c "$BUILD_KERNEL" \
            > "$log.$depth.partial" 2>&1 &
    done
    wait
    cat "$log".[0-9].partial > "$log.partial"; rm -f "$log".[0-9].partial; publish "$log"
}

# Python that builds (or finds in the cache) and loads the CUDA kernel; exit status 1 if it is unavailable
BUILD_KERNEL='import sys, cuda_wkv.loader as l; sys.exit(l.load_extension("cuda") is None)'
NCU_CHUNKS="auto 32"  # the chunk lengths wkv_ncu profiles: the automatic one and short chunks
export PY REPO OUT DEVICE SMOKE BUILD_KERNEL NCU_CHUNKS
export -f environment write_plans network_benchmark wkv_selfcheck wkv_bench wkv_chunks wkv_ncu wkv_depths wkv_glsp
TRAINERS=(nnUNetTrainer nnUNetTrainerGLSP nnUNetTrainerPVTGDLA)
echo "gpu_check.sh: device $DEVICE, budget ${BUDGET}s, output $OUT"
run_step environment 120 environment
PREBUILD=""
if [ "$DEVICE" = cuda ] && [[ ",$STEPS_WANTED," == *",wkv_depths,"* ]]; then
    prebuild_depths & PREBUILD=$!
fi
run_step wkv_selfcheck 240 wkv_selfcheck
if [ "$DEVICE" = cuda ]; then
    # the nvcc compile test runs without a GPU too (and the self-check step has built the kernel)
    run_step tests 180 "$PY" -m pytest -q -rsP -p no:cacheprovider --continue-on-collection-errors \
        -k "cuda and not compiles and not cuda_host" tests
    [ -n "$PREBUILD" ] && wait "$PREBUILD"  # no build beside the timed steps
    run_step bench_wkv 150 wkv_bench --device cuda --profile
    run_step wkv_glsp 120 wkv_glsp "32768:128 4096:256 512:320 64:320" --device cuda --B 2 --profile
    run_step wkv_ncu 120 wkv_ncu --B 2 --C 128 --T 32768
    run_step wkv_chunks 180 wkv_chunks --device cuda --B 2 --C 128 --T 32768 --backends kernel --profile
    run_step wkv_depths 300 wkv_depths --device cuda --B 2 --C 128 --T 4096 32768 --backends kernel --profile
    run_step plans 60 write_plans "$OUT/nnUNet" 128x128x128 320
    run_step networks 330 network_benchmark -tr "${TRAINERS[@]}" -o "$OUT/networks"
else
    run_step tests 180 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_wkv_selfcheck.py -k healthy
    run_step bench_wkv 150 wkv_bench --device cpu --T 256 --backends scan --modes fwd --repeat 1
    run_step wkv_glsp 120 wkv_glsp "256:8 64:4" --device cpu --B 1 --modes fwd --repeat 1
    run_step wkv_ncu 120 wkv_ncu --B 1 --C 8 --T 256
    run_step wkv_chunks 120 wkv_chunks --device cpu --B 1 --C 8 --T 256 --backends kernel --modes fwd --repeat 1
    # the CPU kernel ignores the depth: this checks the step's loop and outputs only
    run_step wkv_depths 120 wkv_depths --device cpu --B 1 --C 8 --T 256 --backends kernel --modes fwd --repeat 1
    run_step plans 60 write_plans "$OUT/nnUNet" 16x16x16 16
    # the WKV op's PyTorch path: the smoke run compiles no kernel for the networks
    run_step networks 240 env CUDA_WKV_BACKEND=torch bash -c 'network_benchmark "$@"' _ \
        -tr "${TRAINERS[@]}" --batch-size 1 --warmup 0 --repeats 1 -o "$OUT/networks"
fi

{
    echo "# gpu_check.sh $(date -u '+%Y-%m-%d %H:%M UTC'), device $DEVICE$([ "$SMOKE" = 1 ] && echo ' (CPU smoke run)')"
    echo
    tail -n +3 "$OUT/logs/environment.log" 2>/dev/null | sed 's/^/    /'
    echo
    echo "| step | status | seconds | log |"
    echo "|---|---|---:|---|"
    while IFS=$'\t' read -r name status secs; do
        echo "| $name | $status | $secs | logs/$name.log |"
    done < "$STEPS"
    echo
    for f in "$OUT"/bench_wkv/*.md "$OUT"/networks/*.md; do
        [ -f "$f" ] || continue
        echo "## ${f#"$OUT"/}"
        echo
        cat "$f"
        echo
    done
    if [ -f "$OUT/logs/wkv_chunks.log" ]; then
        echo "## wkv_chunks (first table row of each chunk length; columns as in bench_wkv)"
        echo
        grep -E '^(== CUDA_WKV_CHUNK|\| [0-9]|kernel fwd)' "$OUT/logs/wkv_chunks.log" |
            sed 's/^== /    /; s/^|/    |/; s/^kernel/    kernel/'
        echo
    fi
    for len in $NCU_CHUNKS; do
        f="$OUT/wkv_ncu/$len/table.md"
        [ -f "$f" ] || continue
        echo "## ${f#"$OUT"/} (Nsight Compute, one forward + backward)"
        echo
        cat "$f"
        echo
    done
    if [ -f "$OUT/logs/wkv_depths.log" ]; then
        echo "## wkv_depths (rows loaded ahead: table rows of each depth; columns as in bench_wkv)"
        echo
        grep -E '^(== CUDA_WKV_ROWS_AHEAD|\| [0-9]|kernel fwd)' "$OUT/logs/wkv_depths.log" |
            sed 's/^== /    /; s/^|/    |/; s/^kernel/    kernel/'
        echo
    fi
    if [ -f "$OUT/logs/wkv_glsp.log" ]; then
        echo "## wkv_glsp (GLSP's calls of the op: table rows of each (T, C); columns as in bench_wkv)"
        echo
        grep -E '^(== T=|\| [0-9]|kernel fwd)' "$OUT/logs/wkv_glsp.log" |
            sed 's/^== /    /; s/^|/    |/; s/^kernel/    kernel/'
        echo
    fi
    echo "Total: $(( $(date +%s) - START ))s of a ${BUDGET}s budget; $([ "$FAILED" = 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')."
} > "$OUT/summary.md.partial"
publish "$OUT/summary.md"
echo
cat "$OUT/summary.md"
exit "$FAILED"

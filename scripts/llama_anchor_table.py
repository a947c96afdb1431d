"""One table from `bitstack bench --json` and `llama-bench -o json` runs (scripts/llama_anchor.sh).

    python3 scripts/llama_anchor_table.py --out-dir OUT --bitstack OUT/bitstack-bench.json \
        --llama Q4_K_M=OUT/llama-bench-Q4_K_M.json=/path/smollm2-135m-Q4_K_M.gguf ... \
        [--stack FILE --load-before "1.0 0.9 0.8" --load-after ... --threads 2 --cpu NAME]

Rows are the bitstack budgets, smallest first; a budget equal to a llama.cpp file's size (in
bytes) is put beside that file's tg (decode) and pp (prefill) tokens/s. Ratios are
bitstack / llama.cpp, so >= 1.0 means bitstack is at least as fast. MB = 10^6 bytes, GB/s =
10^9 bytes per second. Writes OUT/anchor.md and OUT/anchor.json and prints the markdown.
"""
import argparse
import json
import os
import statistics
import sys


def fail(msg):
    print(f"llama_anchor_table: {msg}", file=sys.stderr)
    sys.exit(1)


def load_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read {what} {path}: {e}")


def llama_result(path):
    """(prefill tokens/s median/min/max, decode ..., model bytes, prompt, gen) of one llama-bench json."""
    runs = load_json(path, "llama-bench output")
    if not isinstance(runs, list) or not runs:
        fail(f"{path}: expected a non-empty JSON array (llama-bench -o json)")
    out = {"pp": None, "tg": None, "model_size": None, "n_prompt": None, "n_gen": None}
    for r in runs:
        samples = r.get("samples_ts") or [r.get("avg_ts")]
        samples = [float(s) for s in samples if s is not None]
        if not samples:
            fail(f"{path}: a run without samples_ts / avg_ts")
        spread = {
            "median": statistics.median(samples),
            "min": min(samples),
            "max": max(samples),
            "samples": samples,
        }
        out["model_size"] = r.get("model_size")
        if r.get("n_gen", 0) == 0 and r.get("n_prompt", 0) > 0:
            out["pp"], out["n_prompt"] = spread, r["n_prompt"]
        elif r.get("n_prompt", 0) == 0 and r.get("n_gen", 0) > 0:
            out["tg"], out["n_gen"] = spread, r["n_gen"]
    if out["pp"] is None or out["tg"] is None:
        fail(f"{path}: needs one pp run (n_gen 0) and one tg run (n_prompt 0)")
    return out


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--bitstack", required=True, help="bitstack bench --json output")
    ap.add_argument("--llama", action="append", default=[], help="NAME=LLAMA_BENCH_JSON=GGUF")
    ap.add_argument("--stack", default=None)
    ap.add_argument("--load-before", default=None)
    ap.add_argument("--load-after", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu", default=None)
    a = ap.parse_args()

    bs = load_json(a.bitstack, "bitstack bench report")
    if not isinstance(bs, dict) or not isinstance(bs.get("rows"), list):
        fail(f"{a.bitstack}: not a bitstack bench --json report (no rows)")
    files = {}
    for item in a.llama:
        parts = item.split("=", 2)
        if len(parts) != 3:
            fail(f"--llama {item!r}: expected NAME=LLAMA_BENCH_JSON=GGUF")
        name, bench, gguf = parts
        try:
            size = os.path.getsize(gguf)
        except OSError as e:
            fail(f"--llama {name}: {e}")
        files[size] = dict(name=name, size=size, **llama_result(bench))

    bw = bs["read_bandwidth"]["gb_per_s"]["median"]
    rows = []
    for r in sorted(bs["rows"], key=lambda r: r["budget_bytes"]):
        f = files.get(r["budget_bytes"])
        dec = r["decode_tokens_per_s"]["median"]
        pre = r["prefill_tokens_per_s"]["median"]
        l_dec = f["tg"]["median"] if f else None
        l_pre = f["pp"]["median"] if f else None
        rows.append(
            {
                "budget": f["name"] if f else r["label"],
                "budget_bytes": r["budget_bytes"],
                "bitstack_held_bytes": r["held_bytes"],
                "bitstack_linear_bytes": r["linear_bytes"],
                "bitstack_decode_tokens_per_s": r["decode_tokens_per_s"],
                "bitstack_prefill_tokens_per_s": r["prefill_tokens_per_s"],
                "llama_file": f["name"] if f else None,
                "llama_file_bytes": f["size"] if f else None,
                "llama_decode_tokens_per_s": f["tg"] if f else None,
                "llama_prefill_tokens_per_s": f["pp"] if f else None,
                "decode_ratio": ratio(dec, l_dec),
                "prefill_ratio": ratio(pre, l_pre),
                "bitstack_decode_linear_gb_per_s": r["decode_linear_gb_per_s"],
                "bitstack_decode_held_gb_per_s": r["decode_held_gb_per_s"],
                "llama_decode_file_gb_per_s": f["size"] * l_dec / 1e9 if f else None,
            }
        )
    missing = sorted(set(files) - {r["budget_bytes"] for r in bs["rows"]})
    if missing:
        fail(f"no bitstack row at the llama.cpp file sizes {missing} (bytes)")

    n_prompt = bs["prompt_tokens"]
    n_gen = bs["gen_tokens"]
    head = [
        "budget",
        "budget MB",
        "bitstack held MB",
        f"bitstack decode tok/s",
        f"llama.cpp tg{n_gen} tok/s",
        "decode ratio",
        f"bitstack prefill {n_prompt} tok/s",
        f"llama.cpp pp{n_prompt} tok/s",
        "prefill ratio",
        "bitstack linear GB/s (% of read bw)",
        "bitstack held GB/s",
        "llama.cpp file GB/s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lin = r["bitstack_decode_linear_gb_per_s"]
        cells = [
            r["budget"],
            fmt(r["budget_bytes"] / 1e6),
            fmt(r["bitstack_held_bytes"] / 1e6),
            fmt(r["bitstack_decode_tokens_per_s"]["median"], 2),
            fmt(r["llama_decode_tokens_per_s"]["median"] if r["llama_file"] else None),
            "-" if r["decode_ratio"] is None else f"{r['decode_ratio']:.3f}x",
            fmt(r["bitstack_prefill_tokens_per_s"]["median"], 1),
            fmt(r["llama_prefill_tokens_per_s"]["median"] if r["llama_file"] else None),
            "-" if r["prefill_ratio"] is None else f"{r['prefill_ratio']:.3f}x",
            f"{lin:.2f} ({100 * lin / bw:.1f} %)",
            fmt(r["bitstack_decode_held_gb_per_s"], 2),
            fmt(r["llama_decode_file_gb_per_s"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"bitstack: {bs.get('file')} ({bs.get('threads')} threads, {bs.get('reps')} reps, medians); "
        f"llama.cpp: llama-bench -t {a.threads} -p {n_prompt} -n {n_gen} -r {bs.get('reps')} (medians of its samples).",
        f"machine: {a.cpu or bs.get('cpu')}; read bandwidth {bw:.2f} GB/s "
        f"(sum over {bs['read_bandwidth']['buffer_bytes'] / 1e6:.0f} MB, {bs['read_bandwidth']['threads']} threads, median of 3); "
        f"load before {a.load_before or bs.get('load_before')}, after {a.load_after or bs.get('load_after')}.",
    ]
    md = "\n".join(notes) + "\n\n" + "\n".join(lines) + "\n"
    doc = {
        "bitstack_report": bs,
        "stack": a.stack,
        "cpu": a.cpu or bs.get("cpu"),
        "threads": a.threads,
        "load_before": a.load_before,
        "load_after": a.load_after,
        "read_bandwidth_gb_per_s": bw,
        "rows": rows,
    }
    os.makedirs(a.out_dir, exist_ok=True)
    for name, text in [("anchor.md", md), ("anchor.json", json.dumps(doc, indent=2) + "\n")]:
        path = os.path.join(a.out_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    print(md)


if __name__ == "__main__":
    main()

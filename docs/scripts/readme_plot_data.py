#!/usr/bin/env python3
"""Writes `eval --json`-shaped point files (rows of budget_bytes, ppl) from the README's
measured tables, so `bitstack plot` can redraw the committed SVGs without re-running hours of
evaluation. Every number comes from a README table; the table each file is read from is named
in its `source` key. Usage: python3 docs/scripts/readme_plot_data.py README.md docs/plot-data
"""
import json
import os
import sys


def table_after(lines, marker):
    """Rows (lists of cells) of the first markdown table after the line containing `marker`."""
    start = next(i for i, l in enumerate(lines) if marker in l)
    rows, in_table = [], False
    for l in lines[start + 1:]:
        if l.startswith("|"):
            in_table = True
            rows.append([c.strip() for c in l.strip().strip("|").split("|")])
        elif in_table:
            break
    return rows[0], rows[2:]


def num(cell):
    return float(cell.replace("*", "").replace(",", "").split(" ")[0])


def write(out, name, source, points):
    doc = {
        "source": source,
        "rows": [{"budget_bytes": b * 1e6, "ppl": p} for b, p in points],
    }
    with open(os.path.join(out, name), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def main():
    readme, out = sys.argv[1], sys.argv[2]
    lines = open(readme).read().splitlines()
    m = "--points 10 --max-windows 8 --json sweep10.json"
    head, rows = table_after(lines, m)
    write(out, "ppl-vs-memory.json", "README: Perplexity at any budget from one file",
          [(num(r[0]), num(r[4])) for r in rows])
    m = "**Megabyte granularity**"
    head, rows = table_after(lines, m)
    write(out, "fig8-2mb-stride.json", "README: Megabyte granularity",
          [(num(r[0]), num(r[3])) for r in rows])
    m = "evenly spaced windows (`--scoring-seqs N --scoring-seq-len 256`). Perplexity"
    head, rows = table_after(lines, m)
    for col, name in enumerate(head[1:], start=1):
        slug = "".join(c if c.isalnum() else "-" for c in name.replace("*", "").lower()).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        write(out, f"orders-{col:02}-{slug}.json", f"README: orders table, column {name}",
              [(num(r[0]), num(r[col])) for r in rows])
    m = "windows: 4 of 147 x 2048 tokens per budget"
    head, rows = table_after(lines, m)
    write(out, "demo-eval.json", "README: demo transcript",
          [(num(r[0]), num(r[4])) for r in rows])


if __name__ == "__main__":
    main()

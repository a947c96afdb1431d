#!/usr/bin/env python3
"""Builds docs/plot-data/issue15-*.json (perplexity ratios to each engine's own original) from the
outputs of the commands in the README's "whole curve at equal memory" section: two
`bitstack eval --json` files and three `bitstack compare` output folders (paths below), plus
the llama.cpp ratios of docs/bench/compare-llama-cpp-defaults.md. Then:
    eval target/release/bitstack plot $(python3 docs/scripts/issue15_plot_data.py) --original-ppl 1.0 \
        --y-label "perplexity / own original (log scale)" -o docs/ppl-ratio-vs-memory.svg
"""
import json, os, sys
out = 'docs/plot-data'
ORIG = 24.517  # our original on the first 4 windows of 2048 test tokens (compare's FP16 row)
def write(name, source, pts):
    rows = [{"budget_bytes": b, "ppl": round(r, 4)} for b, r in sorted(pts) if r <= 60]
    p = f'{out}/issue15-{name}.json'
    json.dump({"source": source, "rows": rows}, open(p, 'w'), indent=1)
    return p
series = []
for name, f, lab in [('bitstack-new', '/tmp/curve-new.json', 'BitStack, defaults (int8 factors, q8 embedding)'),
                     ('bitstack-old', '/tmp/curve-old.json', 'BitStack, issue start (f16 factors, f16 embedding)')]:
    d = json.load(open(f))
    pts = [(r['budget_bytes'], r['ppl'] / ORIG) for r in d['rows']]
    series.append((lab, write(name, f'bitstack eval {f} (ratio to 24.517)', pts)))
llama = [(88.2e6, 1.475), (93.5e6, 1.182), (105.5e6, 1.062), (112.1e6, 1.113), (144.8e6, 1.008)]
series.append(('llama.cpp K-quants / Q8_0 (ratio to its F32)', write('llama-cpp', 'docs/bench/compare-llama-cpp-defaults.md', llama)))
rows = []
for f in ['/tmp/cmp-g64/compare.json', '/tmp/cmp-g128/compare.json', '/tmp/cmp-awq64/compare.json']:
    if os.path.exists(f):
        rows += json.load(open(f))['rows']
groups = {}
for r in rows:
    cfg, m = r['config'], r['method']
    g = 'per channel' if 'g' not in cfg else 'g' + cfg.split('g')[1]
    groups.setdefault((m, g), {})[cfg] = (r['memory_bytes'], r['perplexity']['ppl'] / ORIG)
for (m, g), pts in sorted(groups.items()):
    if g == 'per channel' and m != 'AWQ':
        continue
    series.append((f'{m} {g}', write(f'{m.lower()}-{g.replace(" ", "-")}', 'bitstack compare --windows first --max-windows 4', list(pts.values()))))
print(' '.join(f'"{l}={p}"' for l, p in series))

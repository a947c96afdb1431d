# Held bytes of a BitStack model from its shapes, mirroring the Rust accounting:
# ModelConfig::held_resident_bytes (bitstack-format/src/model.rs), block_bytes
# (bitstack-core/src/budget.rs), RankRule::Adaptive 0.5 bits/weight, k in 4..=16
# (examples/src/compress.rs), f32 scale vector of `cols` per weight, 16 levels.
import math, sys
def rank(m, n):
    ideal = 0.5 * m * n / (16 * (m + n))
    k = min(max(int(math.floor(ideal + 0.5)), 4), 16)   # f64::round: half away from zero (ideal > 0)
    return max(1, min(k, min(m, n)))
def block_bytes(m, n, k):
    return m * ((n + 63) // 64) * 8 + 2 * k * (m + n)
def matrix(v, h, p):
    return {'f32': 4*v*h, 'f16': 2*v*h,
            'q8': v*h + 2*v*((h+31)//32),
            'q4': v*((h+1)//2) + 2*v*((h+31)//32)}[p]
def sizes(layers, hidden, ffn, heads, kv, hd, vocab, tied, bias, levels=16):
    q, kvo = heads*hd, kv*hd
    shapes = [(q, hidden), (kvo, hidden), (kvo, hidden), (hidden, q),
              (ffn, hidden), (ffn, hidden), (hidden, ffn)]
    per_block = sum(block_bytes(m, n, rank(m, n)) for m, n in shapes) * layers
    scales = sum(4*n for m, n in shapes) * layers
    f32s = hidden*(2*layers+1) + ((q + 2*kvo) * layers if bias else 0)
    out = {}
    for p in ['f16', 'q8', 'q4']:
        res = (1 if tied else 2) * matrix(vocab, hidden, p) + 4*f32s
        out[p] = (res, res + scales + per_block, res + scales + levels*per_block)
    return out
models = {
  'SmolLM2-135M (tied)': dict(layers=30, hidden=576, ffn=1536, heads=9, kv=3, hd=64, vocab=49152, tied=True, bias=False),
  'Qwen2-shaped (Qwen2.5-0.5B: untied head, Q/K/V biases)': dict(layers=24, hidden=896, ffn=4864, heads=14, kv=2, hd=64, vocab=151936, tied=False, bias=True),
}
for name, m in models.items():
    print(name)
    for p, (res, mn, full) in sizes(**m).items():
        print(f"  {p}: resident {res} B ({res/1e6:.1f} MB), minimum {mn} B ({mn/1e6:.1f} MB), full {full} B ({full/1e6:.1f} MB)")

"""How closely do first-order scores rank one level's blocks like Average does?

Compares the level-`L` scores of a `bitstack sort --method first-order --dump-scores F.json`
run (L = 0-based block index; a gradient at base b scores index b the way Average does) with
Average's measured losses in its checkpoint (`bitstack sort --method average --checkpoint C`):
Spearman rank correlation and the overlap of the 45 blocks each would load first.

    python3 docs/scripts/order_agreement.py average.ckpt first-order.json 2
"""
import json
import struct
import sys


def checkpoint_level(path, level):
    for line in open(path):
        parts = line.split()
        if parts and parts[0] == "level" and int(parts[1]) == level:
            return [struct.unpack(">d", bytes.fromhex(x))[0] for x in parts[2:]]
    raise SystemExit(f"{path} has no level {level}")


def ranks(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    r = [0] * len(values)
    for k, i in enumerate(order):
        r[i] = k
    return r


def main(ckpt, dump, level, k=45):
    average = checkpoint_level(ckpt, level)  # loss with the block added: lower loads first
    first = [w["first_order"][level] for w in json.load(open(dump))["weights"]]
    if any(v is None for v in first):
        raise SystemExit(f"{dump} does not score block {level}; pick --first-order-bases")
    ra, rb = ranks(average), ranks(first)  # first-order: more negative loads first
    n = len(ra)
    rho = 1 - 6 * sum((a - b) ** 2 for a, b in zip(ra, rb)) / (n * (n * n - 1))
    top = len({i for i in range(n) if ra[i] < k} & {i for i in range(n) if rb[i] < k})
    print(f"block {level}: Spearman {rho:.3f}, top-{k} overlap {top} of {k}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))

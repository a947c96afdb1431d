"""How well could per-layer x per-type group probes stand in for per-weight evaluations?

Fits Average's level-3 scores (from a `bitstack sort --method average --checkpoint F` checkpoint)
by log(gain) ~ a_layer + b_type + c * log(dE) (the best any factorised sensitivity could do:
an oracle fit on the very scores it should predict) and reports the Spearman correlation and
the overlap of the top-45 blocks (the 110 MB decision). dE, the activation-weighted error the
block removes, comes from `bitstack sort --method proxy-sensitive --dump-scores F.json`.

    python3 docs/scripts/group_probe_fit.py average.ckpt scores.json    # needs numpy
"""
import json
import struct
import sys

import numpy as np

LEVEL = 2  # 0-based block index: the third block of every weight


def checkpoint_scores(path):
    levels = {}
    for line in open(path):
        parts = line.split()
        if parts and parts[0] == "level":
            levels[int(parts[1])] = [
                None if x == "-" else struct.unpack(">d", bytes.fromhex(x))[0] for x in parts[2:]
            ]
    return levels


def ranks(v):
    r = np.empty(len(v))
    r[np.argsort(-np.asarray(v))] = np.arange(len(v))
    return r


def report(name, reference, predicted, k=45):
    ra, rb = ranks(reference), ranks(predicted)
    n = len(ra)
    rho = 1 - 6 * ((ra - rb) ** 2).sum() / (n * (n * n - 1))
    top = len(set(np.argsort(-reference)[:k]) & set(np.argsort(-predicted)[:k]))
    print(f"{name}: Spearman {rho:.3f}, top-{k} overlap {top}")


def main(ckpt, dump):
    loss = np.array(checkpoint_scores(ckpt)[LEVEL], dtype=float)
    weights = json.load(open(dump))["weights"]
    d_e = np.array([w["errors"][LEVEL] - w["errors"][LEVEL + 1] for w in weights])
    layer = np.array([int(w["name"].split(".")[1]) for w in weights])
    kinds = [w["name"].split(".")[2] for w in weights]
    names = sorted(set(kinds))
    kind = np.array([names.index(k) for k in kinds])
    n_layers = layer.max() + 1
    gain = loss.max() + 0.01 - loss  # Average loads the lowest loss first
    x = np.zeros((len(weights), n_layers + len(names) + 1))
    x[np.arange(len(weights)), layer] = 1
    x[np.arange(len(weights)), n_layers + kind] = 1
    x[:, -1] = np.log(d_e)
    coef, *_ = np.linalg.lstsq(x, np.log(gain), rcond=None)
    report("oracle per-layer x per-type fit", gain, x @ coef)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

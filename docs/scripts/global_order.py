"""One global (not level-major) order from proxy scores, for `bitstack sort --method import`.

Every weight's first block comes first (the minimum); after that the next block of whichever
weight has the highest score for it, so a sensitive weight may get block 3 before another
weight has block 2. Scores come from `bitstack sort --method proxy-sensitive --dump-scores F`.

    python3 docs/scripts/global_order.py scores.json order.json
    bitstack sort stack.bitstack --method import --order-json order.json -o global.bitstack
"""
import heapq
import json
import sys


def main(scores_path, out_path):
    weights = json.load(open(scores_path))["weights"]
    levels = [len(w["scores"]) for w in weights]
    order = [(i, 0) for i in range(len(weights))]
    score = lambda i, level: weights[i]["scores"][level] or 0.0
    heap = [(-score(i, 1), i, 1) for i in range(len(weights)) if levels[i] > 1]
    heapq.heapify(heap)
    while heap:
        _, i, level = heapq.heappop(heap)
        order.append((i, level))
        if level + 1 < levels[i]:
            heapq.heappush(heap, (-score(i, level + 1), i, level + 1))
    json.dump(order, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""How well do cheap, task-agnostic fitnesses rank candidates the way generation accuracy does?

    python benchmarks/fidelity_rank.py [--genomes 40] [--seed 0]

On the embedded toy: draws random pruning genomes at 2-6 kept experts per layer, scores each by
held-out greedy-generation accuracy (the 8 toy tasks) and by teacher-forced measures against the
full model on the search split's texts — ESAP (expected speculative acceptance), KL, perplexity
and MoE-block reconstruction error — and prints Spearman's rank correlation of each with accuracy
(losses negated, so +1 means the same ranking).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from eep.config import parse_config
from eep.evaluator import FitnessWorker
from eep.genome import Genome
from fitness import toy_tasks


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--genomes", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    accuracy = [{"name": t, "dataset": f"toy:{t}", "test_size": 50} for t in toy_tasks.TASKS]
    # each teacher-forced measure on every task's search-split texts (averaged over tasks below)
    cheap = [
        {
            "name": f"{m}:{t}",
            "dataset": f"toy:{t}",
            "metric": m,
            "search_split": "train",
            "test_split": "search",
            "test_size": 16,
        }
        for m in ("esap", "kl", "perplexity", "reconstruction")
        for t in toy_tasks.TASKS
    ]
    config = parse_config(
        {
            "name": "rank",
            "model": {"path": "toy", "device": "cpu", "dtype": "float32"},
            "fitness": {"batch_size": 128, "max_new_tokens": 8, "tasks": accuracy + cheap},
        }
    )
    worker = FitnessWorker(config)
    rng = random.Random(args.seed)
    genomes = [
        Genome.from_keep(8, 2, {i: rng.sample(range(8), rng.randint(2, 6)) for i in range(4)})
        for _ in range(args.genomes)
    ]
    rows, start = [], time.perf_counter()
    for genome in genomes:
        scores = worker.scores(genome, "test")
        row = {"accuracy": statistics.mean(scores[t] for t in toy_tasks.TASKS)}
        for m in ("esap", "kl", "perplexity", "reconstruction"):
            row[m] = statistics.mean(scores[f"{m}:{t}"] for t in toy_tasks.TASKS)
        rows.append(row)
    seconds = time.perf_counter() - start
    acc = [r["accuracy"] for r in rows]
    print(
        f"{len(rows)} random genomes (2-6 of 8 experts per layer), accuracy "
        f"{min(acc):.1f}-{max(acc):.1f} (mean {statistics.mean(acc):.1f}); {seconds:.1f}s"
    )
    print(f"{'measure':<16}{'Spearman rho vs accuracy':>26}")
    for m, sign in (("esap", 1), ("kl", -1), ("perplexity", -1), ("reconstruction", -1)):
        print(f"{m:<16}{spearman([sign * r[m] for r in rows], acc):>26.3f}")


if __name__ == "__main__":
    main()

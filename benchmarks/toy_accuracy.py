"""Held-out accuracy table of a toy run: full model, random genomes of the run's first search
space, the best random initial genome, the search's best pruned genome and, for a prune -> merge
run, its best merged genome.

    python benchmarks/toy_accuracy.py runs/toy [--random 50]

Scores every genome on the run's held-out (test) split, the same data for all rows. Bests are
chosen by search fitness, as the search chose them.
"""

from __future__ import annotations

import argparse
import random
import statistics

from eep.evaluator import FitnessWorker
from eep.journal import RunDir
from eep.loop import make_toolbox
from search_spaces import build_schedule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--random", type=int, default=50, help="random keep sets to average")
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    run = RunDir.open(args.run_dir)
    config = run.config()
    worker = FitnessWorker(config)
    adapter = worker.adapter
    shape = adapter.shape
    first = build_schedule(config.search_space, shape).first
    rng = random.Random(args.seed)
    individual = make_toolbox(first, config.search, rng).individual

    def mean(genome):
        return worker.fitness(worker.scores(genome, split="test"))

    def best(evaluations):
        return min(evaluations, key=lambda e: (-e.fitness, e.id))

    randoms = [mean(individual()) for _ in range(args.random)]
    evaluated = [e for e in run.evaluations() if e.ok]
    initial = [e for e in evaluated if e.id < config.search.initial]
    pruned = [e for e in evaluated if not e.genome.is_merge]
    merged = [e for e in evaluated if e.genome.is_merge]
    what = first.describe().split(": ", 1)[1]
    rows = [
        (f"full model ({adapter.num_experts} of {adapter.num_experts})", mean(None)),
        (f"random genomes ({what}), mean of {args.random}", statistics.mean(randoms)),
        (
            f"random genomes, worst / best of {args.random}",
            f"{min(randoms):.2f} / {max(randoms):.2f}",
        ),
        (f"best of the {len(initial)} random initial genomes", mean(best(initial).genome)),
        (
            f"search best pruned genome ({len(pruned)} evaluated, id {best(pruned).id})",
            mean(best(pruned).genome),
        ),
    ]
    if merged:
        rows.append(
            (
                f"search best merged genome ({len(merged)} evaluated, id {best(merged).id})",
                mean(best(merged).genome),
            )
        )
    print(f"| genome ({config.name}, held-out split) | mean accuracy % |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value if isinstance(value, str) else f'{value:.2f}'} |")


if __name__ == "__main__":
    main()

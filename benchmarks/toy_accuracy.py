"""Held-out accuracy table of the toy: full model, random 4-of-8 keep sets, a search's best genome.

    python benchmarks/toy_accuracy.py runs/toy [--random 50]

Scores every genome on the run's held-out (test) split, the same data for all rows.
"""

from __future__ import annotations

import argparse
import random
import statistics

from eep.evaluator import FitnessWorker
from eep.genome import Genome
from eep.journal import RunDir
from search_spaces import PruneSpace, random_genome


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
    space = PruneSpace(adapter.num_experts, adapter.top_k, tuple(adapter.moe_layers), config.search_space.keep)

    def mean(genome):
        return worker.fitness(worker.scores(genome, split="test"))

    rng = random.Random(args.seed)
    randoms = [mean(random_genome(space, rng)) for _ in range(args.random)]
    summary = run.summary()
    best = Genome.from_dict(summary["best_genome"])
    evaluated = [e for e in run.evaluations() if e.ok]
    initial = [e for e in evaluated if e.id < config.search.initial]
    best_initial = min(initial, key=lambda e: (-e.fitness, e.id))
    rows = [
        ("full model (8 of 8)", mean(None)),
        (f"random 4 of 8, mean of {args.random}", statistics.mean(randoms)),
        (f"random 4 of 8, worst / best of {args.random}", f"{min(randoms):.2f} / {max(randoms):.2f}"),
        (f"best of the {len(initial)} random initial genomes (by search fitness)", mean(best_initial.genome)),
        (f"search best after {len(evaluated)} evaluations (id {summary['best_id']})", mean(best)),
    ]
    print(f"| keep set ({config.name}, held-out split) | mean accuracy % |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value if isinstance(value, str) else f'{value:.2f}'} |")


if __name__ == "__main__":
    main()

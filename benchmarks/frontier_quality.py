"""The frontier against single-size searches and baselines, held out, on both toys.

One multi-objective search (``search.objectives: [fitness, kept_params]``) with the evaluations of
two single-size toy searches, against the single-size search as configured (the toys' 500
evaluations, the export picked on validation examples) at each size, and the calibration-pass
baselines (frequency, REAP, NAEE) and greedy elimination at each size. For each size the frontier
run's pick within it (the best on validation examples among the best few by search fitness that
keep at most that many experts): what ``eep export RUN --max-params`` writes. Every genome is scored on the held-out
test split by the same resident worker; the hypervolume is of the held-out points.

    python benchmarks/frontier_quality.py                       # both toys, keep 2 3 4 6
    python benchmarks/frontier_quality.py --configs experiments/toy.yaml --keeps 2 4
    python benchmarks/frontier_quality.py --seed 1 --test-size 1000   # held out a point apart
    python benchmarks/frontier_quality.py --set search.smallest_after=null   # no smallest-size phase
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _frontier(config, worker, tmp: Path, evaluations: int, seed: int | None = None, overrides=()):
    from eep.evaluator import SerialEvaluator
    from eep.evolution import METHOD, create_run, resolve
    from eep.loop import front_of, run_search

    data = config.to_dict()
    data["search"].update(
        objectives=["fitness", "kept_params"], evaluations=evaluations, initial=60, warm_start=[]
    )
    data["search_space"].pop("keep", None)  # a frontier spans every size
    if seed is not None:
        data["search"]["seed"] = seed
    from eep.config import apply_override, parse_config

    for item in overrides:
        apply_override(data, item)
    frontier = parse_config(data, source="--set" if overrides else config.name)
    schedule = METHOD.plan(frontier, worker.adapter.shape)
    evaluator = SerialEvaluator(worker)
    start = time.perf_counter()  # a calibration warm start's pass counts, as in `eep search`
    run, frontier = create_run(
        resolve(frontier, schedule), tmp / "frontier", schedule, evaluator, lambda m: None
    )
    run_search(run, schedule, evaluator, log=lambda m: None)
    return frontier, run.evaluations(), front_of(run.evaluations()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=["experiments/toy.yaml", "experiments/toy-qwen.yaml"]
    )
    parser.add_argument(
        "--keeps",
        nargs="+",
        type=int,
        help="experts per layer (default: a quarter, 3/8, half and 3/4 of the model's: 2 3 4 6 of 8)",
    )
    parser.add_argument("--runs", type=int, default=2, help="frontier budget in single-size runs")
    parser.add_argument(
        "--seed", type=int, help="the frontier search's seed (default: the config's)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for the frontier search only (e.g. search.smallest_after=null)",
    )
    parser.add_argument(
        "--test-size",
        type=int,
        help="held-out examples a task (configured: 100; more tell apart keep sets a point apart)",
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from benchmarks.search_quality import SHARES, _search, _with_tasks, keeps_for
    from eep import baselines as bl
    from eep.calibration import calibrate
    from eep.compare import greedy_elimination
    from eep.config import load_config
    from eep.evaluator import FitnessWorker, SerialEvaluator
    from eep.evolution import _pick, hypervolume
    from eep.genome import Genome
    from eep.surgery import parameter_counts
    from fitness.metrics import weighted_fitness
    from search_spaces import PruneSpace

    for path in args.configs:
        config = load_config(ROOT / path)
        worker = FitnessWorker(config)
        adapter = worker.adapter
        layers = tuple(adapter.moe_layers)
        num_experts, top_k = adapter.shape.num_experts, adapter.shape.top_k
        keeps = keeps_for(ROOT / path, args.keeps, (*SHARES, 3 / 4))
        tester = (
            FitnessWorker(_with_tasks(config, test_size=args.test_size))
            if args.test_size
            else worker
        )

        def held(genome, config=config, tester=tester):
            return weighted_fitness(config.fitness.tasks, tester.scores(genome, "test"))

        def params(genome, worker=worker, adapter=adapter):
            return parameter_counts(worker.model, adapter, genome)[0]

        with tempfile.TemporaryDirectory() as tmp:
            frontier, archive, front, seconds = _frontier(
                config,
                worker,
                Path(tmp),
                args.runs * config.search.evaluations,
                args.seed,
                args.overrides,
            )
            points = [(e, params(e.genome), held(e.genome)) for e in front]
            _, _, cal = calibrate(config, worker, lambda m: None)
            rows = []
            for keep in keeps:
                uniform = Genome.from_keep(num_experts, top_k, {i: range(keep) for i in layers})
                size = params(uniform)
                # what the run exports at this size: its pick on validation examples
                pick, _ = _pick(archive, keep * len(layers), frontier, SerialEvaluator(worker))
                best = (pick, params(pick.genome), held(pick.genome)) if pick else None
                cfg = config.model_copy(
                    update={"search_space": config.search_space.model_copy(update={"keep": keep})}
                )
                space = PruneSpace(num_experts, top_k, layers, keep)
                single, _, _, _ = _search(cfg, worker, space, Path(tmp))

                greedy_genome, _, _ = greedy_elimination(
                    config, worker, adapter.shape, keep, lambda m: None
                )
                base = {
                    "frequency": held(bl.frequency_genome(cal, keep)),
                    "REAP": held(bl.reap_genome(cal, keep)),
                    "NAEE": held(bl.naee_genome(cal, keep)[0]),
                    "greedy": held(greedy_genome),
                }
                rows.append((keep, size, best, held(single), base))
            full = params(None)
            hv = hypervolume([(h, n) for _, n, h in points], full)
        after = frontier.search.smallest_after
        smallest = f"the smallest size only from {after}" if after else "no smallest-size phase"
        print(
            f"\n## {config.name}: frontier of {args.runs * config.search.evaluations} "
            f"evaluations in {seconds:.0f}s ({smallest}), {len(front)} points, "
            f"hypervolume {hv:.4f}\n"
        )
        print(
            "| size (experts per layer) | frontier pick (experts kept) | frontier held-out | "
            "single-size search | best baseline | frontier ≥ single | frontier > baselines |"
        )
        print("|---|---|---|---|---|---|---|")
        for keep, size, best, single, base in rows:
            name, value = max(base.items(), key=lambda kv: kv[1])
            score = best[2] if best else float("nan")
            experts = sum(g.slots for _, g in best[0].genome.layers) if best else "-"
            print(
                f"| {keep} of {num_experts} ({size:,} parameters) | {experts} | {score:.2f} | {single:.2f} | "
                f"{name} {value:.2f} | {'yes' if score >= single else 'no'} | "
                f"{'yes' if score > value else 'no'} |"
            )


if __name__ == "__main__":
    from eep.errors import EepError

    try:
        main()
    except EepError as err:  # a bad --configs or --set: one line, what to fix
        sys.exit(f"error: {err}")

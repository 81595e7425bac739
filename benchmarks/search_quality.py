"""Search quality: the search against every baseline, held out, with wall time and evaluations.

For each toy config and keep count: random keep sets, routing frequency, REAP, NAEE (one
calibration pass, timed once and shown on each), greedy elimination (``eep.greedy``, real
evaluations), the search as EEP ran it (200 evaluations, the best by search fitness exported) and
the search as configured (the toys: 500 evaluations, the export picked on validation examples).
Every genome is scored on the held-out test split by the same resident worker.

    python benchmarks/search_quality.py                       # both toys, keep 2, 3, 4, seed 0
    python benchmarks/search_quality.py --configs experiments/toy.yaml --keeps 2 --seeds 0 1 2
    python benchmarks/search_quality.py --set search.evaluations=500   # a variant of the search
    python benchmarks/search_quality.py --variant "warm: search.warm_start=[greedy]" --jobs 8
    python benchmarks/search_quality.py --keeps 2 --seeds 0 1 --jobs 2 --test-size 1000

``--variant "LABEL: KEY=VALUE; KEY=VALUE"`` adds a search row per cell with those overrides on top of
the configured search; ``fitness.tasks.*.KEY=VALUE`` sets KEY on every task (e.g. ``--variant "128
examples: fitness.tasks.*.search_size=128"``, searched on its own worker's examples). ``--jobs N``
measures N cells (config, keep, seed) at once in separate processes, each with its share of the CPU
threads (wall times then compare within one run only); ``--json FILE`` also writes every cell's
rows. ``--test-size N`` scores every row on N test examples a task (100 as configured measure a
score near 80 % to about ±1.4 points; 1000 tell apart keep sets a point apart).

The first toy (``experiments/toy.yaml``) is what eep's defaults were tuned on; the second
(``experiments/toy-qwen.yaml``, a Qwen3-MoE with other tasks and another expert-sharing
structure) was kept out of tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EEP_SCHEME = ["search.warm_start=[]", "search.evaluations=200"]  # and no validation examples


SHARES = (1 / 4, 3 / 8, 1 / 2)
"""The default sizes, as shares of a model's experts: 2, 3 and 4 of 8."""


def keeps_for(config_path, asked: list[int] | None, shares=SHARES) -> list[int]:
    """The experts per layer to measure a config's model at: ``asked`` (those between its top-k and
    its expert count; the others are said and skipped), else ``shares`` of its experts."""
    from eep.api import plan
    from eep.config import load_config

    _, shape, _ = plan(load_config(config_path), dry_run=True)
    low, high = shape.top_k, shape.num_experts - 1
    if asked is None:
        return sorted({min(high, max(low, round(share * shape.num_experts))) for share in shares})
    for keep in sorted(set(asked) - set(range(low, high + 1))):
        print(
            f"{config_path}: keep {keep} skipped (its model keeps {low}..{high} of "
            f"{shape.num_experts} experts a layer)",
            file=sys.stderr,
        )
    return [k for k in asked if low <= k <= high]


def _search(config, worker, schedule, tmp: Path) -> tuple[object, float, int, float]:
    from eep.evaluator import SerialEvaluator
    from eep.evolution import resolve, validation_pick
    from eep.genome import Genome
    from eep.journal import RunDir
    from eep.loop import run_search

    run = RunDir.create(tmp / f"run-{time.monotonic_ns()}", resolve(config, schedule))
    start = time.perf_counter()
    summary = run_search(run, schedule, SerialEvaluator(worker), log=lambda m: None)
    genome = Genome.from_dict(summary["best_genome"])
    fitness = summary["best_fitness"]
    picked = (  # what `eep search` exports
        validation_pick(run, schedule, SerialEvaluator(worker), lambda m: None)
        if config.fitness.validates
        else None
    )
    if picked is not None:
        genome, fitness = picked["record"].genome, picked["record"].fitness
    return genome, time.perf_counter() - start, summary["evaluations"], fitness


def _with_tasks(config, **sizes: int | None):
    """``config`` with these sizes (``validation_size=0``: none) set on every task; None: as configured."""
    update = {key: size for key, size in sizes.items() if size is not None}
    if not update:
        return config
    tasks = [t.model_copy(update=update) for t in config.fitness.tasks]
    return config.model_copy(update={"fitness": config.fitness.model_copy(update={"tasks": tasks})})


def _every_task(overrides: list[str], tasks: int) -> list[str]:
    """``fitness.tasks.*.KEY=VALUE`` written out for each of ``tasks`` tasks."""
    return [
        item.replace("fitness.tasks.*.", f"fitness.tasks.{i}.", 1)
        for item in overrides
        for i in (range(tasks) if item.startswith("fitness.tasks.*.") else [None])
    ]


def _shares_examples(config, base) -> bool:
    """Whether a search of ``config`` may run on ``base``'s worker: the same fitness, except
    perhaps no validation examples (a variant that changes the search examples needs its own)."""
    if config.fitness == base.fitness:
        return True
    return (
        not config.fitness.validates
        and config.fitness == _with_tasks(base, validation_size=0).fitness
    )


def measure(
    config_path: str,
    keep: int,
    seed: int,
    overrides: list[str],
    tmp: Path,
    validation: int | None = None,
    variants: dict[str, list[str]] | None = None,
    threads: int | None = None,
    test_size: int | None = None,
) -> dict[str, dict]:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from eep import baselines as bl
    from eep.api import plan
    from eep.calibration import calibrate
    from eep.compare import greedy_elimination
    from eep.config import load_config
    from eep.evaluator import FitnessWorker
    from fitness.metrics import weighted_fitness

    base = [f"search_space.keep={keep}", f"search.seed={seed}"]
    config = _with_tasks(load_config(config_path, base + overrides), validation_size=validation)
    _, shape, _ = plan(config)
    # the searches draw their search and validation examples from this worker; only the
    # held-out scores see the test size
    worker = FitnessWorker(_with_tasks(config, test_size=test_size))

    def heldout(genome) -> float:
        return weighted_fitness(config.fitness.tasks, worker.scores(genome, "test"))

    rows: dict[str, dict] = {}
    start = time.perf_counter()
    _, _, cal = calibrate(config, worker, lambda m: None)
    calibration_s = time.perf_counter() - start
    draws = [heldout(g) for g in bl.random_genomes(cal, keep, 5, seed)]
    rows["random (5 draws)"] = {"heldout": statistics.mean(draws), "seconds": 0.0, "evaluations": 0}
    for name, genome in (
        ("frequency", bl.frequency_genome(cal, keep)),
        ("reap", bl.reap_genome(cal, keep)),
        ("naee", bl.naee_genome(cal, keep, config.baselines.naee_max_subsets)[0]),
    ):
        rows[name] = {"heldout": heldout(genome), "seconds": calibration_s, "evaluations": 0}
    start = time.perf_counter()
    genome, fitness, spent = greedy_elimination(config, worker, shape, keep, lambda m: None)
    rows["greedy"] = {
        "heldout": heldout(genome),
        "seconds": time.perf_counter() - start,
        "evaluations": spent,
        "fitness": fitness,
    }
    # EEP exports its best
    eep_config = _with_tasks(
        load_config(config_path, base + overrides + EEP_SCHEME), validation_size=0
    )
    searches = [("search, EEP's scheme", eep_config), ("search (default)", config)]
    for label, extra in (variants or {}).items():
        extra = _every_task(extra, len(config.fitness.tasks))
        cfg = _with_tasks(
            load_config(config_path, base + overrides + extra), validation_size=validation
        )
        searches.append((f"search ({label})", cfg))
    for name, cfg in searches:
        own = worker if _shares_examples(cfg, config) else FitnessWorker(cfg)
        # each search its own phases: a variant may change the search space (e.g. a merge phase)
        genome, seconds, evaluations, fitness = _search(cfg, own, plan(cfg)[2], tmp)
        rows[name] = {
            "heldout": heldout(genome),
            "seconds": seconds,
            "evaluations": evaluations,
            "fitness": fitness,
        }
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", nargs="+", default=["experiments/toy.yaml", "experiments/toy-qwen.yaml"]
    )
    parser.add_argument(
        "--keeps",
        nargs="+",
        type=int,
        help="experts per layer (default: a quarter, three eighths and half of the model's: 2 3 4 of 8)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--validation", type=int, help="validation_size of every task for the configured search"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the configured search (and every row's config), e.g. search.evaluations=500",
    )
    parser.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=[],
        metavar="'LABEL: KEY=VALUE; ...'",
        help="one more search row per cell, with these overrides on the configured search",
    )
    parser.add_argument(
        "--test-size",
        type=int,
        help="held-out examples a task (configured: 100; more tell apart keep sets a point apart)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="cells measured at once (processes)")
    parser.add_argument("--json", type=Path, help="write every cell's rows to this file")
    args = parser.parse_args(argv)
    variants = {}
    for spec in args.variants:
        label, sep, sets = spec.partition(":")
        if not sep or not label.strip():
            parser.error(f"--variant {spec!r}: write it as 'LABEL: KEY=VALUE; KEY=VALUE'")
        variants[label.strip()] = [s.strip() for s in sets.split(";") if s.strip()]
    configs = [p for p in args.configs if (ROOT / p).exists() or Path(p).exists()]
    for path in sorted(set(args.configs) - set(configs)):
        print(f"{path}: missing, skipped", file=sys.stderr)
    keeps = {p: keeps_for(p if Path(p).exists() else ROOT / p, args.keeps) for p in configs}
    cells = [(p, k, s) for p in configs for k in keeps[p] for s in args.seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    results: dict[tuple, dict] = {}

    def done(cell, rows) -> None:
        results[cell] = rows
        print(
            f"[quality] {len(results)}/{len(cells)} cells: {cell[0]}, keep {cell[1]}, seed {cell[2]}",
            file=sys.stderr,
            flush=True,
        )
        if args.json:  # after every cell, so that an interrupted run keeps what it measured
            cell_rows = [
                {"config": c[0], "keep": c[1], "seed": c[2], "rows": results[c]}
                for c in cells
                if c in results
            ]
            args.json.write_text(json.dumps(cell_rows, indent=1))

    with tempfile.TemporaryDirectory(prefix="eep-quality-") as tmp:
        args_of = {
            c: (*c, args.overrides, Path(tmp), args.validation, variants, threads, args.test_size)
            for c in cells
        }
        if args.jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            spawn = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
                futures = {pool.submit(measure, *args_of[c]): c for c in cells}
                for future in as_completed(futures):
                    done(futures[future], future.result())
        else:
            for c in cells:
                done(c, measure(*args_of[c]))
    print("| config | keep | method | held-out | search fitness | evaluations | wall s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for path in configs:
        for keep in keeps[path]:
            per_seed = [results[path, keep, seed] for seed in args.seeds]
            for method in per_seed[0]:
                held = [rows[method]["heldout"] for rows in per_seed]
                fit = [rows[method].get("fitness") for rows in per_seed]
                shown = f"{statistics.mean(held):.2f}" + (
                    f" ± {statistics.stdev(held):.2f}" if len(held) > 1 else ""
                )
                fitness = f"{statistics.mean(fit):.2f}" if None not in fit else ""
                evals = statistics.mean(rows[method]["evaluations"] for rows in per_seed)
                secs = statistics.mean(rows[method]["seconds"] for rows in per_seed)
                print(
                    f"| {Path(path).stem} | {keep} | {method} | {shown} | {fitness} | {evals:.0f} | {secs:.1f} |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

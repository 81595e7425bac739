"""Evaluations/s of the serial evaluator vs Ray with 1 and 2 actors, and the actors' busy fraction.

    python benchmarks/ray_scaling.py [--model toy|random-mixtral] [--evaluations 40]

Every row runs the same search (same seed, same genomes; `search.in_flight` = actors) on a fresh
local Ray runtime; evaluations/s is measured from the first dispatch, excluding model loading.
`random-mixtral` is a randomly initialised Mixtral (~25M parameters, the toy's tokenizer) saved to
a temporary directory: its accuracy is meaningless, its compute per candidate is real.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from eep.bench import random_mixtral  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy", choices=["toy", "random-mixtral"])
    parser.add_argument("--evaluations", type=int, default=40)
    args = parser.parse_args()

    from eep.config import parse_config
    from eep.evaluator import FitnessWorker, SerialEvaluator
    from eep.journal import RunDir
    from eep.loop import run_search
    from eep.ray_evaluator import RayEvaluator
    from fitness import toy_tasks
    from search_spaces import PruneSpace

    scratch = Path(tempfile.mkdtemp(prefix="eep-bench-"))
    try:
        model = "toy" if args.model == "toy" else random_mixtral(scratch / "model")
        rows = []
        for label, actors in (("serial", 0), ("ray, 1 actor", 1), ("ray, 2 actors", 2)):
            data = {
                "name": "bench",
                "model": {"path": model, "device": "cpu", "dtype": "float32"},
                "search": {
                    "seed": 0,
                    "evaluations": args.evaluations,
                    "initial": 10,
                    "in_flight": max(actors, 1),
                },
                "fitness": {
                    "batch_size": 128,
                    "max_new_tokens": 8,
                    "tasks": [
                        {"name": t, "dataset": f"toy:{t}", "search_size": 16}
                        for t in toy_tasks.TASKS
                    ],
                },
                "evaluator": {"kind": "ray", "workers": actors} if actors else {},
            }
            config = parse_config(data)
            run = RunDir.create(scratch / label.replace(" ", "").replace(",", "-"), config)
            layers = tuple(range(4 if model == "toy" else 8))
            space = PruneSpace(8, 2, layers, 4)
            evaluator = (
                RayEvaluator(config, log=lambda m: None)
                if actors
                else SerialEvaluator(FitnessWorker(config), in_flight=1)
            )
            try:
                start = time.perf_counter()
                run_search(run, space, evaluator, log=lambda m: None)
                seconds = time.perf_counter() - start
                busy = evaluator.busy_fraction()
            finally:
                evaluator.close()
            rows.append((label, args.evaluations / seconds, busy))
            print(
                f"{label:14s} {args.evaluations / seconds:6.2f} evals/s"
                + (f"  busy {100 * busy:5.1f} %" if busy is not None else ""),
                flush=True,
            )
        base = rows[1][1]
        print(
            f"\n| evaluator ({args.model}, {os.cpu_count()} CPUs) | evals/s | vs 1 actor | actor busy |\n|---|---|---|---|"
        )
        for label, rate, busy in rows:
            print(
                f"| {label} | {rate:.2f} | {rate / base:.2f}x | {'' if busy is None else f'{100 * busy:.1f} %'} |"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

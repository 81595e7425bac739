"""What applying a genome to the resident model costs, against evaluating it.

    python benchmarks/apply_cost.py [--model toy|random-100m] [--repeats 5]

For a prune genome (keep 4 of 8) and merge genomes (EEP's merge mutation of it): the median time
to apply and restore a genome (`adapter.applied`: routing hooks, and for merging one GEMM per
expert tensor per layer into reused buffers), the median time of one candidate evaluation (greedy
generation on the toy tasks' search split, 8 tasks x 16 prompts, batch 128, 8 new tokens), and
their ratio. Merge rows: "cold" alternates two genomes that differ in every layer, so every layer
is merged for every candidate; "child" alternates a genome and a child differing in one layer, as
consecutive candidates of a search mostly do (unchanged layers are not merged again). Ratios come
from one run on one machine.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from eep.bench import median_spread, random_mixtral  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="toy", choices=["toy", "random-100m"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from eep.config import parse_config
    from eep.evaluator import FitnessWorker
    from fitness import toy_tasks
    from search_spaces import MergeSpace, PruneSpace, layer_groups, mutate_noise, random_genome

    torch.set_grad_enabled(False)
    scratch = Path(tempfile.mkdtemp(prefix="eep-bench-"))
    try:
        model = "toy" if args.model == "toy" else random_mixtral(scratch / "model", args.model)
        config = parse_config(
            {
                "name": "bench",
                "model": {"path": model, "device": "auto"},
                "fitness": {
                    "batch_size": 128,
                    "max_new_tokens": 8,
                    "tasks": [
                        {"name": t, "dataset": f"toy:{t}", "search_size": 16}
                        for t in toy_tasks.TASKS
                    ],
                },
            }
        )
        worker = FitnessWorker(config)
        adapter = worker.adapter
        layers = tuple(adapter.moe_layers)
        rng = random.Random(0)
        pruned = random_genome(PruneSpace(adapter.num_experts, adapter.top_k, layers, 4), rng)
        space = MergeSpace(adapter.num_experts, adapter.top_k, layer_groups(layers, None))

        def mutate(genome, layer_prob):
            return mutate_noise(
                genome,
                rng,
                space,
                layer_prob=layer_prob,
                noise_prob=0.25,
                noise_scale=0.065,
                renorm_prob=0.0,
            )

        merged, other = mutate(pruned, 1.0), mutate(pruned, 1.0)
        child = mutate(merged, 0.0)  # one matrix of one layer changed
        assert sum(merged.gene(i) != child.gene(i) for i in layers) == 1
        params = sum(p.numel() for p in adapter.model.parameters())
        device = next(adapter.model.parameters()).device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        def apply(*genomes):
            turn = iter(range(10**9))

            def run():
                with adapter.applied(genomes[next(turn) % len(genomes)]):
                    pass
                sync()

            return run

        print(
            f"model {args.model}: {params / 1e6:.1f}M parameters, {len(layers)} MoE layers, {device}; "
            f"medians of {args.repeats}",
            flush=True,
        )
        worker.scores(pruned)  # warm-up
        rows = []
        for name, genomes in (
            ("prune", (pruned,)),
            ("merge, cold", (merged, other)),
            ("merge, child", (merged, child)),
        ):
            genome = genomes[0]
            apply_s, apply_spread = median_spread(apply(*genomes), args.repeats * 4)
            eval_s, eval_spread = median_spread(
                lambda g=genome: (worker.scores(g), sync()), args.repeats
            )
            rows.append((name, apply_s, apply_spread, eval_s, eval_spread))
            print(
                f"{name}: apply+restore {1e3 * apply_s:.3f} ms, evaluation {eval_s:.3f} s",
                flush=True,
            )
        print(
            f"\n| genome ({args.model}, {device.type}) | apply + restore | one evaluation | apply / evaluation |"
            "\n|---|---|---|---|"
        )
        for name, apply_s, apply_spread, eval_s, eval_spread in rows:
            print(
                f"| {name} | {1e3 * apply_s:.3f} ± {1e3 * apply_spread:.3f} ms | {eval_s:.3f} ± {eval_spread:.3f} s"
                f" | {100 * apply_s / eval_s:.3f} % |"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""What a latency frontier times, against the model it exports: one run, ratios measured together.

    python benchmarks/latency_check.py [--config experiments/toy-latency.yaml] [--rounds 20]
                                       [--set model.device=cuda ...]

For the full model and a few pruning genomes (half the experts at top-k; half at top-1; a quarter
at top-1), in interleaved rounds on one worker: the genome applied as the search scores it
(``MoEAdapter.applied``: every expert in place, routing hooks), compacted as a latency is timed
(``MoEAdapter.compacted``), and its exported checkpoint loaded from disk; each the fastest of
``search.latency_repeats`` passes of the worker's latency batch (``FitnessWorker.milliseconds``).
Prints the median over rounds of each and the ratios compacted / exported and applied / exported
(1.0: what is timed is what is exported), and the share ``FitnessWorker.latency`` journals.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from eep.config import load_config
from eep.evaluator import FitnessWorker
from eep.export import export_genome
from eep.genome import Genome
from eep.model import load_model


def _fastest(model, batch, repeats: int) -> float:
    """As ``FitnessWorker.milliseconds`` times: the fastest of ``repeats`` after one untimed."""
    sync = torch.cuda.synchronize if batch["input_ids"].is_cuda else (lambda: None)
    times = []
    with torch.no_grad():
        for _ in range(1 + repeats):
            sync()
            start = time.perf_counter()
            model(**batch)
            sync()
            times.append(time.perf_counter() - start)
    return 1000.0 * min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="experiments/toy-latency.yaml")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    worker = FitnessWorker(config)
    adapter, batch = worker.adapter, worker.latency_batch()
    experts, k, layers = adapter.num_experts, adapter.top_k, adapter.moe_layers
    genomes = {
        f"{experts // 2} of {experts}, top-{k}": Genome.from_keep(
            experts, k, {i: range(experts // 2) for i in layers}
        ),
        f"{experts // 2} of {experts}, top-1": Genome.from_keep(
            experts, k, {i: range(experts // 2) for i in layers}, 1
        ),
        f"{experts // 4} of {experts}, top-1": Genome.from_keep(
            experts, k, {i: range(max(experts // 4, 1)) for i in layers}, 1
        ),
    }
    repeats = config.search.latency_repeats
    with tempfile.TemporaryDirectory() as scratch:
        exported = {}
        for name, genome in genomes.items():
            out = Path(scratch) / name.replace(" ", "_").replace(",", "")
            export_genome(config.model, genome, out, log=lambda m: None)
            exported[name], _ = load_model(config.model.model_copy(update={"path": str(out)}))
        times: dict[str, dict[str, list[float]]] = {
            name: {"applied": [], "compacted": [], "exported": [], "share": []} for name in genomes
        }
        full = []
        for _ in range(args.rounds):  # interleaved: a drift of the machine touches every column
            full.append(worker.milliseconds(None))
            for name, genome in genomes.items():
                with adapter.applied(genome):
                    times[name]["applied"].append(_fastest(worker.model, batch, repeats))
                times[name]["compacted"].append(worker.milliseconds(genome))
                times[name]["exported"].append(_fastest(exported[name], batch, repeats))
                times[name]["share"].append(worker.latency(genome))
    print(
        f"{config.model.path}: latency batch {tuple(batch['input_ids'].shape)}, fastest of "
        f"{repeats} passes, median of {args.rounds} interleaved rounds; full model "
        f"{statistics.median(full):.3f} ms"
    )
    print(
        f"{'genome':<22} {'applied':>9} {'compacted':>10} {'exported':>9} "
        f"{'compacted/exported':>19} {'applied/exported':>17} {'share (journaled)':>18}"
    )
    for name, columns in times.items():
        ms = {column: statistics.median(values) for column, values in columns.items()}
        print(
            f"{name:<22} {ms['applied']:9.3f} {ms['compacted']:10.3f} {ms['exported']:9.3f} "
            f"{ms['compacted'] / ms['exported']:19.3f} {ms['applied'] / ms['exported']:17.3f} "
            f"{ms['share']:18.3f}"
        )


if __name__ == "__main__":
    main()

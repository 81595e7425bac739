"""``eep baselines``: score the task-agnostic baselines next to the search, held out.

One calibration pass of the full model (:func:`eep.baselines.collect`) gives every baseline its
statistics; each baseline genome is then scored on the held-out split by the same resident worker
the search uses, so the table compares genomes, not code paths. Writes ``RUN_DIR/baselines.json``:
``{method: {"heldout", "tasks", "kept_params", "active_params"}}`` (``random``: the mean over its
draws, with ``heldout_std``), plus a ``sweep`` of the baselines at other kept-expert counts.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from eep.calibration import calibrate, calibration_coverage
from eep.config import Config
from eep.errors import EepError
from eep.evolution import FRONTIER_PICK, compared
from eep.genome import Genome
from eep.journal import warm_seed_name
from eep.methods import method_of
from eep.surgery import parameter_counts


def warm_started(config: Config) -> list[str]:
    """The baselines the run's search started from: ``search.warm_start`` as given, and those
    ``eep search`` saved as ``seeds/warm-<method>.json`` (the calibration-pass ones)."""
    warm = [warm_seed_name(s) for s in config.search.seed_genomes]
    return config.search.named_warm_start + [n for n in warm if n is not None]


def search_start(config: Config) -> str | None:
    """How the run's search started, for its row: ``warm start: greedy, naee``
    (:func:`warm_started`) and any other seed genomes; None for random initial genomes only."""
    warm = warm_started(config)
    seeded = sum(warm_seed_name(s) is None for s in config.search.seed_genomes)
    parts = [f"warm start: {', '.join(warm)}"] if warm else []
    parts += [f"{seeded} seed genome{'s' if seeded > 1 else ''}"] if seeded else []
    return "; ".join(parts) or None


def check_baselines(config: Config, shape) -> None:
    """Fail before any model loads when the baselines cannot be compared at the config's size."""
    keep = config.search_space.keep
    if shape.expert_groups > 1:
        raise EepError(
            f"baselines pick experts without regard to the model's {shape.expert_groups} routing groups, "
            "which its routing needs kept evenly; they are not available for grouped top-k models"
        )
    if keep is None:
        raise EepError(
            "baselines compare at a fixed number of experts per layer; set search_space.keep, not budget"
        )
    for k in (keep, *config.baselines.sweep):
        if not shape.top_k <= k <= shape.num_experts:
            raise EepError(
                f"baselines at {k} experts per layer: must be between top-k ({shape.top_k}) and "
                f"{shape.num_experts}; fix search_space.keep or baselines.sweep"
            )
    methods_for(config, shape)


def methods_for(config: Config, shape) -> list[str]:
    """The baselines to score: ``baselines.methods``, less ``naee+skip`` on a model that does not
    route top-2 (dynamic skipping drops the second of two experts) when the list is the default;
    asked for by name there, it is an error."""
    methods = list(config.baselines.methods)
    if "naee+skip" in methods and shape.top_k != 2:
        if "methods" in config.baselines.model_fields_set:
            raise EepError(
                f"naee+skip (dynamic skipping) needs a top-2 model, this one routes top-{shape.top_k}; "
                "remove it from baselines.methods"
            )
        methods.remove("naee+skip")
    return methods


def _no_low_rank(config: Config) -> Config:
    return config.model_copy(
        update={"moei2": config.moei2.model_copy(update={"rank_params": None})}
    )


def run_baselines(
    config: Config,
    worker,
    summary: dict | None,
    log: Callable[[str], None],
    workdir: Path | None = None,
) -> dict:
    """Score the configured baselines (and, from ``summary``, the search and the full model) held
    out. ``workdir`` holds the journals of the ``moei2`` baseline's layer searches (default: a
    temporary directory)."""
    from eep import baselines as bl
    from eep.moe import shape_of
    from eep.progress import tracked
    from fitness.metrics import weighted_fitness

    cfg, keep = config.baselines, config.search_space.keep
    shape = shape_of(worker.model.config)
    check_baselines(config, shape)
    names = methods_for(config, shape)
    if "naee+skip" in cfg.methods and "naee+skip" not in names:
        log(
            f"[eep] naee+skip left out: dynamic skipping needs a top-2 model, this one routes top-{shape.top_k}"
        )
    if workdir is None:  # removed when this call returns
        scratch = tempfile.TemporaryDirectory(prefix="eep-baselines-")
        workdir = Path(scratch.name)
    texts, batches, cal = calibrate(config, worker, log)
    # beside a latency frontier each row is timed as its candidates were: a share of the full
    # model's time (the full model's own, against itself, about 1)
    timed = "latency" in config.search.objectives

    def score(genome: Genome | None, skip=None) -> dict:
        tasks = worker.scores(genome, "test", skip=skip)
        kept, active = parameter_counts(worker.model, worker.adapter, genome)
        return (
            {
                "heldout": weighted_fitness(config.fitness.tasks, tasks),
                "tasks": tasks,
                "kept_params": kept,
                "active_params": active,
            }
            | ({"latency": worker.latency(genome, skip=skip)} if timed else {})
            | ({"genome": genome.to_dict()} if genome else {})
        )

    def methods_at(k: int) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for method in tracked(names, f"baselines at {k} of {shape.num_experts} experts", log):
            if method == "random":
                draws = [
                    score(g)
                    for g in bl.random_genomes(cal, k, cfg.random_draws, config.search.seed)
                ]
                out[method] = _mean_of(draws)
            elif method == "frequency":
                out[method] = score(bl.frequency_genome(cal, k))
            elif method == "reap":
                out[method] = score(bl.reap_genome(cal, k))
            elif method == "moei2":
                out.update(moei2_rows(k))
            elif method == "greedy":
                genome, fitness, spent = greedy_elimination(config, worker, shape, k, log)
                out[method] = {**score(genome), "evaluations": spent, "search_fitness": fitness}
            else:  # naee, naee+skip
                genome, how = bl.naee_genome(cal, k, cfg.naee_max_subsets)
                skip = bl.skip_betas(cal, genome) if method == "naee+skip" else None
                out[method] = {**score(genome, skip), "how": how}
                if skip is not None:
                    out[method]["betas"] = {str(i): round(b, 4) for i, b in skip.items()}
                    # the router's second weight is ~0: nothing to skip
                    if max(skip.values()) < 1e-3:
                        out[method]["how"] = (
                            "no-op: the second expert's weight is ~0, nothing is skipped"
                        )
        return out

    def moei2_rows(k: int) -> dict[str, dict]:
        """MoE-I² at k experts per layer's worth: stage 1 alone at k x layers experts, and (with
        ``moei2.rank_params``) stage 1 keeping more experts, then low-rank to the same size."""
        from eep.moei2 import Moei2Plan, compress

        size = k * len(shape.moe_layers)
        quiet = lambda message: None  # noqa: E731  (the layer searches' progress lines)
        # journals of other settings are never reused
        settings = json.dumps(
            [config.moei2.model_dump(mode="json"), cfg.calibration.model_dump(mode="json")],
            sort_keys=True,
        )
        workdir_k = workdir / f"moei2-{k}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}"
        rows = {}
        alone = _no_low_rank(config)
        stage1 = compress(
            alone,
            worker,
            workdir_k,
            Moei2Plan.of(shape, size, alone.moei2),
            quiet,
            cal=cal,
            batches=batches,
        )["stage1"]
        rows["moei2"] = {**score(stage1), "genome_key": stage1.key}
        if config.moei2.rank_params is not None:
            plan = Moei2Plan.of(shape, size, config.moei2)
            result = compress(
                config,
                worker,
                workdir_k.with_name(workdir_k.name + "-rank"),
                plan,
                quiet,
                cal=cal,
                batches=batches,
            )
            rows["moei2+low-rank"] = {
                **score(result["stage2"]),
                "genome_key": result["stage2"].key,
                "stage1_experts": plan.stage1,
            }
        return rows

    methods = {"full": score(None)}
    methods.update(methods_at(keep))
    # the run's genome at this size: its export, or a frontier's pick there
    point = compared(summary, keep) if summary and method_of(config).searches else None
    if point is not None:
        best = Genome.from_dict(point["genome"])
        kept, active = parameter_counts(worker.model, worker.adapter, best)
        if summary.get("front") is not None:
            how = {"how": f"{FRONTIER_PICK} {keep} of {shape.num_experts}, candidate {point['id']}"}
        elif start := search_start(config):
            how = {"how": start, "warm_start": warm_started(config)}
        else:
            how = {}
        methods["search"] = {
            "heldout": point["heldout"]["mean"],
            "tasks": point["heldout"]["scores"],
            "kept_params": kept,
            "active_params": active,
            "genome_key": best.key,
            "evaluations": summary["evaluations"],
            # "validation" or "search fitness": how the run picked the genome it exports
            "picked_by": point["by"],
            **how,
        }
    sweep_rows = {str(k): methods_at(k) for k in cfg.sweep if k != keep}
    sweep = {k: {m: v["heldout"] for m, v in rows.items()} for k, rows in sweep_rows.items()}
    return {
        "keep": keep,
        "num_experts": shape.num_experts,
        "num_layers": len(shape.moe_layers),
        "top_k": shape.top_k,
        "calibration_texts": len(texts),
        "calibration_tokens": cal.tokens,
        "calibration": calibration_coverage(config),
        "methods": methods,
        "sweep": sweep,
        "sweep_rows": sweep_rows,
    }


def greedy_elimination(
    config: Config, worker, shape, keep: int, log: Callable[[str], None]
) -> tuple[Genome, float, int]:
    """Greedy elimination (:mod:`eep.greedy`) to ``keep`` experts a layer on the resident worker's
    search split, each option cut short once it cannot be taken (``search.early_cut``; it takes the
    same options): (genome, its search fitness, evaluations spent)."""
    from eep import greedy
    from eep.progress import Progress
    from fitness.scoring import Cut
    from search_spaces import PruneSpace

    space = PruneSpace(
        shape.num_experts, shape.top_k, tuple(shape.moe_layers), keep, config.search_space.top_k
    )
    progress = Progress(
        f"greedy elimination at {keep} of {shape.num_experts}", greedy.cost(space), log
    )

    def fitness_or_bound(genome: Genome, bar: float | None) -> float:
        try:
            return worker.fitness(worker.scores(genome, cut_below=bar))
        except Cut as cut:
            return cut.bound

    def fitnesses(batch: greedy.Batch) -> list[float]:
        if config.search.early_cut:
            scored = greedy.cut_scores(batch, fitness_or_bound)
        else:
            scored = [fitness_or_bound(g, None) for g in batch]
        progress.step(len(batch))
        return scored

    result = greedy.run(greedy.steps(space), fitnesses)
    progress.close()
    return result


def _mean_of(draws: list[dict]) -> dict:
    means = [d["heldout"] for d in draws]
    return {
        "heldout": statistics.mean(means),
        "heldout_std": statistics.stdev(means) if len(means) > 1 else 0.0,
        "draws": len(draws),
        "tasks": {t: statistics.mean(d["tasks"][t] for d in draws) for t in draws[0]["tasks"]},
        "kept_params": draws[0]["kept_params"],
        "active_params": draws[0]["active_params"],
        **(
            {"latency": statistics.mean(d["latency"] for d in draws)}
            if "latency" in draws[0]
            else {}
        ),
        "genomes": [d["genome"] for d in draws],
    }

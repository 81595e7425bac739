"""``method: eep``: EEP's evolutionary search as a method (:mod:`eep.methods`).

What a run of it does around the loop (:mod:`eep.loop`): seed genomes and warm starts become
part of the run, the evaluator is made (serial or Ray), and after the last evaluation the
genome to export is picked (by validation examples when the tasks have them) and scored held
out with the full model beside it. A multi-objective run (``search.objectives``) also keeps its
frontier: the non-dominated points and a pick per size, held-out scored (:func:`_front`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from eep import greedy
from eep.config import Config
from eep.errors import EepError
from eep.genome import Genome
from eep.journal import RunDir, warm_seed_path
from eep.progress import stderr_log
from search_spaces import Schedule, build_schedule

Log = Callable[[str], None]


def export_rule(config: Config, named: list[str] = ()) -> str:
    """How the run picks what it exports, for the plan: the best on validation examples among the
    ``select_top`` best by search fitness (per size on a frontier) and the genomes the search starts
    from (``named``: its warm starts, resolved; and its seed genomes), or the best by search
    fitness."""
    top = config.search.select_top
    if "latency" in config.search.objectives:
        return "a point of the front you choose (eep export RUN_DIR --point ID or --max-latency MS)"
    per_size = "per size, " if config.search.frontier else ""
    if config.fitness.validates:
        from eep.loop import start_label

        starts = [start_label(m) for m in named]
        if config.search.seed_genomes:
            starts.append("the seed genomes")
        also = (
            f", and what it starts from ({', '.join(starts)})"
            if starts and not config.search.frontier
            else ""
        )
        return f"{per_size}the best on validation examples among the {top} best by search fitness{also}"
    return (
        f"{per_size}the best by search fitness (validation examples, fitness.tasks[].validation_size, "
        f"would pick among the {top} best on examples the search never scores, which generalises better)"
    )


def validation_fitness(config: Config, scores: dict[str, float]) -> float | None:
    """The fitness on validation examples: the weighted mean over the tasks that have them (an
    ``auto`` task whose source ran out has none); None when no task has."""
    from fitness.metrics import weighted_fitness

    tasks = [t for t in config.fitness.tasks if t.name in scores]
    return weighted_fitness(tasks, scores) if tasks else None


class _Below(float):
    """A validation score not known, only that it is below this bar (its scoring was cut)."""


def _validator(config: Config, evaluator, memo: dict, scored: Callable[[], None] = lambda: None):
    """``validate(genome, bar=None)``: its :func:`validation_fitness`, or None once it cannot reach
    ``bar`` (its scoring is cut short: :func:`eep.loop.select` races the candidates). ``memo`` keeps
    each genome's score, or the bar it fell below, so that a genome is scored again only for a
    lower bar (the picks of a frontier share one memo); ``scored`` is called after each scoring.
    The tasks the candidates scored in full so far scored lowest on are scored first, so that a
    cut comes soon (it never changes a score)."""
    totals: dict[str, float] = {}

    def validate(genome, bar: float | None = None) -> float | None:
        known = memo.get(genome.key, _Below("inf"))  # not scored: below any bar
        if isinstance(known, _Below) and (bar is None or bar < known):
            order = tuple(sorted(totals, key=lambda name: (totals[name], name)))
            scores = evaluator.heldout(genome, "validation", cut_below=bar, order=order)
            memo[genome.key] = _Below(bar) if scores is None else validation_fitness(config, scores)
            for name, score in (scores or {}).items():
                totals[name] = totals.get(name, 0.0) + score
            scored()
        known = memo[genome.key]
        return None if isinstance(known, _Below) else known

    return validate


class Evolution:
    """``method: eep``: EEP's evolutionary search (:mod:`eep.loop`) over the config's search space,
    on a serial or Ray evaluator; the run exports its best genome (or, with validation examples,
    the best of the top few on them), scored held out."""

    name = "eep"
    searches = True
    """Its pick is scored on the tasks like the baselines (the comparison table's "search" row)."""

    def plan(self, config: Config, shape, config_dir: Path | None = None) -> Schedule:
        """The search's phases (:func:`search_spaces.build_schedule`), the warm starts checked,
        and with ``config_dir`` the seed genomes (a bad file fails before anything loads)."""
        frontier = config.search.objectives[1] if config.search.frontier else None
        schedule = build_schedule(
            config.search_space, shape, frontier=frontier, smallest_from=config.search.smallest_from
        )
        named = config.search.named_warm_start
        if config.search.frontier and named:
            _check_frontier_warm(config)
        if config_dir is not None:
            seed_genomes(config, schedule, config_dir)
        if named and not config.search.frontier:
            # the baselines' genomes, like greedy's, keep a uniform number per layer
            greedy.check(schedule.first)
        if "greedy" in named:
            cost = greedy.cost(schedule.first)
            if cost >= config.search.evaluations:
                raise EepError(
                    f"search.warm_start greedy takes {cost} evaluations at this size, and "
                    f"search.evaluations is {config.search.evaluations}; raise evaluations above "
                    f"{cost} or drop greedy"
                )
        return schedule

    def plan_lines(self, config: Config, schedule: Schedule) -> list[tuple[str, str]]:
        from fitness.scoring import scoring_path

        search = config.search
        named = resolve(config, schedule).search.named_warm_start
        lines = [
            (
                "budget",
                f"{search.evaluations} evaluations ({_initial(search, named, schedule)}), "
                f"seed {search.seed}"
                + (
                    f"; objectives {', '.join(search.objectives)} (NSGA-II, parent pool "
                    f"{search.population})"
                    if search.frontier
                    else ""
                ),
            )
        ]
        if search.smallest_from is not None:
            auto = "; search.smallest_after: auto" if search.smallest_after == "auto" else ""
            lines.append(
                (
                    "smallest size",
                    f"from evaluation {search.smallest_from} on, only {schedule.phases[-1][1].keep} "
                    f"experts in every layer{auto}",
                )
            )
        if named and search.frontier:
            keeps = warm_keeps(search, schedule)
            lines.append(
                (
                    "warm start",
                    f"{', '.join(named)} at {keeps[0]}..{keeps[-1]} of {schedule.first.num_experts} "
                    "experts per layer (one calibration pass), as seed genomes",
                )
            )
        elif named:
            auto = "; search.warm_start: auto" if search.warm_start == "auto" else ""
            starts = [
                f"greedy elimination ({greedy.cost(schedule.first)} of the {search.evaluations} "
                f"evaluations{auto})"
                if m == "greedy"
                else f"{m} (one calibration pass)"
                for m in named
            ]
            lines.append(("warm start", ", ".join(starts)))
        elif search.warm_start == "auto" and not search.frontier:
            why = greedy.auto_off(schedule.first, search.evaluations)
            lines.append(("warm start", f"none (search.warm_start: auto; {why})"))
        fit = config.fitness
        why_not = "fitness.scoring: generate" if fit.scoring == "generate" else None
        paths: dict[str, list[str]] = {}
        for task in fit.tasks:
            paths.setdefault(scoring_path(task.metric, why_not), []).append(task.name)
        timed = "latency" in search.objectives
        cut = (
            "; no early cut (a candidate's latency is unknown until it is measured)"
            if timed
            else "; early cut of hopeless candidates"
            if search.early_cut
            else "; no early cut (search.early_cut: false)"
        )
        scoring = "; ".join(f"{path}: {', '.join(names)}" for path, names in paths.items())
        lines.append(("scoring", scoring + cut))
        if timed:
            lines.append(
                (
                    "latency",
                    f"each candidate timed on its worker: the fastest of {search.latency_repeats} "
                    f"forward pass{'es' if search.latency_repeats > 1 else ''} of "
                    f"{fit.batch_size} search prompts (search.latency_repeats, fitness.batch_size)",
                )
            )
        lines.append(("export", export_rule(config, named)))
        return lines

    def start(self, config: Config, run_dir: Path, schedule, log: Log, config_dir: Path) -> None:
        """Create the run (seed genomes and calibration-pass warm starts copied into it, so that it
        resumes from anywhere) and run it to the end."""
        requested = config
        seeds = seed_genomes(config, schedule, config_dir)
        in_flight_is_set = "in_flight" in config.search.model_fields_set
        evaluator = make_evaluator(config, log)
        try:
            if config.evaluator.kind == "ray" and not in_flight_is_set:  # keep every actor busy
                evaluator.in_flight = evaluator.size
                config = _with_search(config, in_flight=evaluator.size)
            run, config = create_run(
                resolve(config, schedule), run_dir, schedule, evaluator, log, seeds
            )
            run.write_request(requested)
        except BaseException:
            evaluator.close()
            raise
        with run.lock():
            _finish(run, config, schedule, evaluator, log)

    def resume(self, run: RunDir, config: Config, schedule, log: Log, worker=None) -> dict:
        """Continue the search from its journal to the end (on ``worker``'s model when given)."""
        return _finish(run, config, schedule, make_evaluator(config, log, worker), log)

    def finished(self, summary: dict, config: Config) -> bool:
        return "heldout" in summary and summary["evaluations"] >= config.search.evaluations

    def progress(self, summary: dict, config: Config) -> tuple[int, int] | None:
        """(evaluations done, planned)."""
        return summary["evaluations"], config.search.evaluations

    def outcome(self, summary: dict) -> dict:
        """What ``eep search`` prints as its one JSON line: the best by search fitness, and (not
        for a frontier, which exports a point chosen later) the candidate exported, held out."""
        out = {k: summary.get(k) for k in ("evaluations", "best_fitness", "best_id")}
        if summary.get("front") is None and "heldout" in summary:
            out["exported_id"] = (summary.get("selected") or {}).get("id", summary.get("best_id"))
            out["heldout"] = round(summary["heldout"]["best"]["mean"], 4)
        return out


METHOD = Evolution()


def _with_search(config: Config, **values) -> Config:
    return config.model_copy(update={"search": config.search.model_copy(update=values)})


def resolve(config: Config, space) -> Config:
    """``config`` with its ``auto`` search settings replaced by what they mean for this search
    space: ``warm_start`` by ``[greedy]`` or ``[]`` (:func:`eep.greedy.starts`), a frontier's
    ``smallest_after`` by the evaluation it starts at or None (``SearchConfig.smallest_from``).
    What a run stores, so that a larger budget given later (``eep resume --evaluations``) cannot
    change how it started or when it turns to the smallest size."""
    search = config.search
    values = {}
    if search.warm_start == "auto":
        started = greedy.starts(search, Schedule.of(space).first)
        values["warm_start"] = ["greedy"] if started else []
    if search.smallest_after == "auto" and search.frontier:
        values["smallest_after"] = search.smallest_from
    return _with_search(config, **values) if values else config


def _initial(search, named: list[str], schedule: Schedule) -> str:
    """What precedes breeding, for the plan (:func:`eep.loop.random_initial`); the calibration
    warm starts are seed genomes once the run starts."""
    from eep.loop import random_initial

    warm = greedy.cost(schedule.first) if "greedy" in named else 0
    calibrated = len([m for m in named if m != "greedy"])
    sizes = len(warm_keeps(search, schedule)) if search.frontier and calibrated else 1
    seeds = len(search.seed_genomes) + calibrated * sizes
    random = random_initial(search, warm, seeds)
    if warm and not random:
        return "no random initial genomes: breeding starts from greedy elimination's"
    return f"{random} random initial"


def seed_genomes(config: Config, space, config_dir: Path) -> list[Genome]:
    """The config's seed genomes, loaded (paths relative to the working directory, else to the
    config file) and checked against the search's first space; an error names the file and why."""
    from search_spaces import Schedule

    paths = config.search.seed_genomes
    seeds = []
    for name in paths:
        path = Path(name) if Path(name).exists() or Path(name).is_absolute() else config_dir / name
        genome = Genome.load(path)
        reason = Schedule.of(space).first.reject(genome)
        if reason is not None:
            raise EepError(f"seed genome {path} does not belong to this search's space: {reason}")
        seeds.append(genome)
    return seeds


def create_run(
    config: Config, run_dir: Path, schedule, evaluator, log: Log, seeds: list[Genome] = ()
) -> tuple[RunDir, Config]:
    """The run directory of a search (``config`` resolved, :func:`resolve`) and the config it
    runs, with its seed genomes and calibration warm starts copied into it as seed genomes: its
    config says what it does, and it resumes from anywhere, whatever happens to the files."""
    names = [f"seeds/seed-{n}.json" for n in range(len(seeds))]
    calibrated = [m for m in config.search.warm_start if m != "greedy"]
    if calibrated:
        seeds, names = _warm_seeds(config, evaluator, calibrated, seeds, names, log, schedule)
        kept = [m for m in config.search.warm_start if m == "greedy"]
        config = _with_search(config, warm_start=kept)
    if seeds:
        config = _with_search(config, seed_genomes=names)
    run = RunDir.create(run_dir, config)
    if seeds:
        (run.path / "seeds").mkdir()
        for name, genome in zip(names, seeds):
            genome.save(run.path / name)
    return run, config


def _warm_seeds(config, evaluator, methods, seeds, names, log: Log, space) -> tuple[list, list]:
    """The seeds with the calibration-pass warm starts appended (those not already among them, and
    only those the search's space holds: e.g. weight groups need one keep set per group)."""
    from eep.baselines import warm_genomes
    from eep.evaluator import FitnessWorker
    from search_spaces import Schedule

    worker = getattr(evaluator, "worker", None)
    if worker is None:  # Ray: the baselines' one calibration pass runs on a model loaded here
        log(f"[eep] loading {config.model.path} here for the warm start's calibration pass")
        worker = FitnessWorker(config)
    seeds, names = list(seeds), list(names)
    keeps = warm_keeps(config.search, space) if config.search.frontier else ()
    for method, genome in warm_genomes(config, worker, methods, log, keeps).items():
        if genome.key in {s.key for s in seeds}:
            log(f"[eep] warm start: {method}'s genome is already a seed")
            continue
        reason = Schedule.of(space).first.reject(genome)
        if reason is not None:
            log(f"[eep] warm start: {method}'s genome is left out: {reason}")
            continue
        seeds.append(genome)
        names.append(warm_seed_path(method))
    return seeds, names


def warm_keeps(search, space) -> list[int]:
    """The sizes (experts per layer) at which a frontier's calibration warm starts seed it: the
    upper half, ceil(E/2)..E-1, where search and validation fitness saturate and a pick among ties
    goes to the earlier candidate (seeding every size lowered the picks at 3 of 8: docs/frontier.md);
    evenly thinned so that the seeds fill at most half of ``search.initial``."""
    first = Schedule.of(space).first
    sizes = list(range(max(math.ceil(first.num_experts / 2), first.min_keep), first.num_experts))
    room = max(search.initial // (2 * max(len(search.named_warm_start), 1)), 1)
    if len(sizes) > room:
        sizes = sorted({sizes[round(i * (len(sizes) - 1) / max(room - 1, 1))] for i in range(room)})
    return sizes


def _check_frontier_warm(config: Config) -> None:
    """A frontier takes the calibration warm starts, over kept experts only (grouped models have
    no such frontier: :func:`search_spaces.build_schedule`)."""
    objective = config.search.objectives[1]
    if objective != "kept_params":
        raise EepError(
            "search.warm_start seeds a frontier over kept experts (objectives: [fitness, "
            f"kept_params]), not over {objective}: drop warm_start"
        )
    if "greedy" in config.search.named_warm_start:
        raise EepError(
            "greedy elimination walks one size; a frontier takes the calibration warm starts "
            "(naee, reap, frequency): drop greedy from search.warm_start"
        )


def make_evaluator(config: Config, log: Log = stderr_log, worker=None):
    """The evaluator the config asks for: serial in this process (on ``worker`` when given, a
    loaded :class:`eep.evaluator.FitnessWorker`), or Ray actors."""
    from eep.evaluator import FitnessWorker, SerialEvaluator

    if config.evaluator.kind == "ray":
        from eep.ray_evaluator import RayEvaluator

        log(f"[eep] loading {config.model.path}")
        return RayEvaluator(config, log=log)
    if worker is None:
        log(f"[eep] loading {config.model.path}")
        worker = FitnessWorker(config)
    return SerialEvaluator(worker, in_flight=config.search.in_flight)


def _finish(run: RunDir, config: Config, space, evaluator, log: Log) -> dict:
    """Run the search on ``evaluator`` (closed at the end), pick the genome to export (the best, or
    with validation examples the best of the top few on them), then score it held-out."""
    from eep.loop import run_search
    from eep.progress import tracked
    from fitness.metrics import weighted_fitness

    start = time.perf_counter()
    before = len(run.evaluations())
    try:
        summary = run_search(run, space, evaluator, log=log)
        if summary["best_genome"] is not None:
            chosen = None
            # a frontier picks per size (_front); its best by search fitness keeps nearly every expert
            if config.fitness.validates and not config.search.frontier:
                chosen = validation_pick(run, space, evaluator, log)
                if chosen is None:
                    log(
                        "[eep] no task has validation examples left after its search ones; "
                        "exporting the best by search fitness"
                    )
            if chosen is not None:
                del chosen["record"]
                summary["selected"] = chosen
            else:
                summary["selected"] = {
                    "id": summary["best_id"],
                    "genome": summary["best_genome"],
                    "fitness": summary["best_fitness"],
                    "by": "search fitness",
                }
            log(
                "[eep] scoring "
                + ("its best" if config.search.frontier else "the exported genome")
                + " and the full model on the held-out split"
            )
            best = Genome.from_dict(summary["selected"]["genome"])
            summary["heldout"] = {}
            for key, genome in tracked(
                (("best", best), ("full", None)), "held-out scoring (models)", log
            ):
                scores = evaluator.heldout(genome)
                summary["heldout"][key] = {
                    "scores": scores,
                    "mean": weighted_fitness(config.fitness.tasks, scores),
                }
            summary["generalisation_gap"] = (
                summary["selected"]["fitness"] - summary["heldout"]["best"]["mean"]
            )
            if config.search.frontier:
                summary.update(_front(run.evaluations(), config, evaluator, log))
        summary["experts_implementation"] = experts_implementation(config.model)
        run.write_summary(summary)
    finally:
        evaluator.close()
    held = summary.get("heldout")
    if summary.get("cut"):
        log(
            f"[eep] {summary['cut']} hopeless candidates cut short, saving ~{summary['cut_seconds_saved']:.0f}s "
            "of scoring"
        )
    chosen = summary.get("selected")
    session = (
        f"{summary['evaluations']} evaluations in {time.perf_counter() - start:.0f}s"
        if not before
        else f"{summary['evaluations']} evaluations ({summary['evaluations'] - before} in this session, "
        f"{time.perf_counter() - start:.0f}s)"
    )
    log(
        f"[eep] done: {session}; "
        + (
            f"best search fitness {summary['best_fitness']:.2f}"
            if summary["best_fitness"] is not None
            else "no evaluation succeeded (see the journal's errors)"
        )
        + (
            f"; exported candidate {chosen['id']}"
            + (f", {start_name(chosen)}," if start_name(chosen) else "")
            + f" (search {chosen['fitness']:.2f}, validation {chosen['validation']:.2f})"
            if chosen and chosen["by"] == "validation"
            else ""
        )
        + (
            f"; held-out {held['best']['mean']:.2f} (full model {held['full']['mean']:.2f}), generalisation gap "
            f"{summary['generalisation_gap']:.2f}"
            if held and not summary.get("front")
            else ""
        )
        + (_front_line(summary) if summary.get("front") else "")
    )
    return summary


def validation_pick(run: RunDir, space, evaluator, log: Log = stderr_log) -> dict | None:
    """The genome a single-size search exports: the best on validation examples among the
    ``select_top`` best by search fitness and what the search started from (:func:`eep.loop.starts`,
    so the export never scores below it there). Returns ``summary["selected"]`` (with ``record``,
    the chosen :class:`~eep.journal.Evaluation`, to be dropped before it is written), or None when
    no task has validation examples left."""
    from eep.loop import best_of, select, starts, top_candidates
    from eep.progress import Progress

    config, archive = run.config(), run.evaluations()
    ranked = top_candidates(archive, config.search.select_top)
    begun = starts(run, space, archive)
    judged = {r.id for r in ranked}
    extra = [e for _, e in begun if e.id not in judged]
    also = f" and {len(extra)} genome{'s' * (len(extra) > 1)} it started from" if extra else ""
    log(f"[eep] picking the export among the {len(ranked)} best{also} by their validation examples")
    progress = Progress("validation scoring (candidates)", len(ranked) + len(extra), log)
    validate = _validator(config, evaluator, {}, progress.step)
    try:
        # the best first: it is among those judged, and tells whether any task validates
        if validate(best_of(archive).genome) is None:
            return None
        chosen, tried = select(archive, validate, len(ranked), also=extra)
    finally:
        progress.close()
    return {
        "id": chosen.id,
        "genome": chosen.genome.to_dict(),
        "fitness": chosen.fitness,
        "validation": tried[chosen.id],
        "by": "validation",
        "candidates": {str(i): v for i, v in tried.items()},
        "top": len(ranked),
        # what the search started from, judged too: by candidate id
        "starts": {str(e.id): name for name, e in begun},
        "record": chosen,
    }


def start_name(selected: dict) -> str | None:
    """What the search started from that the exported candidate is, if it is (e.g. "greedy
    elimination's result"), else None."""
    return (selected.get("starts") or {}).get(str(selected["id"]))


def pick_runs(picks: dict) -> list[tuple[str, dict]]:
    """A frontier's picks per size (``summary["picks"]``) with consecutive sizes that share a pick
    joined, for one-line lists: ``[("2", pick), ("3–8", pick), ...]``."""
    runs: list[list] = []
    for size, pick in picks.items():
        if runs and runs[-1][2]["id"] == pick["id"]:
            runs[-1][1] = size
        else:
            runs.append([size, size, pick])
    return [(first if first == last else f"{first}–{last}", pick) for first, last, pick in runs]


def _front_line(summary: dict) -> str:
    """The end of a frontier run's last line: its front, and its pick per size held out."""
    if summary["objective"] == "latency":
        front = summary["front"]
        picks = ", ".join(
            f"{p['heldout']['mean']:.2f} within {within} ms"
            for within, p in pick_runs(summary["picks"])
        )
        return (
            f"; frontier: {len(front)} points from {front[0]['latency_ms']:.3f} to "
            f"{front[-1]['latency_ms']:.3f} ms a forward pass (full model {summary['full_latency']:.3f} "
            f"ms), hypervolume {summary['hypervolume']:.4f}; held out, the pick within each "
            f"time listed: {picks} (`eep report` lists them; `eep export RUN_DIR --point ID` or "
            "`--max-latency MS` writes one)"
        )
    active = summary["objective"] == "active_params"
    picks = ", ".join(
        f"{f'top-{size}' if active else size}: {p['heldout']['mean']:.2f}"
        for size, p in pick_runs(summary["picks"])
    )
    return (
        f"; frontier: {len(summary['front'])} points, hypervolume {summary['hypervolume']:.4f}; "
        f"held out, the pick at each size ({'top-k' if active else 'experts'} a layer): {picks}, "
        f"full model {summary['heldout']['full']['mean']:.2f} (`eep report` lists them; "
        "`eep export RUN_DIR --point ID` or `--max-params N` writes one)"
    )


NOISE_TIMINGS = 5
"""A latency frontier times the full model against itself this many times at the end: how far its
shares lie from 1 is what a share's noise is on this machine (shown in the report)."""

RETIMES = 2
"""A latency frontier times each front point this many times more at the end and takes the median
of its shares: a candidate measured at a lucky moment does not keep a place on the front it would
lose on the next measurement."""


def retimed(archive: list, evaluator, log: Log) -> tuple[list, dict[int, float]]:
    """``archive`` with its latency front re-timed (:data:`RETIMES` more shares each, the median
    kept), front after front until every point of the front is re-timed (a re-timed point may slow
    and uncover one measured once), and the re-timed shares by id. The journal keeps what the
    search measured; the summary holds the re-timed shares, its front and picks drawn on them."""
    import statistics
    from dataclasses import replace

    from eep.loop import front_of, latency

    by_id = {e.id: e for e in archive}
    done: set[int] = set()
    while todo := [e for e in front_of(list(by_id.values()), latency) if e.id not in done]:
        log(
            f"[eep] re-timing {len(todo)} front point{'s' if len(todo) > 1 else ''} "
            f"({RETIMES} more times each)"
        )
        for e in todo:
            shares = [e.latency, *(evaluator.latency(e.genome) for _ in range(RETIMES))]
            by_id[e.id] = replace(e, latency=statistics.median(shares))
            done.add(e.id)
    return [by_id[e.id] for e in archive], {i: by_id[i].latency for i in sorted(done)}


def _front(archive, config: Config, evaluator, log: Log) -> dict:
    """A multi-objective run's frontier: every non-dominated candidate with its held-out scores
    and parameter counts (and measured latency), the hypervolume of the held-out front
    (:func:`hypervolume`), and for each uniform size (``kept_params``: top-k..E experts per layer;
    ``active_params``: top-1..k) the pick within it (:func:`_pick`). A latency front (shares of
    the full model's time) is re-timed first (:func:`retimed`) and has no uniform sizes: it picks
    within each front point's share, every 5 % above the slowest, and the full model's (1, also
    its hypervolume's reference), keyed by the time in ms, the shares being shown as milliseconds
    of the full model's time measured here."""
    from eep.loop import SIZES, active_experts, front_of, kept_experts
    from eep.progress import tracked
    from eep.surgery import size_model
    from fitness.metrics import weighted_fitness

    sizes = size_model(config.model)
    objective = config.search.objectives[1]
    size = SIZES[objective]
    heldout: dict[int, dict] = {}
    if objective == "latency":  # the front on steadier times than one measurement each
        archive, again = retimed(archive, evaluator, log)

    def held(e) -> dict:
        if e.id not in heldout:
            scores = evaluator.heldout(e.genome)
            heldout[e.id] = {
                "scores": scores,
                "mean": weighted_fitness(config.fitness.tasks, scores),
            }
        return heldout[e.id]

    full = {"full_params": sizes(None)[1 if objective == "active_params" else 0]}
    if objective == "latency":
        log(f"[eep] timing the full model (and {NOISE_TIMINGS} times against itself)")
        full["full_latency"] = evaluator.milliseconds(None)
        full["latency_noise"] = [evaluator.latency(None) for _ in range(NOISE_TIMINGS)]
        full["latency_retimed"] = {str(i): share for i, share in again.items()}

    def timed(share: float | None, key: str = "latency") -> dict:
        if share is None:
            return {}
        return {key: share, f"{key}_ms": share * full["full_latency"]}

    def point(e, **extra) -> dict:
        kept, active = sizes(e.genome)
        return {
            "id": e.id,
            "fitness": e.fitness,
            "kept_experts": kept_experts(e.genome),
            "active_experts": active_experts(e.genome),
            "kept_params": kept,
            "active_params": active,
            **timed(e.latency),
            **extra,
            "heldout": held(e),
            "genome": e.genome.to_dict(),
        }

    front = front_of(archive, size)
    points = [point(e) for e in tracked(front, "held-out scoring (front points)", log)]
    genome = archive[0].genome
    layers = [i for i, _ in genome.layers]
    if objective == "latency":  # within each front point's share, and the full model's
        # and every 5 % of it from the front's slowest point up: the front ends at the fastest
        # candidate of the best search fitness, and past it validation tells apart what search
        # fitness cannot
        slowest = max(e.latency for e in front)
        steps = {k / 20 for k in range(1, 20) if slowest < k / 20}
        shares = sorted({e.latency for e in front} | steps | {1.0})
        limits = {f"{t * full['full_latency']:.3f}": t for t in shares}
    else:
        uniform = (
            range(1, genome.top_k + 1)
            if objective == "active_params"
            else range(genome.top_k, genome.num_experts + 1)
        )
        limits = {str(n): n * len(layers) for n in uniform}
    picks, memo = {}, {}  # the sizes' candidates overlap: each is validated once
    for key, limit in tracked(list(limits.items()), "validation picks (sizes)", log):
        chosen, validation = _pick(archive, limit, config, evaluator, size, memo)
        if chosen is not None:
            within = timed(limit, "within") if objective == "latency" else {}
            picks[key] = point(chosen, validation=validation, **within)
    reference = 1.0 if objective == "latency" else full["full_params"]
    held_points = [(p["heldout"]["mean"], p[objective]) for p in points]
    return {
        "objective": objective,
        "front": points,
        "picks": picks,
        **full,
        "hypervolume": hypervolume(held_points, reference),
    }


def _pick(archive, max_size: float, config: Config, evaluator, size=None, memo=None):
    """The candidate to export at a size: among those of at most ``max_size`` (``size``: kept
    experts by default, or active ones, or milliseconds), the ``select_top`` best by search
    fitness (ties: the larger, then the earlier), the best on the validation examples when the
    tasks have them (the rule a single-size search exports by), else the first. Returns it and its validation score
    (None without validation examples). ``memo``: validation fitness by genome key, filled and
    reused across calls."""
    from eep.loop import kept, select

    size = size or kept
    within = [e for e in archive if e.candidate and size(e) <= max_size]
    if not within:
        return None, None

    def rank(e):  # search fitness, then the larger, then the earlier
        return -e.fitness, -size(e), e.id

    first = min(within, key=rank)
    if not config.fitness.validates:
        return first, None
    validate = _validator(config, evaluator, {} if memo is None else memo)
    if validate(first.genome) is None:  # no task has validation examples left
        return first, None
    chosen, scores = select(within, validate, config.search.select_top, rank)
    return chosen, scores[chosen.id]


FRONTIER_PICK = "the frontier's pick at"
"""How a frontier run's row beside the baselines begins (its ``how``): the run's pick at their size."""


def compared(summary: dict, keep: int) -> dict | None:
    """What a finished run puts beside the baselines at ``keep`` experts per layer (the "search"
    row): a single-size run's export (``selected``, else its best by search fitness), a
    kept-parameters frontier's pick at that size (None where it has none; an active-parameters
    frontier keeps every expert, so it has none). A dict with ``id``, ``genome``, ``fitness``,
    ``heldout`` (``{"scores", "mean"}``) and ``by``: ``validation`` or ``search fitness``."""
    if summary.get("front") is None:
        held = (summary.get("heldout") or {}).get("best")
        chosen = summary.get("selected") or {
            "id": summary.get("best_id"),
            "genome": summary.get("best_genome"),
            "fitness": summary.get("best_fitness"),
            "by": "search fitness",
        }
        return {**chosen, "heldout": held} if held and chosen["genome"] is not None else None
    pick = (summary.get("picks") or {}).get(str(keep))
    if summary.get("objective") != "kept_params" or pick is None:
        return None
    return {**pick, "by": "search fitness" if pick["validation"] is None else "validation"}


def hypervolume(points, full_params: float) -> float:
    """The share (0..1) of the accuracy x size square — accuracy 0..100, kept parameters
    0..``full_params`` — dominated by ``points`` ((accuracy, kept parameters) pairs): the area
    between the step curve of the best accuracy reachable at each size and the full model's size.
    1 would be 100 % accuracy at no parameters; one search's number to compare with another's.
    The size may be any (active parameters, latency), the full model's being the reference."""
    area, best = 0.0, 0.0
    for accuracy, params in sorted(points, key=lambda p: (p[1], -p[0])):
        if accuracy > best:
            area += (accuracy - best) * max(full_params - params, 0)
            best = accuracy
    return area / (100.0 * full_params)


def experts_implementation(model_cfg) -> str:
    """The experts implementation the model loads with here (``eep.model.choose_experts``); for a
    device this machine lacks (a dry run of a GPU config), what decides it when it loads there."""
    from eep.model import choose_experts, pick_device, pick_dtype

    try:
        device = pick_device(model_cfg.device)
    except EepError:
        return f"chosen on {model_cfg.device} when the model loads"
    return choose_experts(
        model_cfg.experts_implementation, device, pick_dtype(model_cfg.dtype, device)
    )

"""The Python API: what the command line does, as functions a script or notebook can call.

    import eep

    run = eep.search("experiments/toy.yaml", run_dir="runs/toy", overrides=["search.evaluations=100"])
    print(run.summary["heldout"]["best"]["mean"], run.best.keep_map())
    run.export("out/toy-pruned")                      # a smaller Hugging Face checkpoint
    eep.evaluate("experiments/toy.yaml", genome=run.best)["fitness"]

``search`` starts a run (or, with ``resume_if_exists``, continues the directory's run of the same
config), ``resume`` continues a stopped one, ``Run(path)`` opens any run directory. Everything a
run knows is on disk (:class:`eep.journal.RunDir`); a :class:`Run` only reads it. The CLI
(:mod:`eep.cli`) is a thin layer over these functions. Progress goes to ``log`` (stderr by default).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from eep.config import Config, differences, load_config, parse_config
from eep.errors import EepError
from eep.genome import Genome
from eep.journal import Evaluation, RunDir
from eep.progress import stderr_log

Log = Callable[[str], None]


def config_of(config: Config | str | Path | dict, overrides: Sequence[str] = ()) -> Config:
    """A validated :class:`Config` from a YAML path, a plain dict or a Config (``overrides``: ``a.b=value``)."""
    if isinstance(config, (str, Path)):
        return load_config(config, list(overrides))
    if isinstance(config, Config) and not overrides:
        return config
    from eep.config import apply_override

    # the caller's dict stays
    data = config.to_dict() if isinstance(config, Config) else copy.deepcopy(config)
    for item in overrides:
        apply_override(data, item)
    return parse_config(data)


class Run:
    """A run directory: its config, journal and summary, and the genome it exports."""

    def __init__(self, path: str | Path):
        self.dir = RunDir.open(path)
        self.path = self.dir.path

    @property
    def config(self) -> Config:
        return self.dir.config()

    @property
    def summary(self) -> dict:
        return self.dir.summary() if self.dir.summary_path.exists() else {}

    def evaluations(self) -> list[Evaluation]:
        return self.dir.evaluations()

    @property
    def finished(self) -> bool:
        summary = self.summary
        if summary.get("method") == "moei2":
            return "heldout" in summary
        return "heldout" in summary and summary["evaluations"] >= self.config.search.evaluations

    @property
    def best(self) -> Genome | None:
        """The genome the run exports: its pick on validation examples, else the best by search fitness."""
        summary = self.summary
        chosen = summary.get("selected") or {"genome": summary.get("best_genome")}
        return Genome.from_dict(chosen["genome"]) if chosen["genome"] is not None else None

    def export(
        self, out: str | Path, form: str | None = None, dense: bool = False, log: Log = stderr_log
    ) -> dict:
        """Write :attr:`best` as a smaller checkpoint to ``out``; returns the export's report."""
        from eep.export import export_genome
        from eep.lowrank import SCALES_FILE

        summary, config = self.summary, self.config
        genome = self.best
        if genome is None:
            raise EepError(f"{self.path} has no successful evaluation to export")
        progress = None
        if summary.get("method") != "moei2":
            progress = (summary["evaluations"], config.search.evaluations)
            if progress[0] < progress[1]:
                log(
                    f"[eep] warning: the search in {self.path} stopped at {progress[0]} of {progress[1]} evaluations; "
                    "exporting its best so far (the model card says so; `eep resume` finishes it)"
                )
        fitness = (summary.get("selected") or {"fitness": summary.get("best_fitness")})["fitness"]
        return export_genome(
            config.model,
            genome,
            out,
            config=config,
            search_fitness=fitness,
            log=log,
            form=form,
            dense=dense,
            scales=self.path / SCALES_FILE,
            search_progress=progress,
        )


def search(
    config: Config | str | Path | dict,
    run_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume_if_exists: bool = False,
    log: Log = stderr_log,
    config_dir: str | Path | None = None,
    planned: tuple | None = None,
) -> Run:
    """Start the search ``config`` describes in ``run_dir`` (default ``runs/<name>``), run it to the
    end and score its pick held out; returns the :class:`Run`. A run directory that exists is
    refused unless ``resume_if_exists`` and it holds a run of the same config, which is continued.
    ``config_dir``: where relative seed-genome paths start (default: a YAML config's directory);
    ``planned``: :func:`plan`'s result when the caller has it already (the CLI prints it first)."""
    if config_dir is None:
        config_dir = Path(config).parent if isinstance(config, (str, Path)) else Path(".")
    config = config_of(config, overrides)
    run_dir = Path(run_dir or Path("runs") / config.name)
    _, _, space = planned or plan(config)
    seeds = seed_genomes(config, space, Path(config_dir))
    if resume_if_exists and (run_dir / "config.yaml").exists():
        existing = RunDir.open(run_dir)
        if not existing.holds(config):
            what = differences(existing.config().outcome(), config.outcome())
            raise EepError(
                f"{run_dir} holds a run of another config ({what}); give a new --run-dir"
            )
        return resume(run_dir, config.evaluator, log)
    requested = config
    RunDir.check_new(run_dir)
    if config.search_space.kind == "moei2":
        run = RunDir.create(run_dir, config)
        run.write_request(requested)
        with run.lock():
            _moei2(run, config, space, log)
        return Run(run_dir)
    in_flight_is_set = "in_flight" in config.search.model_fields_set
    evaluator = make_evaluator(config, log)
    try:
        if config.evaluator.kind == "ray" and not in_flight_is_set:  # keep every actor busy
            evaluator.in_flight = evaluator.size
            config = config.model_copy(
                update={"search": config.search.model_copy(update={"in_flight": evaluator.size})}
            )
        names = [f"seeds/seed-{n}.json" for n in range(len(seeds))]
        calibrated = [m for m in config.search.warm_start if m != "greedy"]
        # become seed genomes of the run: its config says what it does, and it resumes exactly
        if calibrated:
            seeds, names = _warm_seeds(config, evaluator, calibrated, seeds, names, log, space)
            config = config.model_copy(
                update={
                    "search": config.search.model_copy(
                        update={
                            "warm_start": [m for m in config.search.warm_start if m == "greedy"]
                        }
                    )
                }
            )
        # the run keeps its own copies: it resumes from anywhere, whatever happens to the files
        if seeds:
            config = config.model_copy(
                update={"search": config.search.model_copy(update={"seed_genomes": names})}
            )
        run = RunDir.create(run_dir, config)
        run.write_request(requested)
        if seeds:
            (run.path / "seeds").mkdir()
            for name, genome in zip(names, seeds):
                genome.save(run.path / name)
    except BaseException:
        evaluator.close()
        raise
    with run.lock():
        _finish(run, config, space, evaluator, log)
    return Run(run_dir)


def resume(
    run_dir: str | Path, evaluator=None, log: Log = stderr_log, evaluations: int | None = None
) -> Run:
    """Continue a stopped run (on another evaluator if given: an ``EvaluatorConfig``); a finished
    one is left as it is unless ``evaluations`` raises its budget, which continues the same search."""
    run = RunDir.open(run_dir)
    if evaluations is not None and evaluations != run.config().search.evaluations:
        with run.lock():
            run.extend(evaluations)
        log(f"[eep] {run.path}: budget raised to {evaluations} evaluations")
    config = run.config()
    if evaluator is not None:
        config = config.model_copy(update={"evaluator": evaluator})
    _, _, space = plan(config)
    with run.lock():  # before the model loads: a second writer fails fast
        if Run(run_dir).finished and config.search_space.kind != "moei2":
            log(
                f"[eep] {run.path} is finished ({run.summary()['evaluations']} of {config.search.evaluations} "
                "evaluations, held-out scored); nothing to do. Export it with `eep export`"
            )
            return Run(run_dir)
        log(f"[eep] resuming {run.path}")
        if config.search_space.kind == "moei2":
            _moei2(run, config, space, log)
        else:
            _finish(run, config, space, make_evaluator(config, log), log)
    return Run(run_dir)


def evaluate(
    config: Config | str | Path | dict,
    genome: Genome | str | Path | None = None,
    model: str | None = None,
    split: str = "test",
    overrides: Sequence[str] = (),
    log: Log = stderr_log,
) -> dict:
    """Score a model (``model`` or the config's), optionally with ``genome`` applied, on the config's
    tasks: ``{"model", "genome", "split", "examples", "scores", "fitness"}``."""
    from eep.evaluator import FitnessWorker
    from eep.lowrank import SCALES_FILE, scales_for
    from eep.model import load_hf_config
    from eep.moe import check_genome, shape_of
    from fitness.metrics import weighted_fitness
    from fitness.tasks import check_tasks

    config = config_of(config, overrides)
    if model:
        config = config.model_copy(
            update={"model": config.model.model_copy(update={"path": model})}
        )
    source = Path(genome) if isinstance(genome, (str, Path)) else None
    genome = Genome.load(source) if source is not None else genome
    check_tasks(config.fitness.tasks)
    tasks = [t for t in config.fitness.tasks if split != "validation" or t.validation_size]
    if not tasks:
        raise EepError(
            "--split validation needs tasks with validation_size; set fitness.tasks[].validation_size"
        )
    if genome is not None:
        check_genome(genome, shape_of(load_hf_config(config.model)))
    scales = scales_for(genome, source.parent / SCALES_FILE) if source is not None else None
    log(f"[eep] loading {config.model.path}")
    worker = FitnessWorker(config)
    if worker.adapter is not None:  # None for eep's custom-form exports: scored as they are
        worker.adapter.use_scales(scales)
    scores = worker.scores(genome, split)
    return {
        "model": config.model.path,
        "genome": str(source) if source else (genome.key if genome else None),
        "split": split,
        "examples": {t.name: len(t.examples) for t in worker.scorers[split].tasks},
        "scores": scores,
        "fitness": weighted_fitness(tasks, scores),
    }


# -- the pieces behind them ------------------------------------------------------------------------


def plan(config: Config, dry_run: bool = False) -> tuple[object, object, object]:
    """(hf config, MoE shape, search space or MoE-I² plan): the config checked against the model's
    shape (its config.json only) and the tasks, before any weights load."""
    from eep.model import load_hf_config
    from eep.moe import shape_of
    from fitness.tasks import check_local_data, check_tasks
    from search_spaces import build_schedule

    check_tasks(config.fitness.tasks)
    check_local_data(config.fitness.tasks)  # every data error found here costs no model load
    hf_config = load_hf_config(config.model, prefer_file=dry_run)
    shape = shape_of(hf_config)
    if config.search_space.kind == "moei2":
        from eep.moei2 import moei2_plan

        if config.search.warm_start:
            raise EepError(
                "search.warm_start seeds EEP's search; a MoE-I² run has no initial population"
            )
        if config.evaluator.kind == "ray":
            raise EepError(
                "MoE-I² scores its layer searches in this process on cached calibration statistics (each "
                "evaluation takes milliseconds); run it without --workers / --ray-address"
            )
        return hf_config, shape, moei2_plan(config, shape)
    schedule = build_schedule(config.search_space, shape)
    if config.search.warm_start:
        from eep import greedy

        # the baselines' genomes, like greedy's, keep a uniform number per layer
        greedy.check(schedule.first)
    if "greedy" in config.search.warm_start:
        cost = greedy.cost(schedule.first)
        if cost >= config.search.evaluations:
            raise EepError(
                f"search.warm_start greedy takes {cost} evaluations at this size, and search.evaluations is "
                f"{config.search.evaluations}; raise evaluations above {cost} or drop greedy"
            )
    return hf_config, shape, schedule


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


def _warm_seeds(config, evaluator, methods, seeds, names, log: Log, space) -> tuple[list, list]:
    """The seeds with the calibration-pass warm starts appended (those not already among them, and
    only those the search's space holds: e.g. weight groups need one keep set per group)."""
    from eep.compare import warm_genomes
    from eep.evaluator import FitnessWorker
    from search_spaces import Schedule

    worker = getattr(evaluator, "worker", None)
    if worker is None:  # Ray: the baselines' one calibration pass runs on a model loaded here
        log(f"[eep] loading {config.model.path} here for the warm start's calibration pass")
        worker = FitnessWorker(config)
    seeds, names = list(seeds), list(names)
    for method, genome in warm_genomes(config, worker, methods, log).items():
        if genome.key in {s.key for s in seeds}:
            log(f"[eep] warm start: {method}'s genome is already a seed")
            continue
        reason = Schedule.of(space).first.reject(genome)
        if reason is not None:
            log(f"[eep] warm start: {method}'s genome is left out: {reason}")
            continue
        seeds.append(genome)
        names.append(f"seeds/warm-{method}.json")
    return seeds, names


def seed_genomes(config: Config, space, config_dir: Path) -> list[Genome]:
    """The config's seed genomes, loaded (paths relative to the working directory, else to the
    config file) and checked against the search's first space; an error names the file and why."""
    from search_spaces import Schedule

    paths = config.search.seed_genomes
    if paths and config.search_space.kind == "moei2":
        raise EepError(
            "search.seed_genomes seeds EEP's search; a MoE-I² run has no initial population"
        )
    seeds = []
    for name in paths:
        path = Path(name) if Path(name).exists() or Path(name).is_absolute() else config_dir / name
        genome = Genome.load(path)
        reason = Schedule.of(space).first.reject(genome)
        if reason is not None:
            raise EepError(f"seed genome {path} does not belong to this search's space: {reason}")
        seeds.append(genome)
    return seeds


def _moei2(run: RunDir, config: Config, moei2_plan, log: Log, worker=None) -> dict:
    """A MoE-I² run (both stages, resumable from the layer searches' journals) on a resident model."""
    from eep.evaluator import FitnessWorker
    from eep.moei2 import run_moei2

    start = time.perf_counter()
    if worker is None:
        log(f"[eep] loading {config.model.path}")
        worker = FitnessWorker(config)
    summary = run_moei2(run, config, worker, moei2_plan, log)
    stages = summary["stages"]
    log(
        f"[eep] done in {time.perf_counter() - start:.0f}s: "
        + "; ".join(
            f"{name} held-out {s['heldout']['mean']:.2f} ({s['heldout']['kept_params']:,} parameters)"
            for name, s in stages.items()
        )
        + f"; full model {summary['heldout']['full']['mean']:.2f}"
    )
    return summary


def make_evaluator(config: Config, log: Log = stderr_log):
    """The evaluator the config asks for: serial in this process, or Ray actors."""
    from eep.evaluator import FitnessWorker, SerialEvaluator

    log(f"[eep] loading {config.model.path}")
    if config.evaluator.kind == "ray":
        from eep.ray_evaluator import RayEvaluator

        return RayEvaluator(config, log=log)
    return SerialEvaluator(FitnessWorker(config), in_flight=config.search.in_flight)


def _finish(run: RunDir, config: Config, space, evaluator, log: Log) -> dict:
    """Run the search on ``evaluator`` (closed at the end), pick the genome to export (the best, or
    with validation examples the best of the top few on them), then score it held-out."""
    from eep.loop import run_search, select
    from eep.progress import Progress, tracked
    from fitness.metrics import weighted_fitness

    start = time.perf_counter()
    before = len(run.evaluations())
    try:
        summary = run_search(run, space, evaluator, log=log)
        if summary["best_genome"] is not None:
            validated = [t for t in config.fitness.tasks if t.validation_size]
            if validated:
                log(
                    f"[eep] picking the export among the {config.search.select_top} best by their validation examples"
                )
                progress = Progress(
                    "validation scoring (candidates)", config.search.select_top, log
                )

                def validate(genome):
                    fitness = weighted_fitness(validated, evaluator.heldout(genome, "validation"))
                    progress.step()
                    return fitness

                chosen, tried = select(run.evaluations(), validate, config.search.select_top)
                progress.close()
                summary["selected"] = {
                    "id": chosen.id,
                    "genome": chosen.genome.to_dict(),
                    "fitness": chosen.fitness,
                    "validation": tried[chosen.id],
                    "by": "validation",
                    "candidates": {str(i): v for i, v in tried.items()},
                }
            else:
                summary["selected"] = {
                    "id": summary["best_id"],
                    "genome": summary["best_genome"],
                    "fitness": summary["best_fitness"],
                    "by": "search fitness",
                }
            log("[eep] scoring the exported genome and the full model on the held-out split")
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
            f"; exported candidate {chosen['id']} (search {chosen['fitness']:.2f}, validation "
            f"{chosen['validation']:.2f})"
            if chosen and chosen["by"] == "validation"
            else ""
        )
        + (
            f"; held-out {held['best']['mean']:.2f} (full model {held['full']['mean']:.2f}), generalisation gap "
            f"{summary['generalisation_gap']:.2f}"
            if held
            else ""
        )
    )
    return summary

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
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from eep.config import Config, differences, load_config, parse_config
from eep.errors import EepError
from eep.genome import Genome
from eep.journal import Evaluation, RunDir
from eep.methods import method_of
from eep.progress import stderr_log

Log = Callable[[str], None]
"""Where progress lines go (``log=``): stderr by default; None: nowhere."""


def _quiet(message: str) -> None:
    pass


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
        config = self.config
        return method_of(config).finished(self.summary, config)

    @property
    def best(self) -> Genome | None:
        """The genome the run exports: its pick on validation examples, else the best by search fitness."""
        return _exported(self.summary)[0]

    def _summary_so_far(self) -> dict:
        """summary.json, or for a search stopped before it wrote one (e.g. inside its greedy
        start) what its journal says: evaluations done and the best by search fitness."""
        if self.dir.summary_path.exists() or not method_of(self.config).searches:
            return self.summary
        from eep.loop import summarise

        return summarise(self.evaluations())

    def front_point(
        self,
        point: int | None = None,
        max_params: int | None = None,
        max_latency: float | None = None,
    ) -> dict:
        """A point of a multi-objective run's frontier (``summary["front"]``, smallest first): the
        candidate ``point`` (a front point or a size's pick), or the pick (``summary["picks"]``:
        chosen on validation examples) of the largest uniform size keeping at most
        ``max_params``, else the best front point by search fitness within it; of a latency
        frontier, the pick within the time of the slowest front point measured at most
        ``max_latency`` milliseconds (chosen as the picks of sizes are)."""
        front = self.summary.get("front")
        if front is None:
            raise EepError(
                f"{self.path} is not a finished multi-objective search (no frontier in its "
                "summary); --point, --max-params and --max-latency choose among a frontier's points"
            )
        picks = list(self.summary.get("picks", {}).values())
        params = self.summary.get("objective", "kept_params")  # active_params, latency
        if point is not None:
            points = {p["id"]: p for p in front + picks}  # a pick may be a front point too
            if point not in points:
                on_front = {p["id"] for p in front}
                off = {p["id"]: p for p in picks if p["id"] not in on_front}  # levels share picks
                extra = sorted(off.values(), key=lambda p: (p[params], p["id"]))
                raise EepError(
                    f"candidate {point} is neither on the frontier nor a pick; the front points: "
                    + ", ".join(f"{p['id']} ({amount(p, params)})" for p in front)
                    + (
                        "; the picks off it: "
                        + ", ".join(f"{p['id']} ({amount(p, params)})" for p in extra)
                        if extra
                        else ""
                    )
                )
            return points[point]
        if (params == "latency") != (max_latency is not None):
            flag = "--max-latency MS" if params == "latency" else "--max-params N"
            raise EepError(
                f"{self.path}'s frontier is over {params.replace('_', ' ')}: choose a point with "
                f"{flag} or --point ID"
            )
        limit = max_latency if params == "latency" else max_params

        def fits(value) -> bool:  # times compare to the thousandth of a ms, as reports show them
            if params == "latency":
                return round(value, 3) <= round(limit, 3)
            return value <= limit

        # a size's pick is made among the candidates of at most that size; a latency pick within
        # a front point's time (or the full model's), in ms as the report shows it
        made, shown = ("within_ms", "latency_ms") if params == "latency" else (params, params)
        picked = [p for p in picks if fits(p[made])]
        if picked:
            return max(picked, key=lambda p: p[made])
        within = [p for p in front if fits(p[shown])]
        if not within:
            least = "the fastest takes" if params == "latency" else "the smallest has"
            raise EepError(
                f"no frontier point has at most {amount({params: limit, 'latency_ms': limit}, params)}; {least} "
                f"{amount(front[0], params)}"
            )
        return max(within, key=lambda p: (p["fitness"], -p[params]))

    def export(
        self,
        out: str | Path,
        form: str | None = None,
        dense: bool = False,
        log: Log | None = stderr_log,
        point: int | None = None,
        max_params: int | None = None,
        max_latency: float | None = None,
    ) -> dict:
        """Write :attr:`best` (or, of a multi-objective run, the frontier point :meth:`front_point`
        chooses) as a smaller checkpoint to ``out``; returns the export's report."""
        log = log or _quiet
        from eep.export import export_genome
        from eep.lowrank import SCALES_FILE

        choices = (point, max_params, max_latency)
        if sum(c is not None for c in choices) > 1:
            raise EepError(
                "--point, --max-params and --max-latency each choose the point to export: give one"
            )
        summary, config = self._summary_so_far(), self.config
        chooses = any(c is not None for c in choices)
        if summary.get("front") is not None and not chooses:
            from eep.evolution import pick_runs

            if summary.get("objective") == "latency":
                raise EepError(
                    f"{self.path} holds a latency frontier: choose the point to export with "
                    "--point ID or --max-latency MS (`eep report` lists them)"
                )
            active = summary.get("objective") == "active_params"
            picks = ", ".join(
                f"{f'top-{size}' if active else f'{size} experts a layer'}: {p['id']}"
                for size, p in pick_runs(summary.get("picks", {}))
            )
            raise EepError(
                f"{self.path} holds a frontier: choose the point to export with --point ID or "
                f"--max-params N (`eep report` lists them; the picks per size: {picks})"
            )
        genome, fitness = _exported(summary)
        measured = None  # a latency front point's time, for the model card
        if chooses:
            chosen = self.front_point(point, max_params, max_latency)
            genome, fitness = Genome.from_dict(chosen["genome"]), chosen["fitness"]
            if "latency" in chosen:
                measured = {"share": chosen["latency"], "ms": chosen["latency_ms"]}
            on_front = chosen["id"] in {p["id"] for p in summary["front"]}
            what = (
                f"the pick within {chosen['within_ms']:.3f} ms, candidate"
                if "within" in chosen and max_latency is not None
                else "frontier point"
                if on_front
                else "the pick, candidate"
            )
            log(
                f"[eep] {what} {chosen['id']}: {chosen['kept_params']:,} parameters kept, "
                f"{chosen['active_params']:,} active"
                + (
                    f", {chosen['latency_ms']:.3f} ms a forward pass ({100 * chosen['latency']:.1f} % "
                    "of the full model's time)"
                    if "latency" in chosen
                    else ""
                )
            )
            other = also_fits(summary, chosen, max_params) if max_params is not None else None
            if other is not None:  # the pick of a uniform size can sit well below the limit
                params = summary.get("objective", "kept_params")
                log(
                    f"[eep] front point {other['id']} fits too ({amount(other, params)}, search "
                    f"fitness {other['fitness']:.2f} against {fitness:.2f}): `--point "
                    f"{other['id']}` exports it"
                )
        if genome is None:
            raise EepError(f"{self.path} has no successful evaluation to export")
        progress = method_of(config).progress(summary, config)
        if progress is not None and progress[0] < progress[1]:
            log(
                f"[eep] warning: the search in {self.path} stopped at {progress[0]} of "
                f"{progress[1]} evaluations; exporting its best so far (the model card says so; "
                "`eep resume` finishes it)"
            )
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
            latency=measured,
        )


def _export_hint(config, path) -> str:
    """How a finished run is exported, for a log line: a frontier's point is chosen."""
    if not config.search.frontier:
        return "Export it with `eep export`"
    flag = "--max-latency MS" if "latency" in config.search.objectives else "--max-params N"
    return f"Export a point of its frontier with `eep export {path} --point ID` or `{flag}`"


def amount(point: dict, objective: str) -> str:
    """A frontier point's size in words: ``450,000 kept params`` or ``3.21 ms latency``."""
    if objective == "latency":
        return f"{point['latency_ms']:.3f} ms latency"
    return f"{point[objective]:,} {objective.replace('_', ' ')}"


def also_fits(summary: dict, chosen: dict, max_params: int) -> dict | None:
    """The front point of the highest search fitness (the fewest parameters among equals) that is
    larger than ``chosen`` (what ``--max-params`` picked), within ``max_params`` and better by
    search fitness; None when there is none."""
    params = summary.get("objective", "kept_params")
    larger = [
        p
        for p in summary["front"]
        if chosen[params] < p[params] <= max_params and p["fitness"] > chosen["fitness"]
    ]
    return max(larger, key=lambda p: (p["fitness"], -p[params])) if larger else None


def _exported(summary: dict) -> tuple[Genome | None, float | None]:
    """What a run exports (its validation pick, else its best by search fitness), and its search
    fitness; (None, None) before any candidate succeeded."""
    chosen = summary.get("selected") or {
        "genome": summary.get("best_genome"),
        "fitness": summary.get("best_fitness"),
    }
    genome = Genome.from_dict(chosen["genome"]) if chosen["genome"] is not None else None
    return genome, chosen["fitness"]


def search(
    config: Config | str | Path | dict,
    run_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume_if_exists: bool = False,
    log: Log | None = stderr_log,
    config_dir: str | Path | None = None,
    planned: tuple | None = None,
) -> Run:
    """Start the search ``config`` describes in ``run_dir`` (default ``runs/<name>``), run it to the
    end and score its pick held out; returns the :class:`Run`. A run directory that exists is
    refused unless ``resume_if_exists`` and it holds a run of the same config, which is continued.
    ``config_dir``: where relative seed-genome paths start (default: a YAML config's directory);
    ``planned``: :func:`plan`'s result when the caller has it already (the CLI prints it first)."""
    log = log or _quiet
    if config_dir is None:
        config_dir = Path(config).parent if isinstance(config, (str, Path)) else Path(".")
    config = config_of(config, overrides)
    run_dir = Path(run_dir or Path("runs") / config.name)
    _, _, planned = planned or plan(config)
    if resume_if_exists and (run_dir / "config.yaml").exists():
        existing = RunDir.open(run_dir)
        if not existing.holds(config):
            what = differences(existing.config().outcome(), config.outcome())
            raise EepError(
                f"{run_dir} holds a run of another config ({what}); give a new --run-dir"
            )
        return resume(run_dir, config.evaluator, log)
    RunDir.check_new(run_dir)
    method_of(config).start(config, run_dir, planned, log, Path(config_dir))
    return Run(run_dir)


def _keeps_its_start(config: Config, evaluations: int) -> None:
    """A run written outside ``eep search`` may store its ``auto`` search settings unresolved; a
    larger budget must not turn on a greedy start it did not make, nor move the evaluation its
    frontier turns to the smallest size at (its journal would not match)."""
    search = config.search
    if not method_of(config).searches:
        return
    larger = search.model_copy(update={"evaluations": evaluations})
    if search.smallest_after == "auto" and larger.smallest_from != search.smallest_from:
        now, then = (
            "never" if n is None else f"from evaluation {n}"
            for n in (search.smallest_from, larger.smallest_from)
        )
        raise EepError(
            f"--evaluations {evaluations}: this run (search.smallest_after: auto) breeds at the "
            f"smallest size only {now}, at that budget {then}; resume it at its budget, or start "
            "a new run"
        )
    if search.warm_start != "auto":
        return
    from eep import greedy
    from search_spaces import Schedule

    first = Schedule.of(plan(config)[2]).first
    if greedy.starts(larger, first) and not greedy.starts(search, first):
        most = math.ceil(greedy.cost(first) / greedy.AUTO_SHARE) - 1
        raise EepError(
            f"--evaluations {evaluations}: this run (search.warm_start: auto, not started from greedy "
            f"elimination) would start from it at that budget; give at most {most}, or start a new run"
        )


def resume(
    run_dir: str | Path,
    evaluator=None,
    log: Log | None = stderr_log,
    evaluations: int | None = None,
) -> Run:
    """Continue a stopped run (on another evaluator if given: an ``EvaluatorConfig``); a finished
    one is left as it is unless ``evaluations`` raises its budget, which continues the same search."""
    log = log or _quiet
    run = RunDir.open(run_dir)
    if evaluations is not None and evaluations != run.config().search.evaluations:
        _keeps_its_start(run.config(), evaluations)
        with run.lock():
            run.extend(evaluations)
        log(f"[eep] {run.path}: budget raised to {evaluations} evaluations")
    config = run.config()
    if evaluator is not None:
        config = config.model_copy(update={"evaluator": evaluator})
    _, _, planned = plan(config)
    method = method_of(config)
    with run.lock():  # before the model loads: a second writer fails fast
        summary = run.summary() if run.summary_path.exists() else {}
        if method.finished(summary, config):
            done = method.progress(summary, config)
            log(
                f"[eep] {run.path} is finished ("
                + (f"{done[0]} of {done[1]} evaluations, " if done else "")
                + f"held-out scored); nothing to do. {_export_hint(config, run.path)}"
            )
            return Run(run_dir)
        log(f"[eep] resuming {run.path}")
        method.resume(run, config, planned, log)
    return Run(run_dir)


def evaluate(
    config: Config | str | Path | dict,
    genome: Genome | str | Path | None = None,
    model: str | None = None,
    split: str = "test",
    overrides: Sequence[str] = (),
    log: Log | None = stderr_log,
) -> dict:
    """Score a model (``model`` or the config's), optionally with ``genome`` applied, on the config's
    tasks: ``{"model", "genome", "split", "examples", "scores", "fitness"}``."""
    log = log or _quiet
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
    if split == "validation" and not config.fitness.validates:
        raise EepError(
            "--split validation needs tasks with validation examples; "
            "set fitness.tasks[].validation_size above 0"
        )
    if genome is not None:
        check_genome(genome, shape_of(load_hf_config(config.model)))
    scales = scales_for(genome, source.parent / SCALES_FILE) if source is not None else None
    log(f"[eep] loading {config.model.path}")
    worker = FitnessWorker(config)
    if worker.adapter is not None:  # None for eep's custom-form exports: scored as they are
        worker.adapter.use_scales(scales)
    tasks = worker.scorers[split].tasks
    if not tasks:
        raise EepError(
            "--split validation: no task has examples left after its search ones; "
            "lower fitness.tasks[].search_size"
        )
    scores = worker.scores(genome, split)
    return {
        "model": config.model.path,
        "genome": str(source) if source else (genome.key if genome else None),
        "split": split,
        "examples": {t.name: len(t.examples) for t in tasks},
        "scores": scores,
        "fitness": weighted_fitness(tasks, scores),
    }


def baselines(
    config: Config | str | Path | dict,
    run_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    log: Log | None = stderr_log,
) -> dict:
    """Score the task-agnostic baselines beside the config's run in ``run_dir`` (default
    ``runs/<name>``), running or finishing that run first: ``baselines.json`` in the run
    directory, also returned (:func:`eep.compare.run_baselines`)."""
    log = log or _quiet
    from eep.compare import check_baselines, run_baselines
    from eep.evaluator import FitnessWorker
    from eep.journal import write_json_atomic

    source, config = config, config_of(config, overrides)
    run_dir = Path(run_dir or Path("runs") / config.name)
    _, shape, planned = plan(config)
    check_baselines(config, shape)
    method = method_of(config)
    fresh = not (run_dir.exists() and any(run_dir.iterdir()))
    if fresh and (config.search.seed_genomes or set(config.search.named_warm_start) - {"greedy"}):
        search(
            source, run_dir, overrides, log=log
        )  # seeds to copy into the run first: a whole start
        fresh = False
    if fresh:  # stored as ``eep search`` stores it: the auto search settings resolved
        from eep.evolution import resolve

        stored = resolve(config, planned) if method.searches else config
        run = RunDir.create(run_dir, stored)
        if stored is not config:
            run.write_request(config)
    else:
        run = RunDir.open(run_dir)
    if not fresh and not run.holds(config):
        what = differences(run.config().outcome(), config.outcome())
        raise EepError(
            f"{run_dir} holds a search of another config ({what}); give this config's run with "
            "--run-dir or a new directory"
        )
    with run.lock():
        summary = run.summary() if run.summary_path.exists() else {}
        worker = None
        if not method.finished(summary, config):
            log(f"[eep] {'running' if fresh else 'finishing'} the search in {run_dir} first")
            if config.evaluator.kind != "ray":  # one model for the run and the baselines
                log(f"[eep] loading {config.model.path}")
                worker = FitnessWorker(config)
            summary = method.resume(run, run.config(), planned, log, worker)
        if worker is None:
            log(f"[eep] loading {config.model.path}")
            worker = FitnessWorker(config)
        result = run_baselines(config, worker, summary, log, run.path / "baselines")
        write_json_atomic(run.path / "baselines.json", result)
    log(f"[eep] wrote {run.path / 'baselines.json'}; `eep report {run.path}` makes the report")
    return result


def export(
    out: str | Path,
    run_dir: str | Path | None = None,
    model: str | None = None,
    genome: str | Path | None = None,
    config: Config | str | Path | dict | None = None,
    form: str | None = None,
    dense: bool = False,
    log: Log | None = stderr_log,
    point: int | None = None,
    max_params: int | None = None,
    max_latency: float | None = None,
) -> dict:
    """Write a run's pick (``run_dir``; of a multi-objective run, a frontier ``point``, the best
    keeping at most ``max_params``, or of a latency frontier the best within ``max_latency``
    milliseconds), or a genome file applied to ``model``, as a smaller checkpoint to ``out``; with
    ``config`` its tasks' held-out split is scored on the export."""
    log = log or _quiet
    from eep.config import ModelConfig
    from eep.export import export_genome
    from eep.lowrank import SCALES_FILE

    if run_dir:
        if model or genome or config:
            raise EepError("give either RUN_DIR or --model with --genome, not both")
        return Run(run_dir).export(out, form, dense, log, point, max_params, max_latency)
    if point is not None or max_params is not None or max_latency is not None:
        raise EepError(
            "--point, --max-params and --max-latency choose a point of a run's frontier: give RUN_DIR"
        )
    if not (model and genome):
        raise EepError("export needs RUN_DIR, or --model PATH with --genome FILE")
    config = config_of(config) if config is not None else None
    model_cfg = (
        config.model.model_copy(update={"path": model}) if config else ModelConfig(path=model)
    )
    return export_genome(
        model_cfg,
        Genome.load(genome),
        out,
        config=config,
        log=log,
        form=form,
        dense=dense,
        scales=Path(genome).parent / SCALES_FILE,
    )


def finetune(
    model: str,
    config: Config | str | Path | dict,
    out: str | Path,
    steps: int = 50,
    rank: int = 8,
    lr: float = 1e-4,
    overrides: Sequence[str] = (),
    log: Log | None = stderr_log,
) -> dict:
    """LoRA-fine-tune an ``eep export`` output (``model``) on the config's calibration texts and
    write it to ``out`` with everything of the source but its weights, ``eep_finetune.json`` (the
    held-out scores before and after, the losses) and a line in its model card; returns that
    record (:func:`eep.finetune.lora_finetune`: the one gradient step in eep)."""
    log = log or _quiet
    import os
    import shutil

    from eep.calibration import calibration_batches, calibration_texts
    from eep.evaluator import FitnessWorker
    from eep.export import check_target
    from eep.finetune import lora_finetune
    from eep.journal import write_json_atomic
    from eep.model import resolve_path
    from fitness.metrics import weighted_fitness

    if steps < 1 or rank < 1 or not lr > 0:
        raise EepError("--steps and --rank must be at least 1 and --lr positive")
    out = Path(out)
    check_target(out)
    source = Path(resolve_path(model))
    if not (source / "config.json").exists():
        raise EepError(
            f"{model} is not a model directory (no config.json); give an `eep export` output"
        )
    config = config_of(config, overrides)
    config = config.model_copy(
        update={"model": config.model.model_copy(update={"path": str(source)})}
    )
    texts = calibration_texts(config)
    log(f"[eep] loading {source}")
    worker = FitnessWorker(config)
    tasks = config.fitness.tasks

    def heldout() -> dict:
        scores = worker.scores(None, "test")
        return {"scores": scores, "mean": weighted_fitness(tasks, scores)}

    before = heldout()
    batches = calibration_batches(
        worker.tokenizer, texts, config.fitness.batch_size, config.baselines.calibration.max_length
    )
    log(f"[eep] LoRA fine-tune on {len(texts)} calibration texts: the one gradient step in eep")
    trained = lora_finetune(
        worker.model,
        batches,
        steps=steps,
        rank=rank,
        lr=lr,
        seed=config.search.seed,
        log=log,
    )
    after = heldout()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # everything of the source (tokenizer, modeling file, genome, scales) but its weights
        shutil.copytree(
            source,
            tmp,
            ignore=shutil.ignore_patterns(
                "model*.safetensors",
                "model.safetensors.index.json",
                "pytorch_model*.bin",
                "eep_finetune.json",
            ),
        )
        worker.model.save_pretrained(tmp)
        record = {
            "source": str(source),
            "heldout_before": before,
            "heldout_after": after,
            **trained,
        }
        write_json_atomic(tmp / "eep_finetune.json", record)
        card = tmp / "README.md"
        if card.exists():
            card.write_text(
                card.read_text() + f"\n## Fine-tuned\n\nLoRA (rank {rank}, {steps} steps, "
                f"attention projections) on calibration text, merged into the weights: held-out "
                f"{before['mean']:.2f} -> {after['mean']:.2f} (`eep_finetune.json`).\n"
            )
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"[eep] fine-tuned model written to {out}: calibration loss {trained['losses'][0]:.4f} -> "
        f"{trained['losses'][-1]:.4f}, held-out {before['mean']:.2f} -> {after['mean']:.2f}"
    )
    return record


def build_toy(
    which: str = "mixtral",
    out: str | Path | None = None,
    replace_packaged: bool = False,
    seed: int = 0,
    steps: int | None = None,
    log: Log | None = stderr_log,
) -> Path:
    """Retrain a toy model (``mixtral``: the toy; ``qwen``: toy-qwen) into ``out`` (default
    ``toy-build/<which>``), or over the packaged one; returns where it went."""
    log = log or _quiet
    from eep import toy, toy_qwen

    module, packaged = (toy_qwen, toy_qwen.TOY_QWEN_DIR) if which == "qwen" else (toy, toy.TOY_DIR)
    if replace_packaged and out:
        raise EepError("give --out or --replace-packaged, not both")
    out = Path(packaged) if replace_packaged else Path(out or f"toy-build/{which}")
    if not replace_packaged and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EepError(
            f"{out} already exists and is not empty; choose another --out (or --replace-packaged "
            "to overwrite the shipped toy)"
        )
    module.train(out, seed=seed, log=log, **({"steps": steps} if steps else {}))
    log(f"[eep] toy model written to {out}")
    return out


# -- the pieces behind them ------------------------------------------------------------------------


def plan(
    config: Config, dry_run: bool = False, config_dir: Path | None = None
) -> tuple[object, object, object]:
    """(hf config, MoE shape, the method's plan: a search schedule or a MoE-I² plan): the config
    checked against the model's shape (its config.json only) and the tasks, before any weights
    load; with ``config_dir`` (where relative seed-genome paths start) its seed genomes too."""
    from eep.model import load_hf_config
    from eep.moe import shape_of
    from fitness.tasks import check_local_data, check_tasks

    check_tasks(config.fitness.tasks)
    check_local_data(config.fitness.tasks)  # every data error found here costs no model load
    hf_config = load_hf_config(config.model, prefer_file=dry_run)
    shape = shape_of(hf_config)
    return hf_config, shape, method_of(config).plan(config, shape, config_dir)

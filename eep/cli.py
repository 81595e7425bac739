"""Command line: ``eep search | resume | export | baselines | report | eval | finetune | bench | toy build``.

User mistakes (bad config, missing paths, wrong genome) print one line and exit with code 2;
they are checked before any weights are loaded wherever the check does not need them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from eep.errors import EepError
from eep.model import estimate_bytes
from eep.progress import stderr_log as log


def main(argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():  # into a log: eep's own progress lines, not tqdm's bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        key_value = next((a for a in unknown if "=" in a and not a.startswith("-")), None)
        bare = next((o for o in getattr(args, "overrides", None) or () if "=" not in o), None)
        hint = (
            f"; a config override goes after --set: --set {key_value}"
            if key_value
            else f"; --set takes KEY=VALUE as one word: --set {bare}={unknown[0]}"
            if bare and not unknown[0].startswith("-")
            else ""
        )
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    try:
        if hasattr(args, "threads"):
            _use_threads(args.threads)
        return args.func(args) or 0
    except EepError as err:
        print(f"eep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        run_dir = _run_dir_of(args)
        print(
            f"eep: interrupted; a search continues with `eep resume {run_dir or 'RUN_DIR'}`",
            file=sys.stderr,
        )
        return 130


def _run_dir_of(args) -> Path | None:
    """The run directory a command works in, where it names one (for the interrupt's hint)."""
    command = getattr(args, "func", None)
    if command not in (cmd_search, cmd_resume, cmd_baselines):
        return None
    if args.run_dir:  # always, for resume
        return Path(args.run_dir)
    try:
        from eep.config import load_config

        return Path("runs") / load_config(args.config, args.overrides).name
    except Exception:  # noqa: BLE001  (only a hint: the generic one will do)
        return None


def _parser() -> argparse.ArgumentParser:
    from eep import __version__

    parser = argparse.ArgumentParser(
        prog="eep", description="Evolutionary expert pruning for MoE language models."
    )
    parser.add_argument("--version", action="version", version=f"eep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("search", help="start a search from a YAML config")
    p.add_argument("config", help="YAML config, e.g. experiments/toy.yaml")
    p.add_argument("--run-dir", help="where the run lives (default: runs/<config name>)")
    _override_flag(p)
    p.add_argument(
        "--dry-run", action="store_true", help="validate and print the plan; load no weights"
    )
    p.add_argument(
        "--resume-if-exists",
        action="store_true",
        help="if the run directory holds this config's run, resume it instead of refusing (scripts, jobs)",
    )
    _evaluator_flags(p)
    _threads_flag(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("resume", help="continue a stopped search (on any evaluator)")
    p.add_argument("run_dir")
    p.add_argument(
        "--evaluations",
        type=int,
        metavar="N",
        help="raise the search's budget to N evaluations (the same search, continued)",
    )
    _evaluator_flags(p)
    _threads_flag(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("export", help="write a genome as a smaller Hugging Face checkpoint")
    p.add_argument("run_dir", nargs="?", help="export the best genome of this run")
    p.add_argument("--model", help="source model (with --genome): a directory, hub id or 'toy'")
    p.add_argument("--genome", help="genome JSON file (with --model)")
    p.add_argument(
        "--config", help="with --model: a config whose tasks' held-out split is reported"
    )
    p.add_argument("--out", required=True, help="new directory for the checkpoint")
    p.add_argument(
        "--form",
        choices=["stock", "custom"],
        help="stock: plain transformers classes (an error if the genome needs more); custom: eep's "
        "modeling file, trust_remote_code=True (default: stock when possible)",
    )
    p.add_argument(
        "--dense",
        action="store_true",
        help="low-rank experts (MoE-I² stage 2) as re-multiplied dense matrices, in the stock form when "
        "the pruning allows (larger, no custom code for that); default: stored as their factors",
    )
    p.add_argument(
        "--point", type=int, help="multi-objective run: export this frontier point (candidate id)"
    )
    p.add_argument(
        "--max-params",
        type=parameter_count,
        help="multi-objective run: export the pick of the largest size with at most this many "
        "parameters (kept, or active per token for an active_params frontier), e.g. 450000, "
        "450_000, 450k, 1.2M, 30B",
    )
    p.add_argument(
        "--max-latency",
        type=milliseconds,
        metavar="MS",
        help="latency frontier (search.objectives: [fitness, latency]): export the pick within the "
        "largest time listed in the report's second table (each front point's, every 5 %% of the "
        "full model's above them, the full model's) that is at most MS milliseconds, compared to "
        "the thousandth",
    )
    _threads_flag(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "baselines",
        help="score random, frequency, NAEE and REAP pruning next to the search, held out",
    )
    p.add_argument(
        "config", help="YAML config (its search runs first unless --run-dir holds it finished)"
    )
    p.add_argument("--run-dir", help="the search's run directory (default: runs/<config name>)")
    _override_flag(p)
    _threads_flag(p)
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("report", help="write RUN_DIR/report.md with the comparison table and plots")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "eval",
        help="score a model, an exported checkpoint, or a genome applied to a model on tasks",
    )
    p.add_argument("config", help="YAML config whose fitness tasks are scored")
    p.add_argument(
        "--model", help="model to score instead of the config's (directory, hub id or 'toy')"
    )
    p.add_argument("--genome", help="genome JSON applied to the model before scoring")
    p.add_argument(
        "--split",
        choices=["test", "search", "validation"],
        default="test",
        help="which split (default: held-out test; validation: tasks with validation_size)",
    )
    p.add_argument("--out", help="also write the scores to this JSON file")
    p.add_argument(
        "--json", action="store_true", help="print the scores as one JSON object instead of a table"
    )
    _override_flag(p)
    _threads_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "finetune",
        help="the one gradient step: a short LoRA fine-tune of a compressed model on "
        "calibration text (MoE-I²'s recovery step)",
    )
    p.add_argument("model", help="model directory to fine-tune, e.g. an `eep export` output")
    p.add_argument(
        "--config",
        required=True,
        help="YAML config: its baselines.calibration texts are trained on, its "
        "tasks' held-out split is scored before and after",
    )
    p.add_argument("--out", required=True, help="new directory for the fine-tuned checkpoint")
    p.add_argument("--steps", type=int, default=50, help="training batches (default: 50)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: 1e-4)")
    _override_flag(p)
    _threads_flag(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "bench",
        help="measure apply cost, speedup vs rebuilding, duplicates, Ray scaling and export speed",
    )
    p.add_argument(
        "--model",
        default="toy",
        help="toy, random-mixtral (~25M), random-100m, random-mixtral-width (Mixtral-8x7B's layer shape, "
        "1.4 B parameters a layer), or a model directory / hub id (default: toy)",
    )
    p.add_argument("--layers", type=int, help="layers of random-mixtral-width (default: 2)")
    p.add_argument(
        "--out", default="bench", help="directory for bench.json and bench.md (default: bench)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--repeats", type=int, default=5, help="repeats behind each median (default: 5)")
    p.add_argument(
        "--evaluations", type=int, default=40, help="evaluations of each search row (default: 40)"
    )
    p.add_argument(
        "--cut-evaluations",
        type=int,
        default=200,
        help="evaluations of each early-cut search row (default: 200)",
    )
    p.add_argument("--no-ray", dest="ray", action="store_false", help="skip the Ray rows")
    p.add_argument("--no-export", dest="export", action="store_false", help="skip the export rows")
    _threads_flag(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "import-eep", help="convert a genome EEP released (searched_coeff/*.pth) into eep's JSON"
    )
    p.add_argument("file", help="EEP's coefficient file (.pth: a dict of E'xE tensors)")
    p.add_argument(
        "--model", required=True, help="the model it was searched on (directory, hub id or 'toy')"
    )
    p.add_argument("--out", required=True, help="genome JSON to write")
    p.set_defaults(func=cmd_import_eep)

    p = sub.add_parser("toy", help="the embedded toy model")
    toy_sub = p.add_subparsers(dest="toy_command", required=True)
    b = toy_sub.add_parser("build", help="retrain the toy model from a seed (a few minutes on CPU)")
    b.add_argument("--out", help="output directory, new or empty (default: toy-build/<which>)")
    b.add_argument(
        "--replace-packaged",
        action="store_true",
        help="write over the toy model shipped in the package instead (what its tests check)",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--steps", type=int, help="training steps (default: 2500 for mixtral, 3500 for qwen)"
    )
    b.add_argument(
        "--which",
        choices=("mixtral", "qwen"),
        default="mixtral",
        help="mixtral: the toy (model 'toy'); qwen: toy-qwen, the untuned second toy (default: mixtral)",
    )
    b.set_defaults(func=cmd_toy_build)
    return parser


_SCALES = {"k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


def milliseconds(text: str) -> float:
    """``--max-latency``: a positive number of milliseconds, as ``4.09``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive number of milliseconds, e.g. 4.09"
        )
    return value


def parameter_count(text: str) -> int:
    """``--max-params``: a whole number of parameters, as ``450000``, ``450_000``, ``450k``, ``1.2M``."""
    value = text.strip().replace("_", "").replace(",", "")
    scale = _SCALES.get(value[-1:].lower(), 1)
    try:
        number = float(value[:-1] if scale > 1 else value)
    except ValueError:
        number = -1.0
    if not number >= 0 or (scale == 1 and not number.is_integer()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a parameter count: give a whole number, e.g. 450000, 450k or 1.2M"
        )
    return round(number * scale)  # 4.1M: 4099999.99... as a float


def _threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads for CPU work in this process (default: 1, see the README's 'Threads')",
    )


def _use_threads(requested: int | None) -> None:
    """Set torch's CPU threads: ``requested``, else :data:`eep.model.DEFAULT_THREADS`."""
    import torch

    from eep.model import DEFAULT_THREADS

    if requested is not None and requested < 1:
        raise EepError(f"--threads must be at least 1, got {requested}")
    torch.set_num_threads(requested or DEFAULT_THREADS)


def _override_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set search.evaluations=100 (repeatable)",
    )


def _evaluator_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="evaluate on N Ray actors (a local Ray runtime unless --ray-address is given)",
    )
    p.add_argument("--ray-address", metavar="ADDR", help="join a Ray cluster (host:port or 'auto')")
    p.add_argument(
        "--serial",
        action="store_true",
        help="evaluate in this process, whatever evaluator the config (or the run) names",
    )


def _with_evaluator_flags(config, args):
    """Apply --workers / --ray-address / --serial (the evaluator never changes a search's outcome)."""
    if args.serial:
        if args.workers is not None or args.ray_address is not None:
            raise EepError("--serial evaluates in this process: drop --workers / --ray-address")
        evaluator = config.evaluator.model_copy(update={"kind": "serial"})
        return config.model_copy(update={"evaluator": evaluator})
    if args.workers is None and args.ray_address is None:
        return config
    if args.workers is not None and args.workers < 1:
        raise EepError(f"--workers must be at least 1, got {args.workers}")
    evaluator = config.evaluator.model_copy(
        update={
            "kind": "ray",
            "workers": args.workers or config.evaluator.workers,
            "address": args.ray_address or config.evaluator.address,
        }
    )
    return config.model_copy(update={"evaluator": evaluator})


# -- search / resume ----------------------------------------------------------------------------


def _task_sizes(tasks) -> str:
    """Each task's examples per split: as many as local data really has, else the caps asked for
    (a hub dataset is not loaded before the run)."""
    from fitness.tasks import example_counts

    counts = example_counts(tasks)

    def sizes(t) -> str:
        if t.name in counts:
            n = counts[t.name]
            validation = f" / {n['validation']} validation" if n["validation"] else ""
            return f"{n['search']} search{validation} / {n['test']} held-out"
        validation = f" / up to {t.validation_count} validation" if t.validation_count else ""
        return f"up to {t.search_size} search{validation} / up to {t.test_size} held-out"

    return ", ".join(f"{t.name} ({sizes(t)})" for t in tasks)


def _on_cpu(model_cfg) -> bool:
    """Whether the model runs on the CPU here (a GPU config's dry run on a CPU machine: no)."""
    from eep.model import pick_device

    try:
        return pick_device(model_cfg.device).type == "cpu"
    except EepError:
        return False


def _print_plan(config, hf_config, shape, space, run_dir) -> None:
    from eep.evolution import experts_implementation
    from eep.methods import method_of

    size = space.size()
    print(
        f"model        {config.model.path} ({shape.family}, {len(shape.moe_layers)} MoE layers, "
        f"{shape.num_experts} experts, top-{shape.top_k})"
    )
    print(
        f"experts      {experts_implementation(config.model)} (model.experts_implementation: "
        f"{config.model.experts_implementation})"
    )
    active = config.search_space.top_k
    routing = f", top-{shape.top_k} -> top-{active}" if active not in (None, shape.top_k) else ""
    print(
        f"search space {space.describe()}{routing} -> "
        + ("continuous" if size == float("inf") else _large(size))
        + " genomes"
    )
    method_lines = method_of(config).plan_lines(config, space)
    for label, text in method_lines[:1]:
        print(f"{label:<12} {text}")
    print(f"fitness      {_task_sizes(config.fitness.tasks)}")
    for label, text in method_lines[1:]:
        print(f"{label:<12} {text}")
    ev = config.evaluator
    where = (
        f"ray, {ev.workers or 'one per GPU/CPU'} actor(s)"
        + (f" at {ev.address}" if ev.address else " (local)")
        if ev.kind == "ray"
        else "serial (this process)"
    )
    size = estimate_bytes(hf_config, config.model)
    import torch

    threads = (
        f"{torch.get_num_threads()} torch thread(s) here (--threads)"
        if ev.kind != "ray"
        else "1 thread per actor"
    )
    in_flight = f"{config.search.in_flight} candidate(s) in flight"
    if ev.kind == "ray" and "in_flight" not in config.search.model_fields_set:
        # the run sets it to the actors it gets, to keep every one busy (eep.evolution)
        in_flight = (
            f"{ev.workers} candidate(s) in flight, one per actor"
            if ev.workers
            else "one candidate in flight per actor"
        )
    print(
        f"evaluator    {where}; {threads}; {in_flight}; ~"
        + (f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB")
        + " of weights per model copy"
    )
    if "latency" in config.search.objectives and ev.kind == "ray" and _on_cpu(config.model):
        print(
            "note         CPU actors on one machine time their candidates while the others score "
            "theirs, which slows the passes they time: --serial times alone"
        )
    print(f"run dir      {run_dir}")


def _large(n: int) -> str:
    """An exact count as digits, or as d.ddde+NN beyond a million (exact ints may exceed floats)."""
    digits = str(n)
    return digits if n <= 10**6 else f"{digits[0]}.{digits[1:4]}e+{len(digits) - 1:02d}"


def cmd_search(args) -> int:
    from eep.api import plan, search
    from eep.config import load_config

    config = _with_evaluator_flags(load_config(args.config, args.overrides), args)
    run_dir = Path(args.run_dir or Path("runs") / config.name)
    if not args.dry_run and not args.resume_if_exists:
        from eep.journal import RunDir

        RunDir.check_new(run_dir)  # before the plan: its lines would bury the error
    planned = plan(config, dry_run=args.dry_run, config_dir=Path(args.config).parent)
    _print_plan(config, *planned, run_dir)
    if args.dry_run:
        print("dry run: config is valid; nothing was loaded or written")
        return 0
    return _done(
        search(
            config,
            run_dir,
            resume_if_exists=args.resume_if_exists,
            log=log,
            config_dir=Path(args.config).parent,
            planned=planned,
        )
    )


def _done(run) -> int:
    """The one JSON line a finished search prints on stdout."""
    from eep.methods import method_of

    print(json.dumps(method_of(run.config).outcome(run.summary)))
    return 0


def cmd_resume(args) -> int:
    from eep.api import resume
    from eep.journal import RunDir

    config = _with_evaluator_flags(RunDir.open(args.run_dir).config(), args)
    return _done(resume(args.run_dir, config.evaluator, log=log, evaluations=args.evaluations))


# -- baselines / report / eval -------------------------------------------------------------------


def cmd_baselines(args) -> int:
    from eep.api import baselines

    result = baselines(args.config, args.run_dir, args.overrides, log=log)
    methods = result["methods"]
    width = max(len(m) for m in methods)
    print(
        f"held-out mean at {result['keep']} of {result['num_experts']} experts; calibration: {result['calibration']}"
    )
    for name, row in methods.items():
        spread = f" ± {row['heldout_std']:.2f}" if "heldout_std" in row else ""
        spent = f"  ({row['evaluations']} evaluations)" if "evaluations" in row else ""
        noted = name == "search" or row.get("how", "").startswith("no-op")  # not "enumeration"
        spent += f"  ({row['how']})" if noted and row.get("how") else ""
        # beside a latency front: each row's time as a share of the full model's
        timed = f"  {100 * row['latency']:.1f} % time" if "latency" in row else ""
        print(
            f"{name:<{width}}  {row['heldout']:6.2f}{spread}  kept {row['kept_params']:,}  "
            f"active {row['active_params']:,}{timed}{spent}"
        )
    for keep, rows in result.get("sweep_rows", {}).items():  # baselines.sweep: the other sizes
        print(
            f"at {keep} of {result['num_experts']}: "
            + ", ".join(
                f"{name} {row['heldout']:.2f}"
                + (f" ({100 * row['latency']:.1f} % time)" if "latency" in row else "")
                for name, row in rows.items()
            )
        )
    from eep.report import method_rows, search_behind

    picked = methods.get("search", {}).get("picked_by")
    behind = search_behind(method_rows(result), picked == "validation")
    if behind:
        print(behind.replace("`", ""))
    return 0


def cmd_report(args) -> int:
    from eep.report import write_report

    path = write_report(args.run_dir)
    log(f"[eep] wrote {path}")
    return 0


def cmd_eval(args) -> int:
    from eep.api import evaluate
    from eep.journal import write_json_atomic

    if args.out and not Path(args.out).parent.is_dir():
        raise EepError(f"--out {args.out}: directory {Path(args.out).parent} does not exist")
    result = evaluate(args.config, args.genome, args.model, args.split, args.overrides, log=log)
    scores, sizes = result["scores"], result["examples"]
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['model']}"
            + (f" + genome {args.genome}" if args.genome else "")
            + f", {args.split} split"
        )
        width = max(len(name) for name in scores)
        print(f"{'task':<{width}}  {'score':>8}  examples")
        for name, value in scores.items():
            print(f"{name:<{width}}  {value:8.3f}  {sizes.get(name, '')}")
        print(f"{'fitness':<{width}}  {result['fitness']:8.3f}")
    if args.out:
        write_json_atomic(Path(args.out), result)
    return 0


# -- export -------------------------------------------------------------------------------------


def cmd_export(args) -> int:
    from eep.api import export

    export(
        Path(args.out),
        args.run_dir,
        args.model,
        args.genome,
        args.config,
        args.form,
        args.dense,
        log,
        args.point,
        args.max_params,
        args.max_latency,
    )
    return 0


def cmd_finetune(args) -> int:
    from eep.api import finetune

    finetune(args.model, args.config, args.out, args.steps, args.rank, args.lr, args.overrides, log)
    return 0


def cmd_import_eep(args) -> int:
    from eep.eep_format import import_genome

    out = Path(args.out)
    genome, layers = import_genome(args.file, args.model, out)
    slots = sorted({genome.gene(i).slots for i in layers})
    log(
        f"[eep] wrote {out}: {len(layers)} layers merged to {'/'.join(map(str, slots))} experts"
        + (", signed router rows (applied with EEP's arithmetic)" if genome.signed else "")
    )
    return 0


# -- bench / toy --------------------------------------------------------------------------------


def cmd_bench(args) -> int:
    from eep.bench import run_bench

    run_bench(
        args.model,
        args.out,
        args.device,
        args.repeats,
        args.evaluations,
        ray=args.ray,
        export=args.export,
        layers=args.layers,
        cut_evaluations=args.cut_evaluations,
        log=log,
    )
    return 0


def cmd_toy_build(args) -> int:
    from eep.api import build_toy

    build_toy(args.which, args.out, args.replace_packaged, args.seed, args.steps, log)
    return 0

"""Tasks: their examples, built from config entries — the toy's synthetic tasks, or any dataset
that ``datasets`` loads (hub id, local directory, or json/jsonl/csv/parquet files), formatted by
prompt templates. Everything here runs before a model is loaded, so bad task configs and data
fail in one line without costing a model load.
"""

from __future__ import annotations

import glob
import hashlib
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eep.config import TaskConfig
from eep.errors import EepError
from fitness import presets, toy_qwen_tasks, toy_tasks
from fitness.metrics import metric


@dataclass(frozen=True)
class Example:
    prompt: str
    """The generation prompt; for ``text`` metrics, the whole text."""
    answers: tuple[str, ...] = ()
    """Generation: any of these counts as correct."""
    options: tuple[tuple[str, str], ...] = ()
    """Multiple choice: (context, continuation) per option; the continuation's likelihood is scored."""
    label: int | None = None
    """Multiple choice: the index of the correct option."""


@dataclass(frozen=True)
class Task:
    """A named list of examples scored by one metric; ``weight`` is its share of the fitness."""

    name: str
    examples: tuple[Example, ...]
    metric: str = "exact_match"
    weight: float = 1.0
    stop: tuple[str, ...] = ()
    chat_template: bool = False


_TOYS = {"toy": toy_tasks, "toyq": toy_qwen_tasks}  # dataset prefix -> the toy model's tasks
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _fields(template: str) -> list[str]:
    """Top-level field names a template uses (``{choices[0]}`` and ``{a.b}`` use ``choices``, ``a``)."""
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    return [n.split("[")[0].split(".")[0] for n in names]


def _looks_local(dataset: str) -> bool:
    """A path rather than a hub id: a data file's suffix, or a leading ``/``, ``./``, ``../`` or ``~``."""
    return Path(dataset).suffix in _FILE_BUILDERS or dataset.startswith(("/", "./", "../", "~"))


def check_tasks(configs: Sequence[TaskConfig]) -> None:
    """Reject task entries that cannot work; cheap, loads no data."""
    for cfg in configs:
        kind = metric(cfg.metric).kind
        where = f"task {cfg.name!r}"
        source, _, name = (cfg.dataset or "").partition(":")
        for split, pattern in (cfg.data_files or {}).items():
            if not glob.glob(pattern):
                raise EepError(f"{where}: data_files.{split} {pattern!r} matches no file")
        for split in (cfg.search_split, cfg.test_split) if cfg.data_files else ():
            if split not in cfg.data_files:
                raise EepError(
                    f"{where}: split {split!r} is not in data_files ({', '.join(cfg.data_files)}); name it "
                    "there or set search_split / test_split to its keys"
                )
        if cfg.dataset and _looks_local(cfg.dataset) and not Path(cfg.dataset).exists():
            raise EepError(
                f"{where}: dataset {cfg.dataset!r} is no such file or directory (here: {Path.cwd()}); "
                "give its path from where eep runs"
            )
        if cfg.preprocess is not None and cfg.preprocess not in presets.PREPROCESS:
            raise EepError(
                f"{where}: unknown preprocess {cfg.preprocess!r}; available: {', '.join(presets.PREPROCESS)}"
            )
        if cfg.chat_template and kind == "text":
            raise EepError(
                f"{where}: chat_template applies to prompts, not to {cfg.metric} texts; remove it"
            )
        if source in _TOYS:
            if name not in _TOYS[source].TASKS:
                raise EepError(
                    f"{where}: unknown toy task {cfg.dataset!r}; "
                    f"available: {', '.join(f'{source}:{t}' for t in _TOYS[source].TASKS)}"
                )
            if kind == "choice":
                raise EepError(
                    f"{where}: toy tasks have no options; use a generation or text metric, not {cfg.metric}"
                )
            for split in (cfg.search_split, cfg.test_split):
                if split not in toy_tasks.SPLITS:
                    raise EepError(
                        f"{where}: unknown split {split!r}; {cfg.dataset} has {', '.join(toy_tasks.SPLITS)}"
                    )
            continue
        if not cfg.prompt:
            raise EepError(
                f"{where}: dataset {cfg.dataset or 'data_files'!r} needs 'prompt' (a template over its fields)"
            )
        if kind != "text" and not cfg.answer:
            raise EepError(
                f"{where}: metric {cfg.metric} needs 'answer' (the field of the reference answer)"
            )
        if kind == "choice" and not cfg.choices:
            raise EepError(
                f"{where}: metric {cfg.metric} needs 'choices' (a field of options or a list of templates)"
            )
        if kind != "choice" and cfg.choices:
            raise EepError(
                f"{where}: 'choices' is for choice metrics; use metric choice or choice_norm, or drop it"
            )
        templates = [
            cfg.prompt,
            *(cfg.choices if isinstance(cfg.choices, list) else []),
            cfg.continuation or "",
        ]
        for template in templates:
            try:
                fields = _fields(template)
            except ValueError as err:
                raise EepError(f"{where}: template {template!r} is malformed ({err})") from None
            if any(not f.isidentifier() for f in fields):
                raise EepError(f"{where}: template placeholders must be field names, got {fields}")
        if ("choice" in _fields(cfg.prompt)) != (cfg.continuation is not None):
            raise EepError(
                f"{where}: a prompt with {{choice}} needs 'continuation', and 'continuation' needs "
                "{choice} in the prompt"
            )
        if cfg.search_split == cfg.test_split:
            raise EepError(
                f"{where}: search_split and test_split are both {cfg.search_split!r}; "
                "the held-out number must not be the optimised one"
            )


def load_tasks(configs: Sequence[TaskConfig], which: str) -> list[Task]:
    """The tasks' ``search`` (fitness), ``validation`` (picks the exported genome; only tasks with
    validation examples) or ``test`` (held-out report) examples. Validation examples come from the
    search split after its ``search_size`` ones, so the search examples are the same with or without;
    a task with ``validation_size: auto`` takes what is left, up to its count, and is left out of the
    validation tasks when nothing is."""
    if which not in ("search", "validation", "test"):
        raise ValueError(f"which must be 'search', 'validation' or 'test', got {which!r}")
    check_tasks(configs)
    tasks = []
    for cfg in configs:
        if which == "validation" and not cfg.validation_count:
            continue
        split, size, skip = {
            "search": (cfg.search_split, cfg.search_size, 0),
            "test": (cfg.test_split, cfg.test_size, 0),
            "validation": (
                cfg.search_split,
                cfg.search_size + cfg.validation_count,
                cfg.search_size,
            ),
        }[which]
        if (cfg.dataset or "").partition(":")[0] in _TOYS:
            examples = _toy_examples(cfg, split, size)[skip:]
        else:
            examples = tuple(_example(cfg, row) for row in _rows(cfg, split, size)[skip:])
        if which == "validation" and not examples and cfg.validation_size == "auto":
            continue
        if which == "validation" and not examples:
            raise EepError(
                f"task {cfg.name!r}: split {split!r} of {cfg.dataset!r} has no rows left for validation "
                f"after the {cfg.search_size} search ones; lower search_size or validation_size"
            )
        tasks.append(
            Task(
                cfg.name, examples, cfg.metric, cfg.weight, tuple(cfg.stop or ()), cfg.chat_template
            )
        )
    return tasks


def _toy_examples(cfg: TaskConfig, split: str, size: int) -> tuple[Example, ...]:
    source, _, name = cfg.dataset.partition(":")
    rows = _TOYS[source].examples(name, split, size, seed=cfg.seed)
    if metric(cfg.metric).kind == "text":  # the whole worked example is the text
        return tuple(Example(f"{e.prompt} {e.answer}") for e in rows)
    return tuple(Example(e.prompt, (e.answer,)) for e in rows)


def _load(cfg: TaskConfig, split: str):
    import sys

    import datasets

    if not sys.stderr.isatty():  # "Generating ... split" bars would flood a log
        datasets.disable_progress_bars()

    try:
        if cfg.data_files is not None:  # files as they lie, one entry per split
            files = sorted(glob.glob(cfg.data_files[split]))
            if all(Path(f).stat().st_size == 0 for f in files):
                raise EepError(f"task {cfg.name!r}: data_files.{split} is empty")
            return datasets.load_dataset(
                _FILE_BUILDERS.get(Path(files[0]).suffix, "json"),
                data_files={split: files},
                split=split,
            )
        path = Path(cfg.dataset)
        if path.is_file():  # one local data file: its rows, split by content below (see _rows)
            if path.stat().st_size == 0:
                raise EepError(
                    f"task {cfg.name!r}: split {split!r} of {cfg.dataset!r} is empty (the file is empty)"
                )
            return datasets.load_dataset(
                _FILE_BUILDERS.get(path.suffix, "json"),
                data_files={"rows": str(path)},
                split="rows",
            )
        return datasets.load_dataset(cfg.dataset, cfg.subset, split=split)
    except (
        FileNotFoundError,
        ValueError,
        ConnectionError,
        datasets.exceptions.DatasetGenerationError,
    ) as err:
        raise EepError(
            f"task {cfg.name!r}: cannot load split {split!r} of {cfg.dataset!r} "
            f"({' '.join(str(err).split())[:200]})"
        ) from None


def _rows(cfg: TaskConfig, split: str, size: int) -> list[dict[str, Any]]:
    """A seeded subset of ``size`` rows (preprocessed; blank texts dropped for text metrics)."""
    data = _load(cfg, split)
    # one file for every split: never read twice
    if cfg.data_files is None and Path(cfg.dataset).is_file():
        held_out = split == cfg.test_split
        data = data.filter(lambda row: _held_out(row) == held_out)
    if len(data) == 0:
        raise EepError(
            f"task {cfg.name!r}: split {split!r} of {cfg.dataset or 'data_files'!r} is empty"
        )
    text_metric = metric(cfg.metric).kind == "text"
    transform = presets.PREPROCESS.get(cfg.preprocess or "", lambda row: row)
    rows = []
    for row in data.shuffle(seed=cfg.seed):
        try:
            row = transform(row)
        except KeyError as err:
            raise EepError(
                f"task {cfg.name!r}: preprocess {cfg.preprocess!r} needs field {err} that "
                f"{cfg.dataset!r} lacks; fields: {', '.join(row)}"
            ) from None
        if text_metric and not _format(cfg, cfg.prompt, row).strip():
            continue
        rows.append(row)
        if len(rows) == size:
            break
    if not rows:
        raise EepError(
            f"task {cfg.name!r}: split {split!r} of {cfg.dataset!r} has no non-empty text"
        )
    return rows


def _held_out(row: dict[str, Any]) -> bool:
    """Whether a row of a single-file dataset is held out: 3 buckets in 10 by a hash of its content,
    so the search and held-out rows are disjoint and stay so however the file is reordered."""
    digest = hashlib.sha1(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()
    return int(digest, 16) % 10 < 3


def _format(cfg: TaskConfig, template: str, row: dict[str, Any], **extra: str) -> str:
    null = [f for f in _fields(template) if f not in extra and f in row and row[f] is None]
    if null:  # a jsonl row without the key: datasets fills it with None, which would read "None"
        raise EepError(_null_row(cfg, null[0]))
    try:
        return template.format(**row, **extra)
    except (KeyError, IndexError) as err:
        raise EepError(
            f"task {cfg.name!r}: template {template!r} uses {err} that {cfg.dataset!r} lacks; "
            f"fields: {', '.join(row)}"
        ) from None


def _null_row(cfg: TaskConfig, field: str) -> str:
    return (
        f"task {cfg.name!r}: field {field!r} is missing or null in a row of "
        f"{cfg.dataset or 'data_files'!r}; fill or remove such rows"
    )


def _field(cfg: TaskConfig, row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise EepError(
                f"task {cfg.name!r}: field {dotted!r} is missing from {cfg.dataset!r}; "
                f"fields: {', '.join(row)}"
            )
        value = value[part]
    return value


def _example(cfg: TaskConfig, row: dict[str, Any]) -> Example:
    kind = metric(cfg.metric).kind
    if kind == "text":
        return Example(_format(cfg, cfg.prompt, row))
    answers = _answers(cfg, row)
    if kind == "generate":
        return Example(_format(cfg, cfg.prompt, row), answers)
    if isinstance(cfg.choices, list):
        texts = [_format(cfg, t, row) for t in cfg.choices]
    else:
        texts = _field(cfg, row, cfg.choices)
        if not isinstance(texts, list) or not texts:
            raise EepError(
                f"task {cfg.name!r}: choices field {cfg.choices!r} must hold a non-empty list of options"
            )
        texts = [str(t) for t in texts]
    if cfg.continuation is not None:  # options fill a blank in the prompt; the rest is scored
        rest = cfg.target_delimiter + _format(cfg, cfg.continuation, row)
        options = tuple((_format(cfg, cfg.prompt, row, choice=t), rest) for t in texts)
    else:
        prompt = _format(cfg, cfg.prompt, row)
        options = tuple((prompt, cfg.target_delimiter + t) for t in texts)
    return Example(options[0][0], options=options, label=_label(cfg, row, answers[0], len(texts)))


def _label(cfg: TaskConfig, row: dict[str, Any], answer: str, n: int) -> int:
    if cfg.choice_labels:
        labels = [str(x) for x in _field(cfg, row, cfg.choice_labels)]
        if answer not in labels:
            raise EepError(
                f"task {cfg.name!r}: answer {answer!r} is not one of the labels {labels}"
            )
        return labels.index(answer)
    if not answer.lstrip("-").isdigit() or not 0 <= int(answer) < n:
        raise EepError(
            f"task {cfg.name!r}: answer {answer!r} is not an option index below {n}; "
            "set choice_labels or answer_map"
        )
    return int(answer)


def _answers(cfg: TaskConfig, row: dict[str, Any]) -> tuple[str, ...]:
    value = _field(cfg, row, cfg.answer)
    values = value if isinstance(value, list) else [value]
    if not values:
        raise EepError(
            f"task {cfg.name!r}: answer field {cfg.answer!r} is empty in a row of {cfg.dataset!r}"
        )
    if None in values:
        raise EepError(_null_row(cfg, cfg.answer))
    if cfg.answer_map is not None:
        mapping = {k.lower(): v for k, v in cfg.answer_map.items()}
        keys = [str(v).lower() for v in values]
        missing = [k for k in keys if k not in mapping]
        if missing:
            raise EepError(f"task {cfg.name!r}: answer value {missing[0]!r} is not in answer_map")
        return tuple(mapping[k] for k in keys)
    return tuple(str(v) for v in values)


def _local(cfg: TaskConfig) -> bool:
    """Whether a task's data is on this machine: a toy, ``data_files`` or a local path."""
    return (
        cfg.data_files is not None
        or (cfg.dataset or "").partition(":")[0] in _TOYS
        or Path(cfg.dataset or "").exists()
    )


def _prompts(cfg: TaskConfig) -> dict[str, list[str]]:
    """The prompts of each split's examples (``validation`` empty when the task has none)."""
    return {
        which: [ex.prompt for task in load_tasks([cfg], which) for ex in task.examples]
        for which in ("search", "test", "validation")
    }


def example_counts(configs: Sequence[TaskConfig]) -> dict[str, dict[str, int]]:
    """How many search, validation and test examples each task with local data really has (its
    sizes are caps a short file stays under); hub tasks are left out (not loaded here)."""
    return {
        cfg.name: {which: len(found) for which, found in _prompts(cfg).items()}
        for cfg in configs
        if _local(cfg)
    }


def check_local_data(configs: Sequence[TaskConfig]) -> None:
    """Load the tasks whose data is on this machine (toys, ``data_files``, local paths) for every
    split they use, before any model loads, and refuse search / validation / held-out examples that
    share a prompt (files given by hand can overlap; a held-out score on searched rows means nothing).
    Hub datasets are left to the run (``--dry-run`` stays offline)."""
    for cfg in configs:
        if not _local(cfg):
            continue
        prompts = {which: set(found) for which, found in _prompts(cfg).items()}
        for a, b in (("search", "test"), ("search", "validation"), ("validation", "test")):
            shared = prompts.get(a, set()) & prompts.get(b, set())
            if shared:
                raise EepError(
                    f"task {cfg.name!r}: {len(shared)} {b} examples also appear among its {a} examples "
                    f"(e.g. {sorted(shared)[0][:60]!r}); give disjoint files"
                )


def load_texts(
    dataset: str, subset: str | None, split: str, template: str, size: int, seed: int = 0
) -> list[str]:
    """``size`` non-blank texts formed by ``template`` from a seeded sample of a dataset split."""
    cfg = TaskConfig(
        name="calibration",
        dataset=dataset,
        subset=subset,
        prompt=template,
        metric="perplexity",
        search_split=split,
        test_split=f"not-{split}",
        search_size=size,
        seed=seed,
    )
    check_tasks([cfg])
    return [_format(cfg, template, row) for row in _rows(cfg, split, size)]

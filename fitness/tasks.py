"""Build scored tasks from their config entries: the toy's synthetic tasks, or any text dataset
that ``datasets`` loads (hub id or local directory), formatted by a prompt template."""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from eep.config import TaskConfig
from eep.errors import EepError
from fitness import toy_tasks
from fitness.generation import Example, Task


def check_tasks(configs: Sequence[TaskConfig]) -> None:
    """Reject task entries that cannot work; cheap, runs before any model or data is loaded."""
    for cfg in configs:
        source, _, name = cfg.dataset.partition(":")
        if source == "toy":
            if name not in toy_tasks.TASKS:
                raise EepError(f"task {cfg.name!r}: unknown toy task {cfg.dataset!r}; "
                               f"available: {', '.join('toy:' + t for t in toy_tasks.TASKS)}")
            for split in (cfg.search_split, cfg.test_split):
                if split not in toy_tasks.SPLITS:
                    raise EepError(f"task {cfg.name!r}: unknown split {split!r}; "
                                   f"{cfg.dataset} has {', '.join(toy_tasks.SPLITS)}")
            continue
        if not cfg.prompt or not cfg.answer:
            raise EepError(f"task {cfg.name!r}: dataset {cfg.dataset!r} needs 'prompt' (a template) and 'answer' (a field)")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(cfg.prompt) if f is not None]
        except ValueError as err:
            raise EepError(f"task {cfg.name!r}: prompt template is malformed ({err})") from None
        if any(not f.isidentifier() for f in fields):
            raise EepError(f"task {cfg.name!r}: prompt placeholders must be field names, got {fields}")
        if cfg.search_split == cfg.test_split:
            raise EepError(f"task {cfg.name!r}: search_split and test_split are both {cfg.search_split!r}; "
                           "the held-out number must not be the optimised one")


def load_tasks(configs: Sequence[TaskConfig], which: str) -> list[Task]:
    """The tasks' ``search`` (fitness) or ``test`` (held-out report) examples."""
    if which not in ("search", "test"):
        raise ValueError(f"which must be 'search' or 'test', got {which!r}")
    check_tasks(configs)
    tasks = []
    for cfg in configs:
        split, size = (cfg.search_split, cfg.search_size) if which == "search" else (cfg.test_split, cfg.test_size)
        if cfg.dataset.startswith("toy:"):
            examples = tuple(Example(e.prompt, (e.answer,)) for e in
                             toy_tasks.examples(cfg.dataset[4:], split, size, seed=cfg.seed))
        else:
            examples = _dataset_examples(cfg, split, size)
        tasks.append(Task(cfg.name, examples, cfg.metric, cfg.weight))
    return tasks


def _dataset_examples(cfg: TaskConfig, split: str, size: int) -> tuple[Example, ...]:
    import datasets

    try:
        data = datasets.load_dataset(cfg.dataset, cfg.subset, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise EepError(f"task {cfg.name!r}: cannot load split {split!r} of {cfg.dataset!r} "
                       f"({' '.join(str(err).split())[:200]})") from None
    if len(data) == 0:
        raise EepError(f"task {cfg.name!r}: split {split!r} of {cfg.dataset!r} is empty")
    data = data.shuffle(seed=cfg.seed).select(range(min(size, len(data))))
    examples = []
    for row in data:
        try:
            prompt = cfg.prompt.format(**row)
        except KeyError as err:
            raise EepError(f"task {cfg.name!r}: prompt uses field {err} that {cfg.dataset!r} lacks; "
                           f"fields: {', '.join(row)}") from None
        examples.append(Example(prompt, _answers(cfg, row)))
    return tuple(examples)


def _answers(cfg: TaskConfig, row: dict[str, Any]) -> tuple[str, ...]:
    value: Any = row
    for part in cfg.answer.split("."):
        if not isinstance(value, dict) or part not in value:
            raise EepError(f"task {cfg.name!r}: answer field {cfg.answer!r} is missing from {cfg.dataset!r}; "
                           f"fields: {', '.join(row)}")
        value = value[part]
    values = value if isinstance(value, list) else [value]
    if cfg.answer_map is not None:
        keys = [str(v).lower() for v in values]
        missing = [k for k in keys if k not in cfg.answer_map]
        if missing:
            raise EepError(f"task {cfg.name!r}: answer value {missing[0]!r} is not in answer_map")
        return tuple(cfg.answer_map[k] for k in keys)
    return tuple(str(v) for v in values)

"""Build scored tasks from their config entries."""

from __future__ import annotations

from collections.abc import Sequence

from eep.config import TaskConfig
from eep.errors import EepError
from fitness import toy_tasks
from fitness.generation import Example, Task


def check_tasks(configs: Sequence[TaskConfig]) -> None:
    """Reject task entries that cannot be loaded; cheap, runs before any model is loaded."""
    for cfg in configs:
        source, _, name = cfg.dataset.partition(":")
        if source != "toy" or name not in toy_tasks.TASKS:
            raise EepError(f"task {cfg.name!r}: unknown dataset {cfg.dataset!r}; "
                           f"available: {', '.join('toy:' + t for t in toy_tasks.TASKS)}")
        for split in (cfg.search_split, cfg.test_split):
            if split not in toy_tasks.SPLITS:
                raise EepError(f"task {cfg.name!r}: unknown split {split!r}; "
                               f"{cfg.dataset} has {', '.join(toy_tasks.SPLITS)}")


def load_tasks(configs: Sequence[TaskConfig], which: str) -> list[Task]:
    """The tasks' ``search`` (fitness) or ``test`` (held-out report) examples."""
    if which not in ("search", "test"):
        raise ValueError(f"which must be 'search' or 'test', got {which!r}")
    check_tasks(configs)
    tasks = []
    for cfg in configs:
        split, size = (cfg.search_split, cfg.search_size) if which == "search" else (cfg.test_split, cfg.test_size)
        name = cfg.dataset.partition(":")[2]
        examples = tuple(Example(e.prompt, e.answer) for e in toy_tasks.examples(name, split, size, seed=cfg.seed))
        tasks.append(Task(cfg.name, examples, cfg.metric, cfg.weight))
    return tasks

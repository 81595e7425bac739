"""The methods a run can follow (``method:`` in the config), each one module behind one small
interface that the API, the CLI, the report and the baselines dispatch to:

- ``eep``: EEP's evolutionary search (:mod:`eep.evolution`);
- ``moei2``: MoE-I²'s two task-agnostic stages (:mod:`eep.moei2`).

A method ``plan``s a run from the config and the model's shape before any weights load (an
error says what to change), prints that plan as ``(label, text)`` lines, ``start``s a run in a
new directory and ``resume``s one from what its directory holds (to the end, held-out scores
included: ``summary.json``), and says whether a summary is ``finished``, how far it got
(``progress``) and what ``eep search`` prints as its result (``outcome``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

Log = Callable[[str], None]


class Method(Protocol):
    name: str
    searches: bool
    """Whether the run evolves genomes scored on the tasks (its pick is the "search" row)."""

    def plan(self, config, shape, config_dir: Path | None = None) -> object: ...

    def plan_lines(self, config, plan) -> list[tuple[str, str]]: ...

    def start(self, config, run_dir: Path, plan, log: Log, config_dir: Path) -> None: ...

    def resume(self, run, config, plan, log: Log, worker=None) -> dict: ...

    def finished(self, summary: dict, config) -> bool: ...

    def progress(self, summary: dict, config) -> tuple[int, int] | None: ...

    def outcome(self, summary: dict) -> dict: ...


def method_of(config) -> Method:
    """The method the config names."""
    if config.method == "moei2":
        from eep.moei2 import METHOD
    else:
        from eep.evolution import METHOD
    return METHOD

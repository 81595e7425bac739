"""The run directory: the search's source of truth on disk.

    RUN_DIR/config.yaml     resolved config (what `eep resume` reruns)
    RUN_DIR/journal.jsonl   append-only, one JSON line per finished evaluation
    RUN_DIR/state.json      atomic snapshot: RNG state, next candidate id, candidates in flight
    RUN_DIR/summary.json    best_fitness, evaluations, best_genome (+ held-out scores at the end)

The archive of evaluated genomes is never snapshotted: it *is* the journal. A snapshot holds only
what the journal cannot tell (the RNG and the candidates bred but not yet finished), so resuming
is: read the journal, load the snapshot, fold in journal lines of in-flight candidates.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eep.config import Config, parse_config
from eep.errors import EepError
from eep.genome import Genome

STATE_FORMAT = "eep.state/v1"


@dataclass(frozen=True)
class Evaluation:
    """One finished evaluation: an immutable journal record."""

    id: int
    genome: Genome
    fitness: float | None  # None when the evaluation failed or was cut
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""
    error: str | None = None
    note: str | None = None  # e.g. "re-run: actor-1 died" when a worker was lost mid-evaluation
    cut: float | None = None
    """Stopped early: the fitness could be at most this, below what could make it a parent or the best."""
    outside: bool = False
    """A warm-start step outside the search space (greedy elimination part-way, keeping more experts
    than the space allows): journaled, since it cost an evaluation, but never a parent nor the best."""
    examples: dict[str, str] | None = None
    """Per generation task, each example's result (``fitness.scoring.verdicts``: ``1`` scored in
    full, ``0`` less, ``.`` not scored because the candidate was cut): what later candidates order
    their examples by, so that a cut comes early (``eep.loop.example_order``)."""
    latency: float | None = None
    """The time a forward pass of one batch takes with the genome applied, as a share of the full
    model's timed beside it on the worker before scoring (``eep.evaluator.FitnessWorker.latency``):
    the size objective of a ``[fitness, latency]`` search, measured only there."""

    @property
    def ok(self) -> bool:
        return self.fitness is not None

    @property
    def candidate(self) -> bool:
        """Scored in full and inside the search space: what parents and the best are drawn from."""
        return self.fitness is not None and not self.outside

    @property
    def failed(self) -> bool:
        return self.fitness is None and self.cut is None

    @property
    def status(self) -> str:
        return "ok" if self.ok else "cut" if self.cut is not None else "failed"

    def to_dict(self) -> dict[str, Any]:
        data = {
            "id": self.id,
            "key": self.genome.key,
            "status": self.status,
            "fitness": self.fitness,
            "scores": self.scores,
            "seconds": round(self.seconds, 4),
            "worker": self.worker,
            "error": self.error,
            "note": self.note,
            "genome": self.genome.to_dict(),
        }
        return (
            data
            | ({"cut": self.cut} if self.cut is not None else {})
            | ({"outside": True} if self.outside else {})
            | ({"examples": self.examples} if self.examples else {})
            | ({"latency": self.latency} if self.latency is not None else {})
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Evaluation:
        return cls(
            data["id"],
            Genome.from_dict(data["genome"]),
            data["fitness"],
            data["scores"],
            data["seconds"],
            data["worker"],
            data["error"],
            data.get("note"),
            data.get("cut"),
            data.get("outside", False),
            data.get("examples"),
            data.get("latency"),
        )


def file_mode() -> int:
    """The mode a plain ``open()`` would give a new file under this process's umask (0644 usually):
    temporary files start private (0600) and would stay so after their rename."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def share_tree(root: Path) -> None:
    """Give ``root`` and everything under it the modes ``open()`` / ``mkdir`` would (0644 / 0755)."""
    mode = file_mode()
    for path in [root, *Path(root).rglob("*")]:
        os.chmod(path, (mode | 0o111) if path.is_dir() else mode)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that readers see the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _checksum(data: Any) -> str:
    return hashlib.sha256(
        json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def check_creatable(path: Path, what: str) -> None:
    """An :class:`EepError` unless ``path`` could be created: its nearest existing ancestor must be
    a writable directory. Checked before any model loads, so a bad path costs nothing."""
    probe = Path(os.path.abspath(path)).parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise EepError(f"cannot create {what} {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise EepError(f"cannot create {what} {path}: no permission to write in {probe}")


def warm_seed_path(name: str) -> str:
    """Where a run keeps a calibration warm start's genome (``name``: its method, or method-size
    on a frontier), among its seed genomes."""
    return f"seeds/warm-{name}.json"


def warm_seed_name(path: str) -> str | None:
    """The calibration warm start a run's seed genome file holds (:func:`warm_seed_path`), or None
    for a seed genome the config gave."""
    name = Path(path).name
    return name.removeprefix("warm-").removesuffix(".json") if name.startswith("warm-") else None


def _config_yaml(config: Config) -> str:
    """``config.yaml``: the config as a run stores it, itself a config ``eep search`` takes. A
    frontier leaves out ``search_space.keep``, the default :class:`Config` fills in and reads back
    (so the digest holds), which ``load_config`` refuses when written with objectives."""
    data = config.to_dict()
    if config.search.frontier:
        del data["search_space"]["keep"]
    return yaml.safe_dump(data, sort_keys=False)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.journal_path = self.path / "journal.jsonl"
        self.state_path = self.path / "state.json"
        self.summary_path = self.path / "summary.json"
        self.lock_path = self.path / "lock"

    @classmethod
    def check_new(cls, path: str | Path) -> None:
        """Refuse a directory that already holds something (a run or anything else)."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise EepError(
                f"run directory {path} already exists and is not empty; "
                f"continue it with `eep resume {path}` or choose another --run-dir"
            )
        check_creatable(path, "the run directory")

    @classmethod
    def create(cls, path: str | Path, config: Config) -> RunDir:
        cls.check_new(path)
        run = cls(path)
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            run.config_path.write_text(_config_yaml(config))
        except OSError as err:
            raise EepError(f"cannot create run directory {run.path}: {err.strerror}") from None
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(path)
        if not run.config_path.exists():
            raise EepError(
                f"{run.path} is not an eep run directory (no config.yaml); start one with `eep search`"
            )
        return run

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One run, one writer: an exclusive ``flock`` on ``RUN/lock`` for as long as the block
        runs. The kernel drops it when its process ends, however it ends (even SIGKILL), so a lock
        left by a dead process is stale by construction and simply taken over; the file records
        the owner (pid, host, start time) for the message a second writer gets."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                raise EepError(
                    f"{self.path} is in use by {owner}; one run has one writer: wait for that "
                    "process to finish or stop it, then resume"
                ) from None
            previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            if previous:
                print(
                    f"[eep] note: taking over the lock left by {previous}, which has ended",
                    file=sys.stderr,
                )
            # temporaries of atomic writes a crash cut short
            for partial in self.path.glob(".*.json.*"):
                partial.unlink(missing_ok=True)
            os.ftruncate(fd, 0)
            os.pwrite(
                fd,
                f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
                0,
            )
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # a clean exit leaves no owner behind
        finally:
            os.close(fd)  # closing releases the flock

    def config(self) -> Config:
        data = yaml.safe_load(self.config_path.read_text())
        search = data.get("search") if isinstance(data, dict) else None
        if isinstance(search, dict) and len(search.get("objectives", ())) > 1:
            # a frontier run from before search.smallest_after bred on the whole front throughout
            search.setdefault("smallest_after", None)
        return parse_config(data, source=str(self.config_path))

    # -- journal --------------------------------------------------------------------------------

    def evaluations(self) -> list[Evaluation]:
        """All journal records in order. A torn last line (a write cut off by a crash) is dropped
        with a warning; its candidate is simply evaluated again."""
        if not self.journal_path.exists():
            return []
        lines = self.journal_path.read_bytes().split(b"\n")
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(Evaluation.from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, EepError, UnicodeDecodeError) as err:
                if number >= len(lines) - 1:  # the last line, possibly torn by a crash mid-write
                    print(
                        f"[eep] warning: dropping torn last journal line {number} ({err})",
                        file=sys.stderr,
                    )
                    self._truncate_to(
                        b"\n".join(lines[: number - 1]) + (b"\n" if number > 1 else b"")
                    )
                    break
                raise EepError(
                    f"{self.journal_path} line {number} is corrupt ({err}); "
                    "the journal cannot be trusted, start a new run"
                ) from None
        return records

    def _truncate_to(self, content: bytes) -> None:
        with open(self.journal_path, "r+b") as f:
            f.truncate(len(content))

    def append(self, evaluation: Evaluation) -> None:
        with open(self.journal_path, "a") as f:
            f.write(json.dumps(evaluation.to_dict(), separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # -- snapshots ------------------------------------------------------------------------------

    def save_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(
            self.state_path, {"format": STATE_FORMAT, "checksum": _checksum(state), **state}
        )

    def load_state(self) -> dict[str, Any] | None:
        """The search snapshot, or None when there is none; a snapshot that is not valid JSON, of
        another format, or fails its checksum is an :class:`EepError` (the search then rebuilds
        the state from the journal)."""
        if not self.state_path.exists():
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EepError(f"{self.state_path} is corrupt ({err})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise EepError(f"{self.state_path} has format {found!r}, expected {STATE_FORMAT!r}")
        payload = {k: v for k, v in state.items() if k not in ("format", "checksum")}
        if state.get("checksum") != _checksum(payload):
            raise EepError(f"{self.state_path} fails its checksum (edited or damaged)")
        return payload

    def holds(self, config: Config) -> bool:
        """Whether this is the run ``config`` asks for: its own config, or the config it was started
        from before eep resolved it (seed genomes copied in, warm starts computed; ``request.json``)."""
        request = self.path / "request.json"
        asked = json.loads(request.read_text())["digest"] if request.exists() else None
        return config.digest() in (self.config().digest(), asked)

    def extend(self, evaluations: int) -> None:
        """Raise the search's budget (``eep resume --evaluations``): the search goes on as if it had
        been asked for that many from the start."""
        config = self.config()
        done = len(self.evaluations())
        if evaluations < max(done, config.search.evaluations):
            raise EepError(
                f"--evaluations {evaluations} would not extend {self.path}: it plans "
                f"{config.search.evaluations} and has {done}; give more"
            )
        config = config.model_copy(
            update={"search": config.search.model_copy(update={"evaluations": evaluations})}
        )
        tmp = self.config_path.with_suffix(".yaml.tmp")
        tmp.write_text(_config_yaml(config))
        os.replace(tmp, self.config_path)

    def write_request(self, config: Config) -> None:
        write_json_atomic(self.path / "request.json", {"digest": config.digest()})

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.summary_path, summary)

    def summary(self) -> dict[str, Any]:
        if not self.summary_path.exists():
            raise EepError(
                f"{self.path} has no summary.json yet; the search has not finished an evaluation"
            )
        return json.loads(self.summary_path.read_text())

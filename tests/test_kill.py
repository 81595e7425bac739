"""Kill -9 identity: a search killed at any moment and resumed ends exactly as an uninterrupted one.

Each killed run is a real `eep search` process that SIGKILLs itself at a chosen point (between
evaluations, half-way through writing a journal line, with a state snapshot written to its
temporary file but not yet renamed, in either phase of a prune -> merge search); `eep resume`
then finishes it in a new process. The journals (genomes and fitness, in order) and best genomes
must equal the uninterrupted run's.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import local_ray_cluster, toy_config_dict

ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import json, os, signal, sys, tempfile
from eep import cli, journal

point, at = sys.argv[1], int(sys.argv[2])
calls = {"append": 0, "state": 0}
append, write_json_atomic = journal.RunDir.append, journal.write_json_atomic

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def killing_append(self, evaluation):
    calls["append"] += 1
    if point == "journal-write" and calls["append"] == at:
        line = json.dumps(evaluation.to_dict())
        with open(self.journal_path, "a") as f:
            f.write(line[: len(line) // 2])
            f.flush()
            os.fsync(f.fileno())
        die()
    append(self, evaluation)
    if point == "after-append" and calls["append"] == at:
        die()

def killing_write(path, data):
    if path.name == "state.json":
        calls["state"] += 1
        if point == "snapshot" and calls["state"] == at:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".state.json.")
            os.write(fd, json.dumps(data).encode()[:100])
            os.fsync(fd)
            die()
    write_json_atomic(path, data)

journal.RunDir.append = killing_append
journal.write_json_atomic = killing_write
sys.exit(cli.main(sys.argv[3:]))
"""

POINTS = [
    ("after-append", 3),
    ("journal-write", 7),
    ("snapshot", 9),
    ("snapshot", 12),
    ("journal-write", 13),
    ("after-append", 16),
]


def _eep(*args, driver=None):
    cmd = (
        [sys.executable, "-c", DRIVER, *driver, *args]
        if driver
        else [sys.executable, "-m", "eep", *args]
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _records(run: Path):
    rows = [json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines()]
    return [(r["id"], r["genome"], r["fitness"], r["scores"]) for r in rows]


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_equals_uninterrupted(tmp_path):
    data = toy_config_dict()
    data["search_space"] = {"kind": "merge", "keep": 4, "merge_after": 10}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(data))
    whole = _eep("search", str(config), "--run-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    expected = _records(tmp_path / "whole")
    expected_best = json.loads((tmp_path / "whole" / "summary.json").read_text())["best_genome"]
    assert len(expected) == 16
    for point, at in POINTS:
        run = tmp_path / f"{point}-{at}"
        killed = _eep("search", str(config), "--run-dir", str(run), driver=(point, str(at)))
        assert killed.returncode == -signal.SIGKILL, (point, at, killed.stderr[-2000:])
        assert len(_records_or_torn(run)) < 16 or point == "after-append"
        resumed = _eep("resume", str(run))
        assert resumed.returncode == 0, (point, at, resumed.stderr[-2000:])
        assert _records(run) == expected, (point, at)
        assert json.loads((run / "summary.json").read_text())["best_genome"] == expected_best
        if point == "journal-write":
            assert "torn last journal line" in resumed.stderr
        assert not list(run.glob(".*.json.*"))  # the cut-short snapshot's temporary is cleaned up


@pytest.mark.slow
def test_kill_9_of_a_ray_driver_then_resume_equals_uninterrupted(tmp_path):
    """The same with the Ray evaluator: the driver of a search on a running local cluster (2
    actors, 2 candidates in flight) is SIGKILLed mid-run, its actors die with it, and `eep resume
    --ray-address` on the cluster ends with the uninterrupted serial run's journal and best."""
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(toy_config_dict(in_flight=2)))
    whole = _eep("search", str(config), "--run-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    expected = _records(tmp_path / "whole")
    expected_best = json.loads((tmp_path / "whole" / "summary.json").read_text())["best_genome"]
    with local_ray_cluster(nodes=1, cpus_per_node=2) as address:
        ray = ("--ray-address", address, "--workers", "2")
        for point, at in (("journal-write", 5), ("snapshot", 10)):
            run = tmp_path / f"ray-{point}-{at}"
            killed = _eep(
                "search", str(config), "--run-dir", str(run), *ray, driver=(point, str(at))
            )
            assert killed.returncode == -signal.SIGKILL, (point, at, killed.stderr[-2000:])
            resumed = _eep("resume", str(run), *ray)
            assert resumed.returncode == 0, (point, at, resumed.stderr[-2000:])
            assert "2 actor(s)" in resumed.stderr
            assert _records(run) == expected, (point, at)
            assert json.loads((run / "summary.json").read_text())["best_genome"] == expected_best


def _records_or_torn(run: Path) -> list[str]:
    return [line for line in (run / "journal.jsonl").read_text().splitlines() if line.endswith("}")]

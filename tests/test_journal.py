import json

import pytest

from eep.config import parse_config
from eep.errors import EepError
from eep.genome import Genome
from eep.journal import Evaluation, RunDir, write_json_atomic
from tests.conftest import toy_config_dict


def _evaluation(i):
    return Evaluation(
        i, Genome.from_keep(8, 2, {0: [i % 8, (i + 1) % 8]}), 50.0 + i, {"copy": 50.0 + i}, 0.1, "w"
    )


def test_a_runs_config_yaml_is_itself_a_config_to_search_with(tmp_path):
    """A frontier's stored config leaves out the filled-in ``search_space.keep`` (``load_config``
    refuses one written beside objectives) and reads back to the same digest."""
    from eep.config import load_config

    for objectives in (["fitness"], ["fitness", "kept_params"]):
        data = toy_config_dict()
        data["search"]["objectives"] = objectives
        data["search_space"] = {"kind": "prune"}
        config = parse_config(data)
        run = RunDir.create(tmp_path / f"run-{len(objectives)}", config)
        assert run.config().digest() == config.digest()
        assert load_config(run.config_path).digest() == config.digest()
        run.extend(config.search.evaluations + 10)
        assert load_config(run.config_path).search.evaluations == config.search.evaluations + 10


def test_journal_round_trip_and_torn_last_line(tmp_path, capsys):
    run = RunDir.create(tmp_path / "run", parse_config(toy_config_dict()))
    for i in range(3):
        run.append(_evaluation(i))
    assert run.evaluations() == [_evaluation(i) for i in range(3)]
    with open(run.journal_path, "a") as f:
        f.write('{"id": 3, "genome": {"form')  # a crash mid-write
    assert run.evaluations() == [_evaluation(i) for i in range(3)]
    assert "dropping torn last journal line 4" in capsys.readouterr().err
    run.append(_evaluation(3))  # the torn bytes were cut, so the journal stays line-aligned
    assert [e.id for e in run.evaluations()] == [0, 1, 2, 3]


def test_corrupt_middle_line_is_an_error(tmp_path):
    run = RunDir.create(tmp_path / "run", parse_config(toy_config_dict()))
    for i in range(3):
        run.append(_evaluation(i))
    lines = run.journal_path.read_text().splitlines()
    lines[1] = lines[1][:20]
    run.journal_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EepError, match="line 2 is corrupt"):
        run.evaluations()


def test_run_dir_refuses_non_empty_directory(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("data")
    with pytest.raises(EepError, match="already exists and is not empty"):
        RunDir.create(tmp_path / "run", parse_config(toy_config_dict()))
    assert (tmp_path / "run" / "x").read_text() == "data"


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "s.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
    with pytest.raises(TypeError):
        write_json_atomic(path, {"c": object()})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_one_run_has_one_writer_and_a_dead_owner_leaves_no_lock(tmp_path, capsys):
    import os
    import subprocess
    import sys

    run = RunDir.create(tmp_path / "run", parse_config(toy_config_dict()))
    with run.lock():
        assert f"pid {os.getpid()}" in run.lock_path.read_text()
        with pytest.raises(
            EepError, match=r"is in use by pid \d+ on .* since .*; one run has one writer"
        ):
            with RunDir.open(run.path).lock():
                pass
    assert run.lock_path.read_text() == ""  # released cleanly
    # a writer killed while holding the lock: the kernel drops the flock, the next writer takes over
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import os, signal
from eep.journal import RunDir
with RunDir({str(run.path)!r}).lock():
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    holder.wait(timeout=60)
    assert "pid" in run.lock_path.read_text()  # its owner line is still there ...
    with run.lock():  # ... but the lock is not
        pass
    assert "taking over the lock left by pid" in capsys.readouterr().err

"""The Ray evaluator on real local Ray runtimes: same search as serial, survives a killed actor."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from eep.config import parse_config
from eep.evaluator import FitnessWorker, SerialEvaluator
from eep.journal import RunDir
from eep.loop import run_search
from search_spaces import PruneSpace
from tests.conftest import local_ray_cluster, toy_config_dict

SPACE = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), keep=4)
ROOT = Path(__file__).resolve().parents[1]


def _config(in_flight=2, **evaluator):
    data = toy_config_dict(in_flight=in_flight)
    data["evaluator"] = evaluator
    return parse_config(data)


def _journal(run):
    rows = [json.loads(line) for line in run.journal_path.read_text().splitlines()]
    return [
        {k: v for k, v in row.items() if k not in ("seconds", "worker", "note")} for row in rows
    ]


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    config = _config()
    run = RunDir.create(tmp_path_factory.mktemp("serial") / "run", config)
    summary = run_search(
        run, SPACE, SerialEvaluator(FitnessWorker(config), in_flight=2), log=lambda m: None
    )
    return run, summary


class SelfKillingWorker(FitnessWorker):
    """Dies by SIGKILL the first time it is asked to evaluate candidate 5 (a marker file says so)."""

    def evaluate(self, candidate):
        marker = Path(os.environ["EEP_TEST_KILL_MARKER"])
        if candidate.id == 5 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().evaluate(candidate)


def test_ray_search_equals_serial_and_survives_a_killed_actor(tmp_path, serial_run, monkeypatch):
    import ray

    from eep.ray_evaluator import RayEvaluator

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "killed"
    monkeypatch.setenv("EEP_TEST_KILL_MARKER", str(marker))
    config = _config(kind="ray", workers=2)
    run = RunDir.create(tmp_path / "run", config)
    messages = []
    evaluator = RayEvaluator(config, log=messages.append, worker_cls=SelfKillingWorker)
    try:
        summary = run_search(run, SPACE, evaluator, log=messages.append)
        busy = evaluator.busy_fraction()
    finally:
        evaluator.close()
    assert not ray.is_initialized()
    assert marker.exists()  # an actor really was SIGKILLed mid-evaluation
    assert any("died while evaluating candidate 5" in m for m in messages)
    serial, serial_summary = serial_run
    assert _journal(run) == _journal(serial)  # same candidates, same fitness, same order
    assert summary == serial_summary
    rows = [json.loads(line) for line in run.journal_path.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(16))  # none missing, none twice
    assert rows[5]["note"].startswith("re-run: actor-") and "died" in rows[5]["note"]
    assert any(r["worker"].startswith("actor-3@") for r in rows)  # the replacement actor did work
    assert 0.0 < busy <= 1.0


def test_actors_holding_two_candidates_each_equal_serial_and_lose_none_when_killed(
    tmp_path, monkeypatch
):
    """in_flight 4 on 2 actors: each actor queues two candidates; the one killed mid-evaluation
    takes its queued candidate with it, and both are re-run on its replacement."""
    import ray

    from eep.ray_evaluator import RayEvaluator

    config = _config(in_flight=4)
    serial = RunDir.create(tmp_path / "serial", config)
    expected = run_search(
        serial, SPACE, SerialEvaluator(FitnessWorker(config), in_flight=4), log=lambda m: None
    )
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setenv("EEP_TEST_KILL_MARKER", str(tmp_path / "killed"))
    config = _config(in_flight=4, kind="ray", workers=2)
    run = RunDir.create(tmp_path / "run", config)
    messages = []
    evaluator = RayEvaluator(config, log=messages.append, worker_cls=SelfKillingWorker)
    try:
        summary = run_search(run, SPACE, evaluator, log=messages.append)
    finally:
        evaluator.close()
    assert (tmp_path / "killed").exists()
    assert sum("died while evaluating" in m for m in messages) == 1  # one replacement for one death
    assert _journal(run) == _journal(serial) and summary == expected
    rows = [json.loads(line) for line in run.journal_path.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(16))
    assert len({r["worker"].split("@")[0] for r in rows}) >= 2


@pytest.mark.slow
def test_search_on_a_two_node_local_cluster_equals_serial(tmp_path, serial_run):
    """`ray start --head` plus a second node joining it, then `eep search --ray-address`."""
    with local_ray_cluster(nodes=2) as address:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(yaml.safe_dump(toy_config_dict(in_flight=2)))
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "eep",
                "search",
                str(cfg),
                "--run-dir",
                str(tmp_path / "run"),
                "--ray-address",
                address,
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "on 2 node(s)" in done.stderr and "2 actor(s)" in done.stderr
    serial, serial_summary = serial_run
    run = RunDir.open(tmp_path / "run")
    assert _journal(run) == _journal(serial)
    summary = json.loads(run.summary_path.read_text())
    assert summary["best_genome"] == serial_summary["best_genome"]


def test_busy_share_counts_evaluation_time_inside_the_window_only():
    from eep.ray_evaluator import busy_share

    # two actors over [0, 4]: 2+2 and 1, then 1 of 3
    finished = [
        (2.0, 2.0),
        (4.0, 2.0),
        (3.0, 1.0),
        (6.0, 3.0),
    ]
    assert busy_share(finished, 0.0, 4.0, 2) == pytest.approx((2 + 2 + 1 + 1) / 8)
    assert busy_share(finished, 0.0, 10.0, 2) == pytest.approx((2 + 2 + 1 + 3) / 20)
    assert busy_share(finished, 1.0, 1.0, 2) is None
    assert busy_share([(1.0, 5.0)], 0.0, 1.0, 1) == 1.0


@pytest.mark.slow
def test_ray_greedy_warm_start_cuts_what_the_serial_run_cuts(tmp_path):
    """Greedy elimination's options are cut on the options handed back before them, so two actors
    with two candidates in flight journal exactly what a serial run with two in flight does."""
    from eep import greedy
    from eep.ray_evaluator import RayEvaluator

    space = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), keep=3)

    def config(**evaluator):
        data = toy_config_dict(
            in_flight=2, evaluations=greedy.cost(space) + 4, initial=2, warm_start=["greedy"]
        )
        data["fitness"]["batch_size"] = 8
        data["search_space"]["keep"] = 3
        data["evaluator"] = evaluator
        return parse_config(data)

    serial = RunDir.create(tmp_path / "serial", config())
    run_search(
        serial, space, SerialEvaluator(FitnessWorker(config()), in_flight=2), log=lambda m: None
    )
    cfg = config(kind="ray", workers=2)
    ray_run = RunDir.create(tmp_path / "ray", cfg)
    evaluator = RayEvaluator(cfg, log=lambda m: None)
    try:
        run_search(ray_run, space, evaluator, log=lambda m: None)
    finally:
        evaluator.close()
    rows = _journal(ray_run)
    assert rows == _journal(serial)
    assert any(r["status"] == "cut" for r in rows[: greedy.cost(space)])


@pytest.mark.parametrize(
    "keep", [2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)]
)
def test_ray_search_with_early_cut_equals_serial_with_and_without_it(tmp_path, keep):
    """The cut is judged on the results a candidate was bred from, so two actors with two candidates
    in flight cut exactly what the serial run cuts, and the genomes and best equal an uncut run's."""
    from eep.ray_evaluator import RayEvaluator

    space = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), keep=keep)

    def config(cut, **evaluator):
        data = toy_config_dict(in_flight=2, evaluations=18, initial=7, early_cut=cut)
        data["fitness"]["batch_size"] = 8
        data["search_space"]["keep"] = keep
        data["evaluator"] = evaluator
        return parse_config(data)

    runs = {}
    for name, cfg in (("serial", config(True)), ("uncut", config(False))):
        runs[name] = RunDir.create(tmp_path / name, cfg)
        run_search(
            runs[name], space, SerialEvaluator(FitnessWorker(cfg), in_flight=2), log=lambda m: None
        )
    cfg = config(True, kind="ray", workers=2)
    runs["ray"] = RunDir.create(tmp_path / "ray", cfg)
    evaluator = RayEvaluator(cfg, log=lambda m: None)
    try:
        run_search(runs["ray"], space, evaluator, log=lambda m: None)
        # held-out scoring on an actor, cut short as a raced validation pick asks
        genome = runs["ray"].evaluations()[0].genome
        assert evaluator.heldout(genome) == FitnessWorker(cfg).scores(genome, "test")
        assert evaluator.heldout(genome, "test", cut_below=100.01) is None
    finally:
        evaluator.close()
    journals = {name: _journal(run) for name, run in runs.items()}
    assert journals["ray"] == journals["serial"]
    assert keep > 2 or any(row["status"] == "cut" for row in journals["ray"])
    assert [(r["id"], r["key"]) for r in journals["ray"]] == [
        (r["id"], r["key"]) for r in journals["uncut"]
    ]
    summaries = {name: json.loads(run.summary_path.read_text()) for name, run in runs.items()}
    assert summaries["ray"]["best_genome"] == summaries["uncut"]["best_genome"]

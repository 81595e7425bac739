"""The Python API the CLI is built on: search, Run, export, evaluate, resume."""

import json

import pytest
import yaml

import eep
from eep.errors import EepError
from tests.conftest import toy_config_dict


def test_search_export_evaluate_from_python(tmp_path):
    logged = []
    run = eep.search(
        toy_config_dict(evaluations=8, initial=4), run_dir=tmp_path / "run", log=logged.append
    )
    assert run.finished and len(run.evaluations()) == 8
    # warm_start auto is stored as what it resolved to: 8 evaluations leave no room for greedy's 168
    stored = yaml.safe_load((run.path / "config.yaml").read_text())["search"]
    assert stored["warm_start"] == [] and (run.path / "request.json").exists()
    summary = run.summary
    assert run.best.key == eep.Genome.from_dict(summary["selected"]["genome"]).key
    assert any(line.startswith("[eep] done: 8 evaluations") for line in logged)
    # `eep search`'s JSON line names the candidate exported and its held-out score too
    from eep.evolution import METHOD

    assert METHOD.outcome(summary) == {
        "evaluations": 8,
        "best_fitness": summary["best_fitness"],
        "best_id": summary["best_id"],
        "exported_id": summary["selected"]["id"],
        "heldout": round(summary["heldout"]["best"]["mean"], 4),
    }

    report = run.export(tmp_path / "out", log=logged.append)
    assert report["parameters"]["after"] < report["parameters"]["before"]
    assert any(line.startswith(f"[eep] exported to {tmp_path / 'out'}") for line in logged)
    assert eep.Genome.load(tmp_path / "out" / "eep_genome.json").key == run.best.key

    scored = eep.evaluate(toy_config_dict(), genome=run.best, log=logged.append)
    assert scored["fitness"] == pytest.approx(summary["heldout"]["best"]["mean"])
    assert scored["examples"] == {"copy": 12, "reverse": 12, "shift": 12, "lookup": 12}
    assert eep.evaluate(toy_config_dict(), model=str(tmp_path / "out"), log=logged.append)[
        "fitness"
    ] == pytest.approx(report["heldout"]["mean"] if report["heldout"] else scored["fitness"])

    again = eep.resume(run.path, log=logged.append)  # finished: nothing happens
    assert "is finished" in logged[-1] and len(again.evaluations()) == 8
    with pytest.raises(EepError, match="already exists"):
        eep.search(toy_config_dict(evaluations=8, initial=4), run_dir=run.path, log=logged.append)
    same = eep.search(
        toy_config_dict(evaluations=8, initial=4),
        run_dir=run.path,
        resume_if_exists=True,
        log=logged.append,
    )
    assert same.summary == summary


def test_a_run_continues_from_its_journal_in_another_process_s_shoes(tmp_path, capsys):
    """Stopped after 5 of 8 (journal cut, no snapshot), resume gives the uninterrupted journal."""
    config = toy_config_dict(evaluations=8, initial=4)
    full = eep.search(config, run_dir=tmp_path / "full", log=None)  # None: no progress lines
    assert "[eep]" not in capsys.readouterr().err
    cut = eep.search(
        {**config, "search": {**config["search"], "evaluations": 5}},
        run_dir=tmp_path / "cut",
        log=lambda m: None,
    )
    lines = cut.dir.journal_path.read_text().splitlines()
    assert len(lines) == 5
    (cut.path / "config.yaml").write_text((full.path / "config.yaml").read_text())
    (cut.path / "state.json").unlink()
    (cut.path / "summary.json").unlink()
    resumed = eep.resume(cut.path, log=None)

    def strip(run):
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("seconds", "worker")}
            for line in run.dir.journal_path.read_text().splitlines()
        ]

    assert strip(resumed) == strip(full)


def test_a_run_stopped_before_its_first_summary_exports_its_best_so_far(tmp_path):
    from eep.loop import best_of

    run = eep.search(toy_config_dict(evaluations=8, initial=4), run_dir=tmp_path / "r", log=None)
    lines = run.dir.journal_path.read_text().splitlines()
    run.dir.journal_path.write_text("\n".join(lines[:5]) + "\n")  # stopped after 5 of 8
    (run.path / "state.json").unlink()
    (run.path / "summary.json").unlink()
    logged = []
    report = run.export(tmp_path / "out", log=logged.append)
    assert any("stopped at 5 of 8 evaluations" in line for line in logged)
    exported = eep.Genome.load(tmp_path / "out" / "eep_genome.json")
    assert exported.key == best_of(run.evaluations()).genome.key and report["parameters"]


def test_raising_the_budget_of_a_finished_run_continues_the_same_search(tmp_path):
    config = toy_config_dict(evaluations=12, initial=4)
    longer = eep.search(config, run_dir=tmp_path / "long", log=lambda m: None)
    short = eep.search(
        {**config, "search": {**config["search"], "evaluations": 7}},
        run_dir=tmp_path / "short",
        log=lambda m: None,
    )
    assert short.finished
    with pytest.raises(EepError, match="would not extend"):
        eep.resume(short.path, evaluations=5, log=lambda m: None)
    extended = eep.resume(short.path, evaluations=12, log=lambda m: None)
    assert extended.finished and extended.config.search.evaluations == 12
    keys = lambda run: [e.genome.key for e in run.evaluations()]  # noqa: E731
    assert (
        keys(extended) == keys(longer)
        and extended.summary["best_genome"] == longer.summary["best_genome"]
    )


def test_warm_starts_outside_a_grouped_space_are_left_out(tmp_path):
    """With weight groups every genome keeps one set per group; a layer-wise baseline's genome that
    does not is not seeded (said in the log), and everything evaluated belongs to the space."""
    from eep.api import plan

    data = toy_config_dict(evaluations=6, initial=4, warm_start=["naee", "frequency"])
    data["search_space"]["groups"] = 2
    logged = []
    run = eep.search(data, run_dir=tmp_path / "run", log=logged.append)
    space = plan(run.config)[2].first
    assert all(space.reject(e.genome) is None for e in run.evaluations())
    seeded = run.config.search.seed_genomes
    assert (
        len(seeded)
        + sum("is left out" in line for line in logged)
        + sum("already a seed" in line for line in logged)
        == 2
    )


def test_evaluate_scores_a_custom_form_export_as_it_is(tmp_path):
    """eep's custom-form checkpoints (uneven expert counts) have no MoE adapter: scored as they are,
    and a genome on top of one is refused in one line (it used to crash with AttributeError)."""
    from eep.config import ModelConfig
    from eep.export import export_genome

    genome = eep.Genome.from_keep(
        8, 2, {0: [0, 2, 5], 1: [1, 2, 3, 4, 6], 2: [0, 3, 4, 6], 3: [1, 4]}
    )
    report = export_genome(
        ModelConfig(path="toy", device="cpu", dtype="float32"),
        genome,
        tmp_path / "out",
        config=eep.api.config_of(toy_config_dict()),
        log=lambda m: None,
    )
    assert report["form"] == "custom"
    scored = eep.evaluate(toy_config_dict(), model=str(tmp_path / "out"), log=lambda m: None)
    assert scored["fitness"] == pytest.approx(report["heldout"]["mean"])
    # its config names no family eep can apply genomes to
    with pytest.raises(EepError, match="eep_mixtral"):
        eep.evaluate(
            toy_config_dict(), model=str(tmp_path / "out"), genome=genome, log=lambda m: None
        )


def test_a_search_whose_tasks_have_no_validation_rows_left_exports_its_best(tmp_path):
    """``validation_size: auto`` with nothing left after the search rows: the search still runs,
    exports the best by search fitness and says why; ``eep eval --split validation`` says what to fix."""
    from fitness import toy_tasks

    for split, n in (("search", 8), ("test", 8)):
        rows = [
            {"prompt": e.prompt, "answer": e.answer}
            for e in toy_tasks.examples("copy", "search" if split == "search" else "test", n)
        ]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = toy_config_dict(evaluations=6, initial=4)
    config["fitness"]["tasks"] = [
        {
            "name": "copy",
            "data_files": {
                "search": str(tmp_path / "search.jsonl"),
                "test": str(tmp_path / "test.jsonl"),
            },
            "prompt": "{prompt}",
            "answer": "answer",
            "search_size": 8,
        }
    ]
    logged = []
    run = eep.search(config, run_dir=tmp_path / "run", log=logged.append)
    summary = run.summary
    assert summary["selected"]["by"] == "search fitness"
    assert summary["selected"]["id"] == summary["best_id"]
    assert any("no task has validation examples left" in line for line in logged)
    with pytest.raises(EepError, match="no task has examples left after its search ones"):
        eep.evaluate(config, split="validation", log=logged.append)


def test_validation_fitness_weighs_only_the_tasks_that_have_validation_examples():
    from eep.config import parse_config
    from eep.evolution import validation_fitness

    data = toy_config_dict()
    data["fitness"]["tasks"][0]["weight"] = 3.0
    config = parse_config(data)
    assert validation_fitness(config, {"copy": 80.0, "reverse": 40.0}) == pytest.approx(70.0)
    assert validation_fitness(config, {"shift": 50.0}) == 50.0
    assert validation_fitness(config, {}) is None


def test_a_larger_budget_never_turns_on_a_greedy_start_a_run_did_not_make(tmp_path):
    """A run written outside ``eep search`` may keep ``search.warm_start: auto``; extending it past
    the budget where auto would start from greedy elimination is refused before anything runs."""
    from eep.config import parse_config
    from eep.journal import RunDir

    run = RunDir.create(tmp_path / "r", parse_config(toy_config_dict(evaluations=16)))
    # greedy elimination costs 168 at 4 of 8: auto starts from it from 420 evaluations on
    with pytest.raises(EepError, match="give at most 419, or start a new run"):
        eep.resume(run.path, evaluations=420, log=lambda m: None)
    assert run.config().search.evaluations == 16  # nothing changed

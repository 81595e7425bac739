import json

import pytest
from PIL import Image

from eep.config import parse_config
from eep.errors import EepError
from eep.genome import Genome
from eep.journal import Evaluation, RunDir
from eep.report import (
    Row,
    best_compressed,
    comparison_table,
    human_count,
    method_rows,
    running_best,
    running_mean,
    sweep_series,
    sweep_table,
    write_report,
)
from tests.conftest import toy_config_dict

TASKS = ("copy", "reverse", "shift", "lookup")
FITNESS = [50.0, None, 55.0, 52.0, 61.0, None, 60.0, 61.0, 70.0, 64.0]  # None: a failed evaluation


def _scores(value):
    return {t: value for t in TASKS}


BASELINES = {
    "keep": 4,
    "num_experts": 8,
    "num_layers": 4,
    "top_k": 2,
    "methods": {  # deliberately out of order, with a method the report does not know
        "search": {
            "heldout": 88.25,
            "tasks": _scores(88.25),
            "kept_params": 13_200_000,
            "active_params": 4_400_000,
        },
        "mystery": {"heldout": 70.0, "tasks": {"copy": 70.0}},
        "naee": {
            "heldout": 90.5,
            "how": "enumeration",
            "tasks": _scores(90.5),
            "kept_params": 13_200_000,
            "active_params": 4_400_000,
        },
        "random": {
            "heldout": 51.23,
            "heldout_std": 6.27,
            "draws": 5,
            "tasks": _scores(51.2),
            "kept_params": 13_200_000,
            "active_params": 4_400_000,
        },
        "full": {
            "heldout": 99.1,
            "tasks": _scores(99.1),
            "kept_params": 26_400_000,
            "active_params": 4_400_000,
        },
        "reap": {"heldout": 80.0, "tasks": _scores(80.0)},
    },
    "sweep": {
        "2": {"random": 20.1, "naee": 40.2, "reap": 38.0},
        "6": {"random": 80.0, "naee": 97.0, "search": 98.0},
    },
}
HELDOUT = {
    "best": {"scores": _scores(87.0), "mean": 87.0},
    "full": {"scores": _scores(99.0), "mean": 99.0},
}


def _run(tmp_path, summary=True, baselines=None):
    run = RunDir.create(tmp_path / "run", parse_config(toy_config_dict(evaluations=10, initial=4)))
    for i, fitness in enumerate(FITNESS):
        genome = Genome.from_keep(8, 2, {0: [i % 8, (i + 1) % 8, (i + 2) % 8, (i + 3) % 8]})
        run.append(
            Evaluation(
                i,
                genome,
                fitness,
                {} if fitness is None else _scores(fitness),
                0.1,
                "w",
                None if fitness is not None else "out of memory",
            )
        )
    if summary:
        run.write_summary(
            {"evaluations": 10, "failed": 2, "best_fitness": 70.0, "best_id": 8, "heldout": HELDOUT}
        )
    if baselines is not None:
        (run.path / "baselines.json").write_text(json.dumps(baselines))
    return run


def _image_size(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def _table(report: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in report.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_running_best_and_population_mean():
    assert running_best(FITNESS) == [50.0, 50.0, 55.0, 55.0, 61.0, 61.0, 61.0, 61.0, 70.0, 70.0]
    assert running_best([None, None, 3.0, 1.0]) == [None, None, 3.0, 3.0]
    assert running_mean([2.0, 4.0, 6.0, 8.0], window=2) == [2.0, 3.0, 5.0, 7.0]
    assert running_mean([1.0] * 30 + [3.0] * 20)[-1] == pytest.approx(3.0)


def test_rows_are_ordered_and_the_best_compressed_method_wins():
    rows = method_rows(BASELINES, HELDOUT)
    assert [r.method for r in rows] == ["full", "random", "reap", "naee", "search", "mystery"]
    assert rows[4].heldout == 88.25  # baselines.json's search row wins over summary.json's
    assert best_compressed(rows).method == "naee"
    assert (
        human_count(13_200_000) == "13.2M"
        and human_count(690_000) == "690K"
        and human_count(950) == "950"
    )

    table = _table("\n".join(comparison_table(rows, list(TASKS))))
    assert list(table) == [
        "method",
        "full",
        "random (mean ± std of 5 draws)",
        "reap",
        "naee (enumeration)",
        "search",
        "mystery",
    ]
    # every method routes a token to as many experts as the full model: no active-parameter column
    assert table["method"] == [*TASKS, "held-out mean", "kept params"]
    assert table["random (mean ± std of 5 draws)"] == ["51.2"] * 4 + ["51.2 ± 6.3", "13.2M (50 %)"]
    assert table["naee (enumeration)"][4] == "**90.5**"
    assert table["full"][4:] == ["99.1", "26.4M"]
    assert table["mystery"] == ["70.0", "–", "–", "–", "70.0", "–"]
    top1 = [
        r if r.method != "naee" else Row(**{**r.__dict__, "active_params": 2_200_000}) for r in rows
    ]
    table = _table("\n".join(comparison_table(top1, list(TASKS))))
    assert (
        table["method"][-1] == "active params / token"
        and table["naee (enumeration)"][-1] == "2.2M (50 %)"
    )


def test_a_baseline_beating_the_search_is_said_with_what_may_close_the_gap():
    from eep.report import Row, search_behind

    def rows(**heldout):
        return [Row(m, h, {}) for m, h in heldout.items()]

    assert search_behind(rows(full=99.0, naee=80.0, search=85.0)) is None
    assert search_behind(rows(full=99.0, greedy=85.0, search=85.0)) is None  # a tie is not behind
    assert search_behind(rows(naee=90.0)) is None  # no search row
    behind = search_behind(rows(full=99.0, greedy=82.5, search=80.0))
    assert behind.startswith("The search (80.0) is 2.5 points below greedy held out; starting from")
    assert "`search.warm_start: [greedy]`" in behind
    # a search that already started from greedy elimination is not told to
    started = [Row("greedy", 82.5, {}), Row("search", 80.0, {}, warm_start=("naee", "greedy"))]
    assert "warm_start" not in search_behind(started, validated=True)
    # naee with dynamic skipping is no warm start; a validated run is not told to validate
    assert search_behind(rows(**{"naee+skip": 90.0, "search": 80.0}), validated=True) == (
        "The search (80.0) is 10.0 points below naee+skip held out; more evaluations "
        "(`search.evaluations`) may close the gap."
    )
    # a frontier's pick: a frontier takes no warm start, so none is suggested
    pick = [Row("greedy", 82.5, {}), Row("search", 80.0, {}, how="the frontier's pick at 4 of 8")]
    assert "warm_start" not in search_behind(pick, validated=True)


def test_rows_without_baselines_come_from_the_summary():
    rows = method_rows(None, HELDOUT)
    assert [(r.method, r.heldout) for r in rows] == [("full", 99.0), ("search", 87.0)]
    assert method_rows(None, None) == []
    table = _table("\n".join(comparison_table(rows, ["copy", "absent"])))
    # no parameter counts known, no column for absent tasks
    assert table["method"] == [
        "copy",
        "held-out mean",
    ]
    assert table["search"] == ["87.0", "**87.0**"]


def test_sweep_series_adds_the_main_keep():
    series = sweep_series(BASELINES)
    assert list(series) == ["random", "reap", "naee", "search", "mystery"]
    assert series["naee"] == {2: 40.2, 4: 90.5, 6: 97.0}
    assert series["search"] == {4: 88.25, 6: 98.0}
    assert "full" not in series
    assert sweep_series({"methods": {"naee": {"heldout": 5.0}}}) == {}
    assert sweep_series({"methods": {"naee": {"heldout": 5.0}}}, keep=3) == {"naee": {3: 5.0}}
    table = _table("\n".join(sweep_table(series)))
    assert table["method"] == ["2 kept", "4 kept", "6 kept"] and table["naee"] == [
        "40.2",
        "90.5",
        "97.0",
    ]
    assert table["search"] == ["–", "88.2", "98.0"]


def test_report_with_baselines(tmp_path):
    run = _run(tmp_path, baselines=BASELINES)
    path = write_report(run.path)
    assert path == run.path / "report.md"
    report = path.read_text()
    assert report.startswith("# eep report: test (toy)\n")
    assert "- evaluations: 10 of 10, 2 failed" in report
    assert "- best search fitness: 70.00 (candidate 8," in report
    assert (
        "**Best compressed method: naee**, held-out 90.5, 8.6 points below the full model (99.1)."
        in report
    )
    assert (
        "The search (88.2) is 2.2 points below naee held out; starting from it "
        "(`search.warm_start: [naee]`), more evaluations (`search.evaluations`) or validation "
        "examples to pick the export by (`fitness.tasks[].validation_size` above 0) may close the gap."
    ) in report
    assert "not finished" not in report
    # what the scores rest on: the toy's tasks, 12 held-out examples each
    assert "Held-out examples per task: copy 12, reverse 12, shift 12, lookup 12." in report
    assert "](fitness.png)" in report and "](methods.png)" in report
    comparison, sweep = report.split("\n| method | 2 kept | 4 kept | 6 kept |")
    assert _table(comparison)["search"][4] == "88.2"
    assert "| naee | 40.2 | 90.5 | 97.0 |" in sweep  # the plot's numbers as a table
    for png in ("fitness.png", "methods.png"):
        width, height = _image_size(run.path / png)
        assert width > 600 and height > 300


def test_a_search_row_from_before_a_resume_gives_way_to_the_runs_current_pick(tmp_path):
    search = {**BASELINES["methods"]["search"], "evaluations": 6}  # eep baselines at 6 of 10
    run = _run(
        tmp_path, baselines={**BASELINES, "methods": {**BASELINES["methods"], "search": search}}
    )
    report = write_report(run.path).read_text()
    assert (
        "baselines.json was written when the run had 6 evaluations; it has 10 now, so the search "
        "row is the run's current pick"
    ) in report
    comparison = report.split("\n| method | 2 kept")[0]
    assert _table(comparison)["search"][4] == "87.0"  # summary.json's, not baselines.json's 88.2
    (run.path / "baselines.json").write_text(
        json.dumps(
            {
                **BASELINES,
                "methods": {**BASELINES["methods"], "search": {**search, "evaluations": 10}},
            }
        )
    )
    report = write_report(run.path).read_text()
    comparison = report.split("\n| method | 2 kept")[0]
    assert "was written when" not in report
    assert _table(comparison)["search (10 evaluations)"][4] == "88.2"


def test_report_without_baselines(tmp_path):
    run = _run(tmp_path)
    (run.path / "methods.png").write_bytes(b"stale")  # from an earlier report that had baselines
    report = write_report(run.path).read_text()
    assert list(_table(report)) == ["method", "full", "search"]
    assert (
        "**Best compressed method: search**, held-out 87.0, 12.0 points below the full model (99.0)."
        in report
    )
    assert "methods.png" not in report and not (run.path / "methods.png").exists()
    assert _image_size(run.path / "fitness.png")[0] > 0


def test_report_of_an_unfinished_search(tmp_path):
    run = _run(tmp_path, summary=False, baselines={"methods": {"random": {"heldout": 40.0}}})
    report = write_report(run.path).read_text()
    assert "the search has not finished** (no summary.json yet)" in report
    assert "- best search fitness: 70.00 (candidate 8," in report  # from the journal
    assert list(_table(report)) == ["method", "random"]
    assert _image_size(run.path / "methods.png")[0] > 0

    # written mid-search
    run.write_summary({"evaluations": 10, "failed": 2, "best_fitness": 70.0, "best_id": 8})
    (run.path / "baselines.json").unlink()
    report = write_report(run.path).read_text()
    assert "summary.json has no held-out scores yet" in report
    assert "No held-out scores yet" in report and "| method" not in report


def test_empty_journal_and_bad_baselines(tmp_path):
    run = RunDir.create(tmp_path / "run", parse_config(toy_config_dict()))
    report = write_report(run.path).read_text()
    assert "- evaluations: 0 of 16, 0 failed" in report and not (run.path / "fitness.png").exists()
    (run.path / "baselines.json").write_text('{"methods": {"naee": {"tasks": {}}}}')
    with pytest.raises(EepError, match=r"baselines.json: methods.naee.heldout must be a number"):
        write_report(run.path)
    with pytest.raises(EepError, match="not an eep run directory"):
        write_report(tmp_path)


def test_the_search_from_the_summary_is_plotted_and_a_sweep_uses_the_runs_keep(tmp_path):
    # no "keep" given
    baselines = {
        "methods": {"naee": {"heldout": 60.0}},
        "sweep": {"2": {"naee": 30.0}},
    }
    assert sweep_series(baselines, keep=4) == {"naee": {2: 30.0, 4: 60.0}}
    run = _run(tmp_path, baselines=baselines)
    report = write_report(run.path).read_text()
    assert report.startswith("# eep report: test (toy)\n")
    assert "- search space: prune, keep 4 of 8 experts per layer" in report
    assert list(_table(report)) == ["method", "full", "naee", "search"]
    assert "**Best compressed method: search**, held-out 87.0" in report
    assert _image_size(run.path / "methods.png")[0] > 0


def test_cut_candidates_are_counted_apart_from_failures(tmp_path):
    run = _run(tmp_path)
    genome = Genome.from_keep(8, 2, {0: [4, 5, 6, 7]})
    # a hopeless candidate stopped part-way
    with run.path.joinpath("journal.jsonl").open("a") as journal:
        journal.write(
            json.dumps(Evaluation(10, genome, None, {}, 0.05, "w", cut=41.5).to_dict()) + "\n"
        )
    report = write_report(run.path).read_text()
    assert "- evaluations: 11 of 10, 2 failed, 1 cut short as hopeless" in report
    assert [e.status for e in run.evaluations()][-1] == "cut" and run.evaluations()[-1].cut == 41.5
    assert _image_size(run.path / "fitness.png")[0] > 0


def test_frontier_against_the_baselines_at_each_size_they_were_scored_at():
    from eep.report import frontier_against

    picks = {k: {"heldout": {"mean": v}} for k, v in {"2": 80.0, "4": 99.5, "6": 99.9}.items()}
    baselines = {
        "keep": 4,
        "methods": {
            "full": {"heldout": 100.0},
            "naee": {"heldout": 98.0},
            "search": {"heldout": 99.5},
        },
        "sweep": {"2": {"greedy": 70.0, "naee": 60.0}, "6": {"naee": 100.0}, "3": {"naee": 90.0}},
    }
    # 3 a layer has no pick; the search and full rows are not rivals
    assert frontier_against(picks, baselines) == (
        "Behind a baseline held out: naee 100.00 against 99.90 at 6 experts a layer."
    )
    baselines["sweep"]["6"]["naee"] = 99.9  # a tie is not behind
    assert frontier_against(picks, baselines) == (
        "At every size the baselines were scored at (2, 4, 6 experts a layer), the frontier's "
        "pick scores at least the best of them held out."
    )


def test_breeding_starts_after_the_greedy_start_and_the_seeds():
    from eep.report import _breeding_starts

    genome = Genome.from_keep(8, 2, {i: [0, 1, 2, 3] for i in range(4)})
    records = [Evaluation(0, genome, 50.0, _scores(50.0), 0.1, "w")]
    data = toy_config_dict(evaluations=500, initial=30)
    assert _breeding_starts(parse_config(data), records) == 30
    data["search"]["warm_start"] = ["greedy"]  # 4 layers, 8 experts down to 4: 4 x 26 + 4 x 16
    assert _breeding_starts(parse_config(data), records) == 168
    data["search"]["seed_genomes"] = ["a.json", "b.json"]  # after greedy's, before breeding
    assert _breeding_starts(parse_config(data), records) == 170


def test_a_tie_for_the_best_compressed_method_goes_to_the_smaller():
    def row(method, heldout, kept):
        return Row(method, heldout, {}, None, None, kept, None, None, None, ())

    rows = [row("moei2 stage 1", 99.125, 546_000), row("moei2 stage 2", 99.125, 447_000)]
    assert best_compressed(rows).method == "moei2 stage 2"
    assert best_compressed([row("a", 90.0, None), row("b", 90.0, 5)]).method == "b"
    assert best_compressed([row("a", 90.0, 7), row("b", 90.0, 7)]).method == "a"  # the first
    assert best_compressed([row("a", 91.0, 9), row("b", 90.0, 5)]).method == "a"


def test_a_latency_frontier_against_the_baselines_at_the_latency_measured_for_them():
    from eep.report import baseline_points, latency_against

    baselines = {  # latencies as shares of the full model's time, measured beside it
        "keep": 4,
        "methods": {
            "full": {"heldout": 100.0, "latency": 1.0},
            "naee": {"heldout": 98.0, "latency": 0.75},
            "random": {"heldout": 50.0, "latency": 0.8125},
        },
        "sweep": {"2": {"naee": 70.0}},
        "sweep_rows": {"2": {"naee": {"heldout": 70.0, "latency": 0.5}}},
    }
    # shown, as the front is, in milliseconds of the search's full-model time
    points = baseline_points(baselines, {}, "latency", full_latency=8.0)
    assert points == {"naee": [(4.0, 70.0), (6.0, 98.0)], "random": [(6.5, 50.0)]}
    front = [
        {"latency_ms": 3.5, "heldout": {"mean": 60.0}},
        {"latency_ms": 5.0, "heldout": {"mean": 98.0}},
    ]
    assert latency_against(front, points) == (
        "Not dominated held out by a front point or a pick: naee 70.00 at 4.000 ms."
    )
    front[0]["heldout"]["mean"] = 70.0  # a tie is dominated
    assert latency_against(front, points).startswith("Every baseline point is dominated")
    # a kept-parameters frontier places them at their uniform sizes' parameters
    assert baseline_points(baselines, {2: 100, 4: 200}, "kept_params") == {
        "naee": [(100, 70.0), (200, 98.0)],
        "random": [(200, 50.0)],
    }


def test_the_noise_of_a_latency_frontier_is_the_full_models_spread_against_itself():
    from eep.report import _noise

    summary = {
        "latency_noise": [0.98, 1.0, 1.0, 1.01, 1.02],  # 4 points of a share
        "front": [{"latency": t} for t in (0.60, 0.62, 0.70, 0.72)],  # steps of 2, 8, 2 points
    }
    assert _noise(summary) == (
        "Timed against itself 5 times at the end, the full model took 98.0–102.0 % of its own "
        "time: shares less than 4.0 points apart are within one measurement's noise here, as 2 of "
        "the 3 steps between neighbouring front points are."
    )
    assert _noise({**summary, "latency_noise": [1.0, 1.01]}).endswith(
        "no two neighbouring front points are that close."
    )
    assert _noise({"front": []}) == "Times measured on a busy machine vary."

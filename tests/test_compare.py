import json

import pytest
import yaml

from eep.calibration import calibration_coverage, calibration_texts
from eep.cli import main
from eep.config import parse_config
from eep.genome import Genome
from eep.moe import adapter_for
from eep.surgery import compress, parameter_counts
from tests.conftest import toy_config_dict
from tests.test_cli import ROOT


def _write(tmp_path, data):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_parameter_counts_follow_the_kept_and_active_experts(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    total = sum(p.numel() for p in tiny_mixtral.parameters())
    expert = 2 * 48 * 32 + 32 * 48  # gate_up [2i, h] + down [h, i]
    assert parameter_counts(tiny_mixtral, adapter, None) == (total, total - 3 * 6 * expert)
    genome = Genome.from_keep(8, 2, {0: [0, 1, 2, 3], 1: [0, 1, 2, 3, 4], 2: [5, 6]})
    dropped = 4 + 3 + 6
    kept, active = parameter_counts(tiny_mixtral, adapter, genome)
    assert kept == total - dropped * (expert + 32)
    # still two experts per token in every layer
    assert active == total - dropped * 32 - 3 * 6 * expert
    uniform = Genome.from_keep(8, 2, {i: [1, 3, 5, 7] for i in range(3)})
    export, form = compress(adapter, uniform)
    assert form.kind == "stock"
    assert parameter_counts(tiny_mixtral, adapter, uniform)[0] == sum(
        p.numel() for p in export.parameters()
    )


def test_calibration_defaults_to_the_search_examples_written_out():
    config = parse_config(toy_config_dict())
    texts = calibration_texts(config)
    assert len(texts) == 4 * 6 and texts[0].startswith("copy : ") and " = " in texts[0]
    # the tasks in turn: a size below the total still covers every task
    assert [t.split(" : ")[0] for t in texts[:5]] == ["copy", "reverse", "shift", "lookup", "copy"]
    small = parse_config({**toy_config_dict(), "baselines": {"calibration": {"size": 5}}})
    assert calibration_texts(small) == texts[:5]
    assert calibration_coverage(small) == "5 texts of 4 of 4 tasks' search examples"
    tiny = parse_config({**toy_config_dict(), "baselines": {"calibration": {"size": 3}}})
    assert calibration_coverage(tiny) == "3 texts of 3 of 4 tasks' search examples"


@pytest.mark.slow
def test_baselines_then_report_then_eval_on_the_toy(tmp_path, capsys):
    data = toy_config_dict(evaluations=10)
    data["baselines"] = {"random_draws": 2, "sweep": [2]}
    config = _write(tmp_path, data)
    run = tmp_path / "run"
    assert main(["baselines", str(config), "--run-dir", str(run)]) == 0  # runs the search first
    result = json.loads((run / "baselines.json").read_text())
    methods = result["methods"]
    swept = result["sweep_rows"]["2"]
    assert f"at 2 of 8: random {swept['random']['heldout']:.2f}, " in capsys.readouterr().out
    assert set(methods) == {
        "full",
        "random",
        "frequency",
        "naee",
        "naee+skip",
        "reap",
        "greedy",
        "search",
    }
    assert methods["greedy"]["evaluations"] == 4 * (8 + 7 + 6 + 5) + 4 * 4 * 4  # 4 of 8 in 4 layers
    assert methods["search"]["evaluations"] == 10 and "genome" in methods["naee"]
    assert methods["search"]["picked_by"] == "search fitness"  # the unit tests' toy: no validation
    assert len(methods["random"]["genomes"]) == 2 and result["calibration"].startswith(
        "24 texts of 4 of 4 tasks"
    )
    assert methods["random"]["draws"] == 2 and "heldout_std" in methods["random"]
    assert methods["naee"]["how"] == "enumeration" and set(methods["naee+skip"]["betas"]) == {
        "0",
        "1",
        "2",
        "3",
    }
    summary = json.loads((run / "summary.json").read_text())
    assert methods["search"]["heldout"] == summary["heldout"]["best"]["mean"]
    assert methods["full"]["heldout"] == pytest.approx(summary["heldout"]["full"]["mean"])
    assert (
        methods["full"]["kept_params"]
        > methods["naee"]["kept_params"]
        == methods["search"]["kept_params"]
    )
    assert set(result["sweep"]["2"]) == {
        "random",
        "frequency",
        "naee",
        "naee+skip",
        "reap",
        "greedy",
    }
    assert result["sweep_rows"]["2"]["naee"]["heldout"] == result["sweep"]["2"]["naee"]
    assert set(result["sweep_rows"]["2"]["greedy"]["tasks"]) == {
        "copy",
        "reverse",
        "shift",
        "lookup",
    }
    assert all(0 <= m["heldout"] <= 100 for m in methods.values())
    journal_lines = (run / "journal.jsonl").read_text().count("\n")

    # reuses the finished search
    assert main(["baselines", str(config), "--run-dir", str(run)]) == 0
    assert (run / "journal.jsonl").read_text().count("\n") == journal_lines
    assert json.loads((run / "baselines.json").read_text())["methods"] == methods  # deterministic

    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert (
        "naee" in report
        and (run / "fitness.png").stat().st_size > 0
        and (run / "methods.png").exists()
    )

    genome = tmp_path / "g.json"
    Genome.from_dict(summary["best_genome"]).save(genome)
    capsys.readouterr()
    out = tmp_path / "scores.json"
    assert main(["eval", str(config), "--genome", str(genome), "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["fitness"] == pytest.approx(summary["heldout"]["best"]["mean"])
    printed = capsys.readouterr().out
    assert f"toy + genome {genome}, test split" in printed and "fitness" in printed
    assert scores["examples"] == {"copy": 12, "reverse": 12, "shift": 12, "lookup": 12}
    assert main(["eval", str(config), "--genome", str(genome), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fitness"] == scores["fitness"]


def test_baselines_input_errors(tmp_path, capsys):
    def fails(data, message, run=None):
        argv = ["baselines", str(_write(tmp_path, data))] + (["--run-dir", str(run)] if run else [])
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

    budget = toy_config_dict()
    budget["search_space"] = {"kind": "prune", "budget": 12}
    fails(budget, "set search_space.keep, not budget")
    fails({**toy_config_dict(), "baselines": {"sweep": [1]}}, "baselines at 1 experts per layer")
    fails({**toy_config_dict(), "baselines": {"methods": ["magic"]}}, "baselines.methods.0")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text(
        yaml.safe_dump(parse_config(toy_config_dict(seed=99)).to_dict())
    )
    fails(toy_config_dict(), "holds a search of another config (search.seed: 99 -> 3)", run=other)
    assert not (other / "baselines.json").exists()


def test_moei2_rows_compare_at_equal_kept_parameters(tmp_path, capsys):
    """`eep baselines` on a MoE-I² config: its run first, then the rows at 4 experts' worth per
    layer: moei2 stage 1 alone (16 experts) and stage 1 at 20 experts + low-rank to 16's worth."""
    run = tmp_path / "run"
    sets = [
        "--set",
        "moei2.population=8",
        "--set",
        "moei2.generations=4",
        "--set",
        "baselines.calibration.size=48",
        "--set",
        "baselines.random_draws=2",
        "--set",
        "baselines.methods=[random, naee, moei2]",
    ]
    assert (
        main(["baselines", str(ROOT / "experiments/toy-moei2.yaml"), "--run-dir", str(run), *sets])
        == 0
    )
    methods = json.loads((run / "baselines.json").read_text())["methods"]
    # the run is the moei2 row
    assert set(methods) == {
        "full",
        "random",
        "naee",
        "moei2",
        "moei2+low-rank",
    }
    assert methods["moei2"]["kept_params"] == methods["naee"]["kept_params"]
    assert methods["moei2+low-rank"]["stage1_experts"] == 20
    assert (
        abs(methods["moei2+low-rank"]["kept_params"] / methods["naee"]["kept_params"] - 1) < 0.005
    )
    summary = json.loads((run / "summary.json").read_text())
    # same computation
    assert methods["moei2+low-rank"]["genome_key"] == Genome.from_dict(summary["best_genome"]).key
    assert methods["moei2+low-rank"]["heldout"] == pytest.approx(
        summary["stages"]["stage2"]["heldout"]["mean"]
    )
    assert main(["report", str(run)]) == 0
    assert "moei2+low-rank" in (run / "report.md").read_text()


def test_the_search_row_says_how_the_search_started():
    """A warm-started search's row names its warm start, as given or as ``eep search`` saved it
    (calibration-pass genomes become ``seeds/warm-<method>.json``); random starts say nothing."""
    from eep.compare import search_start, warm_started
    from eep.config import parse_config

    def start(**search):
        data = toy_config_dict(evaluations=10)
        data["search"].update(search)
        return search_start(parse_config(data))

    assert start() is None
    assert start(warm_start=["greedy", "naee"]) == "warm start: greedy, naee"
    saved = start(warm_start=["greedy"], seed_genomes=["seeds/warm-reap.json", "seeds/mine.json"])
    assert saved == "warm start: greedy, reap; 1 seed genome"
    data = toy_config_dict(evaluations=10)
    data["search"].update(warm_start=["greedy"], seed_genomes=["seeds/warm-reap.json"])
    assert warm_started(parse_config(data)) == ["greedy", "reap"]


def test_naee_skip_is_left_out_by_default_where_routing_is_not_top_2():
    from eep.compare import check_baselines, methods_for
    from eep.errors import EepError
    from eep.families import MoEShape

    top4 = MoEShape("olmoe", 16, 4, (0, 1, 2))
    default = parse_config({**toy_config_dict(), "search_space": {"keep": 8}})
    assert "naee+skip" in default.baselines.methods
    check_baselines(default, top4)  # the default list runs on any top-k
    assert methods_for(default, top4) == ["random", "frequency", "naee", "reap", "greedy"]
    top2 = MoEShape("mixtral", 8, 2, (0, 1, 2))
    assert "naee+skip" in methods_for(parse_config(toy_config_dict()), top2)
    named = parse_config(
        {**toy_config_dict(), "search_space": {"keep": 8}, "baselines": {"methods": ["naee+skip"]}}
    )
    with pytest.raises(EepError, match="needs a top-2 model, this one routes top-4; remove it"):
        check_baselines(named, top4)

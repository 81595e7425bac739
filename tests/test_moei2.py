import contextlib

import pytest
import torch

from eep import calibration
from eep.errors import EepError
from eep.genome import Genome
from eep.moe import adapter_for
from eep.moei2 import expert_importance, layer_keep_counts


def _ids():
    return torch.randint(0, 48, (4, 11), generator=torch.Generator().manual_seed(5))


def test_an_expert_whose_output_is_zero_has_no_importance(tiny_mixtral):
    with torch.no_grad():
        tiny_mixtral.model.layers[1].mlp.experts.down_proj[3].zero_()
    adapter = adapter_for(tiny_mixtral)
    cal = calibration.collect(
        tiny_mixtral, adapter, [{"input_ids": _ids()}], max_tokens_per_layer=1000
    )
    importance = expert_importance(cal)
    assert importance[1][3] == 0.0
    assert (importance[1][[0, 1, 2, 4, 5, 6, 7]] > 0).all() and (importance[0] > 0).all()


def test_rerouted_importance_is_the_real_output_change_of_pruning_that_expert(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    inputs = {}
    hook = adapter.blocks[2].register_forward_pre_hook(
        lambda m, args: inputs.__setitem__(2, args[0])
    )
    cal = calibration.collect(
        tiny_mixtral, adapter, [{"input_ids": _ids()}], max_tokens_per_layer=1000
    )
    hook.remove()
    importance = expert_importance(cal, reroute=True)
    for expert in (0, 5):
        genome = Genome.from_keep(8, 2, {2: [e for e in range(8) if e != expert]})
        with torch.no_grad():
            full = adapter.blocks[2](inputs[2])
            with adapter.applied(genome):
                pruned = adapter.blocks[2](inputs[2])
        assert float(importance[2][expert]) == pytest.approx(
            float(((full - pruned).double() ** 2).sum()), rel=1e-4
        )


@pytest.mark.parametrize(
    "sums, budget, low, high, expected",
    [
        # the 8 spare in proportion
        (
            {0: 1.0, 1: 3.0, 2: 0.0, 3: 4.0},
            16,
            2,
            8,
            {0: 3, 1: 5, 2: 2, 3: 6},
        ),
        # capped at 8; the rest goes to the other layer
        (
            {0: 10.0, 1: 0.0},
            12,
            2,
            8,
            {0: 8, 1: 4},
        ),
        # 3.33 each: largest remainder, lower layer first
        (
            {0: 1.0, 1: 1.0, 2: 1.0},
            10,
            2,
            8,
            {0: 4, 1: 3, 2: 3},
        ),
        ({0: 0.0, 1: 0.0}, 6, 2, 8, {0: 3, 1: 3}),  # nothing matters: an even split
    ],
)
def test_keep_counts_follow_layer_importance_within_bounds(sums, budget, low, high, expected):
    importance = {
        layer: torch.tensor([value / 4] * 4, dtype=torch.float64) for layer, value in sums.items()
    }
    counts = layer_keep_counts(importance, budget, low, high)
    assert counts == expected and sum(counts.values()) == budget


def test_an_impossible_budget_is_refused():
    with pytest.raises(EepError, match="a budget of 3 experts must lie in 4..16"):
        layer_keep_counts({0: torch.ones(8), 1: torch.ones(8)}, 3, 2, 8)


# -- stage 1: the KT receptive field ------------------------------------------------------------


def test_kt_search_finds_the_brute_force_optimum(tiny_mixtral):
    """All keep sets of layers 0 and 1 among experts 0..3 as candidates, one block of both layers:
    the KT choice equals the best of every combination scored independently (whole-model passes
    with a hook on layer 1's output)."""
    import itertools

    from eep.moe import decoder_layers
    from eep.moei2 import BlockScorer, kt_search

    adapter = adapter_for(tiny_mixtral)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding counts nowhere
    batches = [
        {"input_ids": ids[:2], "attention_mask": mask[:2]},
        {"input_ids": ids[2:], "attention_mask": mask[2:]},
    ]
    candidates = {
        0: [Genome.from_keep(8, 2, {0: s}) for s in itertools.combinations(range(4), 2)],
        1: [Genome.from_keep(8, 2, {1: s}) for s in itertools.combinations(range(4), 3)],
    }
    scorer = BlockScorer(tiny_mixtral, adapter, batches, [[0, 1]])
    chosen, report = kt_search(scorer, candidates)
    assert report == [{"layers": [0, 1], "combinations": 24, "error": report[0]["error"]}]

    outputs = {}
    hook = decoder_layers(tiny_mixtral)[1].register_forward_hook(
        lambda m, a, out: outputs.__setitem__("h", out)
    )

    def block_output(genome):
        with torch.no_grad(), adapter.applied(genome) if genome else contextlib.nullcontext():
            return [
                (tiny_mixtral(**b).logits, outputs["h"][b["attention_mask"].bool()])[1]
                for b in batches
            ]

    full = block_output(None)
    errors = {}
    for a, b in itertools.product(candidates[0], candidates[1]):
        genome = Genome.from_keep(8, 2, {0: a.keep(0), 1: b.keep(1)})
        errors[genome] = sum(
            float(((x - y).double() ** 2).sum()) for x, y in zip(block_output(genome), full)
        )
    hook.remove()
    best = min(errors, key=errors.get)
    assert chosen == best
    assert report[0]["error"] == pytest.approx(errors[best], rel=1e-4)
    assert len({f"{e:.4g}" for e in errors.values()}) > 10  # the case does discriminate


def test_blocks_are_consecutive_layers():
    from eep.moei2 import blocks_of

    assert blocks_of([0, 1, 2, 3, 4, 5, 6], 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert blocks_of([2, 4], 3) == [[2, 4]]


# -- the run: layer-wise searches on eep's engine -----------------------------------------------


def _toy_config(**moei2):
    from eep.config import load_config
    from tests.test_cli import ROOT

    overrides = [f"moei2.{k}={v}" for k, v in {"population": 8, "generations": 4, **moei2}.items()]
    return load_config(
        ROOT / "experiments/toy-moei2.yaml",
        ["baselines.calibration.size=48", "fitness.tasks.0.test_size=8", *overrides],
    )


def _journal(path):
    from eep.journal import RunDir

    return [(e.id, e.genome.key, e.fitness) for e in RunDir(path).evaluations()]


def test_a_stopped_stage_1_resumes_to_the_uninterrupted_result(tmp_path):
    from eep.evaluator import FitnessWorker
    from eep.journal import RunDir
    from eep.moe import shape_of
    from eep.moei2 import moei2_plan, run_moei2

    config = _toy_config()
    worker = FitnessWorker(config)
    plan = moei2_plan(config, shape_of(worker.model.config))
    quiet = lambda m: None  # noqa: E731
    whole = RunDir.create(tmp_path / "whole", config)
    expected = run_moei2(whole, config, worker, plan, quiet)
    stopped = RunDir.create(tmp_path / "stopped", config)
    assert run_moei2(stopped, config, worker, plan, quiet, stop_after=13) is None  # mid-search
    assert not stopped.summary_path.exists()
    assert (
        len(_journal(tmp_path / "stopped/stage1/layer-00"))
        + len(_journal(tmp_path / "stopped/stage1/layer-01"))
        == 13
    )
    assert run_moei2(stopped, config, worker, plan, quiet, stop_after=9) is None
    got = run_moei2(RunDir.open(tmp_path / "stopped"), config, worker, plan, quiet)
    for layer in plan.layers:
        name = f"stage1/layer-{layer:02d}"
        assert _journal(tmp_path / "stopped" / name) == _journal(tmp_path / "whole" / name)
    assert got["best_genome"] == expected["best_genome"] and got["blocks"] == expected["blocks"]
    assert got["stages"]["stage1"]["genome"] == expected["stages"]["stage1"]["genome"]
    counts = {int(i): n for i, n in expected["keep_counts"].items()}
    assert sum(counts.values()) == plan.stage1 == 20
    assert {
        i: len(Genome.from_dict(got["stages"]["stage1"]["genome"]).keep(i)) for i in counts
    } == counts


def test_moei2_search_then_export_is_smaller_than_stage_1_and_reports_both(tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from eep.cli import main
    from tests.test_cli import ROOT

    run, out = tmp_path / "run", tmp_path / "export"
    sets = [
        "--set",
        "moei2.population=8",
        "--set",
        "moei2.generations=4",
        "--set",
        "baselines.calibration.size=48",
        "--set",
        "moei2.factors=activation",
    ]
    assert (
        main(["search", str(ROOT / "experiments/toy-moei2.yaml"), "--run-dir", str(run), *sets])
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    stages = summary["stages"]
    assert set(stages) == {"stage1", "stage2"} and summary["method"] == "moei2"
    assert stages["stage2"]["heldout"]["kept_params"] < stages["stage1"]["heldout"]["kept_params"]
    assert all(0 <= s["heldout"]["mean"] <= 100 for s in stages.values())
    assert summary["heldout"]["best"] == stages["stage2"]["heldout"]
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert (
        "## MoE-I²" in report
        and "low-rank experts (activation-aware)" in report
        and "## Search" not in report
    )
    assert "- size: " in report and "experts' worth of parameters per MoE layer" in report
    assert "search space: prune" not in report and "1 combinations" not in report
    assert (
        "| moei2 stage 1 |" in report
        and "| moei2 stage 2 |" in report
        and "| search |" not in report
    )
    assert main(["export", str(run), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    report = json.loads((out / "eep_report.json").read_text())
    assert report["low_rank"] == "factors" and report["form"] == "custom"
    assert sum(p.numel() for p in model.parameters()) == report["parameters"]["after"]
    stage1 = Genome.from_dict(stages["stage1"]["genome"])
    stage1.save(tmp_path / "stage1.json")
    assert (
        main(
            [
                "export",
                "--model",
                "toy",
                "--genome",
                str(tmp_path / "stage1.json"),
                "--out",
                str(tmp_path / "stage1"),
            ]
        )
        == 0
    )
    stage1_report = json.loads((tmp_path / "stage1/eep_report.json").read_text())
    assert report["parameters"]["after"] < stage1_report["parameters"]["after"]
    # activation-aware factors travel with the genome: the run's scales are copied beside the export's
    assert (run / "eep_scales.safetensors").read_bytes() == (
        out / "eep_scales.safetensors"
    ).read_bytes()
    assert Genome.from_dict(summary["best_genome"]).scales is not None
    config = str(ROOT / "experiments/toy-moei2.yaml")
    assert (
        main(
            [
                "eval",
                config,
                "--genome",
                str(out / "eep_genome.json"),
                "--set",
                "fitness.tasks.0.test_size=4",
            ]
        )
        == 0
    )
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone/g.json").write_text((out / "eep_genome.json").read_text())
    capsys.readouterr()
    assert main(["eval", config, "--genome", str(tmp_path / "alone/g.json")]) == 2
    assert "need eep_scales.safetensors" in capsys.readouterr().err
    # resuming a finished run changes nothing
    before = (run / "summary.json").read_text()
    assert main(["resume", str(run)]) == 0
    assert (
        json.loads((run / "summary.json").read_text())["best_genome"]
        == json.loads(before)["best_genome"]
    )


def test_moei2_is_refused_where_it_cannot_work(tmp_path, capsys):
    from eep.cli import main
    from tests.test_cli import ROOT

    config = str(ROOT / "experiments/toy-moei2.yaml")
    assert main(["search", config, "--dry-run", "--set", "search_space.keep=1"]) == 2
    assert "MoE-I² size 4 experts must lie in 8..32" in capsys.readouterr().err
    assert main(["search", config, "--dry-run", "--set", "search_space.top_k=1"]) == 2
    assert "search_space.top_k and groups are EEP search settings" in capsys.readouterr().err
    assert main(["search", config, "--dry-run", "--workers", "2"]) == 2
    assert "run it without --workers" in capsys.readouterr().err
    assert main(["search", config, "--dry-run", "--set", "moei2.rank_params=0"]) == 2
    assert "moei2.rank_params" in capsys.readouterr().err


def test_loss_importance_is_the_next_token_loss_increase_of_removing_each_expert(tiny_mixtral):
    from eep.moei2 import loss_importance, next_token_loss

    adapter = adapter_for(tiny_mixtral)
    ids = _ids()
    batches = [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]
    # transformers' own loss (mean over the next-token positions of equal batches)
    with torch.no_grad():
        reference = (
            sum(
                float(tiny_mixtral(input_ids=b["input_ids"], labels=b["input_ids"]).loss)
                for b in batches
            )
            / 2
        )
    assert next_token_loss(tiny_mixtral, batches) == pytest.approx(reference, rel=1e-5)
    padded = {
        "input_ids": torch.cat([ids[:1], torch.zeros_like(ids[:1])], dim=1),
        "attention_mask": torch.cat([torch.ones_like(ids[:1]), torch.zeros_like(ids[:1])], dim=1),
    }
    # padding counts nowhere
    assert next_token_loss(tiny_mixtral, [padded]) == pytest.approx(
        next_token_loss(tiny_mixtral, [{"input_ids": ids[:1]}]), rel=1e-5
    )
    importance = loss_importance(tiny_mixtral, adapter, batches)
    base = next_token_loss(tiny_mixtral, batches)
    with adapter.applied(Genome.from_keep(8, 2, {2: [0, 1, 2, 3, 4, 5, 7]})):
        assert float(importance[2][6]) == pytest.approx(
            next_token_loss(tiny_mixtral, batches) - base, abs=1e-9
        )
    assert set(importance) == {0, 1, 2} and all((v != 0).any() for v in importance.values())


def test_a_moei2_genome_seeds_a_budget_search(tmp_path, capsys):
    """MoE-I²'s stage-1 genome is an ordinary non-uniform pruning genome: EEP's budget search can
    start from it (candidate 0), with the file copied into the run; a genome of another size is
    refused in one line before anything loads."""
    import json

    import yaml

    from eep.cli import main
    from eep.journal import RunDir
    from tests.conftest import toy_config_dict

    seed = Genome.from_keep(8, 2, {0: [3, 4], 1: [0, 2, 4, 5, 6, 7], 2: [4, 5, 6, 7], 3: range(8)})
    seed.save(tmp_path / "stage1.json")
    data = toy_config_dict(evaluations=8, initial=4, seed_genomes=["stage1.json"])
    data["search_space"] = {"kind": "prune", "budget": 20}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    # relative to the config
    assert main(["search", str(tmp_path / "cfg.yaml"), "--run-dir", str(run)]) == 0
    records = RunDir(run).evaluations()
    assert records[0].genome == seed and len({r.genome.key for r in records}) == 8
    assert Genome.load(run / "seeds/seed-0.json") == seed
    assert yaml.safe_load((run / "config.yaml").read_text())["search"]["seed_genomes"] == [
        "seeds/seed-0.json"
    ]
    (tmp_path / "stage1.json").unlink()  # the run does not need the original any more
    (run / "summary.json").unlink()
    (run / "state.json").unlink()  # forces a replay from the journal, seeds included
    assert main(["resume", str(run)]) == 0
    assert [r.genome.key for r in RunDir(run).evaluations()] == [r.genome.key for r in records]
    Genome.from_keep(8, 2, {i: range(4) for i in range(4)}).save(tmp_path / "uniform.json")
    data["search"]["seed_genomes"] = [str(tmp_path / "uniform.json")]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["search", str(tmp_path / "cfg.yaml"), "--run-dir", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert (
        "does not belong to this search's space: it keeps 16 experts in all; the budget is 20"
        in err
    )
    assert err.count("\n") == 1 and not (tmp_path / "other").exists()
    assert json.loads((run / "summary.json").read_text())["evaluations"] == 8


def test_layer_searches_are_eeps_loop_and_keep_their_digests():
    """A MoE-I² run's layer searches run EEP's loop on one layer (method eep, prune); their digest
    is what runs written before ``method:`` recorded, so those runs' layer journals resume."""
    from pathlib import Path

    from eep.config import load_config
    from eep.moei2 import layer_config

    config = load_config(Path(__file__).parents[1] / "experiments/toy-moei2.yaml")
    layer = layer_config(config, 0, 2)
    assert (layer.method, layer.search_space.kind, layer.search_space.keep) == ("eep", "prune", 2)
    assert layer.digest() == "f333503b7b3da7ae"  # measured with eep before the method key

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from eep.cli import main
from eep.genome import Genome
from eep.journal import RunDir
from eep.loop import starts
from search_spaces import PruneSpace
from tests.conftest import toy_config_dict

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, **changes):
    data = toy_config_dict()
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _fails(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("eep: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_dry_runs_of_shipped_experiments(capsys, tmp_path):
    assert (
        main(
            [
                "search",
                str(ROOT / "experiments/toy.yaml"),
                "--dry-run",
                "--run-dir",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "keep 4 of 8 per layer -> 2.401e+07 genomes" in out and "nothing was loaded" in out
    # the plan says what the search scores and how the export is picked
    assert "copy (16 search / 64 validation / 100 held-out)" in out
    assert "export       the best on validation examples among the 30 best by search fitness" in out
    # search.warm_start unset is auto: greedy elimination where it takes at most 40 % of the budget
    assert (
        "warm start   greedy elimination (168 of the 500 evaluations; search.warm_start: auto)"
        in out
    )
    # its 168 candidates fill search.initial (30): no random genomes follow them
    assert (
        "budget       500 evaluations (no random initial genomes: breeding starts from greedy "
        "elimination's), seed 0" in out
    )
    assert not (tmp_path / "r").exists()
    fewer = ["--set", "search.evaluations=300"]
    assert main(["search", str(ROOT / "experiments/toy.yaml"), "--dry-run", *fewer]) == 0
    out = capsys.readouterr().out
    assert (
        "warm start   none (search.warm_start: auto; greedy elimination would take 168 of the 300 "
        "evaluations, more than 40%)" in out
    )
    assert "budget       300 evaluations (30 random initial), seed 0" in out
    seeded = ["--set", "search.warm_start=[naee, reap]"]
    assert main(["search", str(ROOT / "experiments/toy.yaml"), "--dry-run", *seeded]) == 0
    assert "budget       500 evaluations (28 random initial)" in capsys.readouterr().out
    # unset, validation_size is auto: 64 examples, or what the source has left
    assert main(["search", str(ROOT / "experiments/toy-top1.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "copy (16 search / 64 validation / 100 held-out)" in out  # local: the real counts
    assert "export       the best on validation examples among the 30 best by search fitness" in out
    off = [arg for i in range(8) for arg in ("--set", f"fitness.tasks.{i}.validation_size=0")]
    assert main(["search", str(ROOT / "experiments/toy-top1.yaml"), "--dry-run", *off]) == 0
    out = capsys.readouterr().out
    assert "copy (16 search / 100 held-out)" in out
    assert (
        "export       the best by search fitness (validation examples, fitness.tasks[].validation_size"
        in out
    )
    assert main(["search", str(ROOT / "experiments/mixtral-8x7b-instruct.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "32 MoE layers, 8 experts, top-2" in out and "1.104e+59 genomes" in out
    assert "~86.99 GiB of weights per model copy" in out  # 46.7 B parameters in bf16
    # a hub dataset is not loaded before the run: its sizes are caps
    assert "squad (up to 200 search / up to 1000 held-out)" in out
    assert main(["search", str(ROOT / "experiments/mixtral-8x7b-moei2.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage 1 keeps 192 of 256 experts" in out and "keeping 0.667 of their parameters" in out
    assert "size 128 experts' worth" in out and "nothing was loaded" in out


@pytest.mark.parametrize(
    "name, family, plan",
    [
        # 30.5 B parameters
        (
            "qwen3-30b-a3b",
            "qwen3_moe, 48 MoE layers, 128 experts, top-8",
            "~56.87 GiB",
        ),
        ("olmoe-1b-7b", "olmoe, 16 MoE layers, 64 experts, top-8", "~12.89 GiB"),
        # layer 0 is dense
        (
            "deepseek-v2-lite",
            "deepseek_v2, 26 MoE layers, 64 experts, top-6",
            "~29.26 GiB",
        ),
        ("gpt-oss-20b", "gpt_oss, 24 MoE layers, 32 experts, top-4", "~38.96 GiB"),
        ("qwen1.5-moe-a2.7b", "qwen2_moe, 24 MoE layers, 60 experts, top-4", "~26.67 GiB"),
        ("glm-4.5-air", "glm4_moe, 45 MoE layers, 128 experts, top-8", "~199.03 GiB"),
        (
            "deepseek-v3",
            "deepseek_v3, 58 MoE layers, 256 experts, top-8",
            "16 in each of 8 expert groups",
        ),
    ],
)
def test_dry_runs_of_every_family_experiment(capsys, name, family, plan):
    """Each family's shipped experiment parses, sizes its search space and estimates its memory offline."""
    assert main(["search", str(ROOT / f"experiments/{name}.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert family in out and plan in out and "nothing was loaded" in out


def test_weight_estimate_counts_the_toys_parameters():
    from eep.config import ModelConfig
    from eep.model import estimate_bytes, load_hf_config

    cpu = ModelConfig(path="toy", device="cpu")
    assert estimate_bytes(load_hf_config(cpu), cpu) == 842_048 * 4  # float32 on CPU
    gpu = cpu.model_copy(update={"device": "cuda", "dtype": "auto"})
    assert estimate_bytes(load_hf_config(cpu), gpu) == 842_048 * 2  # bfloat16 on GPU


@pytest.mark.parametrize(
    "changes, overrides, message",
    [
        (
            {"search__evaluatons": 5},
            [],
            "search.evaluatons: unknown key; did you mean 'evaluations'? allowed here: seed, evaluations",
        ),
        (
            {"search__evaluations": "many"},
            [],
            "search.evaluations: Input should be a valid integer",
        ),
        ({"model__path": "/no/such/model"}, [], "model path /no/such/model does not exist"),
        ({"search_space__keep": 9}, [], "keep=9 but the model has only 8 experts"),
        ({"search_space__keep": 1}, [], "below the top_k=2 each token is routed to"),
        (
            {"search_space__keep": 2, "search_space__top_k": 3},
            [],
            "top_k=3 is above the model's top_k=2",
        ),
        (
            {"search_space__keep": 3, "search_space__top_k": 3},
            [],
            "top_k=3 is above the model's top_k=2",
        ),
        (
            {"search_space__budget": 7, "search_space__keep": None},
            [],
            "budget=7 must lie in 8..32: each of the 4 MoE layers keeps between top_k=2",
        ),
        (
            {"search_space__budget": 12, "search_space__keep": 3},
            [],
            "set either keep (experts per layer) or budget",
        ),
        ({"search_space__groups": 5}, [], "groups=5 but the model has only 4 MoE layers"),
        (
            {"search_space__budget": 12, "search_space__keep": None, "search_space__groups": 2},
            [],
            "budget and groups cannot be combined",
        ),
        (
            {"search_space__kind": "merge", "search_space__merge_after": 3},
            [],
            "merge_after (3) must be at least search.initial (6) and below search.evaluations (16)",
        ),
        (
            {},
            ["search.crossover_prob=2"],
            "search.crossover_prob: Input should be less than or equal to 1",
        ),
        ({}, ["search.seed"], "must look like section.key=value"),
        (
            {"search_space": None},
            [],
            "search_space: the section is empty; give its keys or remove it",
        ),
        ({"model": None}, [], "model: the section is empty; give its keys"),
        (  # a misspelt key is named, not the key it meant, which is then missing
            {},
            ["fitness.tasks.0={nmae: copy, dataset: 'toy:copy'}"],
            "fitness.tasks.0.nmae: unknown key; did you mean 'name'?",
        ),
        (  # inside what --set gave: blamed on --set (an option index as a number is taken)
            {},
            ["fitness.tasks.0.answer_map={A: yes}"],
            "--set fitness.tasks.0.answer_map.A: Input should be a valid string",
        ),
        ({}, ["fitness.tasks=[]"], "fitness.tasks: List should have at least 1 item"),
        (
            {},
            ["model.experts_implementation=grouped"],
            "model.experts_implementation: Input should be 'auto', ",
        ),
    ],
)
def test_config_errors_are_one_line_exit_2_and_write_nothing(
    capsys, tmp_path, changes, overrides, message
):
    argv = ["search", str(_config(tmp_path, **changes)), "--run-dir", str(tmp_path / "run")]
    for item in overrides:
        argv += ["--set", item]
    _fails(capsys, argv, message)
    assert not (tmp_path / "run").exists()


def test_bad_paths_and_models_fail_before_loading(capsys, tmp_path):
    """A model without MoE layers, and run / export paths that cannot be created: one line, exit 2,
    nothing loaded (no weights exist to load) or written."""
    from transformers import LlamaConfig

    # a config without weights
    LlamaConfig(
        num_hidden_layers=2,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        vocab_size=50,
    ).save_pretrained(tmp_path / "llama")
    _fails(
        capsys,
        [
            "search",
            str(_config(tmp_path, model__path=str(tmp_path / "llama"))),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        "model family 'llama' has no MoE layers",
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fails(
        capsys,
        ["search", str(_config(tmp_path)), "--run-dir", str(blocker / "run")],
        f"cannot create the run directory {blocker / 'run'}: {blocker} is a file, not a directory",
    )
    genome = tmp_path / "g.json"
    Genome.from_keep(8, 2, {i: [0, 1, 2, 3] for i in range(4)}).save(genome)
    _fails(
        capsys,
        ["export", "--model", "toy", "--genome", str(genome), "--out", str(blocker / "x" / "out")],
        "cannot create the export target",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "cfg.yaml", "g.json", "llama"]


def test_a_taken_run_directory_is_refused_before_the_plan(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "journal.jsonl").write_text("")
    args = ["search", str(_config(tmp_path)), "--run-dir", str(tmp_path / "run")]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "already exists and is not empty" in err and out == ""  # no plan above the error


def test_an_interrupt_names_the_run_to_resume(capsys, tmp_path, monkeypatch):
    import eep.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eep.api, "search", interrupted)
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(_config(tmp_path))]) == 130
    assert "a search continues with `eep resume runs/test`" in capsys.readouterr().err
    run = str(tmp_path / "elsewhere")
    assert main(["search", str(_config(tmp_path)), "--run-dir", run]) == 130
    assert f"`eep resume {run}`" in capsys.readouterr().err


def test_missing_config_file(capsys, tmp_path):
    _fails(capsys, ["search", str(tmp_path / "nope.yaml")], "does not exist")


def test_resume_of_a_non_run_directory(capsys, tmp_path):
    _fails(capsys, ["resume", str(tmp_path)], "is not an eep run directory")


def test_resume_refuses_a_run_another_process_is_writing(capsys, tmp_path):
    from eep.config import parse_config
    from eep.journal import RunDir

    run = RunDir.create(tmp_path / "run", parse_config(toy_config_dict()))
    with run.lock():
        _fails(capsys, ["resume", str(run.path)], "is in use by pid")
    assert not run.journal_path.exists()


def test_export_input_errors(capsys, tmp_path):
    genome = tmp_path / "g.json"
    Genome.from_keep(16, 2, {0: [0, 1, 2, 3]}).save(genome)
    _fails(
        capsys,
        ["export", "--model", "toy", "--genome", str(genome), "--out", str(tmp_path / "o")],
        "genome is for models with 16 experts per layer, this model has 8",
    )
    (tmp_path / "taken").mkdir()
    good = tmp_path / "good.json"
    Genome.from_keep(8, 2, {i: [0, 1, 2, 3] for i in range(4)}).save(good)
    _fails(
        capsys,
        ["export", "--model", "toy", "--genome", str(good), "--out", str(tmp_path / "taken")],
        "already exists",
    )
    assert not any((tmp_path / "taken").iterdir())
    _fails(capsys, ["export", "--out", str(tmp_path / "o")], "needs RUN_DIR")
    uneven = tmp_path / "uneven.json"
    Genome.from_keep(8, 2, {0: [0, 1, 2], 1: [0, 1, 2, 3, 4]}).save(uneven)
    _fails(
        capsys,
        [
            "export",
            "--model",
            "toy",
            "--genome",
            str(uneven),
            "--out",
            str(tmp_path / "o"),
            "--form",
            "stock",
        ],
        "cannot be a stock checkpoint: layers keep different numbers of experts",
    )
    assert not (tmp_path / "o").exists()


def test_search_shows_and_records_its_experts_implementation(capsys, tmp_path, monkeypatch):
    """The plan names the experts implementation before anything loads, summary.json records it,
    and one torch cannot run is refused in one line."""
    import torch

    from eep import model
    from eep.model import choose_experts

    chosen = choose_experts("auto", torch.device("cpu"), torch.float32)
    run = tmp_path / "run"
    argv = [
        "search",
        str(_config(tmp_path)),
        "--run-dir",
        str(run),
        "--set",
        "search.evaluations=2",
        "--set",
        "search.initial=2",
    ]
    assert main(argv) == 0
    assert f"experts      {chosen} (model.experts_implementation: auto)" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["experts_implementation"] == chosen
    monkeypatch.setattr(model, "grouped_mm_runs", lambda device, dtype: False)
    _fails(
        capsys,
        argv[:2]
        + [
            "--run-dir",
            str(tmp_path / "other"),
            "--set",
            "model.experts_implementation=grouped_mm",
        ],
        "model.experts_implementation is grouped_mm but torch",
    )
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_demo_search_resume_and_export_end_to_end(tmp_path):
    """The README's demo path in subprocesses: search (stopped by budget), resume, export, stock load."""
    run, out = tmp_path / "run", tmp_path / "pruned"
    cmd = [sys.executable, "-m", "eep"]
    common = [
        "--run-dir",
        str(run),
        "--set",
        "search.evaluations=60",
        "--set",
        "fitness.tasks.0.test_size=50",
    ]
    done = subprocess.run(
        cmd + ["search", str(ROOT / "experiments/toy.yaml"), *common],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "evals/s" in done.stderr and "held-out" in done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluations"] == 60
    assert summary["heldout"]["full"]["mean"] >= 90.0
    assert summary["heldout"]["best"]["mean"] >= 85.0  # random 4-of-8 keep sets average about 72
    # a finished run resumes to the same place without evaluating anything
    again = subprocess.run(
        cmd + ["resume", str(run)], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert again.returncode == 0, again.stderr
    assert len((run / "journal.jsonl").read_text().splitlines()) == 60

    done = subprocess.run(
        cmd + ["export", str(run), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_local_experts == 4
    ids = tokenizer(["reverse : a b c d ="], return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=6, do_sample=False)
    text = tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text == "d c b a"
    # picked on validation
    assert Genome.load(out / "eep_genome.json").to_dict() == summary["selected"]["genome"]


def test_warm_start_genomes_become_the_runs_seeds_and_greedy_spends_the_budget(capsys, tmp_path):
    """naee and reap come from one calibration pass and are evaluated right after greedy's 60
    journaled steps (keep 7 of 8 in 4 layers); the run's config says exactly what it did."""
    run = tmp_path / "run"
    argv = [
        "search",
        str(_config(tmp_path, search_space__keep=7)),
        "--run-dir",
        str(run),
        "--set",
        "search.warm_start=[naee, reap, greedy]",
        "--set",
        "search.evaluations=64",
        "--set",
        "search.initial=4",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "warm start   naee (one calibration pass), reap (one calibration pass), greedy elimination (60 of the "
        "64 evaluations)" in out
    )
    saved = yaml.safe_load((run / "config.yaml").read_text())["search"]
    assert saved["warm_start"] == ["greedy"] and set(saved["seed_genomes"]) <= {
        "seeds/warm-naee.json",
        "seeds/warm-reap.json",
    }
    rows = [json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines()]
    assert len(rows) == 64
    keys = [r["key"] for r in rows]
    # evaluated right after greedy, or already one of greedy's steps
    for name in saved["seed_genomes"]:
        assert Genome.load(run / name).key in keys[: 60 + len(saved["seed_genomes"])]
    # what a validation pick would judge besides the best: greedy's result and the warm starts
    space = PruneSpace(8, 2, (0, 1, 2, 3), 7)
    started = starts(RunDir(run), space)
    seeds = [Genome.load(run / name).key for name in saved["seed_genomes"]]
    assert [name for name, _ in started] == [
        "greedy elimination's result",
        *(f"{Path(n).stem.removeprefix('warm-')}'s genome" for n in saved["seed_genomes"]),
    ]
    assert [e.genome.key for _, e in started[1:]] == seeds and started[0][1].id < 60
    assert main(["report", str(run)]) == 0  # the report says what the search was seeded with
    warm = ", ".join(Path(n).stem.removeprefix("warm-") for n in saved["seed_genomes"])
    assert (
        f"- seed genomes, evaluated first: {len(seeds)} (calibration warm starts {warm})"
        in (run / "report.md").read_text()
    )
    assert main(["resume", str(run)]) == 0  # finished: nothing to do, nothing changes
    assert len((run / "journal.jsonl").read_text().splitlines()) == 64
    capsys.readouterr()
    _fails(
        capsys,
        argv[:2]
        + [
            "--run-dir",
            str(tmp_path / "small"),
            "--set",
            "search.warm_start=[greedy]",
            "--set",
            "search.evaluations=50",
        ],
        "search.warm_start greedy takes 60 evaluations at this size, and search.evaluations is 50",
    )
    _fails(
        capsys,
        argv[:2]
        + [
            "--run-dir",
            str(tmp_path / "budget"),
            "--set",
            "search.warm_start=[naee]",
            "--set",
            "search_space.budget=20",
            "--set",
            "search_space.keep=null",
        ],
        "greedy elimination needs a uniform pruning space",
    )


def test_validation_examples_pick_the_export_and_the_gap_is_reported(capsys, tmp_path):
    """With validation examples, the exported genome is the best of the top candidates on them (none
    of them searched on); summary, report and export follow that pick."""
    from eep.config import load_config
    from fitness.tasks import load_tasks

    cfg = _config(tmp_path)
    config = load_config(
        cfg,
        [
            "fitness.tasks="
            + json.dumps(
                [
                    {
                        "name": t,
                        "dataset": f"toy:{t}",
                        "search_size": 6,
                        "validation_size": 6,
                        "test_size": 12,
                    }
                    for t in ("copy", "reverse", "shift", "lookup")
                ]
            )
        ],
    )
    search, validation, test = (
        load_tasks(config.fitness.tasks, w) for w in ("search", "validation", "test")
    )
    assert [t.examples for t in search] == [
        t.examples for t in load_tasks(_no_validation(config), "search")
    ]
    prompts = [{e.prompt for e in t.examples} for t in (*search, *validation, *test)]
    assert all(not (a & b) for i, a in enumerate(prompts) for b in prompts[i + 1 :])  # disjoint
    run = tmp_path / "run"
    argv = [
        "search",
        str(cfg),
        "--run-dir",
        str(run),
        "--set",
        "search_space.keep=2",
        "--set",
        "search.select_top=5",
        "--set",
        "fitness.tasks=" + json.dumps(config.model_dump(mode="json")["fitness"]["tasks"]),
    ]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    chosen = summary["selected"]
    assert chosen["by"] == "validation" and len(chosen["candidates"]) == 5
    # the candidates race: one cut short of the best so far is None
    assert chosen["validation"] == max(v for v in chosen["candidates"].values() if v is not None)
    assert summary["generalisation_gap"] == pytest.approx(
        chosen["fitness"] - summary["heldout"]["best"]["mean"]
    )
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert f"- exported: candidate {chosen['id']}" in report and "generalisation gap" in report
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    exported = Genome.load(tmp_path / "out" / "eep_genome.json")
    assert exported.key == Genome.from_dict(chosen["genome"]).key


def test_the_pick_judges_greedy_eliminations_result_beside_the_best(capsys, tmp_path):
    """With a greedy warm start, the export is picked among the ``select_top`` best and greedy
    elimination's result, so it never scores below that on validation; summary and report say so."""
    tasks = [
        {"name": t, "dataset": f"toy:{t}", "search_size": 4, "validation_size": 4, "test_size": 4}
        for t in ("copy", "reverse", "rotate", "swap", "unshift", "unlookup")
    ]
    run = tmp_path / "run"
    sets = [
        "search_space.keep=2",
        "search.warm_start=[greedy]",
        "search.evaluations=300",
        "search.select_top=1",
        "search.seed=5",
        "fitness.tasks=" + json.dumps(tasks),
    ]
    argv = ["search", str(_config(tmp_path)), "--run-dir", str(run)]
    assert main(argv + [a for item in sets for a in ("--set", item)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    chosen = summary["selected"]
    greedy_id = max(
        (json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines()[:180]),
        key=lambda r: (not r.get("outside") and r["status"] == "ok", r["fitness"] or 0, -r["id"]),
    )["id"]
    assert greedy_id != summary["best_id"]
    assert chosen["starts"] == {str(greedy_id): "greedy elimination's result"}
    assert set(chosen["candidates"]) == {str(summary["best_id"]), str(greedy_id)}
    assert chosen["validation"] == max(v for v in chosen["candidates"].values() if v is not None)
    # here greedy's result beats the best by search fitness on validation (79.17 against 75.00)
    assert chosen["top"] == 1 and chosen["id"] == greedy_id
    assert (
        f"exported candidate {greedy_id}, greedy elimination's result, (search"
        in capsys.readouterr().err
    )
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert (
        f"- exported: candidate {greedy_id} (search fitness {chosen['fitness']:.2f}), greedy "
        "elimination's result, the best on the validation examples (79.17) among the 1 best by "
        f"search fitness, judged with what the search started from (candidate {greedy_id}, greedy "
        "elimination's result: validation 79.17)" in report
    )


def _no_validation(config):
    tasks = [t.model_copy(update={"validation_size": 0}) for t in config.fitness.tasks]
    return config.fitness.model_copy(update={"tasks": tasks}).tasks


def test_first_hour_messages(capsys, tmp_path):
    """--version; a misspelt key gets the closest allowed one, and a bad --set value is blamed on --set."""
    from eep import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"eep {__version__}"
    argv = ["search", str(_config(tmp_path)), "--run-dir", str(tmp_path / "r"), "--dry-run"]
    _fails(
        capsys,
        argv + ["--set", "search.evaluatons=5"],
        "--set search.evaluatons: unknown key; did you mean 'evaluations'?",
    )
    _fails(
        capsys,
        argv + ["--set", "search.evaluations=0"],
        "--set search.evaluations: Input should be greater",
    )
    # an override written as torchtune's recipes take it: pointed to --set
    with pytest.raises(SystemExit):
        main(argv + ["search.evaluations=5"])
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "unrecognized arguments: search.evaluations=5; a config override goes after --set: "
            "--set search.evaluations=5"
        )
    )
    # KEY VALUE as two words
    with pytest.raises(SystemExit):
        main(argv + ["--set", "search.evaluations", "5"])
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "unrecognized arguments: 5; --set takes KEY=VALUE as one word: --set search.evaluations=5"
        )
    )
    assert not (tmp_path / "r").exists()


def test_threads_are_applied_and_shown_in_the_plan(capsys, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        argv = [
            "search",
            str(_config(tmp_path)),
            "--run-dir",
            str(tmp_path / "r"),
            "--dry-run",
            "--threads",
            "2",
        ]
        assert main(argv) == 0 and torch.get_num_threads() == 2
        assert "2 torch thread(s) here (--threads)" in capsys.readouterr().out
        from eep.model import DEFAULT_THREADS

        assert main(argv[:-2]) == 0 and torch.get_num_threads() == DEFAULT_THREADS
        _fails(capsys, argv[:-1] + ["0"], "--threads must be at least 1, got 0")
    finally:
        torch.set_num_threads(before)


def test_a_ray_run_resumes_serially_and_its_plan_counts_the_candidates_in_flight(capsys, tmp_path):
    from eep.config import parse_config
    from eep.journal import RunDir

    argv = ["search", str(_config(tmp_path)), "--dry-run", "--workers", "2"]
    assert main(argv) == 0
    assert "2 candidate(s) in flight, one per actor" in capsys.readouterr().out
    _fails(capsys, [*argv, "--serial"], "--serial evaluates in this process: drop --workers")
    # a run its config says to evaluate on Ray, resumed in this process
    data = toy_config_dict(evaluations=6, initial=4)
    data["evaluator"] = {"kind": "ray", "workers": 2}
    data["search"]["in_flight"] = 2
    run = RunDir.create(tmp_path / "ray-run", parse_config(data))
    assert main(["resume", str(run.path), "--serial"]) == 0
    assert RunDir.open(run.path).summary()["evaluations"] == 6
    assert "actor" not in capsys.readouterr().err  # no Ray actors were started


def test_finished_unfinished_and_existing_runs(capsys, tmp_path):
    """An unfinished search exports with a warning and says so in the model card; a finished one
    resumes to nothing; --resume-if-exists continues a stopped run instead of refusing it."""
    run = tmp_path / "run"
    argv = [
        "search",
        str(_config(tmp_path)),
        "--run-dir",
        str(run),
        "--set",
        "search.evaluations=8",
        "--set",
        "search.initial=4",
    ]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    lines = (run / "journal.jsonl").read_text().splitlines()
    (run / "journal.jsonl").write_text("\n".join(lines[:5]) + "\n")  # as if stopped after 5
    (run / "summary.json").write_text(json.dumps({**summary, "evaluations": 5}))
    (run / "state.json").unlink()
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "early")]) == 0
    assert "stopped at 5 of 8 evaluations" in capsys.readouterr().err
    assert (
        "5 of 8 planned evaluations — **the search was stopped"
        in (tmp_path / "early" / "README.md").read_text()
    )
    assert main(argv + ["--resume-if-exists"]) == 0  # continues it: 8 evaluations, nothing twice
    assert len((run / "journal.jsonl").read_text().splitlines()) == 8
    assert "done: 8 evaluations (3 in this session, " in capsys.readouterr().err
    capsys.readouterr()
    assert main(["resume", str(run)]) == 0
    assert (
        "is finished (8 of 8 evaluations, held-out scored); nothing to do"
        in capsys.readouterr().err
    )
    _fails(
        capsys,
        argv[:-4] + ["--set", "search.seed=9", "--resume-if-exists"],
        "holds a run of another config",
    )


def test_toy_build_never_writes_over_the_packaged_model_unasked(capsys, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    _fails(
        capsys, ["toy", "build", "--out", str(tmp_path / "full")], "already exists and is not empty"
    )
    _fails(
        capsys,
        ["toy", "build", "--out", str(tmp_path / "o"), "--replace-packaged"],
        "give --out or --replace-packaged, not both",
    )


def test_a_model_without_tokenizer_or_config_fails_in_one_line(capsys, tmp_path, tiny_mixtral):
    genome = tmp_path / "g.json"
    Genome.from_keep(8, 2, {i: [0, 1, 2, 3] for i in range(3)}).save(genome)
    # as save_pretrained of a model alone writes
    tiny_mixtral.save_pretrained(tmp_path / "weights-only")
    capsys.readouterr()
    _fails(
        capsys,
        [
            "export",
            "--model",
            str(tmp_path / "weights-only"),
            "--genome",
            str(genome),
            "--out",
            str(tmp_path / "out"),
        ],
        "has no usable tokenizer",
    )
    assert not (tmp_path / "out").exists()
    _fails(
        capsys,
        [
            "search",
            str(_config(tmp_path)),
            "--dry-run",
            "--set",
            "model.path=nobody-here/no-such-moe",
        ],
        "cannot read the config of model 'nobody-here/no-such-moe': the hub is off (HF_HUB_OFFLINE is set)",
    )


def test_progress_in_a_log_reports_done_total_rate_and_time_left():
    from eep.progress import Progress, tracked

    lines = []
    assert list(tracked(range(3), "scoring", lines.append, every=0.0)) == [0, 1, 2]
    assert (
        len(lines) == 3
        and lines[-1].startswith("[eep] scoring: 3/3, ")
        and lines[-1].endswith("~0s left")
    )
    lines.clear()
    progress = Progress("greedy", 10, lines.append, every=3600.0)
    progress.step(4)
    progress.step(6)
    assert lines == []  # a step quicker than the interval says nothing
    progress = Progress("held-out", 2, lines.append, every=0.05)
    progress.step()
    time.sleep(0.06)
    progress.step()
    assert len(lines) == 1 and lines[0].startswith("[eep] held-out: 2/2")


def test_max_params_takes_counts_as_people_write_them(capsys, tmp_path):
    from eep.cli import parameter_count

    for text, count in [
        ("450000", 450_000),
        ("450_000", 450_000),
        ("450k", 450_000),
        ("1.2M", 1_200_000),
        ("4.1M", 4_100_000),
        ("30B", 30 * 10**9),
    ]:
        assert parameter_count(text) == count
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path), "--max-params", "1.5", "--out", str(tmp_path / "o")])
    assert "'1.5' is not a parameter count: give a whole number, e.g. 450000, 450k or 1.2M" in (
        capsys.readouterr().err
    )


def test_no_tqdm_bars_when_stderr_is_a_log(capsys, tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    assert main(["search", str(_config(tmp_path)), "--dry-run"]) == 0  # stderr is captured here
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main(["search", str(_config(tmp_path)), "--dry-run"]) == 0
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ  # a terminal keeps its bars

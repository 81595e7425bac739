import json

import pytest

from eep.bench import GOALS, markdown, run_bench


@pytest.mark.slow
def test_bench_measures_everything_and_writes_json_and_markdown(tmp_path):
    """A minimal `eep bench` on the toy (no Ray rows here; the Ray evaluator has its own tests):
    every figure is measured, the rebuilt models score exactly as eep's in-place genomes (else it
    raises), and the exports are smaller."""
    result = run_bench(
        "toy",
        tmp_path / "b",
        device="cpu",
        repeats=1,
        evaluations=6,
        rebuild_genomes=2,
        ray=False,
        cut_evaluations=40,
        log=lambda m: None,
    )
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in (
        "apply_fraction_prune",
        "apply_fraction_merge",
        "speedup_vs_rebuild",
        "reevaluations",
        "busy_fraction",
        "export_speedup",
    ):
        assert key in saved
    assert 0 < saved["apply_fraction_prune"] < 1 and 0 < saved["apply_fraction_merge"] < 1
    assert (
        saved["speedup_vs_rebuild"] > 0
        and saved["reevaluations"] == 0
        and saved["busy_fraction"] is None
    )
    assert saved["search"]["serial"]["evaluations"] == 6
    full, pruned, top1 = saved["export"].values()
    assert (
        full["parameters"] == 842_048
        and pruned["parameters"] == top1["parameters"] < full["parameters"]
    )
    assert pruned["disk_bytes"] < full["disk_bytes"]
    assert set(saved["export_speedup"]) == {"keep 4 of 8", "keep 4 of 8, top-1"}
    # no Ray rows, no GPU
    assert set(saved["goals"]) == set(GOALS) - {
        "busy_fraction",
        "roofline_ratio",
    }
    scoring, cut = saved["scoring"], saved["cut"]
    assert (
        scoring["examples_differing"] == 0
        and scoring["forced_examples"] == scoring["examples"] == 128
    )
    assert saved["tf_speedup"] == scoring["tf_speedup"] > 0 and scoring["roofline_ratio"] > 0
    # one forward call over all 128 examples (batch 128) settles the toy: its rows x widest row
    assert scoring["forward_passes"] == 1 and scoring["forward_tokens"] % 128 == 0
    # generation: a prefill, then a decode step of one position per prompt
    assert scoring["generated_forward_passes"] > 1 and scoring["generated_forward_tokens"] > 128
    assert scoring["compute_bound_speedup"] == pytest.approx(
        scoring["generated_forward_tokens"] / scoring["forward_tokens"]
    )
    assert 0 < scoring["evaluation_roofline_s"] < scoring["teacher_forced_s"]
    assert saved["roofline_ratio"] is None and saved["experts_implementation"]
    assert (
        cut["keep"] == 2 and cut["cut"] > 0 and saved["cut_saved_fraction"] == cut["saved_fraction"]
    )
    text = (tmp_path / "b" / "bench.md").read_text()
    assert (
        text == markdown(saved) and "rebuild per candidate" in text and "keep 4 of 8, top-1" in text
    )
    assert "teacher-forced vs generated" in text and "early cut" in text and "roofline" in text
    assert "token positions computed per evaluation" in text


def test_bench_refuses_an_output_path_that_is_a_file(tmp_path, capsys):
    from eep.cli import main

    (tmp_path / "f").write_text("")
    assert main(["bench", "--out", str(tmp_path / "f")]) == 2
    assert "is a file; give a directory" in capsys.readouterr().err


def test_every_name_the_benchmark_scripts_import_exists():
    """The scripts under benchmarks/ import lazily, inside functions; a rename in eep must not leave
    one failing only when it is run (search_quality.py once imported a helper the CLI had lost)."""
    import ast
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ours = ("eep", "fitness", "search_spaces", "benchmarks")
    missing = []
    for script in sorted((root / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
                continue
            if node.module.split(".")[0] not in ours:
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{script.name}:{node.lineno} {node.module}.{alias.name}")
    assert not missing


def test_search_quality_gives_a_variant_with_other_search_examples_its_own_worker():
    """A --variant that changes the search examples must not be searched on the shared worker's
    (it once was, and its rows repeated the default's); one without validation shares it."""
    from pathlib import Path

    from benchmarks.search_quality import EEP_SCHEME, _every_task, _shares_examples, _with_tasks
    from eep.config import load_config

    toy = Path(__file__).resolve().parents[1] / "experiments/toy.yaml"
    base = load_config(toy)
    assert _shares_examples(base, base)
    assert _shares_examples(_with_tasks(load_config(toy, EEP_SCHEME), validation_size=0), base)
    assert not _shares_examples(load_config(toy, ["fitness.tasks.0.search_size=32"]), base)
    assert not _shares_examples(_with_tasks(base, validation_size=8), base)
    assert _with_tasks(base, test_size=1000).fitness.tasks[3].test_size == 1000
    every = _every_task(["fitness.tasks.*.search_size=32", "search.seed=3"], 8)
    assert not _shares_examples(load_config(toy, every), base)
    assert {t.search_size for t in load_config(toy, every).fitness.tasks} == {32}


def test_figures_keep_their_digits_from_a_toy_to_mixtral_width():
    """The roofline rows print a 3 MiB toy and a 22 GiB model alike (not "0.00 GiB")."""
    from eep.bench import _scaled

    assert _scaled(3.2e6, "B", 1024) == "3.05 MiB" and _scaled(23.2e9, "B", 1024) == "21.61 GiB"
    assert _scaled(1.2e6, "FLOP") == "1.20 MFLOP" and _scaled(7.75e14, "FLOP/s") == "775.00 TFLOP/s"
    assert _scaled(512, "B", 1024) == "512.00 B"


def test_the_quality_benchmarks_size_cells_by_the_models_experts(capsys):
    """2, 3 and 4 of 8 are shares of a model's experts: 32, 48 and 64 of Qwen3-30B-A3B's 128; a
    size the model cannot keep is said and skipped (no model weights are read)."""
    from pathlib import Path

    from benchmarks.search_quality import keeps_for

    root = Path(__file__).resolve().parents[1] / "experiments"
    assert keeps_for(root / "toy.yaml", None) == [2, 3, 4]
    assert keeps_for(root / "toy.yaml", None, (1 / 4, 3 / 4)) == [2, 6]
    assert keeps_for(root / "qwen3-30b-a3b.yaml", None) == [32, 48, 64]
    assert keeps_for(root / "toy.yaml", [1, 3, 8]) == [3]
    err = capsys.readouterr().err
    assert "keep 1 skipped (its model keeps 2..7 of 8 experts a layer)" in err and "keep 8" in err

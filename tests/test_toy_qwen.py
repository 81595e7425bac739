import json
import random
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eep import toy, toy_qwen
from eep.cli import main
from eep.config import TaskConfig
from eep.errors import EepError
from eep.genome import Genome
from eep.journal import RunDir
from eep.model import resolve_path
from fitness import toy_qwen_tasks
from fitness.tasks import check_tasks, load_tasks
from tests.conftest import toy_accuracy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_qwen_model():
    model = AutoModelForCausalLM.from_pretrained(toy_qwen.TOY_QWEN_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy_qwen.TOY_QWEN_DIR)
    return model, tokenizer


def _sets():
    data = json.loads((toy_qwen.TOY_QWEN_DIR / "eep_toy.json").read_text())
    return [{t: tuple(e) for t, e in layer.items()} for layer in data["expert_sets"]]


def test_toy_qwen_is_a_stock_qwen3_moe(toy_qwen_model):
    model, tokenizer = toy_qwen_model
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and resolve_path("toy-qwen") == str(
        toy_qwen.TOY_QWEN_DIR
    )
    assert (
        model.config.num_experts == 8
        and model.config.num_experts_per_tok == 2
        and model.config.norm_topk_prob
    )
    ids = tokenizer("sort : c a f b =")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "sort", ":", "c", "a", "f", "b", "="]
    out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    assert tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True) == "a b c f"


def test_tasks_and_splits():
    solve = toy_qwen_tasks.solve
    assert solve("ends", list("abcd")) == list("dbca") and solve("count", list("abcab")) == ["five"]
    assert solve("skip", list("abcde")) == list("ace") and solve("atbash", list("apc")) == list(
        "pan"
    )
    assert solve("max", list("cjb")) == ["j"] and solve("sort", list("cab")) == list("abc")
    assert solve("flip", list("abcp")) == list("bado") and solve("halve", list("abcp")) == list(
        "aabh"
    )
    for task in toy_qwen_tasks.TASKS:
        search, test = (toy_qwen_tasks.examples(task, s, 40) for s in ("search", "test"))
        assert not {e.prompt for e in search} & {e.prompt for e in test}
        assert all(len(e.answer.split()) <= 6 for e in test)
    tasks = load_tasks([TaskConfig(name="s", dataset="toyq:sort", search_size=3)], "search")
    assert [e.prompt for e in tasks[0].examples] == [
        e.prompt for e in toy_qwen_tasks.examples("sort", "search", 3)
    ]
    with pytest.raises(EepError, match="unknown toy task 'toyq:copy'; available: toyq:sort"):
        check_tasks([TaskConfig(name="c", dataset="toyq:copy")])
    with pytest.raises(EepError, match="unknown split 'validation'"):
        check_tasks([TaskConfig(name="s", dataset="toyq:sort", search_split="validation")])


def test_structure_has_trade_offs_at_every_size():
    """Solo layers give two tasks one expert each; 5 experts cover every task in every layer; at 4
    only the one task solo in both solo layers can be given up everywhere; 3 and 2 lose more."""
    sets = toy_qwen.expert_sets(seed=0)
    for i, layer in enumerate(sets):
        uses = sorted(e for experts in layer.values() for e in experts)
        assert sorted(set(uses)) == list(range(8))  # every expert serves a task
        assert len(toy_qwen.solo_tasks(layer)) == (2 if i % 2 else 0)
        assert all(not lost for lost in toy.covers(layer, 5).values())
        # 4 never cover every task
        assert all(len(lost) == 1 for lost in toy.covers(layer, 4).values())
    both = set.intersection(*(toy_qwen.solo_tasks(layer) for layer in sets[1::2]))
    assert [len(toy_qwen.best_genome(sets, k)[1]) for k in (5, 4, 3, 2)] == [0, 1, 3, 5]
    genome, lost = toy_qwen.best_genome(sets, 4)
    assert lost == both and all(len(genome.keep(i)) == 4 for i in range(4))
    # the shipped model was built from seed 0
    assert toy_qwen.expert_sets(seed=0) == sets and _sets() == sets


def test_toy_qwen_separation_on_held_out_data(toy_qwen_model):
    """The full model solves the tasks; random 4-of-8 keep sets lose a lot; covering keep sets of 5
    lose (almost) nothing; the best structured 4-of-8 keep set loses about one task."""
    accuracy = toy_accuracy(*toy_qwen_model, toy_qwen_tasks)
    rng = random.Random(0)
    sets = _sets()
    full = accuracy()
    random_mean = statistics.mean(
        accuracy(Genome.from_keep(8, 2, {i: rng.sample(range(8), 4) for i in range(4)}))
        for _ in range(8)
    )
    assert full >= 95.0
    assert random_mean <= full - 15.0
    assert accuracy(toy.covering_genome(sets, 8, 2, rng)) >= full - 5.0
    assert accuracy(toy_qwen.best_genome(sets, 4)[0]) >= full * 7 / 8 - 5.0


def test_search_on_toy_qwen_runs_through_the_cli(tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "search",
                str(ROOT / "experiments/toy-qwen.yaml"),
                "--run-dir",
                str(run),
                "--set",
                "search.evaluations=4",
                "--set",
                "search.initial=4",
            ]
        )
        == 0
    )
    evaluations = RunDir.open(run).evaluations()
    assert len(evaluations) == 4 and not any(e.failed for e in evaluations)
    assert all(len(e.genome.keep(i)) == 4 for e in evaluations for i in range(4))
    heldout = RunDir.open(run).summary()["heldout"]
    assert (
        set(heldout["best"]["scores"]) == set(toy_qwen_tasks.TASKS)
        and heldout["full"]["mean"] >= 95.0
    )

import json
import random
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eep import toy
from eep.genome import Genome
from fitness import toy_tasks
from fitness.generation import greedy_generate
from tests.conftest import toy_accuracy


@pytest.fixture(scope="module")
def toy_model():
    model = AutoModelForCausalLM.from_pretrained(toy.TOY_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy.TOY_DIR)
    return model, tokenizer


def test_toy_is_a_stock_hugging_face_model(toy_model):
    model, tokenizer = toy_model
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 8 and model.config.num_experts_per_tok == 2
    ids = tokenizer("shift : a b c =")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "shift", ":", "a", "b", "c", "="]
    out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    assert tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True) == "b c d"


def test_left_padded_batches_generate_like_single_prompts(toy_model):
    model, tokenizer = toy_model
    prompts = ["copy : a b c =", "lookup : p o n m l k =", "reverse : d e f g ="]
    batched = greedy_generate(model, tokenizer, prompts, batch_size=3, max_new_tokens=8)
    single = [
        greedy_generate(model, tokenizer, [p], batch_size=1, max_new_tokens=8)[0] for p in prompts
    ]
    assert batched == single
    assert batched[0] == "a b c" and batched[2] == "g f e d"


def test_toy_separation_on_held_out_data(toy_model):
    """The property the toy exists for: the full model solves the tasks; random 4-of-8 keep sets
    lose a lot; 5 experts holding one of every task's pair lose (almost) nothing; at 4 of 8,
    losing the same task in every layer keeps the other seven."""
    accuracy = toy_accuracy(*toy_model, toy_tasks)
    rng = random.Random(0)
    full = accuracy()
    random_mean = statistics.mean(
        accuracy(Genome.from_keep(8, 2, {i: rng.sample(range(8), 4) for i in range(4)}))
        for _ in range(12)
    )
    pairs = [
        {t: tuple(p) for t, p in layer.items()}
        for layer in json.loads((toy.TOY_DIR / "eep_toy.json").read_text())["expert_pairs"]
    ]
    covering = min(accuracy(toy.covering_genome(pairs, 8, 2, rng)) for _ in range(3))
    assert full >= 90.0
    assert random_mean <= full - 15.0
    assert covering >= full - 5.0
    sacrifices = {
        t: g for t in toy_tasks.TASKS if (g := toy.sacrificing_genome(pairs, t, 8, 2)) is not None
    }
    assert len(sacrifices) >= 2
    assert min(accuracy(g) for g in list(sacrifices.values())[:2]) >= full * 7 / 8 - 5.0


@pytest.mark.slow
def test_toy_build_is_deterministic(tmp_path):
    a = toy.train(tmp_path / "a", seed=1, steps=30, log=lambda m: None)
    b = toy.train(tmp_path / "b", seed=1, steps=30, log=lambda m: None)
    assert a == b
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert reloaded.config.num_local_experts == 8


def test_task_graph_needs_five_experts_and_four_lose_one_task():
    pairs = toy.expert_pairs(seed=0, num_layers=4)
    for layer in pairs:
        uses = sorted(e for pair in layer.values() for e in pair)
        assert sorted(set(uses)) == list(range(8)) and len(uses) == 16  # every expert serves a task
        # 5 experts can hold every task
        assert all(not lost for lost in toy.covers(layer, 5).values())
        four = toy.covers(layer, 4)
        assert len(four) > 0 and all(len(lost) == 1 for lost in four.values())  # 4 always lose one
        assert len({lost for lost in four.values()}) == 7  # any task but the bridge's
    genome = toy.covering_genome(pairs, 8, 2, random.Random(0))
    for i, layer in enumerate(pairs):
        assert len(genome.keep(i)) == 5 and all(
            set(pair) & set(genome.keep(i)) for pair in layer.values()
        )
    for task in toy_tasks.TASKS:
        sacrifice = toy.sacrificing_genome(pairs, task, 8, 2)
        if sacrifice is not None:
            for i, layer in enumerate(pairs):
                assert [
                    t for t, pair in layer.items() if not set(pair) & set(sacrifice.keep(i))
                ] == [task]

"""fitness.metrics: the text comparisons and the weighted fitness."""

from types import SimpleNamespace

import pytest

from fitness.metrics import METRICS, cut_at_stop, generation_score, token_f1, weighted_fitness


def test_generation_metrics():
    assert generation_score("exact_match", " b  a ", ["b a"]) == 1.0
    assert generation_score("exact_match", "b a c", ["b a"]) == 0.0
    assert generation_score("contains", "It was Paris.\nMore text", ["Paris", "France"]) == 1.0
    assert generation_score("contains", "Lyon\nParis", ["Paris"]) == 0.0
    assert generation_score("first_capital", "the answer is B. No", ["B"]) == 1.0
    assert generation_score("first_capital", "A, surely", ["B"]) == 0.0
    # SQuAD F1: "the" and punctuation are dropped; 2 of 3 predicted tokens match 2 of 2 gold tokens
    assert token_f1("The Eiffel tower, Paris!", "eiffel tower") == pytest.approx(
        2 * (2 / 3) * 1 / (2 / 3 + 1)
    )
    assert generation_score(
        "f1", "Denver Broncos", ["Broncos", "Denver Broncos team"]
    ) == pytest.approx(0.8)
    # both empty after normalisation
    assert token_f1("", "x") == 0.0 and token_f1("the", "a") == 1.0
    assert cut_at_stop("Paris\nQuestion: next", ["\n", "Question"]) == "Paris"
    assert cut_at_stop("abc", []) == "abc"


def test_weighted_fitness_negates_losses():
    tasks = [
        SimpleNamespace(name="acc", metric="exact_match", weight=2.0),
        SimpleNamespace(name="ppl", metric="perplexity", weight=1.0),
    ]
    assert weighted_fitness(tasks, {"acc": 60.0, "ppl": 3.0}) == pytest.approx((120.0 - 3.0) / 3)
    assert {m.kind for m in METRICS.values()} == {"generate", "choice", "text"}

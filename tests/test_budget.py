import math
import random
from itertools import product

import pytest

from search_spaces import BudgetSpace, crossover_budget, mutate_budget, random_budget_genome

SPACE = BudgetSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), budget=16)


def _valid(genome, space=SPACE):
    counts = [len(genome.keep(i)) for i in space.layers]
    assert sum(counts) == space.budget
    assert all(space.min_keep <= n <= space.num_experts for n in counts)
    return counts


def test_random_genomes_spend_the_budget_unevenly():
    rng = random.Random(0)
    counts = [tuple(_valid(random_budget_genome(SPACE, rng))) for _ in range(200)]
    assert len(set(counts)) > 20 and (4, 4, 4, 4) in counts


@pytest.mark.parametrize("move_prob", [0.0, 0.5, 1.0])
def test_mutation_keeps_the_budget_exact_and_always_changes(move_prob):
    rng = random.Random(1)
    moved = 0
    for _ in range(300):
        parent = random_budget_genome(SPACE, rng)
        child = mutate_budget(
            parent, rng, SPACE, layer_prob=0.25, swap_prob=0.15, move_prob=move_prob
        )
        assert child != parent
        moved += _valid(child) != _valid(parent)
    # without moves only a genome whose touched layers are all full moves an expert to change at all
    assert {0.0: moved < 15, 0.5: 100 < moved < 200, 1.0: moved > 250}[move_prob], moved


def test_crossover_keeps_the_budget_exact():
    rng = random.Random(2)
    for _ in range(300):
        a, b = random_budget_genome(SPACE, rng), random_budget_genome(SPACE, rng)
        child = crossover_budget(a, b, rng, SPACE, layer_prob=0.5)
        _valid(child)
        for i in SPACE.layers:
            assert set(child.keep(i)) <= set(range(8))


def test_extreme_budgets_and_top1():
    full = BudgetSpace(8, 2, (0, 1), budget=16)
    assert random_budget_genome(full, random.Random(0)).keep(1) == tuple(range(8))
    top1 = BudgetSpace(8, 2, (0, 1, 2), budget=4, active=1)
    rng = random.Random(3)
    for _ in range(100):
        g = mutate_budget(random_budget_genome(top1, rng), rng, top1, 0.25, 0.15, 0.5)
        assert _valid(g, top1) and all(g.active(i) == 1 for i in top1.layers)


def test_size_counts_the_genomes_with_exactly_the_budget():
    small = BudgetSpace(4, 1, (0, 1), budget=3, active=1)
    brute = sum(
        math.comb(4, a) * math.comb(4, b) for a, b in product(range(1, 5), repeat=2) if a + b == 3
    )
    assert small.size() == brute == 2 * 4 * 6

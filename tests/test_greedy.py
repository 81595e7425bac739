"""Greedy elimination: the evaluations it asks for, and what it finds on fitnesses it can solve."""

import itertools

import pytest

from eep import greedy
from eep.errors import EepError
from search_spaces import BudgetSpace, PruneSpace, layer_groups


def _value(genome):
    """An additive fitness: each kept expert e of layer i is worth (e * 7 + i * 3) % 11."""
    return sum((e * 7 + i * 3) % 11 for i, keep in genome.keep_map().items() for e in keep)


@pytest.mark.parametrize("keep", [2, 3, 4, 8])
def test_greedy_asks_for_its_stated_cost_and_solves_an_additive_fitness(keep):
    space = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2), keep=keep)
    asked = []

    def score(genomes):
        asked.extend(genomes)
        return [float(_value(g)) for g in genomes]

    genome, fitness, spent = greedy.run(greedy.steps(space), score)
    assert spent == len(asked) == greedy.cost(space)
    assert space.reject(genome) is None and fitness == _value(genome)
    best = (
        max(
            _value(space.genome({i: c for i in space.layers}))  # layers are independent here
            for c in itertools.combinations(range(8), keep)
        )
        if keep == 8
        else None
    )
    per_layer = [
        max(sum((e * 7 + i * 3) % 11 for e in c) for c in itertools.combinations(range(8), keep))
        for i in space.layers
    ]
    assert fitness == sum(per_layer) == (best if best is not None else fitness)


def test_greedy_swap_pass_repairs_what_elimination_got_wrong():
    """Elimination drops expert 3 first ({0, 1, 2} is the best triple), so it ends at {0, 1}; the
    best pair, {0, 3}, is one swap away."""
    space = PruneSpace(num_experts=4, top_k=1, layers=(0,), keep=2)
    table = {(0, 1, 2): 10, (0, 1): 6, (0, 2): 5, (1, 2): 5, (0, 3): 9}

    def fitness(genome):
        keep = genome.keep(0)
        return table.get(keep, 20 if len(keep) == 4 else 1)

    genome, value, spent = greedy.run(greedy.steps(space), lambda gs: [fitness(g) for g in gs])
    assert genome.keep(0) == (0, 3) and value == 9 and spent == 4 + 3 + 4


def test_greedy_follows_weight_groups_and_refuses_other_spaces():
    layers = (0, 1, 2, 3)
    grouped = PruneSpace(
        num_experts=8, top_k=2, layers=layers, keep=4, groups=layer_groups(layers, 2)
    )
    genome, _, spent = greedy.run(greedy.steps(grouped), lambda gs: [float(_value(g)) for g in gs])
    assert (
        genome.keep(0) == genome.keep(1)
        and genome.keep(2) == genome.keep(3)
        and spent == greedy.cost(grouped)
    )
    with pytest.raises(EepError, match="uniform pruning space"):
        greedy.check(BudgetSpace(8, 2, layers, 12))
    with pytest.raises(EepError, match="ungrouped"):
        greedy.check(PruneSpace(8, 2, layers, 4, expert_groups=2))

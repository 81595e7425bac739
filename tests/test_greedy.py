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


def test_auto_warm_start_takes_greedy_where_it_fits_a_share_of_the_budget():
    """``search.warm_start: auto`` starts from greedy elimination where it applies and takes at most
    40 % of the evaluations; named lists are taken as they are; a run stores the resolved list."""
    from eep.config import SearchConfig, parse_config
    from eep.evolution import resolve
    from tests.conftest import toy_config_dict

    space = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), keep=2)
    assert greedy.cost(space) == 180
    assert greedy.starts(SearchConfig(evaluations=450), space)  # 180 = 40 % of 450
    assert greedy.auto_off(space, 450) is None
    assert not greedy.starts(SearchConfig(evaluations=449), space)
    assert greedy.auto_off(space, 449) == (
        "greedy elimination would take 180 of the 449 evaluations, more than 40%"
    )
    assert not greedy.starts(SearchConfig(evaluations=450, warm_start=[]), space)
    assert greedy.starts(SearchConfig(evaluations=200, warm_start=["greedy", "naee"]), space)
    budget = BudgetSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), budget=12)
    assert "uniform pruning space" in greedy.auto_off(budget, 10_000)
    frontier = SearchConfig(evaluations=5000, objectives=["fitness", "kept_params"])
    assert not greedy.starts(frontier, space)

    auto = parse_config(toy_config_dict(evaluations=450))
    assert auto.search.warm_start == "auto" and auto.search.named_warm_start == []
    assert resolve(auto, space).search.warm_start == ["greedy"]
    off = parse_config(toy_config_dict(evaluations=100))
    assert resolve(off, space).search.warm_start == []
    named = parse_config(toy_config_dict(evaluations=100, warm_start=["naee"]))
    assert resolve(named, space) is named


@pytest.mark.parametrize("keep", [2, 3, 5])
def test_options_cut_below_their_bar_change_nothing_greedy_takes(keep):
    """Scored one after another, an option below the best before it in its batch (or, in the swap
    pass, below the fitness to beat) may report any bound under that bar instead of its fitness:
    greedy takes the same options and ends with the same genome and fitness."""
    import random

    space = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2), keep=keep)
    rng = random.Random(keep)
    table: dict[str, float] = {}

    def fitness(genome):  # not additive, with ties: any landscape
        return table.setdefault(genome.key, float(rng.randint(0, 12)))

    full = greedy.run(greedy.steps(space), lambda gs: [fitness(g) for g in gs])
    bounded = []

    def fitness_or_bound(genome, bar):
        value = fitness(genome)
        if bar is not None and value < bar:
            bounded.append(genome)
            return rng.uniform(value, bar - 1e-9)  # what a cut reports: at least the fitness
        return value

    cut = greedy.run(greedy.steps(space), lambda batch: greedy.cut_scores(batch, fitness_or_bound))
    assert bounded and cut == full

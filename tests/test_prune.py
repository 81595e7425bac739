import math
import random

import pytest

from eep.genome import Genome
from search_spaces.prune import PruneSpace, crossover_rows, mutate_swap, random_genome

SPACE = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), keep=4)


def _valid(genome, space=SPACE):
    for layer in space.layers:
        kept = genome.keep(layer)
        assert len(kept) == space.keep and len(set(kept)) == space.keep
        assert all(0 <= e < space.num_experts for e in kept)


def test_space_size():
    assert SPACE.size() == math.comb(8, 4) ** 4
    assert SPACE.full().keep(2) == tuple(range(8))


def test_random_genomes_are_valid_and_seeded():
    a = [random_genome(SPACE, random.Random(5)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(0)
    genomes = [random_genome(SPACE, rng) for _ in range(200)]
    for g in genomes:
        _valid(g)
    assert len(set(genomes)) == 200


@pytest.mark.parametrize("layer_prob, swap_prob", [(0.25, 0.15), (1.0, 1.0), (0.0, 0.0)])
def test_mutation_keeps_count_and_always_changes(layer_prob, swap_prob):
    rng = random.Random(1)
    for _ in range(300):
        parent = random_genome(SPACE, rng)
        child = mutate_swap(parent, rng, SPACE, layer_prob, swap_prob)
        _valid(child)
        assert child != parent
        changed = [i for i in SPACE.layers if child.keep(i) != parent.keep(i)]
        assert changed  # at least one layer, and only by swaps (same count)


def test_mutation_touches_layers_at_the_configured_rate():
    rng = random.Random(2)
    changed_layers = []
    for _ in range(2000):
        parent = random_genome(SPACE, rng)
        child = mutate_swap(parent, rng, SPACE, 0.25, 0.15)
        changed_layers.append(sum(child.keep(i) != parent.keep(i) for i in SPACE.layers))
    mean = sum(changed_layers) / len(changed_layers)
    assert 1.0 <= mean < 1.6  # mostly one layer at a time, as EEP's 0.25 per group


def test_crossover_keeps_count_and_draws_from_parents():
    rng = random.Random(3)
    for _ in range(500):
        a, b = random_genome(SPACE, rng), random_genome(SPACE, rng)
        child = crossover_rows(a, b, rng, SPACE, layer_prob=1.0)
        _valid(child)
        for i in SPACE.layers:
            union = set(a.keep(i)) | set(b.keep(i))
            # when the parents' union is big enough, repair never needs a foreign expert
            assert set(child.keep(i)) <= union


def test_crossover_of_identical_parents_is_the_parent():
    rng = random.Random(4)
    a = random_genome(SPACE, rng)
    assert crossover_rows(a, a, rng, SPACE, layer_prob=1.0) == a


def test_crossover_repairs_when_union_is_small():
    space = PruneSpace(num_experts=8, top_k=2, layers=(0,), keep=6)
    rng = random.Random(5)
    for _ in range(300):
        child = crossover_rows(
            random_genome(space, rng), random_genome(space, rng), rng, space, 1.0
        )
        _valid(child, space)


def test_operators_keep_the_spaces_top_k():
    space = PruneSpace(num_experts=8, top_k=2, layers=(0, 1), keep=4, active=1)
    rng = random.Random(6)
    a, b = random_genome(space, rng), random_genome(space, rng)
    for g in (a, mutate_swap(a, rng, space, 0.5, 0.5), crossover_rows(a, b, rng, space, 0.5)):
        assert [g.active(i) for i in space.layers] == [1, 1]
        assert g.to_dict()["layers"]["0"]["top_k"] == 1


GROUPED = PruneSpace(num_experts=8, top_k=2, layers=(1, 2, 3), keep=4, expert_groups=2)


def _even(genome, space=GROUPED):
    _valid(genome, space)
    for layer in space.layers:
        assert sorted(e // 4 for e in genome.keep(layer)) == [0, 0, 1, 1], genome.keep(layer)


def test_grouped_routing_operators_keep_every_expert_group_even():
    """DeepSeek's grouped top-k: each of the two groups of four keeps two, through every operator."""
    assert GROUPED.size() == math.comb(4, 2) ** 6
    assert "2 in each of 2 expert groups" in GROUPED.describe()
    rng = random.Random(0)
    population = [random_genome(GROUPED, rng) for _ in range(50)]
    assert len(set(population)) == 50
    for genome in population:
        _even(genome)
    for _ in range(300):
        a, b = rng.sample(population, 2)
        child = mutate_swap(a, rng, GROUPED, 0.5, 0.3)
        assert child != a
        _even(child)
        mixed = crossover_rows(a, b, rng, GROUPED, 0.5)
        _even(mixed)
        for layer in GROUPED.layers:
            assert set(mixed.keep(layer)) <= set(a.keep(layer)) | set(b.keep(layer)) | set(range(8))


def test_one_expert_group_draws_exactly_as_the_ungrouped_space():
    """The grouped operators reduce to the original ones: same seed, same genomes."""
    one = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), keep=4, expert_groups=1)
    for seed in range(20):
        a, b = random.Random(seed), random.Random(seed)
        ga, gb = random_genome(SPACE, a), random_genome(one, b)
        assert ga == gb
        assert mutate_swap(ga, a, SPACE, 0.3, 0.2) == mutate_swap(gb, b, one, 0.3, 0.2)
        assert crossover_rows(ga, random_genome(SPACE, a), a, SPACE, 0.5) == crossover_rows(
            gb, random_genome(one, b), b, one, 0.5
        )


def test_reject_says_why_a_genome_is_not_in_the_space():
    space = PruneSpace(8, 2, (0, 1, 2, 3), 4, groups=((0, 1), (2, 3)))
    inside = space.genome({0: [0, 1, 2, 3], 2: [4, 5, 6, 7]})
    assert space.reject(inside) is None
    assert "keeps 3 experts" in space.reject(
        Genome.from_keep(8, 2, {i: range(3) for i in range(4)})
    )
    assert "naming exactly the layers [0, 1, 2, 3]" in space.reject(
        Genome.from_keep(8, 2, {0: range(4)})
    )
    split = Genome.from_keep(8, 2, {0: range(4), 1: range(4, 8), 2: range(4), 3: range(4)})
    assert "layers [0, 1] form one weight group" in space.reject(split)
    grouped = PruneSpace(8, 2, (0,), 4, expert_groups=2)
    assert grouped.reject(Genome.from_keep(8, 2, {0: [0, 1, 4, 5]})) is None
    assert "2 experts in each expert group" in grouped.reject(
        Genome.from_keep(8, 2, {0: [0, 1, 2, 4]})
    )

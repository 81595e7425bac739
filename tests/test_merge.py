import random

import pytest

from eep.genome import Genome
from search_spaces import (
    MergeSpace,
    PruneSpace,
    crossover_matrices,
    layer_groups,
    mutate_noise,
    random_genome,
)

PRUNE = PruneSpace(num_experts=8, top_k=2, layers=(0, 1, 2, 3), keep=4)
SPACE = MergeSpace(num_experts=8, top_k=2, groups=layer_groups((0, 1, 2, 3), None))
EEP = dict(layer_prob=0.25, noise_prob=0.25, noise_scale=0.065, renorm_prob=0.1)


def _mutate(genome, rng, space=SPACE, **settings):
    return mutate_noise(genome, rng, space, **{**EEP, **settings})


def test_first_merge_child_is_a_small_perturbation_of_its_pruned_parent():
    rng = random.Random(0)
    parent = random_genome(PRUNE, rng)
    child = _mutate(parent, rng, renorm_prob=0.0)
    assert child.is_merge and child != parent
    for layer in PRUNE.layers:
        merge, router = child.gene(layer).matrices(8)
        base, _ = parent.gene(layer).matrices(8)
        assert len(merge) == 4
        assert (
            max(abs(x - y) for row, ref in zip(merge, base) for x, y in zip(row, ref)) < 0.065 * 6
        )
        assert (
            max(abs(x - y) for row, ref in zip(router, base) for x, y in zip(row, ref)) < 0.065 * 6
        )


def test_mutation_always_changes_keeps_shapes_and_router_non_negative():
    rng = random.Random(1)
    genome = random_genome(PRUNE, rng)
    seen = {genome.key}
    for _ in range(300):  # a long random walk, noise bigger than EEP's to stress the router floor
        child = _mutate(genome, rng, noise_scale=0.5, layer_prob=0.5)
        assert child.key not in seen
        seen.add(child.key)
        for layer in PRUNE.layers:
            gene = child.gene(layer)
            assert gene.slots == 4
            assert all(min(row) >= 0.0 and max(row) > 0.0 for row in gene.matrices(8)[1])
        genome = child


def test_renormalisation_makes_merge_rows_sum_to_one():
    rng = random.Random(2)
    child = _mutate(random_genome(PRUNE, rng), rng, renorm_prob=1.0, noise_prob=1.0, layer_prob=1.0)
    for layer in PRUNE.layers:
        assert all(abs(sum(row) - 1.0) < 1e-12 for row in child.gene(layer).matrices(8)[0])


def test_noise_touches_entries_with_the_configured_probability():
    rng = random.Random(3)
    parent = random_genome(PRUNE, rng)
    changed, total = 0, 0
    for _ in range(200):
        child = _mutate(parent, rng, layer_prob=1.0, renorm_prob=0.0)
        for layer in PRUNE.layers:
            for row, ref in zip(
                child.gene(layer).matrices(8)[0], parent.gene(layer).matrices(8)[0]
            ):
                changed += sum(x != y for x, y in zip(row, ref))
                total += len(row)
    assert 0.22 < changed / total < 0.28


def test_crossover_takes_rows_from_the_parents():
    rng = random.Random(4)
    a = _mutate(random_genome(PRUNE, rng), rng, layer_prob=1.0)
    b = _mutate(random_genome(PRUNE, rng), rng, layer_prob=1.0)
    for _ in range(50):
        child = crossover_matrices(a, b, rng, SPACE, layer_prob=0.5)
        for layer in PRUNE.layers:
            for m in (0, 1):
                rows = child.gene(layer).matrices(8)[m]
                parents = set(a.gene(layer).matrices(8)[m]) | set(b.gene(layer).matrices(8)[m])
                assert set(rows) <= parents


def test_crossover_copies_groups_of_different_expert_counts_from_the_first_parent():
    a = Genome.from_keep(8, 2, {0: [0, 1, 2], 1: [0, 1, 2, 3, 4]})
    b = Genome.from_keep(8, 2, {0: [3, 4, 5, 6], 1: [4, 5, 6, 7]})
    space = MergeSpace(8, 2, ((0,), (1,)))
    child = crossover_matrices(a, b, random.Random(0), space, layer_prob=1.0)
    assert child.gene(0).slots == 3 and child.gene(1).slots == 5


def test_weight_groups_share_one_gene():
    space = MergeSpace(8, 2, layer_groups((0, 1, 2, 3), 2))
    assert space.groups == ((0, 1), (2, 3))
    prune = PruneSpace(8, 2, (0, 1, 2, 3), 4, groups=space.groups)
    rng = random.Random(5)
    genome = _mutate(random_genome(prune, rng), rng, space=space, layer_prob=1.0)
    assert genome.gene(0) == genome.gene(1) and genome.gene(2) == genome.gene(3)
    assert genome.gene(0) != genome.gene(2)


@pytest.mark.parametrize(
    "layers, groups, expected",
    [
        ((0, 1, 2, 3), None, ((0,), (1,), (2,), (3,))),
        (tuple(range(32)), 4, tuple(tuple(range(g * 8, g * 8 + 8)) for g in range(4))),
        ((0, 1, 2, 3, 4), 2, ((0, 1, 2), (3, 4))),
        ((0, 1, 2), 3, ((0,), (1,), (2,))),
    ],
)
def test_layer_groups_are_consecutive_and_balanced(layers, groups, expected):
    assert layer_groups(layers, groups) == expected


def test_mutation_is_a_pure_function_of_its_rng():
    parent = random_genome(PRUNE, random.Random(6))
    assert _mutate(parent, random.Random(7)) == _mutate(parent, random.Random(7))

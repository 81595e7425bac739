"""Expert pruning (EEP stage 1): a genome keeps exactly ``keep`` of the ``E`` experts per layer.

Operators are small pure functions of (genomes, rng, settings) -> new genome; the search
registers them on a DEAP toolbox. They never return a genome with a wrong keep count or a
repeated expert.

Departures from EEP's released code, each to avoid a wasted evaluation or a silent bias:
- a mutation always changes at least one expert (EEP's could redraw the same expert);
- crossover repairs duplicate picks with the parents' other experts first, then random ones,
  so a child always keeps exactly ``keep`` distinct experts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from eep.genome import Genome

# EEP takes a crossover row from the first parent with this probability (``from_front_prob``).
FRONT_PARENT_PROB = 0.6


@dataclass(frozen=True)
class PruneSpace:
    """Which genomes exist: ``keep`` of ``num_experts`` experts in each of ``layers``."""

    num_experts: int
    top_k: int
    layers: tuple[int, ...]
    keep: int
    active: int | None = None
    """Experts each token is routed to in every layer (None: the model's top_k)."""

    def genome(self, keep: dict[int, list[int]]) -> Genome:
        return Genome.from_keep(self.num_experts, self.top_k, keep, self.active)

    def size(self) -> int:
        return math.comb(self.num_experts, self.keep) ** len(self.layers)

    def full(self) -> Genome:
        """The uncompressed model as a genome (every expert kept)."""
        return Genome.from_keep(self.num_experts, self.top_k, {i: range(self.num_experts) for i in self.layers})


def random_genome(space: PruneSpace, rng: random.Random) -> Genome:
    """A uniformly random keep set per layer."""
    return space.genome({i: rng.sample(range(space.num_experts), space.keep) for i in space.layers})


def _touched_layers(layers: Sequence[int], rng: random.Random, layer_prob: float) -> list[int]:
    """Each layer with probability ``layer_prob``; redrawn until at least one (as EEP)."""
    if layer_prob == 0.0:
        return [rng.choice(layers)]
    while True:
        touched = [i for i in layers if rng.random() < layer_prob]
        if touched:
            return touched


def mutate_swap(genome: Genome, rng: random.Random, space: PruneSpace, layer_prob: float, swap_prob: float) -> Genome:
    """In the touched layers, swap each kept expert with probability ``swap_prob`` for a dropped one."""
    keep = {i: list(genome.keep(i)) for i in space.layers}
    touched = _touched_layers(space.layers, rng, layer_prob)
    swapped = False
    for layer in touched:
        kept = keep[layer]
        for slot in range(len(kept)):
            if rng.random() < swap_prob:
                kept[slot] = rng.choice([e for e in range(space.num_experts) if e not in kept])
                swapped = True
    if not swapped and space.keep < space.num_experts:
        kept = keep[rng.choice(touched)]
        kept[rng.randrange(len(kept))] = rng.choice([e for e in range(space.num_experts) if e not in kept])
    return space.genome(keep)


def crossover_rows(a: Genome, b: Genome, rng: random.Random, space: PruneSpace, layer_prob: float) -> Genome:
    """Row-wise crossover (EEP): touched layers mix the parents' kept experts slot by slot;
    the other layers are copied whole from one parent. Duplicates are repaired to the exact count."""
    touched = set(_touched_layers(space.layers, rng, layer_prob))
    keep = {}
    for layer in space.layers:
        rows_a, rows_b = a.keep(layer), b.keep(layer)
        if layer not in touched:
            keep[layer] = rows_a if rng.random() < FRONT_PARENT_PROB else rows_b
            continue
        picks = [ra if rng.random() < FRONT_PARENT_PROB else rb for ra, rb in zip(rows_a, rows_b, strict=True)]
        child = list(dict.fromkeys(picks))
        spare = [e for e in dict.fromkeys(rows_a + rows_b) if e not in child]
        rng.shuffle(spare)
        others = [e for e in range(space.num_experts) if e not in child and e not in spare]
        rng.shuffle(others)
        child += (spare + others)[: space.keep - len(child)]
        keep[layer] = child
    return space.genome(keep)

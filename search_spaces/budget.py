"""Non-uniform pruning: a total budget of kept experts across the MoE layers; the genome decides
how many each layer keeps (between its top-k and E) and which.

Every operator returns a genome whose kept experts add up to the budget exactly. Layers are not
equally important (MoE-I², EvoESAP): moving an expert from a layer that does not need it to one
that does is the move a uniform keep count cannot make. Experts of one model are the same size, so
a budget of experts is also a budget of parameters.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deap import base

from eep.genome import Genome
from search_spaces.prune import FRONT_PARENT_PROB, mix_rows, not_pruning, touched_units


@dataclass(frozen=True)
class BudgetSpace:
    """``budget`` experts kept in all of ``layers`` together, each layer in ``[min_keep, num_experts]``."""

    num_experts: int
    top_k: int
    layers: tuple[int, ...]
    budget: int
    active: int | None = None

    kind = "budget"

    @property
    def min_keep(self) -> int:
        return self.active or self.top_k

    def genome(self, keep: Mapping[int, Sequence[int]]) -> Genome:
        return Genome.from_keep(self.num_experts, self.top_k, keep, self.active)

    def size(self) -> int:
        """Genomes with exactly ``budget`` experts kept (a polynomial product over the layers)."""
        ways = [1] + [0] * self.budget  # ways[t]: keep sets of the layers so far keeping t experts
        for _ in self.layers:
            ways = [
                sum(
                    ways[t - n] * math.comb(self.num_experts, n)
                    for n in range(self.min_keep, min(self.num_experts, t) + 1)
                )
                for t in range(self.budget + 1)
            ]
        return ways[self.budget]

    def reject(self, genome: Genome) -> str | None:
        """Why ``genome`` is not in this space (None when it is): e.g. a seed for the search."""
        reason = not_pruning(genome, self.layers)
        if reason is not None:
            return reason
        counts = [len(genome.keep(i)) for i in self.layers]
        if sum(counts) != self.budget:
            return f"it keeps {sum(counts)} experts in all; the budget is {self.budget}"
        return layer_bounds(self, genome)

    def describe(self) -> str:
        mean = self.budget / len(self.layers)
        return (
            f"budget: {self.budget} experts over {len(self.layers)} layers (mean {mean:.2f} of "
            f"{self.num_experts}, each layer {self.min_keep}..{self.num_experts})"
        )

    def register(self, toolbox: base.Toolbox, cfg, rng: random.Random) -> None:
        toolbox.register("individual", random_budget_genome, space=self, rng=rng)
        toolbox.register(
            "mutate",
            mutate_budget,
            rng=rng,
            space=self,
            layer_prob=cfg.layer_prob,
            swap_prob=cfg.swap_prob,
            move_prob=cfg.move_prob,
        )
        toolbox.register("mate", crossover_budget, rng=rng, space=self, layer_prob=cfg.layer_prob)


def layer_bounds(space, genome: Genome) -> str | None:
    """Why a layer of ``genome`` is outside ``space.min_keep``..``num_experts`` experts routed
    top-``space.active`` (None when none is): the per-layer bounds of the budget and frontier
    spaces."""
    for layer in space.layers:
        n = len(genome.keep(layer))
        if n < space.min_keep or genome.gene(layer).top_k != space.active:
            return (
                f"layer {layer} keeps {n} experts routed top-{genome.active(layer)}; each layer keeps "
                f"{space.min_keep}..{space.num_experts}"
                + (f" routed top-{space.active}" if space.active else "")
            )
    return None


def cross_layers(
    a: Genome, b: Genome, rng: random.Random, layers: Sequence[int], layer_prob: float
) -> dict[int, list[int]]:
    """Keep sets of a child: each layer whole from one parent (the first with EEP's 0.6); touched
    layers whose parents keep the same number mix them slot by slot."""
    touched = set(touched_units(list(layers), rng, layer_prob))
    keep = {}
    for layer in layers:
        rows_a, rows_b = a.keep(layer), b.keep(layer)
        if layer in touched and len(rows_a) == len(rows_b):
            child, spare = mix_rows(rows_a, rows_b, rng)
            keep[layer] = child + spare[: len(rows_a) - len(child)]
        else:
            keep[layer] = list(rows_a if rng.random() < FRONT_PARENT_PROB else rows_b)
    return keep


def random_budget_genome(space: BudgetSpace, rng: random.Random) -> Genome:
    """Counts: every layer starts at its minimum, the rest of the budget goes one expert at a time
    to a random layer with room; then a uniformly random keep set of that size per layer."""
    counts = dict.fromkeys(space.layers, space.min_keep)
    for _ in range(space.budget - space.min_keep * len(space.layers)):
        counts[rng.choice([i for i in space.layers if counts[i] < space.num_experts])] += 1
    return space.genome({i: rng.sample(range(space.num_experts), n) for i, n in counts.items()})


def move_expert(keep: dict[int, list[int]], space: BudgetSpace, rng: random.Random) -> bool:
    """Drop a random expert of one layer and add a random dropped expert to another."""
    donors = [i for i in space.layers if len(keep[i]) > space.min_keep]
    takers = [i for i in space.layers if len(keep[i]) < space.num_experts]
    pairs = [(d, t) for d in donors for t in takers if d != t]
    if not pairs:
        return False
    donor, taker = rng.choice(pairs)
    keep[donor].remove(rng.choice(keep[donor]))
    keep[taker].append(rng.choice([e for e in range(space.num_experts) if e not in keep[taker]]))
    return True


def mutate_budget(
    genome: Genome,
    rng: random.Random,
    space: BudgetSpace,
    layer_prob: float,
    swap_prob: float,
    move_prob: float,
) -> Genome:
    """With probability ``move_prob`` move one expert of budget between two layers; then swap kept
    experts for dropped ones as :func:`search_spaces.prune.mutate_swap` does. Always changes something."""
    keep = {i: list(genome.keep(i)) for i in space.layers}
    changed = rng.random() < move_prob and move_expert(keep, space, rng)
    touched = touched_units(list(space.layers), rng, layer_prob)
    for layer in touched:
        kept = keep[layer]
        for slot in range(len(kept)):
            if rng.random() < swap_prob and len(kept) < space.num_experts:
                kept[slot] = rng.choice([e for e in range(space.num_experts) if e not in kept])
                changed = True
    if not changed:
        room = [i for i in touched if len(keep[i]) < space.num_experts]
        if room:
            kept = keep[rng.choice(room)]
            kept[rng.randrange(len(kept))] = rng.choice(
                [e for e in range(space.num_experts) if e not in kept]
            )
        else:
            move_expert(keep, space, rng)
    return space.genome(keep)


def crossover_budget(
    a: Genome, b: Genome, rng: random.Random, space: BudgetSpace, layer_prob: float
) -> Genome:
    """Each layer comes whole from one parent (the first with EEP's 0.6); touched layers whose
    parents keep the same number mix them slot by slot. Then the total is repaired to the budget by
    dropping (adding) random experts in random layers that have room."""
    keep = cross_layers(a, b, rng, space.layers, layer_prob)
    total = sum(len(k) for k in keep.values())
    while total > space.budget:
        layer = rng.choice([i for i in space.layers if len(keep[i]) > space.min_keep])
        keep[layer].remove(rng.choice(keep[layer]))
        total -= 1
    while total < space.budget:
        layer = rng.choice([i for i in space.layers if len(keep[i]) < space.num_experts])
        keep[layer].append(
            rng.choice([e for e in range(space.num_experts) if e not in keep[layer]])
        )
        total += 1
    return space.genome(keep)

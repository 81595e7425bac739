"""Genomes of every size: each layer keeps between its top-k and E experts, and the total is free
(:class:`FrontierSpace`); or every expert kept and each layer routing to 1..top-k of them
(:class:`TopKFrontierSpace`); or both free (:class:`LatencyFrontierSpace`).

The spaces of a multi-objective search (``search.objectives: [fitness, kept_params]``,
``[fitness, active_params]`` or ``[fitness, latency]``), which looks for the whole accuracy-size
frontier at once. Operators keep every layer within its bounds; besides swapping experts (as :mod:`search_spaces.prune`) and moving one between layers (as
:mod:`search_spaces.budget`), a mutation may grow or shrink one layer by an expert, which is how
the search walks along the size axis. Crossover takes each layer whole from one parent (touched
layers of equal size mix slot by slot), so a child's size lies between its parents' per layer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deap import base

from eep.genome import Genome
from search_spaces.budget import cross_layers, layer_bounds, move_expert
from search_spaces.prune import FRONT_PARENT_PROB, mix_rows, not_pruning, touched_units


@dataclass(frozen=True)
class FrontierSpace:
    """Each of ``layers`` keeps ``min_keep``..``num_experts`` experts, any total."""

    num_experts: int
    top_k: int
    layers: tuple[int, ...]
    active: int | None = None

    kind = "frontier"

    @property
    def min_keep(self) -> int:
        return self.active or self.top_k

    def genome(self, keep: Mapping[int, Sequence[int]]) -> Genome:
        return Genome.from_keep(self.num_experts, self.top_k, keep, self.active)

    def size(self) -> int:
        per_layer = sum(
            math.comb(self.num_experts, n) for n in range(self.min_keep, self.num_experts + 1)
        )
        return per_layer ** len(self.layers)

    def reject(self, genome: Genome) -> str | None:
        """Why ``genome`` is not in this space (None when it is)."""
        return not_pruning(genome, self.layers) or layer_bounds(self, genome)

    def describe(self) -> str:
        return (
            f"frontier: every size, each of {len(self.layers)} layers keeping "
            f"{self.min_keep}..{self.num_experts} experts"
        )

    def register(self, toolbox: base.Toolbox, cfg, rng: random.Random) -> None:
        toolbox.register("individual", random_frontier_genome, space=self, rng=rng)
        toolbox.register(
            "mutate",
            mutate_frontier,
            rng=rng,
            space=self,
            layer_prob=cfg.layer_prob,
            swap_prob=cfg.swap_prob,
            move_prob=cfg.move_prob,
            resize_prob=cfg.resize_prob,
        )
        toolbox.register("mate", crossover_frontier, rng=rng, space=self, layer_prob=cfg.layer_prob)


def random_frontier_genome(space: FrontierSpace, rng: random.Random) -> Genome:
    """A total drawn uniformly from every possible size, spread over the layers at random (each
    from its minimum up), then a uniformly random keep set of that size per layer: the initial
    population covers the size axis instead of crowding around its middle."""
    counts = _spread(dict.fromkeys(space.layers, space.min_keep), space.num_experts, rng)
    return space.genome({i: rng.sample(range(space.num_experts), n) for i, n in counts.items()})


def _spread(low: Mapping[int, int], high: int, rng: random.Random) -> dict[int, int]:
    """Per-layer counts from ``low`` (by layer) up to ``high`` each, their total drawn uniformly
    from every possible one and the steps above ``low`` spread over the layers at random."""
    counts = dict(low)
    for _ in range(rng.randint(0, sum(high - n for n in low.values()))):
        counts[rng.choice([i for i in counts if counts[i] < high])] += 1
    return counts


def _resize(
    keep: dict[int, list[int]],
    space: FrontierSpace,
    rng: random.Random,
    floor: Mapping[int, int] | None = None,
) -> bool:
    """Grow or shrink one random layer that can by one expert (a random one added or dropped);
    ``floor``: each layer's fewest experts (default: the space's ``min_keep``)."""
    least = floor or dict.fromkeys(space.layers, space.min_keep)
    moves = [(i, +1) for i in space.layers if len(keep[i]) < space.num_experts]
    moves += [(i, -1) for i in space.layers if len(keep[i]) > least[i]]
    if not moves:
        return False
    layer, step = rng.choice(moves)
    kept = keep[layer]
    if step > 0:
        kept.append(rng.choice([e for e in range(space.num_experts) if e not in kept]))
    else:
        kept.remove(rng.choice(kept))
    return True


def _swap_touched(
    keep: dict[int, list[int]], space, rng: random.Random, layer_prob: float, swap_prob: float
) -> bool:
    """In the touched layers, swap each kept expert with probability ``swap_prob`` for a dropped
    one (a layer keeping every expert has none to swap); whether any was."""
    swapped = False
    for layer in touched_units(list(space.layers), rng, layer_prob):
        kept = keep[layer]
        for slot in range(len(kept)):
            if rng.random() < swap_prob and len(kept) < space.num_experts:
                kept[slot] = rng.choice([e for e in range(space.num_experts) if e not in kept])
                swapped = True
    return swapped


def mutate_frontier(
    genome: Genome,
    rng: random.Random,
    space: FrontierSpace,
    layer_prob: float,
    swap_prob: float,
    move_prob: float,
    resize_prob: float,
) -> Genome:
    """With probability ``resize_prob`` grow or shrink a layer by one expert, and with probability
    ``move_prob`` move an expert between two layers; then swap kept experts for dropped ones in
    the touched layers. Always changes something."""
    keep = {i: list(genome.keep(i)) for i in space.layers}
    changed = rng.random() < resize_prob and _resize(keep, space, rng)
    changed = (rng.random() < move_prob and move_expert(keep, space, rng)) or changed
    changed = _swap_touched(keep, space, rng, layer_prob, swap_prob) or changed
    if not changed:
        _resize(keep, space, rng)
    return space.genome(keep)


def crossover_frontier(
    a: Genome, b: Genome, rng: random.Random, space: FrontierSpace, layer_prob: float
) -> Genome:
    """Each layer comes whole from one parent (the first with EEP's 0.6); touched layers whose
    parents keep the same number mix them slot by slot. No repair: any total is in the space."""
    return space.genome(cross_layers(a, b, rng, space.layers, layer_prob))


@dataclass(frozen=True)
class TopKFrontierSpace:
    """Every expert of ``layers`` kept; each layer routes each token to 1..``top_k`` of them: the
    space of an accuracy vs active-parameters frontier (``search.objectives: [fitness,
    active_params]``)."""

    num_experts: int
    top_k: int
    layers: tuple[int, ...]

    kind = "frontier-top-k"

    def genome(self, active: Mapping[int, int]) -> Genome:
        keep = {i: range(self.num_experts) for i in self.layers}
        return Genome.from_keep(self.num_experts, self.top_k, keep, dict(active))

    def size(self) -> int:
        return self.top_k ** len(self.layers)

    def reject(self, genome: Genome) -> str | None:
        reason = not_pruning(genome, self.layers)
        if reason is not None:
            return reason
        for layer in self.layers:
            if len(genome.keep(layer)) != self.num_experts:
                return (
                    f"layer {layer} keeps {len(genome.keep(layer))} experts; this space keeps all"
                )
        return None

    def describe(self) -> str:
        return (
            f"top-k frontier: all {self.num_experts} experts kept, each of {len(self.layers)} "
            f"layers routing to 1..{self.top_k}"
        )

    def register(self, toolbox: base.Toolbox, cfg, rng: random.Random) -> None:
        toolbox.register("individual", random_top_k_genome, space=self, rng=rng)
        toolbox.register("mutate", mutate_top_k, rng=rng, space=self, layer_prob=cfg.layer_prob)
        toolbox.register("mate", crossover_top_k, rng=rng, space=self)


def random_top_k_genome(space: TopKFrontierSpace, rng: random.Random) -> Genome:
    """A total of active experts drawn uniformly from every possible one, spread at random."""
    active = dict.fromkeys(space.layers, 1)
    for _ in range(rng.randint(0, (space.top_k - 1) * len(space.layers))):
        active[rng.choice([i for i in space.layers if active[i] < space.top_k])] += 1
    return space.genome(active)


def mutate_top_k(
    genome: Genome, rng: random.Random, space: TopKFrontierSpace, layer_prob: float
) -> Genome:
    """Each touched layer routes to one more or one fewer expert (within 1..top_k); always changes one."""
    active = {i: genome.active(i) for i in space.layers}
    touched = touched_units(list(space.layers), rng, layer_prob) or [rng.choice(space.layers)]
    for layer in touched:
        steps = [s for s in (-1, 1) if 1 <= active[layer] + s <= space.top_k]
        if steps:
            active[layer] += rng.choice(steps)
    if all(active[i] == genome.active(i) for i in space.layers):  # top_k 1: nothing to change
        return genome
    return space.genome(active)


def crossover_top_k(a: Genome, b: Genome, rng: random.Random, space: TopKFrontierSpace) -> Genome:
    """Each layer's top-k from one parent (the first with EEP's 0.6)."""
    return space.genome(
        {i: (a if rng.random() < FRONT_PARENT_PROB else b).active(i) for i in space.layers}
    )


@dataclass(frozen=True)
class LatencyFrontierSpace:
    """Each of ``layers`` keeps 1..``num_experts`` experts and routes each token to 1..``top_k`` of
    them (no more than it keeps): what a forward pass costs depends on both (how many experts a
    token runs through, how many a batch touches), so the space of an accuracy vs latency frontier
    (``search.objectives: [fitness, latency]``) has both."""

    num_experts: int
    top_k: int
    layers: tuple[int, ...]

    kind = "frontier-latency"

    def genome(self, keep: Mapping[int, Sequence[int]], active: Mapping[int, int]) -> Genome:
        return Genome.from_keep(self.num_experts, self.top_k, keep, dict(active))

    def size(self) -> int:
        per_layer = sum(
            math.comb(self.num_experts, n)
            for k in range(1, self.top_k + 1)
            for n in range(k, self.num_experts + 1)
        )
        return per_layer ** len(self.layers)

    def reject(self, genome: Genome) -> str | None:
        reason = not_pruning(genome, self.layers)
        if reason is not None:
            return reason
        for layer in self.layers:
            if genome.active(layer) > self.top_k:
                return f"layer {layer} routes to {genome.active(layer)}, above top_k={self.top_k}"
        return None

    def describe(self) -> str:
        return (
            f"latency frontier: each of {len(self.layers)} layers keeping 1..{self.num_experts} "
            f"experts and routing to 1..{self.top_k} of them"
        )

    def register(self, toolbox: base.Toolbox, cfg, rng: random.Random) -> None:
        toolbox.register("individual", random_latency_genome, space=self, rng=rng)
        toolbox.register(
            "mutate",
            mutate_latency,
            rng=rng,
            space=self,
            layer_prob=cfg.layer_prob,
            swap_prob=cfg.swap_prob,
            resize_prob=cfg.resize_prob,
        )
        toolbox.register("mate", crossover_latency, rng=rng, space=self, layer_prob=cfg.layer_prob)


def random_latency_genome(space: LatencyFrontierSpace, rng: random.Random) -> Genome:
    """A total top-k drawn uniformly from every possible one and spread over the layers, then
    experts kept from each layer's top-k up the same way (:func:`random_frontier_genome`'s
    rule), then random keep sets of those sizes."""
    active = _spread(dict.fromkeys(space.layers, 1), space.top_k, rng)
    counts = _spread(active, space.num_experts, rng)
    keep = {i: rng.sample(range(space.num_experts), n) for i, n in counts.items()}
    return space.genome(keep, active)


def _step_top_k(
    active: dict[int, int], keep: dict[int, list[int]], space, rng: random.Random
) -> bool:
    """Route one random layer that can to one more or one fewer expert (within 1..top_k, and no
    more than the layer keeps)."""
    moves = [(i, +1) for i in space.layers if active[i] < min(space.top_k, len(keep[i]))]
    moves += [(i, -1) for i in space.layers if active[i] > 1]
    if not moves:
        return False
    layer, step = rng.choice(moves)
    active[layer] += step
    return True


def mutate_latency(
    genome: Genome,
    rng: random.Random,
    space: LatencyFrontierSpace,
    layer_prob: float,
    swap_prob: float,
    resize_prob: float,
) -> Genome:
    """With probability ``resize_prob`` grow or shrink a layer by one expert (never below its
    top-k), and with the same probability step a layer's top-k by one; then swap kept experts for
    dropped ones in the touched layers. Always changes something."""
    keep = {i: list(genome.keep(i)) for i in space.layers}
    active = {i: genome.active(i) for i in space.layers}
    changed = rng.random() < resize_prob and _resize(keep, space, rng, active)
    changed = (rng.random() < resize_prob and _step_top_k(active, keep, space, rng)) or changed
    changed = _swap_touched(keep, space, rng, layer_prob, swap_prob) or changed
    if not changed and not (rng.random() < 0.5 and _step_top_k(active, keep, space, rng)):
        _resize(keep, space, rng, active)
    return space.genome(keep, active)


def crossover_latency(
    a: Genome, b: Genome, rng: random.Random, space: LatencyFrontierSpace, layer_prob: float
) -> Genome:
    """Each layer's keep set and top-k come whole from one parent (the first with EEP's 0.6);
    touched layers whose parents keep the same number mix their experts slot by slot and take
    either parent's top-k."""
    touched = set(touched_units(list(space.layers), rng, layer_prob))
    keep, active = {}, {}
    for layer in space.layers:
        rows_a, rows_b = a.keep(layer), b.keep(layer)
        if layer in touched and len(rows_a) == len(rows_b):
            child, spare = mix_rows(rows_a, rows_b, rng)
            keep[layer] = child + spare[: len(rows_a) - len(child)]
            active[layer] = rng.choice((a.active(layer), b.active(layer)))
        else:
            parent = a if rng.random() < FRONT_PARENT_PROB else b
            keep[layer], active[layer] = list(parent.keep(layer)), parent.active(layer)
    return space.genome(keep, active)

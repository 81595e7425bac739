"""Expert pruning (EEP stage 1): a genome keeps exactly ``keep`` of the ``E`` experts per layer.

Operators are small pure functions of (genomes, rng, settings) -> new genome; the search
registers them on a DEAP toolbox. They never return a genome with a wrong keep count or a
repeated expert. They act on weight groups (:func:`layer_groups`): every layer of a group
carries the same gene, so a group of one layer is the per-layer search.

Departures from EEP's released code, each to avoid a wasted evaluation or a silent bias:
- a mutation always changes at least one expert (EEP's could redraw the same expert);
- crossover repairs duplicate picks with the parents' other experts first, then random ones,
  so a child always keeps exactly ``keep`` distinct experts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deap import base

from eep.genome import Genome, LayerGene

# EEP takes a crossover row from the first parent with this probability (``from_front_prob``).
FRONT_PARENT_PROB = 0.6

Groups = tuple[tuple[int, ...], ...]


def layer_groups(layers: Sequence[int], groups: int | None) -> Groups:
    """``groups`` consecutive blocks of ``layers``, sizes differing by at most one (EEP: 4 groups
    for Mixtral's 32 layers); ``None``: one group per layer."""
    layers = tuple(layers)
    if groups is None:
        return tuple((i,) for i in layers)
    size, extra = divmod(len(layers), groups)
    bounds = [g * size + min(g, extra) for g in range(groups + 1)]
    return tuple(layers[bounds[g] : bounds[g + 1]] for g in range(groups))


def expand(groups: Groups, genes: Mapping[int, LayerGene]) -> dict[int, LayerGene]:
    """Per-group genes (keyed by each group's first layer) -> per-layer genes."""
    return {layer: genes[group[0]] for group in groups for layer in group}


def not_pruning(genome: Genome, layers: Sequence[int]) -> str | None:
    """Why ``genome`` is not a pruning genome naming exactly ``layers`` (None when it is): what
    every pruning space checks first in its ``reject``."""
    if {i for i, _ in genome.layers} != set(layers) or genome.is_merge or genome.is_low_rank:
        return f"it must be a pruning genome naming exactly the layers {list(layers)}"
    return None


@dataclass(frozen=True)
class PruneSpace:
    """Which genomes exist: ``keep`` of ``num_experts`` experts in each of ``layers``."""

    num_experts: int
    top_k: int
    layers: tuple[int, ...]
    keep: int
    active: int | None = None
    """Experts each token is routed to in every layer (None: the model's top_k)."""
    groups: Groups | None = None
    """Weight groups sharing one gene (None: one per layer)."""
    expert_groups: int = 1
    """Routing picks within this many equal, consecutive expert groups (DeepSeek's grouped top-k):
    every layer keeps ``keep / expert_groups`` experts of each, and operators swap within a group."""

    kind = "prune"

    @property
    def pools(self) -> tuple[range, ...]:
        """The expert groups as id ranges (one range of all experts when routing is not grouped)."""
        size = self.num_experts // self.expert_groups
        return tuple(range(g * size, (g + 1) * size) for g in range(self.expert_groups))

    def pool_of(self, expert: int) -> range:
        return self.pools[expert // (self.num_experts // self.expert_groups)]

    @property
    def units(self) -> Groups:
        return self.groups if self.groups is not None else tuple((i,) for i in self.layers)

    def genome(self, keep: Mapping[int, Sequence[int]]) -> Genome:
        """A genome from ``{group's first layer: expert ids}``."""
        genes = {
            i: LayerGene(tuple(sorted(int(e) for e in ids)), self.active) for i, ids in keep.items()
        }
        return Genome.from_genes(self.num_experts, self.top_k, expand(self.units, genes))

    def size(self) -> int:
        per_pool = math.comb(len(self.pools[0]), self.keep // self.expert_groups)
        return per_pool ** (self.expert_groups * len(self.units))

    def full(self) -> Genome:
        """The uncompressed model as a genome (every expert kept)."""
        return Genome.from_keep(
            self.num_experts, self.top_k, {i: range(self.num_experts) for i in self.layers}
        )

    def reject(self, genome: Genome) -> str | None:
        """Why ``genome`` is not in this space (None when it is): e.g. a seed for the search."""
        reason = not_pruning(genome, self.layers)
        if reason is not None:
            return reason
        for layer in self.layers:
            gene = genome.gene(layer)
            if len(gene.keep) != self.keep or gene.top_k != self.active:
                return (
                    f"layer {layer} keeps {len(gene.keep)} experts routed top-{genome.active(layer)}; the space "
                    f"keeps {self.keep}" + (f" routed top-{self.active}" if self.active else "")
                )
            if self.expert_groups > 1 and any(
                sum(e in pool for e in gene.keep) != self.keep // self.expert_groups
                for pool in self.pools
            ):
                return f"layer {layer} must keep {self.keep // self.expert_groups} experts in each expert group"
        for unit in self.units:
            if len({genome.gene(layer) for layer in unit}) > 1:
                return f"layers {list(unit)} form one weight group and must share one gene"
        return None

    def describe(self) -> str:
        groups = "" if self.groups is None else f" in {len(self.units)} weight groups"
        pools = (
            ""
            if self.expert_groups == 1
            else f" ({self.keep // self.expert_groups} in each of "
            f"{self.expert_groups} expert groups)"
        )
        return f"prune: keep {self.keep} of {self.num_experts} per layer{pools}{groups}"

    def register(self, toolbox: base.Toolbox, cfg, rng: random.Random) -> None:
        toolbox.register("individual", random_genome, space=self, rng=rng)
        toolbox.register(
            "mutate",
            mutate_swap,
            rng=rng,
            space=self,
            layer_prob=cfg.layer_prob,
            swap_prob=cfg.swap_prob,
        )
        toolbox.register("mate", crossover_rows, rng=rng, space=self, layer_prob=cfg.layer_prob)


def random_genome(space: PruneSpace, rng: random.Random) -> Genome:
    """A uniformly random keep set per weight group (the same number from each expert group)."""
    per_pool = space.keep // space.expert_groups
    return space.genome(
        {g[0]: [e for pool in space.pools for e in rng.sample(pool, per_pool)] for g in space.units}
    )


def touched_units(units: Sequence, rng: random.Random, layer_prob: float) -> list:
    """Each unit (a group's first layer) with probability ``layer_prob``; redrawn until at least one (as EEP)."""
    if layer_prob == 0.0:
        return [rng.choice(units)]
    while True:
        touched = [u for u in units if rng.random() < layer_prob]
        if touched:
            return touched


def mutate_swap(
    genome: Genome, rng: random.Random, space: PruneSpace, layer_prob: float, swap_prob: float
) -> Genome:
    """In the touched groups, swap each kept expert with probability ``swap_prob`` for a dropped one
    (of its own expert group, when routing is grouped)."""
    keep = {g[0]: list(genome.keep(g[0])) for g in space.units}
    touched = touched_units([g[0] for g in space.units], rng, layer_prob)
    swapped = False
    for unit in touched:
        kept = keep[unit]
        for slot in range(len(kept)):
            if rng.random() < swap_prob:
                kept[slot] = rng.choice([e for e in space.pool_of(kept[slot]) if e not in kept])
                swapped = True
    if not swapped and space.keep < space.num_experts:
        kept = keep[rng.choice(touched)]
        if space.expert_groups == 1:
            kept[rng.randrange(len(kept))] = rng.choice(
                [e for e in range(space.num_experts) if e not in kept]
            )
        else:
            slot = rng.randrange(len(kept))
            kept[slot] = rng.choice([e for e in space.pool_of(kept[slot]) if e not in kept])
    return space.genome(keep)


def mix_rows(
    rows_a: Sequence[int], rows_b: Sequence[int], rng: random.Random
) -> tuple[list[int], list[int]]:
    """Slot by slot, the first parent's expert with EEP's 0.6, else the second's: (the distinct
    picks, the parents' other experts shuffled) — the child's count is then repaired from the latter."""
    picks = [
        ra if rng.random() < FRONT_PARENT_PROB else rb
        for ra, rb in zip(rows_a, rows_b, strict=True)
    ]
    child = list(dict.fromkeys(picks))
    spare = [e for e in dict.fromkeys([*rows_a, *rows_b]) if e not in child]
    rng.shuffle(spare)
    return child, spare


def crossover_rows(
    a: Genome, b: Genome, rng: random.Random, space: PruneSpace, layer_prob: float
) -> Genome:
    """Row-wise crossover (EEP): touched groups mix the parents' kept experts slot by slot;
    the other groups are copied whole from one parent. Duplicates are repaired to the exact count."""
    touched = set(touched_units([g[0] for g in space.units], rng, layer_prob))
    keep = {}
    for unit in (g[0] for g in space.units):
        rows_a, rows_b = a.keep(unit), b.keep(unit)
        if unit not in touched:
            keep[unit] = rows_a if rng.random() < FRONT_PARENT_PROB else rows_b
            continue
        keep[unit] = []
        for pool in space.pools:  # one pool of all experts unless routing is grouped
            child, spare = mix_rows(
                [e for e in rows_a if e in pool], [e for e in rows_b if e in pool], rng
            )
            others = [e for e in pool if e not in child and e not in spare]
            rng.shuffle(others)
            keep[unit] += child + (spare + others)[: space.keep // space.expert_groups - len(child)]
    return space.genome(keep)

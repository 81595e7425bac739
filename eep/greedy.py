"""Greedy backward elimination: the honest bar a search must clear.

Layer by layer (or weight group by group), drop the expert whose removal costs the least fitness
(every remaining expert of the layer tried, the other layers as decided so far), until the layer
keeps ``keep``; then one swap pass: per layer, every kept <-> dropped exchange tried at once and the
best taken if it improves. It uses the real fitness on the search split, so it pays in evaluations,
a fixed number of them (:func:`cost`): for E experts kept down to k in L layers,
L·(E + (E-1) + ... + (k+1)) + L·k·(E-k), e.g. 168 for 4 of 8 in 4 layers.

:func:`steps` is a generator so that both its users drive it the same way: ``eep baselines``
scores each batch on the resident worker, the search (``search.warm_start: [greedy]``) through
its evaluator and journal. It yields a batch of genomes to score and receives their fitnesses;
its return value is the final genome and its fitness. Ties go to the lowest expert id, so it is
deterministic given the fitnesses.

Only the best option of a batch is taken (in the swap pass, only if it beats the fitness so far),
so an option scoring below the best scored before it (:func:`bar`) need not be scored exactly: the
search's early cut stops it once even a perfect rest could not reach that, and its upper bound
stands in for its fitness. Whatever it is, it stays below the best, so the same options are taken.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable

from eep.errors import EepError
from eep.genome import Genome
from search_spaces import PruneSpace


class Batch(list):
    """One step's options (a list of genomes), and ``floor``: the fitness an option must beat to be
    taken (the swap pass: the fitness so far; None in elimination, where the best is always taken)."""

    def __init__(self, genomes: Iterable[Genome], floor: float | None = None):
        super().__init__(genomes)
        self.floor = floor


Steps = Generator[Batch, list[float], tuple[Genome, float]]

AUTO_SHARE = 0.4
"""``search.warm_start: auto`` starts a search from greedy elimination when its evaluations are at
most this share of the budget: at 2 and 3 of 8 in 4 layers, 180 of the default 500."""


def check(space) -> None:
    """Greedy elimination walks a uniform pruning space with ungrouped routing."""
    if not isinstance(space, PruneSpace) or space.expert_groups > 1:
        raise EepError(
            "greedy elimination needs a uniform pruning space (search_space.keep) over ungrouped "
            "experts; drop greedy from search.warm_start / baselines.methods"
        )


def cost(space: PruneSpace) -> int:
    """Evaluations :func:`steps` asks for (the same whatever the fitnesses)."""
    e, k = space.num_experts, space.keep
    # keeping all: the full model, once
    return len(space.units) * (sum(range(k + 1, e + 1)) + k * (e - k)) or 1


def steps(space: PruneSpace) -> Steps:
    """Backward elimination then one best-swap pass per layer (see the module docstring)."""
    check(space)
    num_experts, keep = space.num_experts, space.keep
    layers = [unit[0] for unit in space.units]
    kept = {layer: list(range(num_experts)) for layer in layers}

    def genome(changes: dict[int, list[int]]) -> Genome:
        return space.genome({**kept, **changes})

    fitness = None
    for layer in layers:
        while len(kept[layer]) > keep:
            options = [[e for e in kept[layer] if e != drop] for drop in kept[layer]]
            scores = yield Batch(genome({layer: o}) for o in options)
            best = max(range(len(options)), key=lambda i: (scores[i], -i))
            kept[layer], fitness = options[best], scores[best]
    for layer in layers:
        dropped = [e for e in range(num_experts) if e not in kept[layer]]
        options = [
            sorted([*(k for k in kept[layer] if k != out), into])
            for out in kept[layer]
            for into in dropped
        ]
        if not options:
            continue
        scores = yield Batch((genome({layer: o}) for o in options), fitness)
        best = max(range(len(options)), key=lambda i: (scores[i], -i))
        if fitness is None or scores[best] > fitness:
            kept[layer], fitness = options[best], scores[best]
    if fitness is None:  # nothing to drop or swap: the full model is the answer
        fitness = (yield Batch([genome({})]))[0]
    return genome({}), fitness


def auto_off(space, evaluations: int) -> str | None:
    """Why ``search.warm_start: auto`` does not start this search from greedy elimination (None:
    it does)."""
    try:
        check(space)
    except EepError:
        return "greedy elimination needs a uniform pruning space over ungrouped experts"
    spent = cost(space)
    if spent > AUTO_SHARE * evaluations:
        return (
            f"greedy elimination would take {spent} of the {evaluations} evaluations, more than "
            f"{AUTO_SHARE:.0%}"
        )
    return None


def starts(search, space) -> bool:
    """Whether a search (its ``SearchConfig``) over ``space`` starts from greedy elimination."""
    if search.warm_start == "auto":
        return not search.frontier and auto_off(space, search.evaluations) is None
    return "greedy" in search.warm_start


def bar(batch: Batch, scored: Iterable[float]) -> float | None:
    """The fitness below which an option of ``batch`` cannot be taken, given options of it scored
    before (``scored``): the best of them, or the batch's floor if higher; None when neither."""
    values = [*scored, *(() if batch.floor is None else (batch.floor,))]
    return max(values) if values else None


def cut_scores(batch: Batch, score: Callable[[Genome, float | None], float]) -> list[float]:
    """``batch`` scored one option after another, each given the :func:`bar` it cannot be taken
    below: ``score(genome, bar)`` may stop early and return an upper bound under ``bar`` instead of
    the fitness (the early cut), and greedy takes the same options."""
    scored: list[float] = []
    for genome in batch:
        scored.append(score(genome, bar(batch, scored)))
    return scored


def run(gen: Steps, score) -> tuple[Genome, float, int]:
    """Drive ``gen`` with ``score(genomes) -> fitnesses``: (genome, its fitness, evaluations spent)."""
    spent = 0
    try:
        batch = next(gen)
        while True:
            fitnesses = score(batch)
            spent += len(batch)
            batch = gen.send(fitnesses)
    except StopIteration as done:
        genome, fitness = done.value
        return genome, fitness, spent

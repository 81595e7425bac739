"""What a genome means: pruning keep sets (uniform or under a budget), merge matrices, top-k,
weight groups; and the schedule of phases a search runs through."""

from __future__ import annotations

from dataclasses import dataclass

from eep.errors import EepError
from search_spaces.budget import BudgetSpace, crossover_budget, mutate_budget, random_budget_genome
from search_spaces.frontier import FrontierSpace, LatencyFrontierSpace, TopKFrontierSpace
from search_spaces.merge import MergeSpace, crossover_matrices, mutate_noise
from search_spaces.prune import PruneSpace, crossover_rows, layer_groups, mutate_swap, random_genome

__all__ = [
    "BudgetSpace",
    "FrontierSpace",
    "LatencyFrontierSpace",
    "TopKFrontierSpace",
    "MergeSpace",
    "PruneSpace",
    "Schedule",
    "build_schedule",
    "crossover_budget",
    "crossover_matrices",
    "crossover_rows",
    "layer_groups",
    "mutate_budget",
    "mutate_noise",
    "mutate_swap",
    "random_budget_genome",
    "random_genome",
]


@dataclass(frozen=True)
class Schedule:
    """The spaces a search breeds in, each from a candidate id on (EEP: prune, then merge)."""

    phases: tuple[tuple[int, object], ...]

    @classmethod
    def of(cls, space) -> Schedule:
        return space if isinstance(space, Schedule) else cls(((0, space),))

    @property
    def first(self):
        return self.phases[0][1]

    def phase(self, candidate_id: int) -> int:
        """Index of the phase candidate ``candidate_id`` is bred in."""
        return max(i for i, (start, _) in enumerate(self.phases) if start <= candidate_id)

    def size(self) -> float:
        return max(space.size() for _, space in self.phases)

    def describe(self) -> str:
        if len(self.phases) == 1:
            return self.first.describe()
        return "; then ".join(
            f"from evaluation {start}: {space.describe()}" for start, space in self.phases
        )


def build_schedule(
    cfg, shape, frontier: str | None = None, smallest_from: int | None = None
) -> Schedule:
    """The search's phases from the ``search_space`` config section and the model's MoE shape
    (:class:`eep.families.MoEShape`); a setting the model cannot satisfy is an :class:`EepError`.
    ``frontier``: a multi-objective search's size objective: ``kept_params`` over genomes of
    every size (:class:`FrontierSpace`), ``active_params`` over per-layer top-k
    (:class:`TopKFrontierSpace`). ``smallest_from`` (``kept_params`` only): from that candidate
    on, the frontier's smallest size alone (a :class:`PruneSpace` keeping top-k in every layer)."""
    from eep.families import FAMILIES

    family = FAMILIES[shape.family]
    layers, num_experts = tuple(shape.moe_layers), shape.num_experts
    k = cfg.top_k or shape.top_k
    if shape.expert_groups > 1 and (cfg.budget is not None or cfg.kind != "prune"):
        raise EepError(
            f"{family.title} routes within {shape.expert_groups} expert groups, where eep searches uniform "
            "pruning only (search_space.kind: prune, no budget)"
        )
    lower = "" if cfg.top_k else " or set search_space.top_k lower"
    if cfg.top_k is not None and cfg.top_k > shape.top_k:
        raise EepError(
            f"search_space.top_k={cfg.top_k} is above the model's top_k={shape.top_k}; it can only be lowered"
        )
    if cfg.groups is not None and cfg.groups > len(layers):
        raise EepError(
            f"search_space.groups={cfg.groups} but the model has only {len(layers)} MoE layers"
        )
    if frontier:
        if cfg.kind != "prune" or cfg.budget is not None or cfg.groups is not None:
            raise EepError(
                "a multi-objective search (search.objectives) spans every size: set neither "
                "search_space.budget nor groups, and search_space.kind: prune"
            )
        if frontier == "active_params":
            if cfg.top_k is not None:
                raise EepError(
                    "an active-parameters frontier searches each layer's top-k: remove "
                    "search_space.top_k"
                )
            return Schedule(((0, TopKFrontierSpace(num_experts, shape.top_k, layers)),))
        if shape.expert_groups > 1 or shape.group_min > k:
            what = "latency" if frontier == "latency" else "kept-parameters"
            raise EepError(
                f"{family.title} routes within expert groups; a {what} frontier changes layer sizes "
                "freely, which grouped routing does not allow (an active-parameters one, "
                "search.objectives: [fitness, active_params], keeps every expert)"
            )
        if frontier == "latency":
            if cfg.top_k is not None:
                raise EepError(
                    "a latency frontier searches each layer's top-k: remove search_space.top_k"
                )
            return Schedule(((0, LatencyFrontierSpace(num_experts, shape.top_k, layers)),))
        space = FrontierSpace(num_experts, shape.top_k, layers, cfg.top_k)
        if smallest_from is None:
            return Schedule(((0, space),))
        smallest = PruneSpace(num_experts, shape.top_k, layers, space.min_keep, cfg.top_k)
        return Schedule(((0, space), (smallest_from, smallest)))
    if cfg.budget is not None:
        low, high = k * len(layers), num_experts * len(layers)
        if not low <= cfg.budget <= high:
            raise EepError(
                f"search_space.budget={cfg.budget} must lie in {low}..{high}: each of the {len(layers)} MoE "
                f"layers keeps between top_k={k} and {num_experts} experts{lower}"
            )
        if shape.group_min > k:
            raise EepError(
                f"{family.title} scores its expert groups by their top {shape.group_min} experts, so every "
                f"layer keeps at least {shape.group_min}; a budget search lets layers keep top_k={k}: "
                f"raise search_space.top_k to {shape.group_min}"
            )
        first = BudgetSpace(num_experts, shape.top_k, layers, cfg.budget, cfg.top_k)
    else:
        if cfg.keep > num_experts:
            raise EepError(
                f"search_space.keep={cfg.keep} but the model has only {num_experts} experts per layer"
            )
        if cfg.keep < k:
            raise EepError(
                f"search_space.keep={cfg.keep} is below the top_k={k} each token is routed to; "
                f"keep at least {k}{lower}"
            )
        per_group, left = divmod(cfg.keep, shape.expert_groups)
        if left or per_group < shape.group_min:
            raise EepError(
                f"search_space.keep={cfg.keep} must be a multiple of the model's {shape.expert_groups} "
                f"expert groups with at least {shape.group_min} per group: {family.title} routes within "
                "groups"
            )
        groups = layer_groups(layers, cfg.groups) if cfg.groups is not None else None
        first = PruneSpace(
            num_experts, shape.top_k, layers, cfg.keep, cfg.top_k, groups, shape.expert_groups
        )
    if cfg.kind == "prune":
        return Schedule(((0, first),))
    # router matrices that mix experts map softmax probabilities; elsewhere the router keeps selecting
    merge = MergeSpace(
        num_experts,
        shape.top_k,
        layer_groups(layers, cfg.groups),
        mix_router=shape.router_matrix is not None,
    )
    return Schedule(((0, first), (cfg.merge_after, merge)))

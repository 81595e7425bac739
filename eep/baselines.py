"""Task-agnostic expert-pruning baselines from one calibration pass (:mod:`eep.calibration`):
routing frequency, REAP, random keep sets, NAEE (enumeration of keep sets by MoE-output error)
and NAEE's dynamic-skipping thresholds."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence

import torch

from eep.calibration import Calibration, keep_set_error
from eep.config import Config
from eep.errors import EepError
from eep.genome import Genome, LayerGene
from eep.moe import MoEShape, mapped_routing, router_columns

# -- baselines ----------------------------------------------------------------------------------


def frequency_genome(cal: Calibration, keep: int) -> Genome:
    """The ``keep`` most-routed experts of each layer (ties: the lower index)."""
    _check_keep(cal, keep)
    return Genome.from_keep(
        cal.num_experts, cal.top_k, {i: _top(cal.counts[i], keep) for i in cal.moe_layers}
    )


def reap_genome(cal: Calibration, keep: int) -> Genome:
    """The ``keep`` experts of highest REAP saliency in each layer (ties: the lower index)."""
    _check_keep(cal, keep)
    return Genome.from_keep(
        cal.num_experts, cal.top_k, {i: _top(cal.reap[i], keep) for i in cal.moe_layers}
    )


def random_genomes(shape: MoEShape | Calibration, keep: int, n: int, seed: int) -> list[Genome]:
    """``n`` distinct genomes, each keeping ``keep`` experts per layer drawn uniformly (seeded)."""
    _check_keep(shape, keep)
    possible = math.comb(shape.num_experts, keep) ** len(shape.moe_layers)
    if n > possible:
        raise EepError(
            f"asked for {n} distinct random genomes but only {possible} exist; ask for fewer"
        )
    rng = random.Random(seed)
    genomes: dict[str, Genome] = {}
    while len(genomes) < n:
        genome = Genome.from_keep(
            shape.num_experts,
            shape.top_k,
            {i: rng.sample(range(shape.num_experts), keep) for i in shape.moe_layers},
        )
        genomes.setdefault(genome.key, genome)
    return list(genomes.values())


def naee_genome(cal: Calibration, keep: int, max_subsets: int = 20_000) -> tuple[Genome, str]:
    """NAEE task-agnostic pruning: per layer, the keep set S minimising ‖Z − Z_S‖_F on the sampled
    tokens, Z_S routing among S exactly as a prune gene does (:meth:`eep.moe.MoEAdapter.route`).
    Returns (genome, how): ``enumeration`` of all C(E, keep) sets, or, when there are more than
    ``max_subsets``, ``greedy`` backward elimination (drop the expert whose removal raises the
    error least, repeatedly), which is not guaranteed to find the best set.

    Inputs: every layer is scored on the unpruned model's inputs, as NAEE's ``layerwise_pruning``
    does (Lucky-Lance/Expert_Sparsity ``method/expert_pruning.py``, the method its README runs);
    its other method, ``progressive_pruning``, re-collects each layer's inputs after pruning the
    layers before it (one model pass per layer) and is not done here. Departures: NAEE scores all
    calibration tokens and sums per-batch norms Σ_b ‖Z_b − Z'_b‖_F; we score a uniform token sample
    with the paper's single norm (as its square, same argmin).
    """
    _check_keep(cal, keep)
    how = "enumeration" if math.comb(cal.num_experts, keep) <= max_subsets else "greedy"
    chosen = {}
    for layer in cal.moe_layers:
        error = keep_set_error(cal, layer)
        if how == "enumeration":
            chosen[layer] = min(itertools.combinations(range(cal.num_experts), keep), key=error)
        else:
            kept = list(range(cal.num_experts))
            while len(kept) > keep:
                kept.remove(min(kept, key=lambda e: error([x for x in kept if x != e])))
            chosen[layer] = kept
    return Genome.from_keep(cal.num_experts, cal.top_k, chosen), how


def skip_betas(cal: Calibration, genome: Genome) -> dict[int, float]:
    """NAEE dynamic skipping thresholds {layer: beta}: the median over the sampled tokens of w2/w1
    under the genome's routing (restricted to a prune gene's kept experts, or a merge gene's
    router), for ``MoEAdapter.applied(genome, skip=...)``. Only for top-2 layers.

    The logits are the unpruned model's: exact for the first MoE layer, an approximation for later
    ones, whose inputs change once earlier layers are pruned (NAEE measures beta on the model it
    is given, pruned or not: ``method/dynamic_skipping.py``)."""
    genome.validate_for(cal.num_experts, cal.top_k, cal.moe_layers)
    betas = {}
    for layer in cal.moe_layers:
        k = genome.active(layer)
        if k != 2:
            raise EepError(
                f"dynamic skipping needs top-2 routing; layer {layer} of the genome routes top-{k}"
            )
        weights, _ = _gene_routing(cal, layer, genome.gene(layer), k)
        # = numpy's median
        betas[layer] = float(torch.quantile((weights[:, 1] / weights[:, 0]).double(), 0.5))
    return betas


def _gene_routing(cal: Calibration, layer: int, gene: LayerGene, k: int):
    """The routing ``MoEAdapter.applied`` gives this gene, on the layer's sampled logits."""
    logits = cal.logits[layer]
    picks = router_columns(gene, cal.num_experts) if gene.is_merge else list(gene.keep)
    if picks is None:  # a router matrix mixing experts
        if cal.router_matrix is None:
            raise EepError("this model's routing defines no router matrix that mixes experts")
        router = torch.tensor(
            gene.matrices(cal.num_experts)[1], dtype=torch.float32, device=logits.device
        )
        return mapped_routing(logits, router.T.contiguous(), k, *cal.router_matrix)
    return cal.routing(layer, logits, picks, k)


def _top(scores: torch.Tensor, keep: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))[:keep]


def _check_keep(shape: MoEShape | Calibration, keep: int) -> None:
    if not shape.top_k <= keep <= shape.num_experts:
        raise EepError(
            f"keep must be between the model's top_k ({shape.top_k}) and its {shape.num_experts} experts, "
            f"got {keep}"
        )


def warm_genomes(
    config: Config, worker, methods, log: Callable[[str], None], keeps: Sequence[int] = ()
) -> dict[str, Genome]:
    """``search.warm_start``'s calibration-pass genomes (``naee``, ``reap``, ``frequency``) by
    name: at the search's keep count, named by method; or at each of ``keeps`` (a frontier's
    sizes, :func:`eep.evolution.warm_keeps`), named ``method-keep``."""
    from eep.calibration import calibrate

    _, _, cal = calibrate(config, worker, log)
    out = {}
    for keep in keeps or [config.search_space.keep]:
        for method in methods:
            name = f"{method}-{keep}" if keeps else method
            if method == "naee":
                out[name] = naee_genome(cal, keep, config.baselines.naee_max_subsets)[0]
            elif method == "reap":
                out[name] = reap_genome(cal, keep)
            elif method == "frequency":
                out[name] = frequency_genome(cal, keep)
            else:
                raise ValueError(f"{method!r} is not a calibration-pass warm start")
            # the search routes to fewer experts: so do its seeds
            if config.search_space.top_k is not None:
                out[name] = Genome.from_keep(
                    out[name].num_experts,
                    out[name].top_k,
                    out[name].keep_map(),
                    config.search_space.top_k,
                )
    return out

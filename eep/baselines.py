"""Task-agnostic expert-pruning baselines from one calibration pass: routing frequency, REAP,
random keep sets, NAEE (enumeration of keep sets by MoE-output error) and NAEE's dynamic-skipping
thresholds.

:func:`collect` runs the unpruned model once over calibration batches with a forward hook on each
layer's router and keeps, per MoE layer, over all non-padding tokens:

- ``counts``: how often each expert is in a token's top-k;
- ``reap``: REAP saliency, the mean over the tokens routed to an expert of g · ‖expert output‖₂.
  For Mixtral g is the router's softmax probability over all E logits, as REAP's released code
  takes it (CerebrasResearch/reap ``src/reap/observer.py``: it renormalises over the top-k only for
  models with ``norm_topk_prob``); the top-k weight Mixtral multiplies by is g / Σ top-k g. For
  the other families g is the routed weight (see :func:`_reap_gates`);
- for a uniform sample of at most ``max_tokens_per_layer`` tokens (the same tokens in every
  layer): the router logits and the Gram matrix G = Y Yᵀ [E, E] of the E experts' outputs Y.

The sample is all NAEE and skipping need, for any keep set: a token's MoE output with keep set S
is Σ_e w_e(S) y_e, so ‖Z − Z_S‖_F² = Σ_t cᵀ G_t c with c = w(all) − w(S) — the exact error without
keeping the hidden states (E² numbers a token instead of h; for Mixtral 64 instead of 4096).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from eep.errors import EepError
from eep.genome import Genome, LayerGene
from eep.moe import MoEAdapter, MoEShape, mapped_routing, router_columns


@dataclass(frozen=True)
class Calibration:
    """Per-MoE-layer routing statistics of the unpruned model (all on CPU)."""

    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    tokens: int
    """Non-padding tokens seen."""
    counts: dict[int, torch.Tensor]
    """[E] int64: tokens whose top-k held each expert."""
    reap: dict[int, torch.Tensor]
    """[E] float64: REAP saliency (0 for an expert never routed to)."""
    logits: dict[int, torch.Tensor]
    """[N, E] float32: router logits of the sampled tokens."""
    gram: dict[int, torch.Tensor]
    """[N, E, E] float32: Gram matrices of the experts' outputs on the sampled tokens."""
    route: (
        Callable[[int, torch.Tensor, list[int], int], tuple[torch.Tensor, torch.Tensor]] | None
    ) = None
    """The model family's routing of logits [N, E] of a layer among some experts with some top-k
    (:meth:`eep.moe.MoEAdapter.route`, set by :func:`collect`); None for statistics built by hand,
    which then cannot route."""
    router_matrix: tuple[bool, float] | None = (True, 1.0)
    """How a router matrix mixing experts forms weights in this model (:attr:`eep.families.MoEShape.router_matrix`)."""

    def routing(
        self, layer: int, logits: torch.Tensor, keep, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids), each [N, top_k]: how the layer routes ``logits`` among ``keep``."""
        if self.route is None:
            raise EepError(
                "these calibration statistics carry no routing; build them with collect()"
            )
        return self.route(layer, logits, sorted(keep), top_k)


@dataclass
class _Layer:
    counts: torch.Tensor
    reap_sum: torch.Tensor
    logits: torch.Tensor
    gram: torch.Tensor


class _TokenSample:
    """A seeded uniform sample of at most ``size`` tokens of a stream (the ``size`` smallest of
    random keys), filled in place: ``offer`` says which slots the new tokens overwrite."""

    def __init__(self, size: int, seed: int):
        self.keys = torch.full((size,), math.inf, dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)

    def offer(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, new): the new tokens ``new`` (indices into the n offered) go to ``slots``."""
        keys = torch.rand(n, generator=self.generator, dtype=torch.float64)
        size = len(self.keys)
        chosen = torch.topk(torch.cat([self.keys, keys]), size, largest=False).indices
        stays = torch.zeros(size, dtype=torch.bool)
        stays[chosen[chosen < size]] = True
        slots = (~stays).nonzero().squeeze(1)
        new = (chosen[chosen >= size] - size).sort().values
        self.keys[slots] = keys[new]
        return slots, new


def calibration_inputs(
    model: nn.Module, batches: Iterable[dict]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) of each tokenizer-output batch on the model's input device; a
    batch without a mask is all tokens."""
    device = model.get_input_embeddings().weight.device
    for inputs in batches:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        yield ids.to(device), (torch.ones_like(ids) if mask is None else mask).to(device)


def collect(
    model: nn.Module,
    adapter: MoEAdapter,
    batches: Iterable[dict],
    max_tokens_per_layer: int = 8192,
    seed: int = 0,
    chunk: int = 1024,
) -> Calibration:
    """One pass of the (unpruned, eval-mode) model over tokenizer-output batches (``input_ids``,
    ``attention_mask``); positions whose mask is 0 count nowhere. Statistics are computed where
    each layer lives and stored on CPU; the model is left exactly as it was, also on error.
    ``chunk`` bounds the tokens whose E expert outputs are held at once."""
    if max_tokens_per_layer < 1:
        raise EepError(f"max_tokens_per_layer must be at least 1, got {max_tokens_per_layer}")
    experts = adapter.num_experts
    sample = _TokenSample(max_tokens_per_layer, seed)
    layers = {}
    for layer in adapter.moe_layers:
        device = adapter.routers[layer].weight.device
        layers[layer] = _Layer(
            torch.zeros(experts, dtype=torch.float64, device=device),
            torch.zeros(experts, dtype=torch.float64, device=device),
            torch.zeros(max_tokens_per_layer, experts),
            torch.zeros(max_tokens_per_layer, experts, experts),
        )
    # this batch's valid-token mask and sample picks, for the hooks
    batch: dict[str, torch.Tensor] = {}

    def observer(layer: int) -> Callable:
        def hook(gate: nn.Module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            valid = batch["valid"].to(x.device)
            _observe(
                adapter,
                layer,
                layers[layer],
                x[valid],
                output[0][valid],
                output[1][valid],
                output[2][valid],
                batch["slots"],
                batch["new"],
                chunk,
            )

        return hook

    tokens = 0
    handles = []
    try:
        handles = [
            adapter.routers[i].register_forward_hook(observer(i)) for i in adapter.moe_layers
        ]
        with torch.no_grad():
            for ids, mask in calibration_inputs(model, batches):
                batch["valid"] = mask.reshape(-1).bool()
                n = int(batch["valid"].sum())
                batch["slots"], batch["new"] = sample.offer(n)
                tokens += n
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise EepError("the calibration batches hold no tokens (empty, or all padding)")
    filled = sample.keys.isfinite()
    return Calibration(
        experts,
        adapter.top_k,
        tuple(adapter.moe_layers),
        tokens,
        counts={i: s.counts.cpu().long() for i, s in layers.items()},
        reap={
            i: torch.where(s.counts > 0, s.reap_sum / s.counts.clamp(min=1), 0.0).cpu()
            for i, s in layers.items()
        },
        logits={i: s.logits[filled] for i, s in layers.items()},
        gram={i: s.gram[filled] for i, s in layers.items()},
        route=adapter.route,
        router_matrix=adapter.shape.router_matrix,
    )


def _observe(
    adapter: MoEAdapter,
    layer: int,
    stats: _Layer,
    x: torch.Tensor,
    logits: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    slots: torch.Tensor,
    new: torch.Tensor,
    chunk: int,
) -> None:
    """Add one batch's valid tokens (x [n, h], router logits [n, E], top-k weights and index [n, k])."""
    gates = _reap_gates(adapter, logits, weights, index)
    stats.counts += torch.bincount(index.reshape(-1), minlength=adapter.num_experts).double()
    for expert in range(adapter.num_experts):
        token = (index == expert).any(dim=-1).nonzero().squeeze(1)
        if len(token):
            norms = adapter.expert_output(layer, expert, x[token]).float().norm(dim=-1)
            stats.reap_sum[expert] += (gates[token, expert] * norms).sum().double()
    if len(new):
        new = new.to(x.device)
        stats.logits[slots] = logits[new].float().cpu()
        stats.gram[slots] = output_gram(adapter, layer, x[new], chunk).cpu()


def _reap_gates(
    adapter: MoEAdapter, logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """[n, E] REAP gate values g: for Mixtral the softmax over all E logits (REAP's code); for the
    other families the weight the router gives a routed expert, which is what REAP's code takes
    for them (softmax probabilities, renormalised over the top-k with ``norm_topk_prob``) and, for
    sigmoid and top-k-softmax routers, what the model multiplies the expert's output by."""
    if adapter.family.model_type == "mixtral":
        return torch.softmax(logits.float(), dim=-1)
    return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter_(
        1, index, weights.float()
    )


def output_gram(
    adapter: MoEAdapter, layer: int, x: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """[n, E, E] float32: for each token of x [n, h], the inner products of the E experts' outputs."""
    grams = []
    for part in x.split(chunk):
        y = torch.stack(
            [adapter.expert_output(layer, e, part).float() for e in range(adapter.num_experts)],
            dim=1,
        )
        grams.append(y @ y.transpose(1, 2))
    return torch.cat(grams)


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


def output_error(cal: Calibration, layer: int, keep: Iterable[int]) -> float:
    """‖Z − Z_S‖_F²: squared error of the layer's MoE output on the sampled tokens when only the
    experts ``keep`` remain (routing restricted to them, as a prune gene routes)."""
    return keep_set_error(cal, layer)(list(keep))


def output_energy(cal: Calibration, layer: int) -> float:
    """‖Z‖_F²: the unpruned layer's MoE output energy on the sampled tokens."""
    full = _dense_weights(cal, layer, range(cal.num_experts))
    return float(torch.einsum("ne,nef,nf->", full, cal.gram[layer].double(), full))


def keep_set_error(cal: Calibration, layer: int) -> Callable[[Iterable[int]], float]:
    """:func:`output_error` of the layer as a function of the keep set (its set-up done once)."""
    gram = cal.gram[layer].double()
    full = _dense_weights(cal, layer, range(cal.num_experts))

    def error(keep: Iterable[int]) -> float:
        c = full - _dense_weights(cal, layer, keep)  # exactly 0 for tokens routed as before
        return float(torch.einsum("ne,nef,nf->", c, gram, c))

    return error


def _dense_weights(cal: Calibration, layer: int, keep: Iterable[int]) -> torch.Tensor:
    """[N, E] float64 routing weights among ``keep`` (0 for experts a token is not routed to)."""
    logits = cal.logits[layer]
    weights, index = cal.routing(layer, logits, list(keep), cal.top_k)
    return torch.zeros_like(logits, dtype=torch.float64).scatter_(1, index, weights.double())


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

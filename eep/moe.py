"""MoE adapters: where a model family's routing and expert tensors live, and how a genome
changes them reversibly in place for search (physically, for export: :mod:`eep.surgery`).

One adapter serves every family of :mod:`eep.families`; what differs between them is read from
the model (its [E, ...] expert and router tensors) and the family table, and each family's routing
rule is run by its own ``transformers`` router code, never re-derived here.

- Pruning means "the same routing over fewer experts": the router runs on its tensors sliced to
  the kept experts (weights, biases, score-correction biases), which is exactly the routing of a
  smaller stock model of the family; the chosen slots are mapped back to the kept experts' ids.
  Kept experts stay in their original order, so top-k ties and expert groups break the same way.
  No expert weight is touched.
- Merging (EEP stage 2) computes each layer's E' merged experts with one matrix product per
  expert tensor into a buffer kept for the next candidate, swaps it in for the duration of the
  evaluation and swaps the originals back after: nothing is reloaded or allocated per candidate,
  the extra memory is E'/E of the expert weights, and a layer whose merge matrix equals the
  previous candidate's (children share most layers with their parents) is not merged again.
  A router matrix that only selects (one source expert per slot) routes like pruning, over the
  selected experts; one that mixes experts is EEP's routing (softmax over the E logits -> router
  matrix -> top-k -> the family's renormalisation and scale, :attr:`MoEShape.router_matrix`),
  defined where a family routes by softmax probabilities.
- Low-rank experts (MoE-I² stage 2, a pruning gene's ``rank``): the kept experts, their matrices
  replaced by rank-r approximations (:mod:`eep.lowrank`; the SVD of each matrix is computed once),
  are written into the merge buffers as slots 0..n-1 and swapped in for the evaluation, routed like
  the smaller exported model; the originals are swapped back after.
- Dynamic skipping (NAEE, top-2 only) is one more router hook after those: a token whose second
  weight w2 < beta * w1 keeps only its first expert, with weight 1 (NAEE renormalises after
  zeroing w2). The second expert still runs with weight 0 in transformers' experts kernels, so in
  search this measures accuracy, not speed.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from eep.errors import EepError
from eep.families import FAMILIES, MoEShape, shape_of
from eep.genome import Genome, LayerGene
from eep.lowrank import Factors, check_ranks, matrix_tensors


def merge_experts(
    weight: torch.Tensor, matrix: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """[E, ...] expert tensor -> [E', ...] with slot j = sum_i matrix[j, i] * weight[i] (one GEMM),
    written into ``out`` when given (a reused buffer: no allocation per candidate).

    Search and export both call this, so an exported model holds the same merged weights."""
    shape = (matrix.shape[0], *weight.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=weight.dtype, device=weight.device)
    torch.matmul(
        matrix.to(device=weight.device, dtype=weight.dtype),
        weight.reshape(weight.shape[0], -1),
        out=out.view(matrix.shape[0], -1),
    )
    return out


def router_columns(gene: LayerGene, num_experts: int) -> list[int] | None:
    """For a router matrix that only picks one source expert per slot (the same positive weight
    for every slot, distinct experts): the picked experts, slot by slot. Such routing equals a
    sliced stock router. None otherwise."""
    _, router = gene.matrices(num_experts)
    picks, values = [], set()
    for row in router:
        nonzero = [i for i, x in enumerate(row) if x != 0.0]
        if len(nonzero) != 1:
            return None
        picks.append(nonzero[0])
        values.add(row[nonzero[0]])
    return picks if len(values) == 1 and len(set(picks)) == len(picks) else None


class MoEAdapter:
    """One adapter for every family in :data:`eep.families.FAMILIES` (transformers 5.x fused
    experts: ``experts.<tensor>`` [E, ...] per MoE block, a router module returning
    (logits, top-k weights, top-k indices)).

    The family's own router code does the routing under a genome: it runs on a copy of the router
    tensors sliced to the kept experts (:meth:`_reroute`), so in search a pruned layer computes
    exactly what the exported smaller model computes, whatever the family's routing rule."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        shape = shape_of(model.config)
        self.shape = shape
        self.family = FAMILIES[shape.family]
        self.num_experts, self.top_k, self.moe_layers = (
            shape.num_experts,
            shape.top_k,
            list(shape.moe_layers),
        )
        layers = decoder_layers(model)
        self.blocks = {i: layers[i].mlp for i in self.moe_layers}
        missing = [i for i, block in self.blocks.items() if not hasattr(block, "experts")]
        if missing:
            raise EepError(
                f"layers {missing} of this {self.family.title} model have no experts although its config "
                "says they are MoE layers; the model does not match its config"
            )
        self.routers = {i: getattr(block, self.family.router) for i, block in self.blocks.items()}
        prefixes = {id(block): name for name, block in model.named_modules()}
        self.prefixes = {i: prefixes[id(block)] + "." for i, block in self.blocks.items()}
        first = self.blocks[self.moe_layers[0]]
        # every [E, ...] tensor of the experts (weights, and GPT-OSS's biases) and of the router
        # (weight, GPT-OSS's bias, DeepSeek-V3/GLM's score-correction bias)
        self.expert_tensors = tuple(
            name
            for name, p in first.experts.named_parameters(recurse=False)
            if p.shape[0] == self.num_experts
        )
        router = self.routers[self.moe_layers[0]]
        self.router_tensors = tuple(
            name
            for name, t in [
                *router.named_parameters(recurse=False),
                *router.named_buffers(recurse=False),
            ]
            if t.shape[0] == self.num_experts
        )
        # merged experts, reused across candidates
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}
        self._merged_for: dict[int, tuple | None] = {}  # the merge matrix each layer's buffers hold
        self._factors = None  # eep.lowrank.Factors, made on first use

    @property
    def factors(self):
        """Low-rank factors of this model's experts (:class:`eep.lowrank.Factors`), cached."""
        if self._factors is None:
            self._factors = Factors(self)
        return self._factors

    def use_scales(self, scales: dict[str, torch.Tensor] | None) -> None:
        """Make low-rank factors activation-aware with these scales (None: plain SVD)."""
        self._factors = Factors(self, scales)

    def validate(self, genome: Genome, skip: Mapping[int, float] | None = None) -> None:
        check_genome(genome, self.shape)
        check_ranks(genome, self)
        for layer, beta in (skip or {}).items():
            if layer not in self.moe_layers:
                raise EepError(f"skip names layer {layer}, which is not an MoE layer of this model")
            if genome.active(layer) != 2:
                raise EepError(
                    f"dynamic skipping needs top-2 routing; layer {layer} routes top-{genome.active(layer)}"
                )
            if not (math.isfinite(beta) and beta >= 0):
                raise EepError(
                    f"skip beta of layer {layer} must be a finite number >= 0, got {beta!r}"
                )

    def expert_output(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's output on tokens ``x`` [n, h], unweighted, computed by the family's own
        experts module (every token routed to ``expert`` alone with weight 1)."""
        tokens = x.reshape(-1, x.shape[-1])
        index = torch.full((tokens.shape[0], 1), expert, dtype=torch.long, device=x.device)
        weight = torch.ones((tokens.shape[0], 1), dtype=x.dtype, device=x.device)
        return self.blocks[layer].experts(tokens, index, weight).reshape(x.shape)

    def route(
        self, layer: int, logits: torch.Tensor, rows: list[int], top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, expert ids), each [N, top_k]: the layer's routing of router ``logits`` [N, E]
        (as the full model computed them) among the experts ``rows`` only, with ``top_k`` — what a
        pruned layer does, from logits alone. The family's own router code runs on an identity
        weight over the kept logits (their bias is already in them); its other per-expert tensors
        (DeepSeek-V3's score correction) are sliced as in :meth:`_reroute`."""
        router = self.routers[layer]
        index = torch.tensor(list(rows), dtype=torch.long, device=logits.device)
        n = len(rows)
        tensors = {
            name: getattr(router, name)
            .index_select(0, index.to(router.weight.device))
            .to(logits.device)
            for name in self.router_tensors
        }
        tensors["weight"] = torch.eye(n, dtype=logits.dtype, device=logits.device)
        if "bias" in tensors:
            tensors["bias"] = torch.zeros(n, dtype=logits.dtype, device=logits.device)
        with (
            torch.no_grad(),
            _replaced(router, tensors, {"num_experts": n, "top_k": top_k, "hidden_dim": n}),
        ):
            _, weights, chosen = type(router).forward(router, logits.index_select(1, index))
        return weights, index[chosen]

    # -- search: reversible, in place ---------------------------------------------------------

    @contextlib.contextmanager
    def applied(self, genome: Genome, skip: Mapping[int, float] | None = None) -> Iterator[None]:
        """Route (and, for merge genes, weigh) every MoE layer as the genome says while the block
        is active; restore the model exactly after, also on error. ``skip`` ({layer: beta}) adds
        NAEE dynamic skipping on top of the genome's routing in those layers."""
        self.validate(genome, skip)
        handles, swapped = [], []
        try:
            for layer, gene in genome.layers:
                k = genome.active(layer, gene)
                block, router = self.blocks[layer], self.routers[layer]
                if gene.is_merge:
                    # the experts implementations size their dispatch by num_experts
                    swapped.append((block.experts, "num_experts", block.experts.num_experts))
                    block.experts.num_experts = gene.slots
                    self._swap_merged(layer, gene, swapped)
                    picks = router_columns(gene, self.num_experts)
                    if picks is None:  # EEP's router matrix mixing experts
                        router_map = self._matrix(gene.matrices(self.num_experts)[1], router)
                        handles.append(
                            router.register_forward_hook(
                                _mapped_routing_hook(router_map, k, *self.shape.router_matrix)
                            )
                        )
                    else:
                        handles.append(
                            router.register_forward_hook(
                                self._reroute(layer, picks, k, remap=False)
                            )
                        )
                # the kept experts, low-rank, in slots 0..n-1 as a smaller model's
                elif gene.ranks is not None:
                    swapped.append((block.experts, "num_experts", block.experts.num_experts))
                    block.experts.num_experts = gene.slots
                    self._swap_low_rank(layer, gene, swapped)
                    handles.append(
                        router.register_forward_hook(
                            self._reroute(layer, gene.keep, k, remap=False)
                        )
                    )
                elif len(gene.keep) < self.num_experts or k != self.top_k:
                    handles.append(
                        router.register_forward_hook(self._reroute(layer, gene.keep, k, remap=True))
                    )
            for layer, beta in (skip or {}).items():  # after the routing hooks: sees their output
                handles.append(self.routers[layer].register_forward_hook(_skip_hook(beta)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, name, original in reversed(swapped):
                setattr(module, name, original)

    @contextlib.contextmanager
    def compacted(self, genome: Genome, skip: Mapping[int, float] | None = None) -> Iterator[None]:
        """The smaller model a pruning genome exports, in place and without a copy: in each layer
        it changes, the kept experts are moved to slots 0..n-1 (an in-place permutation of the
        experts' and the router's rows) and both modules see those n rows only, the router picking
        its top-k among them. The same modules and shapes as the exported checkpoint, with no
        routing hook and no memory beyond one expert's row: what a latency is measured on
        (:meth:`eep.evaluator.FitnessWorker.latency`). The rows are moved back after, exactly
        (moved, never recomputed), also on error. Computes what :meth:`applied` computes, whose
        hooks keep every expert in place instead (tested). Merge and low-rank genes are refused."""
        self.validate(genome, skip)
        if genome.is_merge or genome.is_low_rank:
            raise EepError("compacted applies pruning genomes only (no merge or low-rank genes)")
        moved, handles = [], []
        try:
            with contextlib.ExitStack() as stack:
                for layer, gene in genome.layers:
                    n, k = len(gene.keep), genome.active(layer, gene)
                    if n == self.num_experts and k == self.top_k:
                        continue
                    experts, router = self.blocks[layer].experts, self.routers[layer]
                    tensors = [getattr(experts, name) for name in self.expert_tensors]
                    tensors += [getattr(router, name) for name in self.router_tensors]
                    dropped = [e for e in range(self.num_experts) if e not in gene.keep]
                    order = [*gene.keep, *dropped]
                    _permute_rows(tensors, order)
                    moved.append((tensors, order))
                    for module, names, sizes in (
                        (experts, self.expert_tensors, {"num_experts": n}),
                        (router, self.router_tensors, {"num_experts": n, "top_k": k}),
                    ):
                        rows = {name: getattr(module, name)[:n] for name in names}
                        stack.enter_context(_replaced(module, rows, sizes))
                for layer, beta in (skip or {}).items():
                    handles.append(self.routers[layer].register_forward_hook(_skip_hook(beta)))
                yield
        finally:
            for handle in handles:
                handle.remove()
            for tensors, order in reversed(moved):
                back = [0] * len(order)
                for slot, expert in enumerate(order):
                    back[expert] = slot
                _permute_rows(tensors, back)

    def _reroute(self, layer: int, rows, top_k: int, remap: bool):
        """A router forward hook: the family's own routing over the experts ``rows`` only (the
        router tensors sliced to them, as in the smaller exported model), with ``top_k``. The
        logits it returns stay the full model's (router-logit consumers see all E). ``remap``:
        indices name the original experts (pruning); else the slots 0..len(rows)-1 (merging)."""
        router = self.routers[layer]
        device = router.weight.device
        index = torch.tensor(list(rows), dtype=torch.long, device=device)
        sliced = {
            name: getattr(router, name).index_select(0, index) for name in self.router_tensors
        }
        sizes = {"num_experts": len(rows), "top_k": top_k}

        def hook(module: nn.Module, args, output):
            with _replaced(module, sliced, sizes):
                _, weights, chosen = type(module).forward(module, *args)
            return output[0], weights, index[chosen] if remap else chosen

        return hook

    def _swap_merged(self, layer: int, gene: LayerGene, swapped: list) -> None:
        """Swap the layer's merged experts in (from reused buffers, merged only if this gene's
        merge matrix differs from the one the buffers hold)."""
        experts = self.blocks[layer].experts
        merge = self._matrix(gene.matrices(self.num_experts)[0], self.routers[layer])
        # the last candidate's merge is still there
        fresh = self._merged_for.get(layer) != gene.merge
        self._merged_for[layer] = None  # until the merge below completes
        with torch.no_grad():
            for name in self.expert_tensors:
                original = getattr(experts, name)
                swapped.append((experts, name, original))
                merged = self._buffer(layer, name, original, gene.slots)
                if fresh:
                    merge_experts(original, merge, merged)
                setattr(experts, name, nn.Parameter(merged, requires_grad=False))
        self._merged_for[layer] = gene.merge

    def _swap_low_rank(self, layer: int, gene: LayerGene, swapped: list) -> None:
        """Swap in the kept experts only, as slots 0..n-1 of the reused merge buffers: their
        matrices as low-rank approximations, their other tensors (biases) as they are. Extra
        memory: n/E of the layer's expert weights, as for merging."""
        experts = self.blocks[layer].experts
        factored = matrix_tensors(self)
        with torch.no_grad():
            for name in self.expert_tensors:
                original = getattr(experts, name)
                kept = self._buffer(layer, name, original, gene.slots)
                for slot, (expert, rank) in enumerate(zip(gene.keep, gene.ranks)):
                    kept[slot] = (
                        self.factors.product(layer, name, expert, rank)
                        if name in factored
                        else original[expert]
                    )
                swapped.append((experts, name, original))
                setattr(experts, name, nn.Parameter(kept, requires_grad=False))
        self._merged_for[layer] = None  # the buffers no longer hold a merge

    def _buffer(self, layer: int, name: str, weight: torch.Tensor, slots: int) -> torch.Tensor:
        """The layer's merged-experts buffer, grown (never shrunk) to ``slots``: allocating (and on
        CPU, page-faulting) fresh tensors for every candidate costs more than the merge itself."""
        buffer = self._buffers.get((layer, name))
        if buffer is None or buffer.shape[0] < slots:
            buffer = torch.empty(
                (max(slots, 1), *weight.shape[1:]), dtype=weight.dtype, device=weight.device
            )
            self._buffers[(layer, name)] = buffer
            self._merged_for[layer] = None
        return buffer[:slots]

    @staticmethod
    def _matrix(rows, router: nn.Module) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.float32, device=router.weight.device)


def check_genome(genome: Genome, shape: MoEShape) -> None:
    """An :class:`EepError` unless ``genome`` fits a model of this shape (its experts, top-k and
    MoE layers) and what the family's routing allows: grouped routing needs the same number of
    experts kept in every group; router matrices that mix experts are defined on routing by
    softmax probabilities (:attr:`MoEShape.router_matrix`). Needs no weights."""
    genome.validate_for(shape.num_experts, shape.top_k, shape.moe_layers)
    family = FAMILIES[shape.family]
    for layer, gene in genome.layers:
        if (
            gene.is_merge
            and router_columns(gene, shape.num_experts) is None
            and shape.router_matrix is None
        ):
            raise EepError(
                f"layer {layer} routes through a router matrix that mixes experts, which maps softmax "
                f"probabilities; this {family.title} model routes otherwise ({family.routing}), so its merge "
                "genomes must keep a selecting router (one source expert per slot)"
            )
        if shape.expert_groups > 1 or shape.group_min > 1:
            rows = gene.keep if not gene.is_merge else router_columns(gene, shape.num_experts) or ()
            if gene.is_merge and shape.expert_groups > 1:
                raise EepError(
                    f"layer {layer} is a merge gene; {family.title} routes within expert groups, "
                    "where eep supports pruning only"
                )
            shape.check_groups(rows, f"layer {layer}")


@contextlib.contextmanager
def _replaced(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], attributes: Mapping[str, int]
):
    """Temporarily give ``module`` other parameter/buffer tensors and attributes (no autograd
    bookkeeping: the tensors may carry the graph back to the originals, as in toy training)."""
    saved = []
    try:
        for name, tensor in tensors.items():
            store = module._parameters if name in module._parameters else module._buffers
            saved.append((store, name, store[name]))
            store[name] = tensor
        for name, value in attributes.items():
            if hasattr(module, name):
                saved.append((module.__dict__, name, module.__dict__[name]))
                module.__dict__[name] = value
        yield
    finally:
        for store, name, original in reversed(saved):
            store[name] = original


def _permute_rows(tensors: list[torch.Tensor], order: list[int]) -> None:
    """Reorder the rows of each tensor in place so that row ``i`` becomes the former row
    ``order[i]``, cycle by cycle through one row's copy (exact: rows are moved, not recomputed)."""
    done = [False] * len(order)
    with torch.no_grad():
        for start in range(len(order)):
            if done[start]:
                continue
            cycle, i = [start], order[start]
            while i != start:
                cycle.append(i)
                i = order[i]
            for i in cycle:
                done[i] = True
            if len(cycle) == 1:
                continue
            for tensor in tensors:
                first = tensor[start].clone()
                for here, there in zip(cycle, cycle[1:]):
                    tensor[here].copy_(tensor[there])
                tensor[cycle[-1]].copy_(first)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM of any supported family."""
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    return base.layers


def mapped_routing(
    logits: torch.Tensor,
    router_t: torch.Tensor,
    top_k: int,
    renormalise: bool = True,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EEP's routing: softmax over the source experts, scores = p @ router.T, top-k, renormalise
    by the plain sum (no epsilon, as EEP). For the families that do not renormalise their top-k
    (:attr:`MoEShape.router_matrix`) the top-k scores are divided by the sum of all E' scores
    instead, a distribution over the merged experts as a smaller model's softmax gives; then
    times ``scale``. eep's custom form computes the same. With signed router rows the sum can come
    near zero, where the weights blow up: warned about, as EEP's own behaviour there is
    ill-conditioned."""
    scores = torch.softmax(logits.float(), dim=-1) @ router_t
    weights, index = torch.topk(scores, top_k, dim=-1)
    total = (weights if renormalise else scores).sum(dim=-1, keepdim=True)
    # only signed rows can cancel: a small sum of non-negative scores still divides well
    if bool((router_t < 0).any()) and bool((total.abs() < NEAR_ZERO).any()):
        warnings.warn(
            f"EEP routing: a token's scores sum to {float(total.abs().min()):.2e}, near zero; its expert "
            "weights are ill-conditioned (signed router rows)",
            RuntimeWarning,
            stacklevel=2,
        )
    return weights / total * scale, index


NEAR_ZERO = 1e-3
"""A renormalisation denominator below this (in absolute value) is warned about."""


def _mapped_routing_hook(router: torch.Tensor, top_k: int, renormalise: bool, scale: float):
    router_t = router.T.contiguous()

    def hook(module: nn.Module, args, output):
        return output[0], *mapped_routing(output[0], router_t, top_k, renormalise, scale)

    return hook


def _skip_hook(beta: float):
    """NAEE dynamic skipping on top-2 weights: where w2 < beta * w1 the weights become (1, 0)."""

    def hook(module: nn.Module, args, output):
        logits, weights, index = output
        first_only = torch.tensor([1.0, 0.0], dtype=weights.dtype, device=weights.device)
        return (
            logits,
            torch.where((weights[:, 1] < beta * weights[:, 0])[:, None], first_only, weights),
            index,
        )

    return hook


def adapter_for(model: nn.Module) -> MoEAdapter:
    """The adapter for a loaded model of any supported family (an error names the supported ones)."""
    return MoEAdapter(model)


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """The sparse MoE blocks by layer index (any supported family, stock or eep's custom form)."""
    return {
        i: layer.mlp
        for i, layer in enumerate(decoder_layers(model))
        if hasattr(layer.mlp, "experts")
    }

"""Export surgery: a physically smaller model equal to a genome applied to a loaded one.

The genome's experts are sliced (pruning) or merged (:func:`eep.moe.merge_experts`, the same
product the search computes) into new tensors, the router rows sliced to the kept experts, and
the config's counts updated; :func:`assemble` builds the model around that state without a random
initialisation. Two forms (:func:`export_form` decides, from the model's shape alone):

- ``stock``: uniform expert count and top-k, experts kept or merged, routing that only selects
  experts. Stock ``AutoModelForCausalLM.from_pretrained(path)`` loads it.
- ``custom``: per-layer expert counts or top-k, a router matrix that mixes experts, or low-rank
  experts: eep's modeling file (:mod:`eep.remote`), loaded with ``trust_remote_code=True``.

:func:`parameter_counts` says what the smaller model holds without building it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from eep.errors import EepError
from eep.families import FAMILIES, MoEShape
from eep.genome import Genome, LayerGene
from eep.lowrank import expert_params, matrix_tensors
from eep.moe import MoEAdapter, merge_experts, router_columns


def _matrix(rows, router: nn.Module) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, device=router.weight.device)


@dataclass(frozen=True)
class ExportForm:
    """How a genome can be written: ``stock`` (plain transformers class) or ``custom``
    (eep's modeling file, ``trust_remote_code=True``), and why."""

    kind: str
    reason: str


def export_form(genome: Genome, shape: MoEShape, form: str | None = None) -> ExportForm:
    """The form a genome is exported in (``form`` forces one; ``stock`` when impossible is an
    :class:`EepError`, as is ``custom`` for a family eep has no modeling file for). Needs only the
    model's shape, so it is decided before weights load."""
    family = FAMILIES[shape.family]
    layers = shape.moe_layers
    counts = sorted({genome.gene(i).slots for i in layers})
    actives = sorted({genome.active(i) for i in layers})
    general = [i for i in layers if router_columns(genome.gene(i), shape.num_experts) is None]
    stock = f"a stock {family.title} checkpoint"
    low_rank = [i for i in layers if genome.gene(i).ranks is not None]
    if low_rank:
        chosen = ExportForm(
            "custom",
            f"layers {low_rank} store low-rank expert factors; {stock} holds dense experts "
            "(export with --dense for the re-multiplied weights)",
        )
    elif len(counts) > 1:
        chosen = ExportForm(
            "custom",
            "layers keep different numbers of experts "
            f"({'/'.join(str(genome.gene(i).slots) for i in layers)}); {stock} has one expert count",
        )
    elif len(actives) > 1:
        chosen = ExportForm(
            "custom",
            "layers route to different top_k "
            f"({'/'.join(str(genome.active(i)) for i in layers)}); {stock} has one top_k",
        )
    elif general:
        chosen = ExportForm(
            "custom",
            f"layers {general} route through a router matrix that mixes experts; {stock} "
            "router can only select them",
        )
    else:
        what = "merged experts with a selecting router" if genome.is_merge else "kept experts"
        chosen = ExportForm(
            "stock", f"{what}, {counts[0]} per layer, top_k={actives[0]}: {stock} holds it"
        )
    if form == "stock" and chosen.kind != "stock":
        raise EepError(
            f"this genome cannot be a stock checkpoint: {chosen.reason}; export it in the custom form"
        )
    if form == "custom" and chosen.kind == "stock":
        chosen = ExportForm("custom", "the custom form was asked for")
    if low_rank and chosen.kind == "custom" and not family.gated_experts:
        raise EepError(
            f"{family.title}'s experts (biases, their own activation) have no low-rank form in eep's custom "
            "code; export with --dense for the re-multiplied weights"
        )
    return chosen


def assemble(model_cls: type, config, state: dict, source: nn.Module, device=None) -> nn.Module:
    """A ``model_cls(config)`` holding exactly ``state`` (assigned, not copied, and without the
    cost of a random initialisation: it is built on the meta device), with the non-persistent
    buffers (rotary tables) that the state dict lacks copied from ``source``; in eval mode."""
    with torch.device("meta"):
        model = model_cls(config)
    model.load_state_dict(state, assign=True, strict=True)
    for name, buffer in source.named_buffers():
        if name not in state:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buffer.to(
                device or buffer.device, copy=True
            )
    model.tie_weights()
    return model.eval()


def form_of(adapter: MoEAdapter, genome: Genome) -> ExportForm:
    """Whether a stock checkpoint of the family can hold this genome exactly, and if not, why."""
    adapter.validate(genome)
    return export_form(genome, adapter.shape)


def compress(
    adapter: MoEAdapter, genome: Genome, form: str | None = None, dense: bool = False
) -> tuple[nn.Module, ExportForm]:
    """A new, physically smaller model equal to the genome applied to the adapter's, in the stock
    form when possible (or the ``form`` asked for); its config's expert counts are updated.
    Low-rank experts are stored as their factors (custom form), or with ``dense`` as the
    re-multiplied matrices in the form the genome's pruning needs."""
    adapter.validate(genome)
    chosen = export_form(genome.dense() if dense else genome, adapter.shape, form)
    factored = matrix_tensors(adapter)
    state = adapter.model.state_dict()
    layers = {}
    for layer in adapter.moe_layers:
        gene = genome.gene(layer)
        prefix, router = (
            adapter.prefixes[layer],
            adapter.prefixes[layer] + adapter.family.router + ".",
        )
        for name in adapter.expert_tensors:
            key = prefix + f"experts.{name}"
            if gene.ranks is None or name not in factored:
                state[key] = _experts_for(gene, state[key])
            elif dense:
                state[key] = torch.stack(
                    [
                        adapter.factors.product(layer, name, e, r).to(state[key].device)
                        for e, r in zip(gene.keep, gene.ranks)
                    ]
                )
            else:  # the factors themselves: what makes a low-rank model physically smaller
                del state[key]
                for slot, (e, r) in enumerate(zip(gene.keep, gene.ranks)):
                    state[f"{key}_a.{slot}"], state[f"{key}_b.{slot}"] = adapter.factors.factors(
                        layer, name, e, r
                    )
        picks = router_columns(gene, adapter.num_experts) if gene.is_merge else list(gene.keep)
        spec = {"experts": gene.slots, "top_k": genome.active(layer)}
        if picks is not None:  # the family's own router over the picked experts
            for name in adapter.router_tensors:
                state[router + name] = state[router + name][picks]
        else:  # EEP's: the router over all source experts, and the router matrix
            state[router + "router_map"] = _matrix(
                gene.matrices(adapter.num_experts)[1], adapter.routers[layer]
            )
            spec["sources"] = adapter.num_experts
        if gene.ranks is not None and not dense:
            spec["ranks"] = list(gene.ranks)
        layers[str(layer)] = spec
    with torch.no_grad():
        small = _build(adapter, genome, chosen, layers, state)
    return small, chosen


def sliced(adapter: MoEAdapter, genome: Genome) -> nn.Module:
    """The stock-form model; an error names why when the genome needs the custom form."""
    return compress(adapter, genome, form="stock")[0]


def _experts_for(gene: LayerGene, weight: torch.Tensor) -> torch.Tensor:
    if gene.is_merge:  # exactly what applied() computes
        return merge_experts(
            weight, torch.tensor(gene.merge, dtype=torch.float32, device=weight.device)
        )
    return weight.index_select(0, torch.tensor(gene.keep, device=weight.device))


def _build(
    adapter: MoEAdapter, genome: Genome, form: ExportForm, layers: dict, state: dict
) -> nn.Module:
    if form.kind == "stock":
        config = copy.deepcopy(adapter.config)
        text = config.get_text_config()
        setattr(text, adapter.family.experts_key, genome.gene(adapter.moe_layers[0]).slots)
        text.num_experts_per_tok = genome.active(adapter.moe_layers[0])
        model_cls = type(adapter.model)
    else:
        from eep.remote import MODELING_FILE, custom_classes

        if adapter.config.model_type != adapter.family.model_type:
            raise EepError(
                f"eep's custom form holds {adapter.family.title} causal LMs; this model is "
                f"{adapter.config.model_type!r} (export its text model, or a genome of the stock form)"
            )
        config_cls, model_cls = custom_classes(adapter.family.model_type)
        values = {
            k: v
            for k, v in adapter.config.to_dict().items()
            if k not in ("model_type", "architectures", "transformers_version", "auto_map")
        }
        renormalise, scale = adapter.shape.router_matrix or (True, 1.0)
        values.update(
            {
                adapter.family.experts_key: max(s["experts"] for s in layers.values()),
                "num_experts_per_tok": max(s["top_k"] for s in layers.values()),
                "eep_layers": layers,
                "eep_routing": {"renormalise": renormalise, "scale": scale},
            }
        )
        config = config_cls(**values)
        config.architectures = [model_cls.__name__]
        module = MODELING_FILE.stem
        config.auto_map = {
            "AutoConfig": f"{module}.{config_cls.__name__}",
            "AutoModelForCausalLM": f"{module}.{model_cls.__name__}",
        }
    return assemble(model_cls, config, state, adapter.model)


def parameter_counts(model, adapter, genome: Genome | None) -> tuple[int, int]:
    """(parameters kept, parameters active per token) of ``model`` compressed by ``genome``
    (``None``: uncompressed). Embeddings count as kept and active; a dropped expert removes its
    weights and its router row; an expert not routed to is kept but not active; a low-rank expert's
    matrices count as their factors."""
    total = sum(p.numel() for p in model.parameters())
    active = total
    for layer in adapter.moe_layers:
        experts = adapter.blocks[layer].experts
        expert = sum(getattr(experts, name)[0].numel() for name in adapter.expert_tensors)
        router = adapter.routers[layer]  # a dropped expert's row of every [E, ...] router parameter
        router_row = sum(
            p[0].numel()
            for name, p in router.named_parameters(recurse=False)
            if name in adapter.router_tensors
        )
        slots = adapter.num_experts if genome is None else genome.gene(layer).slots
        k = adapter.top_k if genome is None else genome.active(layer)
        dropped = adapter.num_experts - slots
        total -= dropped * (expert + router_row)
        active -= dropped * router_row + (adapter.num_experts - k) * expert
        ranks = None if genome is None else genome.gene(layer).ranks
        # low-rank experts: their matrices are factors (a token's: the layer's mean)
        if ranks is not None:
            saved = [expert_params(adapter, None) - expert_params(adapter, r) for r in ranks]
            total -= sum(saved)
            active -= round(k * sum(saved) / len(saved))
    return total, active


def size_model(model_cfg) -> Callable[[Genome | None], tuple[int, int]]:
    """``genome -> (parameters kept, active per token)`` (:func:`parameter_counts`) of the model
    ``model_cfg`` names, from its config alone: the model is built on the meta device, no weights."""
    from transformers import AutoModelForCausalLM

    from eep.model import load_hf_config
    from eep.moe import MoEAdapter

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_hf_config(model_cfg))
    adapter = MoEAdapter(model)
    return lambda genome: parameter_counts(model, adapter, genome)

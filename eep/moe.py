"""MoE adapters: where a model family's routing and expert tensors live, and how a genome
changes them — reversibly in place for search, physically for export.

Only Mixtral-style routing is implemented here (softmax over all E router logits, top-k,
renormalise the chosen weights to sum to one). Pruning means "the same routing over fewer
experts": the dropped experts' logits become -inf before the softmax, which gives exactly
the routing of a model whose router and experts were sliced to the kept ones (the softmax
denominator cancels in the renormalisation, and top-k ties break the same way because kept
experts stay in their original order).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from eep.errors import EepError
from eep.genome import Genome


class MixtralAdapter:
    """Mixtral (transformers 5.x fused experts): ``mlp.gate.weight`` [E, h],
    ``mlp.experts.gate_up_proj`` [E, 2i, h], ``mlp.experts.down_proj`` [E, h, i]."""

    family = "mixtral"
    expert_tensors = ("gate_up_proj", "down_proj")

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        shape = shape_of(model.config)
        self.num_experts, self.top_k, self.moe_layers = shape.num_experts, shape.top_k, list(shape.moe_layers)
        self.blocks = {i: model.model.layers[i].mlp for i in self.moe_layers}

    def validate(self, genome: Genome) -> None:
        genome.validate_for(self.num_experts, self.top_k, self.moe_layers)

    # -- search: reversible, in place ---------------------------------------------------------

    @contextlib.contextmanager
    def applied(self, genome: Genome) -> Iterator[None]:
        """Route every MoE layer as the genome says while the block is active; restore after.

        Nothing is copied or rebuilt: a forward hook on each pruned layer's router recomputes
        the top-k from its logits with the dropped experts masked out.
        """
        self.validate(genome)
        handles = []
        try:
            for layer, keep in genome.keep_map().items():
                k = genome.active(layer)
                if len(keep) == self.num_experts and k == self.top_k:
                    continue
                gate = self.blocks[layer].gate
                mask = torch.full((self.num_experts,), float("-inf"), device=gate.weight.device)
                mask[list(keep)] = 0.0
                handles.append(gate.register_forward_hook(_masked_routing_hook(mask, k)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    # -- export: physically smaller -----------------------------------------------------------

    def sliced(self, genome: Genome) -> nn.Module:
        """A new model holding only the kept experts, with the config's expert count and top-k updated."""
        self.validate(genome)
        counts = {len(genome.keep(i)) for i in self.moe_layers}
        if len(counts) != 1:
            raise EepError(
                f"genome keeps different expert counts per layer ({sorted(counts)}); a stock Mixtral "
                "checkpoint has one num_local_experts, so keep the same number in every layer")
        actives = {genome.active(i) for i in self.moe_layers}
        if len(actives) != 1:
            raise EepError(
                f"genome routes to different top_k per layer ({sorted(actives)}); a stock Mixtral "
                "checkpoint has one num_experts_per_tok, so use the same top_k in every layer")
        config = copy.deepcopy(self.config)
        config.num_local_experts = counts.pop()
        config.num_experts_per_tok = actives.pop()
        state = self.model.state_dict()
        for layer in self.moe_layers:
            index = torch.tensor(genome.keep(layer))
            prefix = f"model.layers.{layer}.mlp."
            for name in ["gate.weight", *(f"experts.{t}" for t in self.expert_tensors)]:
                state[prefix + name] = state[prefix + name].index_select(0, index.to(state[prefix + name].device))
        with torch.device("meta"):
            small = type(self.model)(config)
        small.load_state_dict(state, assign=True, strict=True)
        for name, buffer in self.model.named_buffers():  # non-persistent buffers (rotary tables)
            owner, _, leaf = name.rpartition(".")
            small.get_submodule(owner)._buffers[leaf] = buffer.clone()
        small.tie_weights()
        return small.eval()


def _masked_routing_hook(mask: torch.Tensor, top_k: int):
    def hook(module: nn.Module, args, output):
        logits = output[0]
        probs = torch.softmax(logits.float() + mask, dim=-1)
        weights, index = torch.topk(probs, top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, index

    return hook


ADAPTERS = {"mixtral": MixtralAdapter}


@dataclass(frozen=True)
class MoEShape:
    """What a search needs to know of a model before loading its weights."""

    family: str
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]


def shape_of(hf_config) -> MoEShape:
    """Read the MoE dimensions from a ``transformers`` config (no weights needed)."""
    family = getattr(hf_config, "model_type", None)
    if family not in ADAPTERS:
        raise EepError(f"unsupported model family {family!r}; supported: {', '.join(sorted(ADAPTERS))}")
    return MoEShape(family, int(hf_config.num_local_experts), int(hf_config.num_experts_per_tok),
                    tuple(range(int(hf_config.num_hidden_layers))))


def adapter_for(model: nn.Module) -> MixtralAdapter:
    """The adapter for a loaded model, chosen from its config's ``model_type``."""
    return ADAPTERS[shape_of(model.config).family](model)

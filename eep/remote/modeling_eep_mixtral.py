"""A Mixtral whose MoE layers may each keep a different number of experts, route to a different
top-k, and route through a router matrix (EEP's W_RM). Written by ``eep`` next to the weights;
load with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.

Per MoE layer ``l`` (``config.eep_layers[str(l)]``: ``experts`` E'_l, ``sources`` E, ``top_k`` k_l):

    p      = softmax(x @ gate.weight.T)          # over the source model's E experts
    scores = p @ gate.router_map.T               # E'_l scores; router_map >= 0, no zero row
    top-k_l of scores, renormalised to sum to 1, weight experts 0..E'_l-1 (already merged)

With ``router_map`` one-hot this is the source model's routing restricted to the kept experts.
Needs only torch and transformers (>= 5, fused MoE experts).
"""

from __future__ import annotations

import contextlib

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.nn import functional as F
from transformers import MixtralConfig
from transformers import initialization as init
from transformers.models.mixtral import modeling_mixtral


@strict
class EepMixtralConfig(MixtralConfig):
    model_type = "eep_mixtral"
    eep_layers: dict | None = None
    """``{"<layer>": {"experts": E', "sources": E, "top_k": k}}`` for every MoE layer."""


class EepRouter(modeling_mixtral.MixtralTopKRouter):
    """The source model's router over its E experts, mapped onto E' experts by ``router_map``."""

    def __init__(self, config: EepMixtralConfig, experts: int):
        super().__init__(config)
        self.router_map = nn.Parameter(torch.empty(experts, self.num_experts))

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        probs = torch.softmax(router_logits.float(), dim=-1)
        scores = probs @ self.router_map.float().T
        weights, indices = torch.topk(scores, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return router_logits, weights, indices


@contextlib.contextmanager
def _sized(config: EepMixtralConfig, **values):
    """Build one layer's modules with its own sizes; the modules keep a reference to ``config``."""
    saved = {key: getattr(config, key) for key in values}
    try:
        for key, value in values.items():
            setattr(config, key, value)
        yield config
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


class EepMixtralForCausalLM(modeling_mixtral.MixtralForCausalLM):
    config_class = EepMixtralConfig

    def __init__(self, config: EepMixtralConfig):
        super().__init__(config)
        for name, spec in (config.eep_layers or {}).items():
            block = self.model.layers[int(name)].mlp
            with _sized(config, num_local_experts=spec["experts"]):
                block.experts = modeling_mixtral.MixtralExperts(config)
            with _sized(config, num_local_experts=spec["sources"], num_experts_per_tok=spec["top_k"]):
                block.gate = EepRouter(config, spec["experts"])
            block.top_k = spec["top_k"]
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, EepRouter):
            init.uniform_(module.router_map, 0.0, 1.0)  # any non-negative map is a valid router


__all__ = ["EepMixtralConfig", "EepMixtralForCausalLM"]

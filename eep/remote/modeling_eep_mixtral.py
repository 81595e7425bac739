"""A Mixtral whose MoE layers may each keep a different number of experts, route to a different
top-k, and route through a router matrix (EEP's W_RM). Written by ``eep`` next to the weights;
load with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.

Per MoE layer ``l`` (``config.eep_layers[str(l)]``: ``experts`` E'_l, ``sources`` E, ``top_k`` k_l):

    p      = softmax(x @ gate.weight.T)          # over the source model's E experts
    scores = p @ gate.router_map.T               # E'_l scores; router_map >= 0, no zero row
    top-k_l of scores, renormalised to sum to 1, weight experts 0..E'_l-1 (already merged)

With ``router_map`` one-hot this is the source model's routing restricted to the kept experts.
A layer whose spec has ``ranks`` (one per expert) stores each expert's matrices as low-rank
factors, ``W ≈ A @ B`` (``gate_up_proj_a.j`` [2i, r_j], ``gate_up_proj_b.j`` [r_j, h], likewise
``down_proj``), and applies them as two thin products.
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
from transformers.activations import ACT2FN
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


class EepLowRankExperts(nn.Module):
    """Mixtral's experts with each expert's matrices as rank-r_j factors (r_j may differ)."""

    def __init__(self, config: EepMixtralConfig, ranks: list[int]):
        super().__init__()
        self.num_experts = len(ranks)
        h, i = config.hidden_size, config.intermediate_size
        for name, (out, inp) in (("gate_up_proj", (2 * i, h)), ("down_proj", (h, i))):
            setattr(self, f"{name}_a", nn.ParameterList(nn.Parameter(torch.empty(out, r)) for r in ranks))
            setattr(self, f"{name}_b", nn.ParameterList(nn.Parameter(torch.empty(r, inp)) for r in ranks))
        self.act_fn = ACT2FN[config.hidden_act]

    @staticmethod
    def _linear(x, a, b):
        return F.linear(F.linear(x, b), a)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == expert)
            gate, up = self._linear(hidden_states[token], self.gate_up_proj_a[expert],
                                    self.gate_up_proj_b[expert]).chunk(2, dim=-1)
            out = self._linear(self.act_fn(gate) * up, self.down_proj_a[expert], self.down_proj_b[expert])
            final.index_add_(0, token, (out * top_k_weights[token, slot, None]).to(final.dtype))
        return final


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
            if spec.get("ranks") is not None:
                block.experts = EepLowRankExperts(config, spec["ranks"])
            else:
                with _sized(config, num_local_experts=spec["experts"]):
                    block.experts = modeling_mixtral.MixtralExperts(config)
            with _sized(config, num_local_experts=spec["sources"], num_experts_per_tok=spec["top_k"]):
                block.gate = EepRouter(config, spec["experts"])
            block.top_k = spec["top_k"]
        self.post_init()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for its decorator in the model's own source file; the experts here are
        # its decorated MixtralExperts (low-rank ones have a forward of their own and ignore it)
        return True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, EepRouter):
            init.uniform_(module.router_map, 0.0, 1.0)  # any non-negative map is a valid router
        if isinstance(module, EepLowRankExperts):
            for parameter in module.parameters():
                init.normal_(parameter, 0.0, self.config.initializer_range)


__all__ = ["EepMixtralConfig", "EepMixtralForCausalLM"]

"""MoE models of every family ``eep`` supports whose MoE layers may each keep a different number
of experts, route to a different top-k, route through a router matrix (EEP's W_RM), or store
low-rank experts. Written by ``eep`` next to the weights; load with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.

Each class is the family's own ``transformers`` model; only its MoE blocks differ. Per MoE layer
``l`` (``config.eep_layers[str(l)]``):

- ``experts`` E'_l, ``top_k`` k_l: the block is the family's own block built as a model of the
  family with E'_l experts and top-k k_l would build it, so routing over the kept experts is the
  family's own routing, and shared experts are untouched.
- ``sources`` E (only for a router matrix): the router is the family's router over the source
  model's E experts, and ``router_map`` [E'_l, E] maps its probabilities onto the E'_l experts::

      p       = softmax(router logits)        # over the E source experts
      scores  = p @ router_map.T              # E'_l scores
      weights = top-k_l of scores / their sum         if eep_routing["renormalise"]
                top-k_l of scores / the sum of scores  otherwise
                times eep_routing["scale"]; they weigh experts 0..E'_l-1 (already merged)

  (``eep_routing`` is how the family forms its weights; EEP's Mixtral: renormalise, scale 1.
  Without renormalisation the scores are a distribution over the E'_l experts, as the softmax
  of a smaller model of the family is.)
- ``ranks`` (one per expert): each expert's matrices are stored as low-rank factors,
  ``W ~= A @ B`` (``gate_up_proj_a.j`` [2i, r_j], ``gate_up_proj_b.j`` [r_j, h], likewise
  ``down_proj``), applied as two thin products; for gated experts without biases.

Needs only torch and transformers (>= 5, fused MoE experts).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as deepseek_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as deepseek_v3
from transformers.models.glm4_moe import modeling_glm4_moe as glm4_moe
from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss
from transformers.models.mixtral import modeling_mixtral as mixtral
from transformers.models.olmoe import modeling_olmoe as olmoe
from transformers.models.qwen2_moe import modeling_qwen2_moe as qwen2_moe
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as qwen3_5_moe
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe
from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next


class MappedRouter:
    """Mixed into a family's router class: its logits over the E source experts, mapped onto
    E' experts by ``router_map`` (see the module docstring)."""

    router_map: nn.Parameter
    eep_renormalise: bool = True
    eep_scale: float = 1.0

    def forward(self, hidden_states):
        router_logits = super().forward(hidden_states)[0]
        scores = torch.softmax(router_logits.float(), dim=-1) @ self.router_map.float().T
        weights, indices = torch.topk(scores, self.top_k, dim=-1)
        total = (weights if self.eep_renormalise else scores).sum(dim=-1, keepdim=True)
        return router_logits, weights / total * self.eep_scale, indices


@functools.cache
def mapped(router_class: type) -> type:
    """The family's router class with :class:`MappedRouter` mixed in."""
    return type(
        f"Mapped{router_class.__name__}", (MappedRouter, router_class), {"__module__": __name__}
    )


class LowRankExperts(nn.Module):
    """Gated experts (``act(gate) * up`` from a fused ``gate_up_proj``, then ``down_proj``) with
    each expert's matrices as rank-r_j factors (r_j may differ)."""

    def __init__(self, dense: nn.Module, ranks: list[int]):
        super().__init__()
        if not all(hasattr(dense, name) for name in ("gate_up_proj", "down_proj", "act_fn")) or any(
            name.endswith("bias") for name, _ in dense.named_parameters()
        ):
            raise ValueError(
                f"{type(dense).__name__} are not gated experts without biases; they have no low-rank form"
            )
        self.num_experts = len(ranks)
        for name in ("gate_up_proj", "down_proj"):
            out, inp = getattr(dense, name).shape[1:]
            setattr(
                self,
                f"{name}_a",
                nn.ParameterList(nn.Parameter(torch.empty(out, r)) for r in ranks),
            )
            setattr(
                self,
                f"{name}_b",
                nn.ParameterList(nn.Parameter(torch.empty(r, inp)) for r in ranks),
            )
        self.act_fn = dense.act_fn

    @staticmethod
    def _linear(x, a, b):
        return F.linear(F.linear(x, b), a)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == expert)
            gate, up = self._linear(
                hidden_states[token], self.gate_up_proj_a[expert], self.gate_up_proj_b[expert]
            ).chunk(2, dim=-1)
            out = self._linear(
                self.act_fn(gate) * up, self.down_proj_a[expert], self.down_proj_b[expert]
            )
            final.index_add_(0, token, (out * top_k_weights[token, slot, None]).to(final.dtype))
        return final


@contextlib.contextmanager
def _sized(config, **values):
    """Build one layer's modules with its own sizes; the modules keep a reference to ``config``."""
    saved = {key: getattr(config, key) for key in values}
    try:
        for key, value in values.items():
            setattr(config, key, value)
        yield config
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


class EepLayers:
    """Mixed into a family's causal LM: rebuilds the MoE blocks ``config.eep_layers`` lists."""

    experts_key: str
    """The config key holding the family's number of routed experts."""
    router: str = "gate"
    """The MoE block's attribute holding its router."""

    def __init__(self, config):
        super().__init__(config)
        base = getattr(self.model, "language_model", self.model)
        routing = config.eep_routing or {}
        for name, spec in (config.eep_layers or {}).items():
            layer = base.layers[int(name)]
            with _sized(
                config, **{self.experts_key: spec["experts"], "num_experts_per_tok": spec["top_k"]}
            ):
                block = type(layer.mlp)(config)
            if spec.get("sources") is not None:
                router_class = mapped(type(getattr(block, self.router)))
                with _sized(
                    config,
                    **{self.experts_key: spec["sources"], "num_experts_per_tok": spec["top_k"]},
                ):
                    router = router_class(config)
                router.router_map = nn.Parameter(torch.empty(spec["experts"], spec["sources"]))
                router.eep_renormalise = bool(routing.get("renormalise", True))
                router.eep_scale = float(routing.get("scale", 1.0))
                setattr(block, self.router, router)
            if spec.get("ranks") is not None:
                block.experts = LowRankExperts(block.experts, spec["ranks"])
            layer.mlp = block
        self.post_init()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for its decorator in the model's own source file; the experts here are
        # the family's decorated ones (low-rank ones have a forward of their own and ignore it)
        return True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MappedRouter):
            init.uniform_(module.router_map, 0.0, 1.0)  # any non-negative map is a valid router
        if isinstance(module, LowRankExperts):
            for parameter in module.parameters():
                init.normal_(parameter, 0.0, self.config.initializer_range)


# -- one config and one causal LM per family ----------------------------------------------------
# ``eep_layers``: {"<layer>": {"experts": E', "top_k": k, "sources": E?, "ranks": [...]?}} for every
# MoE layer; ``eep_routing``: {"renormalise": bool, "scale": float} for router matrices.


@strict
class EepMixtralConfig(mixtral.MixtralConfig):
    model_type = "eep_mixtral"
    eep_layers: dict | None = None
    eep_routing: dict | None = None


class EepMixtralForCausalLM(EepLayers, mixtral.MixtralForCausalLM):
    config_class = EepMixtralConfig
    experts_key = "num_local_experts"


@strict
class EepQwen2MoeConfig(qwen2_moe.Qwen2MoeConfig):
    model_type = "eep_qwen2_moe"
    eep_layers: dict | None = None
    eep_routing: dict | None = None


class EepQwen2MoeForCausalLM(EepLayers, qwen2_moe.Qwen2MoeForCausalLM):
    config_class = EepQwen2MoeConfig
    experts_key = "num_experts"


@strict
class EepQwen3MoeConfig(qwen3_moe.Qwen3MoeConfig):
    model_type = "eep_qwen3_moe"
    eep_layers: dict | None = None
    eep_routing: dict | None = None


class EepQwen3MoeForCausalLM(EepLayers, qwen3_moe.Qwen3MoeForCausalLM):
    config_class = EepQwen3MoeConfig
    experts_key = "num_experts"


@strict
class EepQwen3NextConfig(qwen3_next.Qwen3NextConfig):
    model_type = "eep_qwen3_next"
    eep_layers: dict | None = None
    eep_routing: dict | None = None


class EepQwen3NextForCausalLM(EepLayers, qwen3_next.Qwen3NextForCausalLM):
    config_class = EepQwen3NextConfig
    experts_key = "num_experts"


@strict
class EepQwen3_5MoeTextConfig(qwen3_5_moe.Qwen3_5MoeTextConfig):
    model_type = "eep_qwen3_5_moe_text"
    eep_layers: dict | None = None
    eep_routing: dict | None = None


class EepQwen3_5MoeForCausalLM(EepLayers, qwen3_5_moe.Qwen3_5MoeForCausalLM):
    config_class = EepQwen3_5MoeTextConfig
    experts_key = "num_experts"


@strict
class EepOlmoeConfig(olmoe.OlmoeConfig):
    model_type = "eep_olmoe"
    eep_layers: dict | None = None
    eep_routing: dict | None = None


class EepOlmoeForCausalLM(EepLayers, olmoe.OlmoeForCausalLM):
    config_class = EepOlmoeConfig
    experts_key = "num_experts"


@strict
class EepDeepseekV2Config(deepseek_v2.DeepseekV2Config):
    model_type = "eep_deepseek_v2"
    eep_layers: dict | None = None
    eep_routing: dict | None = None


class EepDeepseekV2ForCausalLM(EepLayers, deepseek_v2.DeepseekV2ForCausalLM):
    config_class = EepDeepseekV2Config
    experts_key = "n_routed_experts"


@strict
class EepDeepseekV3Config(deepseek_v3.DeepseekV3Config):
    model_type = "eep_deepseek_v3"
    eep_layers: dict | None = None
    eep_routing: dict | None = None


class EepDeepseekV3ForCausalLM(EepLayers, deepseek_v3.DeepseekV3ForCausalLM):
    config_class = EepDeepseekV3Config
    experts_key = "n_routed_experts"


@strict
class EepGlm4MoeConfig(glm4_moe.Glm4MoeConfig):
    model_type = "eep_glm4_moe"
    eep_layers: dict | None = None
    eep_routing: dict | None = None


class EepGlm4MoeForCausalLM(EepLayers, glm4_moe.Glm4MoeForCausalLM):
    config_class = EepGlm4MoeConfig
    experts_key = "n_routed_experts"


@strict
class EepGptOssConfig(gpt_oss.GptOssConfig):
    model_type = "eep_gpt_oss"
    eep_layers: dict | None = None
    eep_routing: dict | None = None


class EepGptOssForCausalLM(EepLayers, gpt_oss.GptOssForCausalLM):
    config_class = EepGptOssConfig
    experts_key = "num_local_experts"
    router = "router"


CLASSES = {
    "mixtral": (EepMixtralConfig, EepMixtralForCausalLM),
    "qwen2_moe": (EepQwen2MoeConfig, EepQwen2MoeForCausalLM),
    "qwen3_moe": (EepQwen3MoeConfig, EepQwen3MoeForCausalLM),
    "qwen3_next": (EepQwen3NextConfig, EepQwen3NextForCausalLM),
    "qwen3_5_moe_text": (EepQwen3_5MoeTextConfig, EepQwen3_5MoeForCausalLM),
    "olmoe": (EepOlmoeConfig, EepOlmoeForCausalLM),
    "deepseek_v2": (EepDeepseekV2Config, EepDeepseekV2ForCausalLM),
    "deepseek_v3": (EepDeepseekV3Config, EepDeepseekV3ForCausalLM),
    "glm4_moe": (EepGlm4MoeConfig, EepGlm4MoeForCausalLM),
    "gpt_oss": (EepGptOssConfig, EepGptOssForCausalLM),
}
"""The source family's ``model_type`` -> eep's (config, causal LM) classes for it."""

__all__ = ["CLASSES", *(cls.__name__ for pair in CLASSES.values() for cls in pair)]

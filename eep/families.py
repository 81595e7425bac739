"""The MoE model families ``eep`` knows, read from a ``transformers`` config alone (no weights).

Each family differs from the others only in facts listed here: which config key holds the
routed-expert count, which decoder layers are sparse, what the MoE block calls its router, and
whether routing picks experts within groups. How a family routes (softmax then top-k, top-k then
softmax, sigmoid scores with a correction bias, renormalisation, scaling) is never re-derived in
``eep``: the adapter (:mod:`eep.moe`) runs each family's own ``transformers`` router on a sliced
copy of its weights, which is exactly what a smaller stock model of the family computes. The
one routing ``transformers`` has no code for, EEP's router matrix mixing experts, is stated here
per family as the two facts it needs (renormalise? scale?), and tested against the family's own
router with one-hot matrices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eep.errors import EepError


def _every_layer(config) -> tuple[int, ...]:
    return tuple(range(config.num_hidden_layers))


def _sparse_step(config) -> tuple[int, ...]:
    """Qwen2/Qwen3(-Next)-MoE: layer i is sparse unless listed in ``mlp_only_layers``, when
    ``(i + 1) % decoder_sparse_step == 0``."""
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    if int(config.num_experts) <= 0:
        return ()
    return tuple(
        i for i in range(config.num_hidden_layers) if i not in dense and (i + 1) % step == 0
    )


def _after_dense(config) -> tuple[int, ...]:
    """DeepSeek / GLM: the first ``first_k_dense_replace`` layers are dense MLPs."""
    return tuple(range(int(config.first_k_dense_replace or 0), config.num_hidden_layers))


def _no_groups(config) -> tuple[int, int] | None:
    return None


def _deepseek_v2_groups(config) -> tuple[int, int] | None:
    """V2 limits routing to ``topk_group`` of ``n_group`` groups only with ``group_limited_greedy``."""
    if config.topk_method == "group_limited_greedy" and int(config.n_group or 1) > 1:
        return int(config.n_group), 1
    return None


def _no_router_matrix(config) -> tuple[bool, float] | None:
    return None


def _renormalised(config) -> tuple[bool, float] | None:
    return True, 1.0


def _norm_topk_prob(config) -> tuple[bool, float] | None:
    return bool(config.norm_topk_prob), 1.0


def _deepseek_v2_matrix(config) -> tuple[bool, float] | None:
    """Greedy top-k of softmax probabilities, times ``routed_scaling_factor``, not renormalised;
    group-limited routing picks within groups first, which a router matrix would cut across."""
    return (False, float(config.routed_scaling_factor)) if config.topk_method == "greedy" else None


def _sigmoid_groups(config) -> tuple[int, int] | None:
    """DeepSeek-V3 / GLM-4-MoE always route through groups, scoring each by its top-2 experts:
    with one group that only needs two experts left; with several, see :class:`MoEShape`."""
    return int(config.n_group or 1), 2


@dataclass(frozen=True)
class Family:
    model_type: str
    title: str
    experts_key: str
    """Config attribute holding the number of routed experts per layer."""
    moe_layers: Callable[[object], tuple[int, ...]]
    router: str = "gate"
    """Attribute of the MoE block holding the router module."""
    routing: str = ""
    groups: Callable[[object], tuple[int, int] | None] = _no_groups
    """(expert groups, experts each kept group needs) when routing picks within groups."""
    shared_experts: bool = False
    """Always-active shared experts: never pruned, counted as active parameters."""
    router_matrix: Callable[[object], tuple[bool, float] | None] = _no_router_matrix
    """Where routing is softmax probabilities -> top-k (-> renormalise) (-> x scale): (renormalise,
    scale). EEP's router matrix maps the probabilities of the E source experts onto the E' merged
    ones before the top-k, and the weights are then formed as the family forms them (without
    renormalisation: divided by the sum of all E' scores, as a smaller model's softmax is), so
    that a one-hot matrix routes exactly as the family over the picked experts
    (:func:`eep.moe.mapped_routing`). None where routing is something else (sigmoid scores with a
    correction bias, group-limited top-k): there a merge keeps routers that select."""
    gated_experts: bool = True
    """Experts are ``act(x W_gate) * (x W_up)`` then ``W_down`` (fused ``gate_up_proj``,
    ``down_proj``, no biases), which eep's custom form can store as low-rank factors."""


FAMILIES = {
    f.model_type: f
    for f in (
        Family(
            "mixtral",
            "Mixtral",
            "num_local_experts",
            _every_layer,
            routing="softmax, top-k, renormalise",
            router_matrix=_renormalised,
        ),
        Family(
            "qwen2_moe",
            "Qwen2-MoE",
            "num_experts",
            _sparse_step,
            routing="softmax, top-k (renormalise if norm_topk_prob)",
            shared_experts=True,
            router_matrix=_norm_topk_prob,
        ),
        Family(
            "qwen3_moe",
            "Qwen3-MoE",
            "num_experts",
            _sparse_step,
            routing="softmax, top-k (renormalise if norm_topk_prob)",
            router_matrix=_norm_topk_prob,
        ),
        Family(
            "qwen3_next",
            "Qwen3-Next",
            "num_experts",
            _sparse_step,
            routing="softmax, top-k (renormalise if norm_topk_prob)",
            shared_experts=True,
            router_matrix=_norm_topk_prob,
        ),
        Family(
            "qwen3_5_moe_text",
            "Qwen3.5-MoE (text)",
            "num_experts",
            _every_layer,
            routing="softmax, top-k, renormalise",
            shared_experts=True,
            router_matrix=_renormalised,
        ),
        Family(
            "olmoe",
            "OLMoE",
            "num_experts",
            _every_layer,
            routing="softmax, top-k (renormalise if norm_topk_prob)",
            router_matrix=_norm_topk_prob,
        ),
        Family(
            "deepseek_v2",
            "DeepSeek-V2",
            "n_routed_experts",
            _after_dense,
            routing="softmax, greedy or group-limited top-k, x routed_scaling_factor",
            groups=_deepseek_v2_groups,
            shared_experts=True,
            router_matrix=_deepseek_v2_matrix,
        ),
        Family(
            "deepseek_v3",
            "DeepSeek-V3",
            "n_routed_experts",
            _after_dense,
            routing="sigmoid + correction bias, grouped top-k, renormalise, x routed_scaling_factor",
            groups=_sigmoid_groups,
            shared_experts=True,
        ),
        Family(
            "glm4_moe",
            "GLM-4-MoE",
            "n_routed_experts",
            _after_dense,
            routing="sigmoid + correction bias, grouped top-k, renormalise, x routed_scaling_factor",
            groups=_sigmoid_groups,
            shared_experts=True,
        ),
        Family(
            "gpt_oss",
            "GPT-OSS",
            "num_local_experts",
            _every_layer,
            router="router",
            routing="router bias, top-k of logits, softmax over the k",
            # the softmax over the top-k logits is the renormalised top-k of the softmax over all E
            router_matrix=_renormalised,
            gated_experts=False,
        ),
    )
}

_EXPERT_KEYS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_experts_per_tok",
)


@dataclass(frozen=True)
class MoEShape:
    """What a search needs to know of a model before loading its weights.

    ``expert_groups`` > 1: routing picks within that many equal, consecutive expert groups
    (DeepSeek's grouped top-k). A smaller model of the family routes like the original over the
    kept experts only if every group keeps the same number of them (at least ``group_min``), so
    genomes must (:meth:`check_groups`)."""

    family: str
    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    expert_groups: int = 1
    group_min: int = 1
    router_matrix: tuple[bool, float] | None = None
    """(renormalise, scale) of routing through a router matrix that mixes experts
    (:attr:`Family.router_matrix`); None where that is not defined for this model."""

    @property
    def group_size(self) -> int:
        return self.num_experts // self.expert_groups

    def group_of(self, expert: int) -> int:
        return expert // self.group_size

    def check_groups(self, keep, where: str) -> None:
        """An :class:`EepError` unless the kept experts ``keep`` sit evenly in the expert groups."""
        counts = [0] * self.expert_groups
        for expert in keep:
            counts[self.group_of(expert)] += 1
        if len(set(counts)) > 1 or counts[0] < self.group_min:
            title = FAMILIES[self.family].title
            raise EepError(
                f"{where} keeps {counts} experts in the {self.expert_groups} expert groups; {title} "
                f"routes within groups, so every group must keep the same number (at least "
                f"{self.group_min})"
            )


def family_of(hf_config) -> Family:
    """The family of a config (a multimodal config's text part), or a one-line error saying why not."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    model_type = getattr(text, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(f"{f.title} ({f.model_type})" for f in FAMILIES.values())
    if any(getattr(text, key, None) for key in _EXPERT_KEYS):
        raise EepError(
            f"model family {model_type!r} is a mixture of experts eep has no adapter for; "
            f"supported: {supported}"
        )
    raise EepError(
        f"model family {model_type!r} has no MoE layers (no routed experts in its config); "
        f"eep compresses mixture-of-experts models: {supported}"
    )


def shape_of(hf_config) -> MoEShape:
    """Read the MoE dimensions from a ``transformers`` config (no weights needed)."""
    family = family_of(hf_config)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    layers = family.moe_layers(text)
    if not layers:
        raise EepError(
            f"this {family.title} config has no MoE layers (all {text.num_hidden_layers} layers are "
            "dense); there are no experts to compress"
        )
    num_experts, top_k = int(getattr(text, family.experts_key)), int(text.num_experts_per_tok)
    groups, group_min = family.groups(text) or (1, 1)
    if groups > 1 and num_experts % groups:
        raise EepError(
            f"{family.title} config has {num_experts} experts in {groups} groups, which do not divide them"
        )
    return MoEShape(
        family.model_type, num_experts, top_k, layers, groups, group_min, family.router_matrix(text)
    )

"""MoE adapters: where a model family's routing and expert tensors live, and how a genome
changes them — reversibly in place for search, physically for export.

Only Mixtral-style routing is implemented here (softmax over all E router logits, top-k,
renormalise the chosen weights to sum to one).

- Pruning means "the same routing over fewer experts": the dropped experts' logits become -inf
  before the softmax, which gives exactly the routing of a model whose router and experts were
  sliced to the kept ones (the softmax denominator cancels in the renormalisation, and top-k ties
  break the same way because kept experts stay in their original order). No weight is touched.
- Merging (EEP stage 2) computes each layer's E' merged experts with one matrix product per
  expert tensor into a buffer kept for the next candidate, swaps it in for the duration of the
  evaluation and swaps the originals back after: nothing is reloaded or allocated per candidate,
  the extra memory is E'/E of the expert weights, and a layer whose merge matrix equals the
  previous candidate's (children share most layers with their parents) is not merged again.
  Routing becomes softmax over the E logits -> router matrix -> top-k -> renormalise.
- Dynamic skipping (NAEE, top-2 only) is one more router hook after those: a token whose second
  weight w2 < beta * w1 keeps only its first expert, with weight 1 (NAEE renormalises after
  zeroing w2). The second expert still runs with weight 0 in transformers' experts kernels, so in
  search this measures accuracy, not speed.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from eep.errors import EepError
from eep.genome import Genome, LayerGene


@dataclass(frozen=True)
class ExportForm:
    """How a genome can be written: ``stock`` (plain transformers class) or ``custom``
    (eep's modeling file, ``trust_remote_code=True``), and why."""

    kind: str
    reason: str


def merge_experts(weight: torch.Tensor, matrix: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[E, ...] expert tensor -> [E', ...] with slot j = sum_i matrix[j, i] * weight[i] (one GEMM),
    written into ``out`` when given (a reused buffer: no allocation per candidate).

    Search and export both call this, so an exported model holds the same merged weights."""
    shape = (matrix.shape[0], *weight.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=weight.dtype, device=weight.device)
    torch.matmul(matrix.to(device=weight.device, dtype=weight.dtype), weight.reshape(weight.shape[0], -1),
                 out=out.view(matrix.shape[0], -1))
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


def export_form(genome: Genome, shape: MoEShape, form: str | None = None) -> ExportForm:
    """The form a genome is exported in (``form`` forces one; ``stock`` when impossible is an
    :class:`EepError`). Needs only the model's shape, so it is decided before weights load."""
    layers = shape.moe_layers
    counts = sorted({genome.gene(i).slots for i in layers})
    actives = sorted({genome.active(i) for i in layers})
    general = [i for i in layers if router_columns(genome.gene(i), shape.num_experts) is None]
    if len(counts) > 1:
        chosen = ExportForm("custom", f"layers keep different numbers of experts ({counts}); a stock Mixtral has one "
                                      "num_local_experts")
    elif len(actives) > 1:
        chosen = ExportForm("custom", f"layers route to different top_k ({actives}); a stock Mixtral has one "
                                      "num_experts_per_tok")
    elif general:
        chosen = ExportForm("custom", f"layers {general} route through a router matrix that mixes experts; a stock "
                                      "Mixtral router can only select them")
    else:
        what = "merged experts with a selecting router" if genome.is_merge else "kept experts"
        chosen = ExportForm("stock", f"{what}, {counts[0]} per layer, top_k={actives[0]}: a stock Mixtral holds it")
    if form == "stock" and chosen.kind != "stock":
        raise EepError(f"this genome cannot be a stock checkpoint: {chosen.reason}; export it in the custom form")
    if form == "custom" and chosen.kind == "stock":
        return ExportForm("custom", "the custom form was asked for")
    return chosen


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
        self._buffers: dict[tuple[int, str], torch.Tensor] = {}  # merged experts, reused across candidates
        self._merged_for: dict[int, tuple | None] = {}  # the merge matrix each layer's buffers hold

    def validate(self, genome: Genome, skip: Mapping[int, float] | None = None) -> None:
        genome.validate_for(self.num_experts, self.top_k, self.moe_layers)
        for layer, beta in (skip or {}).items():
            if layer not in self.moe_layers:
                raise EepError(f"skip names layer {layer}, which is not an MoE layer of this model")
            if genome.active(layer) != 2:
                raise EepError(f"dynamic skipping needs top-2 routing; layer {layer} routes top-{genome.active(layer)}")
            if not (math.isfinite(beta) and beta >= 0):
                raise EepError(f"skip beta of layer {layer} must be a finite number >= 0, got {beta!r}")

    def expert_output(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's output on tokens ``x`` [n, h], unweighted (as ``MixtralExperts`` computes it)."""
        experts = self.blocks[layer].experts
        gate, up = nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])

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
                block = self.blocks[layer]
                if gene.is_merge:
                    merge, router = (self._matrix(m, block) for m in gene.matrices(self.num_experts))
                    # the experts implementations size their dispatch by num_experts
                    swapped.append((block.experts, "num_experts", block.experts.num_experts))
                    block.experts.num_experts = gene.slots
                    fresh = self._merged_for.get(layer) != gene.merge  # the last candidate's merge is still there
                    self._merged_for[layer] = None  # until the merge below completes
                    with torch.no_grad():
                        for name in self.expert_tensors:
                            original = getattr(block.experts, name)
                            swapped.append((block.experts, name, original))
                            merged = self._buffer(layer, name, original, gene.slots)
                            if fresh:
                                merge_experts(original, merge, merged)
                            setattr(block.experts, name, nn.Parameter(merged, requires_grad=False))
                    self._merged_for[layer] = gene.merge
                    handles.append(block.gate.register_forward_hook(_mapped_routing_hook(router, k)))
                elif len(gene.keep) < self.num_experts or k != self.top_k:
                    mask = keep_mask(gene.keep, self.num_experts, block.gate.weight.device)
                    handles.append(block.gate.register_forward_hook(_masked_routing_hook(mask, k)))
            for layer, beta in (skip or {}).items():  # after the routing hooks: sees their output
                handles.append(self.blocks[layer].gate.register_forward_hook(_skip_hook(beta)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, name, original in reversed(swapped):
                setattr(module, name, original)

    def _buffer(self, layer: int, name: str, weight: torch.Tensor, slots: int) -> torch.Tensor:
        """The layer's merged-experts buffer, grown (never shrunk) to ``slots``: allocating (and on
        CPU, page-faulting) fresh tensors for every candidate costs more than the merge itself."""
        buffer = self._buffers.get((layer, name))
        if buffer is None or buffer.shape[0] < slots:
            buffer = torch.empty((max(slots, 1), *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
            self._buffers[(layer, name)] = buffer
            self._merged_for[layer] = None
        return buffer[:slots]

    @staticmethod
    def _matrix(rows, block: nn.Module) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.float32, device=block.gate.weight.device)

    # -- export: physically smaller -----------------------------------------------------------

    def export_form(self, genome: Genome) -> ExportForm:
        """Whether a stock Mixtral checkpoint can hold this genome exactly, and if not, why."""
        self.validate(genome)
        return export_form(genome, shape_of(self.config))

    def compressed(self, genome: Genome, form: str | None = None) -> tuple[nn.Module, ExportForm]:
        """A new, physically smaller model equal to the genome applied to this one, in the stock
        form when possible (or the ``form`` asked for); its config's expert counts are updated."""
        self.validate(genome)
        chosen = export_form(genome, shape_of(self.config), form)
        state = self.model.state_dict()
        layers = {}
        for layer in self.moe_layers:
            gene = genome.gene(layer)
            prefix = f"model.layers.{layer}.mlp."
            for name in self.expert_tensors:
                key = prefix + f"experts.{name}"
                state[key] = self._experts_for(gene, state[key])
            picks = router_columns(gene, self.num_experts)
            if chosen.kind == "stock":
                state[prefix + "gate.weight"] = state[prefix + "gate.weight"][picks]
            else:
                state[prefix + "gate.router_map"] = self._matrix(gene.matrices(self.num_experts)[1], self.blocks[layer])
                layers[str(layer)] = {"experts": gene.slots, "sources": self.num_experts, "top_k": genome.active(layer)}
        with torch.no_grad():
            small = self._build(genome, chosen, layers, state)
        return small, chosen

    def sliced(self, genome: Genome) -> nn.Module:
        """The stock-form model; an error names why when the genome needs the custom form."""
        return self.compressed(genome, form="stock")[0]

    def _experts_for(self, gene: LayerGene, weight: torch.Tensor) -> torch.Tensor:
        if gene.is_merge:  # exactly what applied() computes
            return merge_experts(weight, torch.tensor(gene.merge, dtype=torch.float32, device=weight.device))
        return weight.index_select(0, torch.tensor(gene.keep, device=weight.device))

    def _build(self, genome: Genome, form: ExportForm, layers: dict, state: dict) -> nn.Module:
        if form.kind == "stock":
            config = copy.deepcopy(self.config)
            config.num_local_experts = genome.gene(self.moe_layers[0]).slots
            config.num_experts_per_tok = genome.active(self.moe_layers[0])
            model_cls = type(self.model)
        else:
            from eep.remote.modeling_eep_mixtral import EepMixtralConfig, EepMixtralForCausalLM

            values = {k: v for k, v in self.config.to_dict().items()
                      if k not in ("model_type", "architectures", "transformers_version", "auto_map")}
            values.update(num_local_experts=max(s["experts"] for s in layers.values()),
                          num_experts_per_tok=max(s["top_k"] for s in layers.values()), eep_layers=layers)
            config = EepMixtralConfig(**values)
            config.architectures = ["EepMixtralForCausalLM"]
            config.auto_map = {"AutoConfig": "modeling_eep_mixtral.EepMixtralConfig",
                               "AutoModelForCausalLM": "modeling_eep_mixtral.EepMixtralForCausalLM"}
            model_cls = EepMixtralForCausalLM
        with torch.device("meta"):
            small = model_cls(config)
        small.load_state_dict(state, assign=True, strict=True)
        for name, buffer in self.model.named_buffers():  # non-persistent buffers (rotary tables)
            owner, _, leaf = name.rpartition(".")
            small.get_submodule(owner)._buffers[leaf] = buffer.clone()
        small.tie_weights()
        return small.eval()


def keep_mask(keep, num_experts: int, device: torch.device) -> torch.Tensor:
    """[E] router-logit mask: 0 for the kept experts, -inf for the others (see :func:`masked_routing`)."""
    mask = torch.full((num_experts,), float("-inf"), device=device)
    mask[list(keep)] = 0.0
    return mask


def masked_routing(logits: torch.Tensor, mask: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing among the experts where ``mask`` is 0 (-inf elsewhere): softmax, top-k,
    renormalise. Returns (weights, index), each [tokens, top_k]."""
    probs = torch.softmax(logits.float() + mask, dim=-1)
    weights, index = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), index


def mapped_routing(logits: torch.Tensor, router_t: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EEP's routing: softmax over the source experts, scores = p @ router.T, top-k, renormalise."""
    scores = torch.softmax(logits.float(), dim=-1) @ router_t
    weights, index = torch.topk(scores, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), index


def _masked_routing_hook(mask: torch.Tensor, top_k: int):
    def hook(module: nn.Module, args, output):
        return output[0], *masked_routing(output[0], mask, top_k)

    return hook


def _mapped_routing_hook(router: torch.Tensor, top_k: int):
    router_t = router.T.contiguous()

    def hook(module: nn.Module, args, output):
        return output[0], *mapped_routing(output[0], router_t, top_k)

    return hook


def _skip_hook(beta: float):
    """NAEE dynamic skipping on top-2 weights: where w2 < beta * w1 the weights become (1, 0)."""
    def hook(module: nn.Module, args, output):
        logits, weights, index = output
        first_only = torch.tensor([1.0, 0.0], dtype=weights.dtype, device=weights.device)
        return logits, torch.where((weights[:, 1] < beta * weights[:, 0])[:, None], first_only, weights), index

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


def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """The sparse MoE blocks by layer index of a Mixtral-layout model (stock or eep's custom form)."""
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}

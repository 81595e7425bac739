"""The calibration pass: one run of the unpruned model over calibration texts, and the
per-layer statistics the task-agnostic methods (baselines, NAEE's enumeration, MoE-I², low-rank
scales) need from it.

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
:func:`collect_scales` is a second pass for activation-aware low-rank factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from eep.config import Config
from eep.errors import EepError
from eep.moe import MoEAdapter


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


def calibration_texts(config: Config) -> list[str]:
    """The calibration texts: a dataset's, or the fitness tasks' search examples written out, taken
    from the tasks in turn (one of each, then the next of each...) so that a ``size`` below their
    total still covers every task."""
    from fitness.tasks import load_tasks, load_texts

    cal = config.baselines.calibration
    if cal.dataset is not None:
        return load_texts(cal.dataset, cal.subset, cal.split, cal.prompt, cal.size, cal.seed)
    per_task = []
    for task in load_tasks(config.fitness.tasks, "search"):
        texts = []
        for ex in task.examples:
            if ex.options:
                texts.append("".join(ex.options[ex.label]))
            else:
                texts.append(f"{ex.prompt} {ex.answers[0]}" if ex.answers else ex.prompt)
        per_task.append(texts)
    balanced = [
        texts[i] for i in range(max(map(len, per_task))) for texts in per_task if i < len(texts)
    ]
    return balanced[: cal.size]


def calibration_coverage(config: Config) -> str:
    """What the calibration texts are drawn from, for the table: ``128 texts of 8 of 8 tasks``."""
    cal = config.baselines.calibration
    if cal.dataset is not None:
        return f"{cal.size} texts of {cal.dataset}"
    sizes = [t.search_size for t in config.fitness.tasks]
    covered = sum(1 for n in sizes if n) if cal.size >= len(sizes) else cal.size
    return f"{min(cal.size, sum(sizes))} texts of {covered} of {len(sizes)} tasks' search examples"


def calibration_batches(
    tokenizer, texts: list[str], batch_size: int, max_length: int
) -> list[dict]:
    """The texts tokenized in right-padded batches (``input_ids``, ``attention_mask``)."""
    return [
        tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            padding_side="right",
        )
        for start in range(0, len(texts), batch_size)
    ]


def calibrate(config: Config, worker, log: Callable[[str], None]):
    """(texts, batches, :class:`eep.baselines.Calibration`): one pass of the unpruned model."""
    from eep.progress import tracked

    cal = config.baselines.calibration
    texts = calibration_texts(config)
    log(f"[eep] calibration pass over {len(texts)} texts")
    batches = calibration_batches(
        worker.tokenizer, texts, config.fitness.batch_size, cal.max_length
    )
    stats = collect(
        worker.model,
        worker.adapter,
        tracked(batches, "calibration pass (batches)", log),
        cal.max_tokens_per_layer,
        seed=cal.seed,
    )
    return texts, batches, stats


def collect_scales(model, adapter, batches) -> dict[str, torch.Tensor]:
    """``{"layer.tensor.expert": s}``: the root-mean-square of each expert matrix's input channels
    over the non-padding calibration tokens routed to that expert (``gate_up_proj``: the block
    input; ``down_proj``: ``act(gate) * up``). Experts no token reached get no entry."""
    experts0 = adapter.blocks[adapter.moe_layers[0]].experts
    if not all(hasattr(experts0, name) for name in ("gate_up_proj", "down_proj", "act_fn")):
        raise EepError(
            f"activation-aware factors need Mixtral-style experts (gate_up_proj, down_proj); "
            f"{adapter.family.title} has {', '.join(adapter.expert_tensors)}"
        )
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    valid: dict[str, torch.Tensor] = {}

    def observe(layer: int):
        def hook(module, args):
            x, index = args[0], args[1]
            keep = valid["mask"].to(x.device)
            x, index = x[keep].float(), index[keep]
            for expert in index.unique().tolist():
                tokens = x[(index == expert).any(dim=-1)]
                gate, up = (tokens @ module.gate_up_proj[expert].float().T).chunk(2, dim=-1)
                for name, inputs in (
                    ("gate_up_proj", tokens),
                    ("down_proj", module.act_fn(gate) * up),
                ):
                    key = f"{layer}.{name}.{expert}"
                    sums[key] = sums.get(key, 0) + inputs.double().pow(2).sum(dim=0).cpu()
                    counts[key] = counts.get(key, 0) + len(tokens)

        return hook

    handles = [
        adapter.blocks[i].experts.register_forward_pre_hook(observe(i)) for i in adapter.moe_layers
    ]
    try:
        with torch.no_grad():
            for ids, mask in calibration_inputs(model, batches):
                valid["mask"] = mask.reshape(-1).bool()
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {key: (total / counts[key]).sqrt().float() for key, total in sums.items()}

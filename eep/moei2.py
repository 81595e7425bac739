"""MoE-I² (arXiv 2411.01016) stage 1, first pieces: expert and layer importance from eep's one
calibration pass (:func:`eep.baselines.collect`), and the non-uniform per-layer keep counts they
decide under a global expert budget.

Details the paper's abstract and secondary descriptions leave open, chosen here:
- an expert's importance is the reconstruction loss ‖Z − Z₋ₑ‖²_F of its layer's MoE output on the
  sampled calibration tokens when that expert alone is removed. ``reroute=False`` (default) drops
  its contribution and leaves the other experts' weights alone (Σ_t w_te² ‖y_te‖², so an expert
  whose output is zero has importance 0); ``reroute=True`` routes among the others as a pruning
  gene does (the tokens it served go to their next expert), the loss a pruned model really sees;
- a layer's importance is the sum of its experts';
- keep counts: every layer gets at least ``low`` (top-k) and at most ``high`` (E) experts; the
  rest of the budget is shared in proportion to layer importance (water-filling: a layer that
  would exceed ``high`` is capped and the remainder re-shared), rounded by largest remainder,
  ties to the lower layer index.
"""

from __future__ import annotations

import math

import torch

from eep.baselines import Calibration, output_error
from eep.errors import EepError


def expert_importance(cal: Calibration, reroute: bool = False) -> dict[int, torch.Tensor]:
    """[E] float64 per MoE layer: the loss of removing each expert alone (see the module)."""
    out = {}
    for layer in cal.moe_layers:
        if reroute:
            everyone = range(cal.num_experts)
            out[layer] = torch.tensor([output_error(cal, layer, [x for x in everyone if x != e]) for e in everyone],
                                      dtype=torch.float64)
        else:
            weights, index = cal.routing(layer, cal.logits[layer], list(range(cal.num_experts)), cal.top_k)
            dense = torch.zeros(cal.logits[layer].shape, dtype=torch.float64).scatter_(1, index, weights.double())
            diagonal = torch.diagonal(cal.gram[layer].double(), dim1=1, dim2=2)  # ‖y_te‖² [N, E]
            out[layer] = (dense ** 2 * diagonal).sum(dim=0)
    return out


def layer_keep_counts(importance: dict[int, torch.Tensor], budget: int, low: int, high: int) -> dict[int, int]:
    """Experts each layer keeps, summing to ``budget``, each in ``low..high``, more for layers of
    higher importance (see the module for the rule)."""
    layers = sorted(importance)
    if not low * len(layers) <= budget <= high * len(layers):
        raise EepError(f"a budget of {budget} experts must lie in {low * len(layers)}..{high * len(layers)} for "
                       f"{len(layers)} layers keeping {low}..{high} each")
    weight = {i: max(float(importance[i].sum()), 0.0) for i in layers}
    share = {i: float(low) for i in layers}
    open_layers, left = set(layers), float(budget - low * len(layers))
    while left > 1e-9 and open_layers:
        total = sum(weight[i] for i in open_layers)
        portion = {i: left * (weight[i] / total if total > 0 else 1 / len(open_layers)) for i in open_layers}
        left = 0.0
        for i in sorted(open_layers):
            room = high - share[i]
            given = min(portion[i], room)
            share[i] += given
            left += portion[i] - given
            if given >= room - 1e-12:
                open_layers.discard(i)
    counts = {i: math.floor(share[i] + 1e-9) for i in layers}
    spare = budget - sum(counts.values())
    by_remainder = sorted((i for i in layers if counts[i] < high), key=lambda i: (-(share[i] - counts[i]), i))
    for i in by_remainder[:spare]:
        counts[i] += 1
    return counts

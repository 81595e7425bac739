"""Low-rank experts (MoE-I² stage 2): each kept expert's weight matrices replaced by rank-r
factors ``W ≈ A @ B`` (A [out, r], B [r, in]) from the truncated SVD, with ranks set per expert
from its importance under a parameter budget.

- Factors: ``A = U_r diag(S_r)``, ``B = V_rᵀ`` of ``W = U S Vᵀ``, computed once per matrix in float64
  and truncated per rank (the best rank-r approximation in Frobenius norm, Eckart–Young). Every
  matrix of an expert (Mixtral: the fused ``gate_up_proj`` [2i, h] and ``down_proj`` [h, i]) gets
  the expert's rank; 1-D tensors (biases) stay as they are.
- Ranks, MoE-I²'s rule (from secondary summaries): in each layer ``R_ij ∝ (I_ij + ε)^α``,
  normalised over the layer's kept experts so that they average the target rank, α = 0.15, I the
  stage-1 importance (the loss of removing the expert). Chosen here: the target average rank is
  the one whose factors hold ``fraction`` of the dense matrices' numbers (the factored size is
  linear in the rank); importance is divided by the layer's mean first (so ε = 1e-6 is
  scale-free); each layer's rank total is rounded down and shared by largest remainder (so the
  budget is never exceeded), and ranks are clamped to 1..full rank. A small α keeps ranks close
  to even: it moves rank towards important experts without starving the others.
"""

from __future__ import annotations

import math

import torch

from eep.errors import EepError
from eep.genome import Genome


def matrix_tensors(adapter) -> tuple[str, ...]:
    """The expert tensors that are matrices per expert ([E, out, in]); these are factored."""
    experts = adapter.blocks[adapter.moe_layers[0]].experts
    return tuple(name for name in adapter.expert_tensors if getattr(experts, name).dim() == 3)


def matrix_shapes(adapter) -> list[tuple[int, int]]:
    experts = adapter.blocks[adapter.moe_layers[0]].experts
    return [tuple(getattr(experts, name).shape[1:]) for name in matrix_tensors(adapter)]


def full_rank(adapter) -> int:
    """The largest rank a genome may give an expert: the smallest dimension of its matrices."""
    return min(min(shape) for shape in matrix_shapes(adapter))


def break_even_rank(adapter) -> int:
    """The largest rank at which every matrix's factors hold fewer numbers than the matrix."""
    return max(1, min((out * inp - 1) // (out + inp) for out, inp in matrix_shapes(adapter)))


def expert_params(adapter, rank: int | None) -> int:
    """Numbers stored for one expert's matrices: dense (``rank=None``) or as rank-``rank`` factors."""
    return sum(out * inp if rank is None else rank * (out + inp) for out, inp in matrix_shapes(adapter))


class Factors:
    """Truncated-SVD factors of the experts' matrices of one model, computed once per matrix."""

    def __init__(self, adapter):
        self.adapter = adapter
        self._svd: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def factors(self, layer: int, name: str, expert: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [out, r], B [r, in]) in the weight's dtype and device, r = min(rank, full rank)."""
        key = (layer, name, expert)
        if key not in self._svd:
            weight = getattr(self.adapter.blocks[layer].experts, name)[expert].detach()
            u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
            self._svd[key] = (u * s, vh)
        us, vh = self._svd[key]
        weight = getattr(self.adapter.blocks[layer].experts, name)
        a, b = us[:, :rank], vh[:rank]
        return a.to(weight.dtype), b.to(weight.dtype)

    def product(self, layer: int, name: str, expert: int, rank: int) -> torch.Tensor:
        """The rank-``rank`` approximation A @ B of the expert's matrix (what search evaluates)."""
        us, vh = self.factors(layer, name, expert, rank)
        return us @ vh


def check_ranks(genome: Genome, adapter) -> None:
    """An :class:`EepError` unless every rank of the genome is at most the experts' full rank."""
    if not genome.is_low_rank:
        return
    if not matrix_tensors(adapter):
        raise EepError(f"{adapter.family.title} experts have no weight matrices eep can factor")
    limit = full_rank(adapter)
    for layer, gene in genome.layers:
        if gene.ranks is not None and max(gene.ranks) > limit:
            raise EepError(f"layer {layer}: rank {max(gene.ranks)} exceeds the experts' full rank {limit}")


def allocate_ranks(genome: Genome, importance: dict[int, torch.Tensor], adapter, fraction: float,
                   alpha: float = 0.15) -> Genome:
    """``genome`` with low-rank experts whose matrices hold about ``fraction`` of the kept experts'
    dense parameters (never more), ranks following importance (see the module)."""
    if genome.is_merge:
        raise EepError("low-rank experts are for pruning genomes; this one merges experts")
    per_rank = expert_params(adapter, 1)
    average = fraction * expert_params(adapter, None) / per_rank  # the target average rank
    if average < 1:
        raise EepError(f"a low-rank budget of {fraction:.3f} of the kept experts' parameters is below rank 1 "
                       f"({per_rank / expert_params(adapter, None):.4f}); raise it")
    limit = full_rank(adapter)
    by_layer: dict[int, dict[int, int]] = {}
    for layer in adapter.moe_layers:
        kept = list(genome.keep(layer))
        scores = torch.tensor([max(float(importance[layer][e]), 0.0) for e in kept], dtype=torch.float64)
        scores = scores / scores.mean() if scores.sum() > 0 else torch.ones_like(scores)
        weights = (scores + 1e-6) ** alpha
        total = math.floor(average * len(kept))
        share = total * weights / weights.sum()
        ranks = share.floor().long()
        for j in sorted(range(len(kept)), key=lambda j: (-float(share[j] - ranks[j]), j))[: total - int(ranks.sum())]:
            ranks[j] += 1
        by_layer[layer] = {e: int(min(max(int(r), 1), limit)) for e, r in zip(kept, ranks)}
    return genome.with_ranks(by_layer)

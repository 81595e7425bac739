"""Low-rank experts (MoE-I² stage 2): each kept expert's weight matrices replaced by rank-r
factors ``W ≈ A @ B`` (A [out, r], B [r, in]) from the truncated SVD, with ranks set per expert
from its importance under a parameter budget.

- Factors: ``A = U_r diag(S_r)``, ``B = V_rᵀ`` of ``W = U S Vᵀ``, computed once per matrix in float64
  and truncated per rank (the best rank-r approximation in Frobenius norm, Eckart–Young). Every
  matrix of an expert (Mixtral: the fused ``gate_up_proj`` [2i, h] and ``down_proj`` [h, i]) gets
  the expert's rank; 1-D tensors (biases) stay as they are.
- Activation-aware factors (``method: activation``): the SVD of ``W D``, ``D = diag(s)`` with ``s_j``
  the root-mean-square of input channel j over the calibration tokens routed to the expert, and
  ``B = V_rᵀ D⁻¹``: the best rank-r approximation of ``W x`` in expectation when the input channels
  are uncorrelated (a diagonal whitening; full whitening by the Cholesky factor of XᵀX, as SVD-LLM
  does, would need [in, in] statistics per expert — 0.8 GB per Mixtral expert for ``down_proj`` —
  where the diagonal needs [in]). The scales (:func:`collect_scales`) are a few MB for Mixtral and
  are saved beside the genome (``eep_scales.safetensors``); the genome names their digest.
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

import hashlib
import math
from pathlib import Path

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
    return sum(
        out * inp if rank is None else rank * (out + inp) for out, inp in matrix_shapes(adapter)
    )


SCALES_FILE = "eep_scales.safetensors"


def scales_digest(scales: dict[str, torch.Tensor]) -> str:
    """A content hash of activation scales (what a genome's ``factors`` names)."""
    digest = hashlib.sha256()
    for key in sorted(scales):
        digest.update(key.encode())
        digest.update(scales[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_scales(scales: dict[str, torch.Tensor], path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in scales.items()}, str(path))


def load_scales(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def scales_for(genome: Genome, path) -> dict[str, torch.Tensor] | None:
    """The activation scales an activation-aware genome names, from ``path``, checked by digest."""
    if genome.scales is None:
        return None
    if path is None or not Path(path).exists():
        raise EepError(
            f"this genome's low-rank experts are activation-aware: they need {SCALES_FILE} (digest "
            f"{genome.scales}) beside the genome file or in its run directory"
            + (f"; {path} does not exist" if path else "")
        )
    values = load_scales(path)
    if scales_digest(values) != genome.scales:
        raise EepError(
            f"{path} holds scales {scales_digest(values)}, but the genome was made with {genome.scales}"
        )
    return values


class Factors:
    """Low-rank factors of the experts' matrices of one model: plain truncated SVD, or
    activation-aware with ``scales`` (see the module); one decomposition per matrix, cached."""

    def __init__(self, adapter, scales: dict[str, torch.Tensor] | None = None):
        self.adapter, self.scales = adapter, scales
        self.digest = scales_digest(scales) if scales is not None else None
        self._svd: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def factors(
        self, layer: int, name: str, expert: int, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [out, r], B [r, in]) in the weight's dtype and device, r = min(rank, full rank)."""
        key = (layer, name, expert)
        if key not in self._svd:
            weight = getattr(self.adapter.blocks[layer].experts, name)[expert].detach().double()
            scale = None if self.scales is None else self.scales.get(f"{layer}.{name}.{expert}")
            if scale is not None:  # unreached experts (no scale) fall back to the plain SVD
                scale = scale.double().to(weight.device)
                # channels never active stay invertible
                scale = scale + 1e-6 * float(scale.max()) + 1e-30
                u, s, vh = torch.linalg.svd(weight * scale, full_matrices=False)
                self._svd[key] = (u * s, vh / scale)
            else:
                u, s, vh = torch.linalg.svd(weight, full_matrices=False)
                self._svd[key] = (u * s, vh)
        us, vh = self._svd[key]
        dtype = getattr(self.adapter.blocks[layer].experts, name).dtype
        return us[:, :rank].to(dtype), vh[:rank].to(dtype)

    def product(self, layer: int, name: str, expert: int, rank: int) -> torch.Tensor:
        """The rank-``rank`` approximation A @ B of the expert's matrix (what search evaluates)."""
        us, vh = self.factors(layer, name, expert, rank)
        return us @ vh


def check_ranks(genome: Genome, adapter) -> None:
    """An :class:`EepError` unless every rank of the genome is at most the experts' full rank and
    the adapter holds the activation scales an activation-aware genome names."""
    if not genome.is_low_rank:
        return
    if genome.scales is not None and adapter.factors.digest != genome.scales:
        held = f"holds scales {adapter.factors.digest}" if adapter.factors.digest else "holds none"
        raise EepError(
            f"this genome's low-rank experts are activation-aware, made with the scales {genome.scales} "
            f"({SCALES_FILE} beside the genome or in its run directory); the model {held}"
        )
    if not matrix_tensors(adapter):
        raise EepError(f"{adapter.family.title} experts have no weight matrices eep can factor")
    limit = full_rank(adapter)
    for layer, gene in genome.layers:
        if gene.ranks is not None and max(gene.ranks) > limit:
            raise EepError(
                f"layer {layer}: rank {max(gene.ranks)} exceeds the experts' full rank {limit}"
            )


def allocate_ranks(
    genome: Genome,
    importance: dict[int, torch.Tensor],
    adapter,
    fraction: float,
    alpha: float = 0.15,
) -> Genome:
    """``genome`` with low-rank experts whose matrices hold about ``fraction`` of the kept experts'
    dense parameters (never more), ranks following importance (see the module); the factors are
    those the adapter makes (activation-aware when it holds scales)."""
    if genome.is_merge:
        raise EepError("low-rank experts are for pruning genomes; this one merges experts")
    per_rank = expert_params(adapter, 1)
    average = fraction * expert_params(adapter, None) / per_rank  # the target average rank
    if average < 1:
        raise EepError(
            f"a low-rank budget of {fraction:.3f} of the kept experts' parameters is below rank 1 "
            f"({per_rank / expert_params(adapter, None):.4f}); raise it"
        )
    limit = full_rank(adapter)
    by_layer: dict[int, dict[int, int]] = {}
    for layer in adapter.moe_layers:
        kept = list(genome.keep(layer))
        scores = torch.tensor(
            [max(float(importance[layer][e]), 0.0) for e in kept], dtype=torch.float64
        )
        scores = scores / scores.mean() if scores.sum() > 0 else torch.ones_like(scores)
        weights = (scores + 1e-6) ** alpha
        total = math.floor(average * len(kept))
        share = total * weights / weights.sum()
        ranks = share.floor().long()
        for j in sorted(range(len(kept)), key=lambda j: (-float(share[j] - ranks[j]), j))[
            : total - int(ranks.sum())
        ]:
            ranks[j] += 1
        by_layer[layer] = {e: int(min(max(int(r), 1), limit)) for e, r in zip(kept, ranks)}
    return genome.with_ranks(by_layer, adapter.factors.digest)

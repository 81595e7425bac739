"""Expert merging (EEP stage 2): each kept expert becomes a learned mixture of the original ones
(merge matrix W_EM, E'×E) and the router is remapped onto them (router matrix W_RM, E'×E).

The merge phase starts from the pruned genomes of stage 1: a pruning gene is the one-hot pair
W_EM = W_RM (:meth:`eep.genome.LayerGene.matrices`), and the operators below perturb it into a
continuous one. Settings and defaults are EEP's (``configs/search/search.yml`` of its code):

- each weight group's merge matrix and its router matrix are touched independently with
  probability ``layer_prob`` (EEP ``weight_change_prob`` / ``transfer_change_prob`` = 0.25), at
  least one matrix per child;
- mutation adds N(0, 1)·``noise_scale`` (0.065) to each entry of a touched matrix with probability
  ``noise_prob`` (0.25);
- with probability ``renorm_prob`` (0.1) every merge row is divided by its sum;
- crossover (probability ``crossover_prob`` = 0.3 in the search loop) takes each row of a touched
  matrix from the first parent with probability 0.6, else from the second; untouched matrices
  come whole from one parent.

Departures, each for a well-defined model:

- router entries are kept non-negative (a mutation that would push one below zero leaves it at
  zero, and a router row that would become all zeros keeps its parent's row). EEP's code lets them
  go negative, so a chosen score can be negative and the top-k renormalisation's denominator can
  approach zero or change sign, which blows up routing weights. With non-negative rows every score
  is a positive mix of softmax probabilities and the renormalisation is always safe;
- a merge row whose sum is near zero is not renormalised (EEP would divide by it);
- a mutation always changes at least one entry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from deap import base

from eep.genome import Genome, LayerGene
from search_spaces.prune import FRONT_PARENT_PROB, Groups, expand, touched_units

_TINY = 1e-6


@dataclass(frozen=True)
class MergeSpace:
    """Merge genomes over weight groups; expert counts per layer come from the parents."""

    num_experts: int
    top_k: int
    groups: Groups
    mix_router: bool = True
    """Evolve router matrices too (EEP); False keeps each router selecting its parent's experts
    (families whose routing is not Mixtral's softmax-renormalise, see :func:`eep.moe.check_genome`)."""

    kind = "merge"

    def size(self) -> float:
        return float("inf")

    def describe(self) -> str:
        return f"merge: E'x{self.num_experts} merge + router matrices per weight group ({len(self.groups)} groups)"

    def register(self, toolbox: base.Toolbox, cfg, rng: random.Random) -> None:
        toolbox.register(
            "mutate",
            mutate_noise,
            rng=rng,
            space=self,
            layer_prob=cfg.layer_prob,
            noise_prob=cfg.noise_prob,
            noise_scale=cfg.noise_scale,
            renorm_prob=cfg.renorm_prob,
        )
        toolbox.register("mate", crossover_matrices, rng=rng, space=self, layer_prob=cfg.layer_prob)


Rows = list[list[float]]


def _lift(genome: Genome, space: MergeSpace) -> dict[int, tuple[Rows, Rows, int | None]]:
    """(merge rows, router rows, top_k) per group, as mutable lists."""
    out = {}
    for group in space.groups:
        gene = genome.gene(group[0])
        merge, router = gene.matrices(space.num_experts)
        out[group[0]] = ([list(r) for r in merge], [list(r) for r in router], gene.top_k)
    return out


def _lower(genes: dict[int, tuple[Rows, Rows, int | None]], space: MergeSpace) -> Genome:
    layer_genes = {unit: LayerGene.merged(m, r, k) for unit, (m, r, k) in genes.items()}
    return Genome.from_genes(space.num_experts, space.top_k, expand(space.groups, layer_genes))


def _touched(space: MergeSpace, rng: random.Random, layer_prob: float) -> list[tuple[int, int]]:
    """(group, matrix) pairs, matrix 0 = merge, 1 = router; each with ``layer_prob``, at least one."""
    matrices = (0, 1) if space.mix_router else (0,)
    return touched_units([(g[0], m) for g in space.groups for m in matrices], rng, layer_prob)


def mutate_noise(
    genome: Genome,
    rng: random.Random,
    space: MergeSpace,
    layer_prob: float,
    noise_prob: float,
    noise_scale: float,
    renorm_prob: float,
) -> Genome:
    """Gaussian noise on entries of the touched matrices, then maybe row re-normalisation of merge rows."""
    genes = _lift(genome, space)
    touched = _touched(space, rng, layer_prob)
    changed = False
    for unit, m in touched:
        matrix = genes[unit][m]
        for r, row in enumerate(matrix):
            new = [
                x + rng.gauss(0.0, 1.0) * noise_scale if rng.random() < noise_prob else x
                for x in row
            ]
            changed |= _set_row(matrix, r, new, router=m == 1)
    if not changed:  # nothing drawn (or every router change clipped away): perturb one entry
        unit, m = rng.choice(touched)
        matrix = genes[unit][m]
        r, c = rng.randrange(len(matrix)), rng.randrange(space.num_experts)
        row = list(matrix[r])
        row[c] = (
            abs(row[c] + rng.gauss(0.0, 1.0) * noise_scale)
            if m == 1
            else row[c] + rng.gauss(0.0, 1.0) * noise_scale
        )
        _set_row(matrix, r, row, router=m == 1)
    if rng.random() < renorm_prob:
        for merge, _, _ in genes.values():
            for r, row in enumerate(merge):
                total = sum(row)
                if abs(total) > _TINY:
                    merge[r] = [x / total for x in row]
    return _lower(genes, space)


def _set_row(matrix: Rows, r: int, new: list[float], router: bool) -> bool:
    if router:
        new = [max(0.0, x) for x in new]
        if not any(x > 0.0 for x in new):
            return False  # an all-zero router row could never be routed to: keep the parent's
    changed = new != matrix[r]
    matrix[r] = new
    return changed


def crossover_matrices(
    a: Genome, b: Genome, rng: random.Random, space: MergeSpace, layer_prob: float
) -> Genome:
    """Row-wise crossover of touched matrices; untouched matrices from one parent. A group whose
    parents have different expert counts (budget searches) is copied whole from the first parent."""
    genes_a, genes_b = _lift(a, space), _lift(b, space)
    touched = set(_touched(space, rng, layer_prob))
    child = {}
    for unit, (merge_a, router_a, k_a) in genes_a.items():
        merge_b, router_b, _ = genes_b[unit]
        if len(merge_a) != len(merge_b):
            child[unit] = (merge_a, router_a, k_a)
            continue
        matrices = []
        for m, (rows_a, rows_b) in enumerate(((merge_a, merge_b), (router_a, router_b))):
            if (unit, m) in touched:
                matrices.append(
                    [
                        ra if rng.random() < FRONT_PARENT_PROB else rb
                        for ra, rb in zip(rows_a, rows_b)
                    ]
                )
            else:
                matrices.append(rows_a if rng.random() < FRONT_PARENT_PROB else rows_b)
        child[unit] = (matrices[0], matrices[1], k_a)
    return _lower(child, space)

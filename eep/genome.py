"""The genome: what a candidate compressed model is, as a frozen value.

File form (JSON, versioned)::

    {"format": "eep.genome/v1", "num_experts": 8, "top_k": 2,
     "layers": {"0": {"keep": [1, 3, 4, 6]},
                "1": {"keep": [0, 2, 5, 7], "top_k": 1},
                "2": {"merge": [[0.9, 0.1, 0, ...], ...], "router": [[1, 0, 0, ...], ...]}}}

``num_experts`` and ``top_k`` are those of the source model; ``layers`` maps an MoE layer index
to its gene. A layer that is missing is left unchanged. A gene is one of:

- a pruning gene, ``keep``: the experts the layer keeps (slot j is expert ``keep[j]``);
- a merge gene (EEP stage 2), ``merge`` and ``router``, both E'×E: slot j's weights are
  ``sum_i merge[j][i] * expert_i`` for every expert tensor, and its routing score is
  ``sum_i router[j][i] * softmax(logits)_i`` over the original E router logits; the top-k of the
  E' scores are renormalised to sum to one. Router entries are non-negative (see
  :mod:`search_spaces.merge` for why), so scores are positive and the renormalisation is safe —
  unless the genome says ``"router_sign": "signed"`` (EEP's released genomes have negative router
  entries, ``eep import-eep``): the same arithmetic then runs on signed rows, exactly as EEP's code
  does, and a renormalisation denominator near zero is warned about.

Either may set ``top_k``, the experts each token is routed to in that layer (e.g. 2 -> 1).
A pruning gene may also set ``rank`` (MoE-I² stage 2), one integer per kept expert: that
expert's weight matrices are replaced by their rank-r truncated SVD factors (see
:mod:`eep.lowrank`); a gene without ``rank`` keeps its experts dense, so older files stay valid.
A top-level ``activation_scales`` (a digest) makes those factors activation-aware, computed with
the activation scales of that digest (``eep_scales.safetensors``, saved beside the genome).
A merge gene whose matrices are the same one-hot rows *is* a pruning gene and is stored as one, so
the two spellings of one model share a content hash. Readers reject keys they do not know rather
than silently dropping them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eep.errors import EepError

GENOME_FORMAT = "eep.genome/v1"
_LAYER_KEYS = {"keep", "top_k", "merge", "router", "rank"}

Matrix = tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class LayerGene:
    """One MoE layer's gene. A pruning gene holds the sorted ids of the kept experts; a merge gene
    holds E'×E ``merge`` and ``router`` matrices, and ``keep`` lists the experts they draw on.
    ``top_k`` is the experts each token is routed to (``None`` keeps the model's); ``ranks``, for a
    pruning gene, the rank of each kept expert's low-rank factors (``None``: dense experts)."""

    keep: tuple[int, ...]
    top_k: int | None = None
    merge: Matrix | None = None
    router: Matrix | None = None
    ranks: tuple[int, ...] | None = None

    @classmethod
    def merged(cls, merge, router, top_k: int | None = None) -> LayerGene:
        """A merge gene from two E'×E matrices (nested sequences of numbers); one-hot matrices
        that only pick experts become the equivalent pruning gene."""
        merge = tuple(tuple(float(x) for x in row) for row in merge)
        router = tuple(tuple(float(x) for x in row) for row in router)
        picks = _one_hot_columns(merge)
        if picks is not None and merge == router and len(set(picks)) == len(picks):
            return cls(tuple(sorted(picks)), top_k)
        used = {
            i for matrix in (merge, router) for row in matrix for i, x in enumerate(row) if x != 0.0
        }
        return cls(tuple(sorted(used)), top_k, merge, router)

    @property
    def is_merge(self) -> bool:
        return self.merge is not None

    @property
    def slots(self) -> int:
        """E', the number of experts the layer has after the genome is applied."""
        return len(self.merge) if self.merge is not None else len(self.keep)

    def matrices(self, num_experts: int) -> tuple[Matrix, Matrix]:
        """(merge, router) as E'×E matrices; one-hot rows for a pruning gene."""
        if self.merge is not None:
            return self.merge, self.router
        one_hot = tuple(
            tuple(1.0 if i == e else 0.0 for i in range(num_experts)) for e in self.keep
        )
        return one_hot, one_hot

    def to_dict(self) -> dict[str, Any]:
        if self.merge is not None:
            data: dict[str, Any] = {
                "merge": [list(r) for r in self.merge],
                "router": [list(r) for r in self.router],
            }
        else:
            data = {"keep": list(self.keep)}
            if self.ranks is not None:
                data["rank"] = list(self.ranks)
        if self.top_k is not None:
            data["top_k"] = self.top_k
        return data


def _one_hot_columns(matrix: Matrix) -> list[int] | None:
    """The column of each row's single 1.0, or None unless every row is exactly one-hot."""
    picks = []
    for row in matrix:
        nonzero = [i for i, x in enumerate(row) if x != 0.0]
        if len(nonzero) != 1 or row[nonzero[0]] != 1.0:
            return None
        picks.append(nonzero[0])
    return picks


@dataclass(frozen=True)
class Genome:
    """Per-layer expert keep sets for a model with ``num_experts`` experts routed top-``top_k``."""

    num_experts: int
    top_k: int
    layers: tuple[tuple[int, LayerGene], ...]
    scales: str | None = None
    """Digest of the activation scales of activation-aware low-rank experts (None: plain SVD)."""
    signed: bool = False
    """Router rows may have negative entries (``"router_sign": "signed"``; EEP's released genomes)."""
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(
            isinstance(self.num_experts, int) and self.num_experts >= 1,
            f"num_experts must be a positive integer, got {self.num_experts!r}",
        )
        _check(
            isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
            f"top_k must be an integer in 1..{self.num_experts}, got {self.top_k!r}",
        )
        indices = [i for i, _ in self.layers]
        _check(indices == sorted(set(indices)), "layer indices must be distinct and sorted")
        for i, gene in self.layers:
            _check(
                isinstance(i, int) and i >= 0,
                f"layer index must be a non-negative integer, got {i!r}",
            )
            keep = gene.keep
            _check(
                all(isinstance(e, int) and 0 <= e < self.num_experts for e in keep),
                f"layer {i}: expert ids must be integers in 0..{self.num_experts - 1}, got {list(keep)}",
            )
            _check(
                list(keep) == sorted(set(keep)),
                f"layer {i}: expert ids must be distinct, got {list(keep)}",
            )
            if gene.is_merge:
                self._check_matrices(i, gene)
            if gene.ranks is not None:
                _check(
                    not gene.is_merge,
                    f"layer {i}: 'rank' is for pruning genes; merged experts stay dense",
                )
                _check(
                    len(gene.ranks) == len(keep)
                    and all(type(r) is int and r >= 1 for r in gene.ranks),
                    f"layer {i}: 'rank' must list one positive integer per kept expert ({len(keep)}), "
                    f"got {list(gene.ranks)}",
                )
            if gene.top_k is not None:
                _check(
                    type(gene.top_k) is int and gene.top_k >= 1,
                    f"layer {i}: top_k must be a positive integer, got {gene.top_k!r}",
                )
            k = self.active(i, gene)
            what = "merged experts" if gene.is_merge else "experts"
            _check(
                gene.slots >= k,
                f"layer {i}: keeps {gene.slots} {what} but routes each token to top_k={k}; "
                f"keep at least {k} or lower the layer's top_k",
            )
        _check(
            self.scales is None or (isinstance(self.scales, str) and self.is_low_rank),
            "activation_scales only goes with low-rank experts (a 'rank' in some layer)",
        )
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "key", hashlib.sha256(text.encode()).hexdigest()[:16])

    def __hash__(self) -> int:
        return hash(self.key)

    def _check_matrices(self, layer: int, gene: LayerGene) -> None:
        rows = len(gene.merge)
        _check(rows >= 1, f"layer {layer}: 'merge' must have at least one row")
        for name, matrix in (("merge", gene.merge), ("router", gene.router)):
            _check(
                matrix is not None and len(matrix) == rows,
                f"layer {layer}: 'merge' and 'router' must have the same number of rows (experts kept)",
            )
            for r, row in enumerate(matrix):
                _check(
                    len(row) == self.num_experts,
                    f"layer {layer}: {name} row {r} has {len(row)} entries; it needs one per source expert "
                    f"({self.num_experts})",
                )
                _check(
                    all(math.isfinite(x) for x in row),
                    f"layer {layer}: {name} row {r} has a NaN or infinite entry",
                )
        for r, row in enumerate(gene.router):
            _check(
                self.signed or all(x >= 0.0 for x in row),
                f"layer {layer}: router row {r} has a negative entry; router weights must be >= 0 so that "
                'routing scores stay positive (or, for EEP\'s own signed genomes, set "router_sign": "signed")',
            )
            _check(
                any(x > 0.0 for x in row),
                f"layer {layer}: router row {r} is all zeros; that expert could never be routed to",
            )

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_keep(
        cls,
        num_experts: int,
        top_k: int,
        keep: Mapping[int, Iterable[int]],
        active: int | Mapping[int, int] | None = None,
    ) -> Genome:
        """A pruning genome from ``{layer: expert ids}`` (ids in any order); ``active`` sets the
        layers' top-k (one value for all, or per layer; ``None``: the model's)."""

        def k(i: int) -> int | None:
            return active.get(i) if isinstance(active, Mapping) else active

        layers = tuple(
            (int(i), LayerGene(tuple(sorted(int(e) for e in ids)), k(i)))
            for i, ids in sorted(keep.items())
        )
        return cls(num_experts, top_k, layers)

    @classmethod
    def from_genes(
        cls,
        num_experts: int,
        top_k: int,
        genes: Mapping[int, LayerGene],
        scales: str | None = None,
        signed: bool = False,
    ) -> Genome:
        return cls(
            num_experts,
            top_k,
            tuple((int(i), gene) for i, gene in sorted(genes.items())),
            scales,
            signed,
        )

    @classmethod
    def from_dict(cls, data: Any) -> Genome:
        """Parse the file form; any malformed input raises :class:`EepError`."""
        _check(isinstance(data, dict), "a genome must be a JSON object")
        _check(
            data.get("format") == GENOME_FORMAT,
            f"unsupported genome format {data.get('format')!r}; expected {GENOME_FORMAT!r}",
        )
        unknown = set(data) - {
            "format",
            "num_experts",
            "top_k",
            "layers",
            "activation_scales",
            "router_sign",
        }
        _check(not unknown, f"unknown genome keys: {', '.join(sorted(unknown))}")
        for name in ("num_experts", "top_k"):
            _check(
                type(data.get(name)) is int,
                f"genome {name} must be an integer, got {data.get(name)!r}",
            )
        layers = data.get("layers")
        _check(isinstance(layers, dict), "genome 'layers' must be an object of layer index -> gene")
        genes: dict[int, LayerGene] = {}
        for name, gene in layers.items():
            _check(
                isinstance(name, str) and name.isdigit(),
                f"layer index must be a decimal string, got {name!r}",
            )
            _check(isinstance(gene, dict), f"layer {name}: gene must be an object")
            unknown = set(gene) - _LAYER_KEYS
            _check(not unknown, f"layer {name}: unknown gene keys: {', '.join(sorted(unknown))}")
            _check(
                "top_k" not in gene or type(gene["top_k"]) is int,
                f"layer {name}: top_k must be an integer, got {gene.get('top_k')!r}",
            )
            top_k = gene.get("top_k")
            if "merge" in gene or "router" in gene:
                _check(
                    "rank" not in gene,
                    f"layer {name}: 'rank' is for pruning genes; merged experts stay dense",
                )
                _check(
                    "keep" not in gene and "merge" in gene and "router" in gene,
                    f"layer {name}: a gene has either 'keep', or both 'merge' and 'router'",
                )
                for key in ("merge", "router"):
                    _check(
                        isinstance(gene[key], list)
                        and all(
                            isinstance(row, list) and all(type(x) in (int, float) for x in row)
                            for row in gene[key]
                        ),
                        f"layer {name}: '{key}' must be a list of rows of numbers",
                    )
                genes[int(name)] = LayerGene.merged(gene["merge"], gene["router"], top_k)
                continue
            ids = gene.get("keep")
            _check(
                isinstance(ids, list) and all(type(e) is int for e in ids),
                f"layer {name}: 'keep' must be a list of expert ids",
            )
            _check(
                len(ids) == len(set(ids)), f"layer {name}: expert ids must be distinct, got {ids}"
            )
            ranks = gene.get("rank")
            # listed in the order of 'keep'; stored in the order of sorted ids
            if ranks is not None:
                _check(
                    isinstance(ranks, list)
                    and len(ranks) == len(ids)
                    and all(type(r) is int for r in ranks),
                    f"layer {name}: 'rank' must list one integer per kept expert ({len(ids)})",
                )
                ranks = tuple(r for _, r in sorted(zip(ids, ranks)))
            genes[int(name)] = LayerGene(tuple(sorted(ids)), top_k, ranks=ranks)
        _check(len(genes) == len(layers), "genome layer indices must be distinct")
        scales = data.get("activation_scales")
        _check(
            scales is None or isinstance(scales, str), "activation_scales must be a digest string"
        )
        sign = data.get("router_sign", "nonnegative")
        _check(
            sign in ("nonnegative", "signed"),
            f"router_sign must be 'nonnegative' or 'signed', got {sign!r}",
        )
        return cls.from_genes(data["num_experts"], data["top_k"], genes, scales, sign == "signed")

    @classmethod
    def load(cls, path: str | Path) -> Genome:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise EepError(f"genome file {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EepError(f"genome file {path} is not valid JSON ({err})") from None
        return cls.from_dict(data)

    # -- views --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": GENOME_FORMAT,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "layers": {str(i): gene.to_dict() for i, gene in self.layers},
        }
        if self.scales is not None:
            data["activation_scales"] = self.scales
        if self.signed:
            data["router_sign"] = "signed"
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def gene(self, layer: int) -> LayerGene:
        """The layer's gene (keep everything when the genome leaves the layer unchanged)."""
        for i, gene in self.layers:
            if i == layer:
                return gene
        return LayerGene(tuple(range(self.num_experts)))

    def keep(self, layer: int) -> tuple[int, ...]:
        """Experts kept in ``layer`` (for a merge gene: the experts its slots draw on)."""
        return self.gene(layer).keep

    def keep_map(self) -> dict[int, tuple[int, ...]]:
        return {i: gene.keep for i, gene in self.layers}

    @functools.cached_property
    def kept_bits(self) -> int:
        """Every kept expert as bit ``layer * num_experts + expert``, computed once: two genomes
        share ``(a.kept_bits & b.kept_bits).bit_count()`` kept experts (what the early cut's order
        compares)."""
        return sum(1 << (i * self.num_experts + e) for i, gene in self.layers for e in gene.keep)

    @property
    def is_merge(self) -> bool:
        return any(gene.is_merge for _, gene in self.layers)

    @property
    def is_low_rank(self) -> bool:
        return any(gene.ranks is not None for _, gene in self.layers)

    def with_ranks(
        self, ranks: Mapping[int, Mapping[int, int]], scales: str | None = None
    ) -> Genome:
        """This pruning genome with low-rank experts: ``{layer: {expert: rank}}`` for every kept
        expert of each named layer; ``scales``: the digest of activation-aware factors' scales."""
        genes = dict(self.layers)
        for layer, by_expert in ranks.items():
            gene = self.gene(layer)
            _check(
                set(by_expert) == set(gene.keep),
                f"layer {layer}: ranks must name exactly the kept experts "
                f"{list(gene.keep)}, got {sorted(by_expert)}",
            )
            genes[layer] = LayerGene(
                gene.keep,
                gene.top_k,
                gene.merge,
                gene.router,
                tuple(int(by_expert[e]) for e in gene.keep),
            )
        return Genome.from_genes(self.num_experts, self.top_k, genes, scales)

    def dense(self) -> Genome:
        """The same genome with every expert dense (its low-rank ranks dropped)."""
        return Genome.from_genes(
            self.num_experts,
            self.top_k,
            {i: LayerGene(g.keep, g.top_k, g.merge, g.router) for i, g in self.layers},
        )

    def active(self, layer: int, gene: LayerGene | None = None) -> int:
        """Experts each token is routed to in ``layer`` (the layer's ``top_k``, else the model's)."""
        if gene is None:
            gene = dict(self.layers).get(layer)
        return gene.top_k if gene is not None and gene.top_k is not None else self.top_k

    def validate_for(self, num_experts: int, top_k: int, moe_layers: Iterable[int]) -> None:
        """Raise :class:`EepError` unless this genome fits a model with these MoE dimensions."""
        moe_layers = list(moe_layers)
        _check(
            self.num_experts == num_experts,
            f"genome is for models with {self.num_experts} experts per layer, this model has {num_experts}",
        )
        _check(
            self.top_k == top_k,
            f"genome is for top_k={self.top_k} routing, this model routes top_k={top_k}",
        )
        extra = [i for i, _ in self.layers if i not in moe_layers]
        _check(
            not extra,
            f"genome names layers {extra} that are not MoE layers of this model "
            f"(MoE layers: {moe_layers[0]}..{moe_layers[-1]})"
            if moe_layers
            else "model has no MoE layers",
        )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise EepError(message)

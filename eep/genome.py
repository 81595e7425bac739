"""The genome: what a candidate compressed model is, as a frozen value.

File form (JSON, versioned)::

    {"format": "eep.genome/v1", "num_experts": 8, "top_k": 2,
     "layers": {"0": {"keep": [1, 3, 4, 6]}, "1": {"keep": [0, 2, 5, 7], "top_k": 1}}}

``num_experts`` and ``top_k`` are those of the source model; ``layers`` maps an MoE layer index
to its gene: the experts it keeps and, optionally, its own ``top_k`` (active experts per token,
e.g. 2 -> 1). A layer that is missing is left unchanged. Later search spaces add keys to a
layer's gene; readers reject keys they do not know rather than silently dropping them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eep.errors import EepError

GENOME_FORMAT = "eep.genome/v1"
_LAYER_KEYS = {"keep", "top_k"}


@dataclass(frozen=True)
class LayerGene:
    """One MoE layer's gene: the sorted ids of the experts it keeps, and optionally how many of
    them each token is routed to (``top_k``; ``None`` keeps the model's)."""

    keep: tuple[int, ...]
    top_k: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"keep": list(self.keep)}
        if self.top_k is not None:
            data["top_k"] = self.top_k
        return data


@dataclass(frozen=True)
class Genome:
    """Per-layer expert keep sets for a model with ``num_experts`` experts routed top-``top_k``."""

    num_experts: int
    top_k: int
    layers: tuple[tuple[int, LayerGene], ...]
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(isinstance(self.num_experts, int) and self.num_experts >= 1,
               f"num_experts must be a positive integer, got {self.num_experts!r}")
        _check(isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
               f"top_k must be an integer in 1..{self.num_experts}, got {self.top_k!r}")
        indices = [i for i, _ in self.layers]
        _check(indices == sorted(set(indices)), "layer indices must be distinct and sorted")
        for i, gene in self.layers:
            _check(isinstance(i, int) and i >= 0, f"layer index must be a non-negative integer, got {i!r}")
            keep = gene.keep
            _check(all(isinstance(e, int) and 0 <= e < self.num_experts for e in keep),
                   f"layer {i}: expert ids must be integers in 0..{self.num_experts - 1}, got {list(keep)}")
            _check(list(keep) == sorted(set(keep)), f"layer {i}: expert ids must be distinct, got {list(keep)}")
            if gene.top_k is not None:
                _check(type(gene.top_k) is int and gene.top_k >= 1,
                       f"layer {i}: top_k must be a positive integer, got {gene.top_k!r}")
            k = self.active(i, gene)
            _check(len(keep) >= k, f"layer {i}: keeps {len(keep)} experts but routes each token to top_k={k}; "
                                   f"keep at least {k} or lower the layer's top_k")
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        object.__setattr__(self, "key", hashlib.sha256(text.encode()).hexdigest()[:16])

    def __hash__(self) -> int:
        return hash(self.key)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_keep(cls, num_experts: int, top_k: int, keep: Mapping[int, Iterable[int]],
                  active: int | Mapping[int, int] | None = None) -> Genome:
        """A pruning genome from ``{layer: expert ids}`` (ids in any order); ``active`` sets the
        layers' top-k (one value for all, or per layer; ``None``: the model's)."""
        def k(i: int) -> int | None:
            return active.get(i) if isinstance(active, Mapping) else active

        layers = tuple((int(i), LayerGene(tuple(sorted(int(e) for e in ids)), k(i))) for i, ids in sorted(keep.items()))
        return cls(num_experts, top_k, layers)

    @classmethod
    def from_dict(cls, data: Any) -> Genome:
        """Parse the file form; any malformed input raises :class:`EepError`."""
        _check(isinstance(data, dict), "a genome must be a JSON object")
        _check(data.get("format") == GENOME_FORMAT,
               f"unsupported genome format {data.get('format')!r}; expected {GENOME_FORMAT!r}")
        unknown = set(data) - {"format", "num_experts", "top_k", "layers"}
        _check(not unknown, f"unknown genome keys: {', '.join(sorted(unknown))}")
        for name in ("num_experts", "top_k"):
            _check(type(data.get(name)) is int, f"genome {name} must be an integer, got {data.get(name)!r}")
        layers = data.get("layers")
        _check(isinstance(layers, dict), "genome 'layers' must be an object of layer index -> gene")
        keep: dict[int, list[int]] = {}
        active: dict[int, int] = {}
        for name, gene in layers.items():
            _check(isinstance(name, str) and name.isdigit(), f"layer index must be a decimal string, got {name!r}")
            _check(isinstance(gene, dict), f"layer {name}: gene must be an object")
            unknown = set(gene) - _LAYER_KEYS
            _check(not unknown, f"layer {name}: unknown gene keys: {', '.join(sorted(unknown))}")
            ids = gene.get("keep")
            _check(isinstance(ids, list) and all(type(e) is int for e in ids),
                   f"layer {name}: 'keep' must be a list of expert ids")
            _check(len(ids) == len(set(ids)), f"layer {name}: expert ids must be distinct, got {ids}")
            _check("top_k" not in gene or type(gene["top_k"]) is int,
                   f"layer {name}: top_k must be an integer, got {gene.get('top_k')!r}")
            keep[int(name)] = ids
            if "top_k" in gene:
                active[int(name)] = gene["top_k"]
        _check(len(keep) == len(layers), "genome layer indices must be distinct")
        return cls.from_keep(data["num_experts"], data["top_k"], keep, active)

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
        return {
            "format": GENOME_FORMAT,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "layers": {str(i): gene.to_dict() for i, gene in self.layers},
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def keep(self, layer: int) -> tuple[int, ...]:
        """Experts kept in ``layer`` (all of them when the genome leaves the layer unchanged)."""
        for i, gene in self.layers:
            if i == layer:
                return gene.keep
        return tuple(range(self.num_experts))

    def keep_map(self) -> dict[int, tuple[int, ...]]:
        return {i: gene.keep for i, gene in self.layers}

    def active(self, layer: int, gene: LayerGene | None = None) -> int:
        """Experts each token is routed to in ``layer`` (the layer's ``top_k``, else the model's)."""
        if gene is None:
            gene = dict(self.layers).get(layer)
        return gene.top_k if gene is not None and gene.top_k is not None else self.top_k

    def validate_for(self, num_experts: int, top_k: int, moe_layers: Iterable[int]) -> None:
        """Raise :class:`EepError` unless this genome fits a model with these MoE dimensions."""
        moe_layers = list(moe_layers)
        _check(self.num_experts == num_experts,
               f"genome is for models with {self.num_experts} experts per layer, this model has {num_experts}")
        _check(self.top_k == top_k, f"genome is for top_k={self.top_k} routing, this model routes top_k={top_k}")
        extra = [i for i, _ in self.layers if i not in moe_layers]
        _check(not extra, f"genome names layers {extra} that are not MoE layers of this model "
                          f"(MoE layers: {moe_layers[0]}..{moe_layers[-1]})" if moe_layers else "model has no MoE layers")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise EepError(message)

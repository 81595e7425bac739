"""EEP's released genomes (``searched_coeff/*.pth`` in imagination-research/EEP) as eep genomes.

EEP stores a dict of E'×E tensors. Merge matrices are keyed by group patterns over parameter
names (``layers.3``, ``layers.[0-7]``, ``layers.*``) with ``others`` for every layer no pattern
names; router matrices by ``transfer.<pattern>`` with ``others_transfer`` as the fallback. A
layer takes the first key, in the dict's order, whose pattern matches (EEP's ``pattern_in``): a
pattern's dot-separated parts must match consecutive parts of the name, ``*`` matching any part and
``[a-b]`` any integer from a to b inclusive. Merge patterns are matched against the layer's expert
parameter names (``model.layers.<i>.block_sparse_moe.experts.<j>.w1.weight``), router patterns
against ``transfer.<i>``, as EEP's ``merge_weights`` / ``set_router_transfer`` do.

Routers in EEP's files may be signed; the genome then says ``"router_sign": "signed"`` and is
applied with EEP's arithmetic unchanged (:func:`eep.moe.mapped_routing`). The files are read with
``torch.load(weights_only=True)``: tensors and plain containers only, no code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from eep.errors import EepError
from eep.genome import Genome, LayerGene


def pattern_in(text: str, pattern: str) -> bool:
    """Whether ``pattern`` matches consecutive dot-separated parts of ``text`` (``*``: any part;
    ``[a-b]``: an integer in a..b inclusive) — EEP's matching rule."""
    texts, parts = text.split("."), pattern.split(".")
    for start in range(len(texts) - len(parts) + 1):
        if all(_part_matches(texts[start + j], part) for j, part in enumerate(parts)):
            return True
    return False


def _part_matches(text: str, part: str) -> bool:
    if part == "*":
        return True
    if part.startswith("[") and part.endswith("]"):
        low, _, high = part[1:-1].partition("-")
        return text in {str(i) for i in range(int(low), int(high) + 1)}  # "03" is not 3, as in EEP
    return text == part


def merge_key(keys: Sequence[str], layer: int) -> str:
    """The key of ``layer``'s merge matrix: the first key matching its expert parameter names, else ``others``."""
    name = f"model.layers.{layer}.block_sparse_moe.experts.0.w1.weight"
    return next((k for k in keys if pattern_in(name, k)), "others")


def router_key(keys: Sequence[str], layer: int) -> str:
    """The key of ``layer``'s router matrix: the first ``transfer`` key matching ``transfer.<layer>``,
    else ``others_transfer``."""
    return next(
        (k for k in keys if "transfer" in k and pattern_in(f"transfer.{layer}", k)),
        "others_transfer",
    )


def genome_from_coefficients(
    coeff: Mapping[str, object], num_experts: int, top_k: int, layers: Sequence[int]
) -> Genome:
    """The eep genome of EEP's coefficient dict for a model with ``num_experts`` experts, top-``top_k``."""
    keys = list(coeff)
    genes, signed = {}, False
    for layer in layers:
        names = merge_key(keys, layer), router_key(keys, layer)
        missing = [n for n in names if n not in coeff]
        if missing:
            raise EepError(
                f"EEP coefficients name no matrix for layer {layer} (looked for {missing[0]!r}; keys: "
                f"{', '.join(keys)})"
            )
        merge, router = (_rows(coeff[n], n, num_experts) for n in names)
        if len(merge) != len(router):
            raise EepError(
                f"layer {layer}: merge matrix {names[0]!r} has {len(merge)} rows, router {names[1]!r} "
                f"{len(router)}; EEP's pair must agree"
            )
        signed = signed or any(x < 0 for row in router for x in row)
        genes[layer] = LayerGene.merged(merge, router)
    return Genome.from_genes(num_experts, top_k, genes, signed=signed)


def _rows(value, name: str, num_experts: int) -> list[list[float]]:
    rows = value.tolist() if hasattr(value, "tolist") else value
    if not (
        isinstance(rows, list)
        and rows
        and all(isinstance(r, list) and len(r) == num_experts for r in rows)
    ):
        raise EepError(f"EEP coefficient {name!r} must be an E'x{num_experts} matrix")
    return [[float(x) for x in row] for row in rows]


def load_coefficients(path: str | Path) -> dict:
    """EEP's coefficient dict, read without running any code from the file."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EepError(f"EEP coefficient file {path} does not exist") from None
    except Exception as err:  # noqa: BLE001  (torch raises many kinds for a file that is not one)
        raise EepError(
            f"{path} is not an EEP coefficient file readable as plain tensors ({type(err).__name__})"
        ) from None
    if not isinstance(data, dict) or not data:
        raise EepError(f"{path} holds no dict of coefficient matrices")
    return data


def import_genome(path: str | Path, model: str, out: str | Path) -> tuple[Genome, tuple[int, ...]]:
    """Read EEP's coefficient file ``path`` for ``model`` (a Mixtral: its config.json is enough)
    and write it to ``out`` as an eep genome; returns the genome and the model's MoE layers."""
    from eep.config import ModelConfig
    from eep.journal import check_creatable
    from eep.model import load_hf_config
    from eep.moe import shape_of

    out = Path(out)
    if out.exists():
        raise EepError(f"{out} already exists; choose another --out")
    check_creatable(out, "the genome file")
    shape = shape_of(load_hf_config(ModelConfig(path=model)))
    if shape.family != "mixtral":
        raise EepError(f"EEP's genomes are Mixtral's; {model} is {shape.family}")
    genome = genome_from_coefficients(
        load_coefficients(path), shape.num_experts, shape.top_k, shape.moe_layers
    )
    genome.save(out)
    return genome, tuple(shape.moe_layers)

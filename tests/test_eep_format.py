"""EEP's released genome format: its group names resolved as EEP resolves them, signed routers
applied with EEP's arithmetic (checked against an independent restatement of it), and the CLI."""

import json
import warnings

import pytest
import torch

from eep.cli import main
from eep.eep_format import genome_from_coefficients, merge_key, pattern_in, router_key
from eep.errors import EepError
from eep.genome import Genome
from eep.moe import adapter_for, mapped_routing


def test_group_names_resolve_as_eep_does():
    keys = [
        "layers.[0-1]",
        "layers.1",
        "layers.*.block_sparse_moe",
        "others",
        "transfer.[0-1]",
        "transfer.2",
        "others_transfer",
    ]
    assert merge_key(keys, 1) == "layers.[0-1]"  # the first match in the dict's order wins
    assert merge_key(keys, 5) == "layers.*.block_sparse_moe"  # '*' is any one part
    assert merge_key(["layers.1", "others"], 12) == "others"  # parts match whole: 12 is not 1
    assert (
        merge_key(["layers.[0-3]"], 3) == "layers.[0-3]"
        and merge_key(["layers.[0-3]"], 4) == "others"
    )
    assert router_key(keys, 0) == "transfer.[0-1]" and router_key(keys, 2) == "transfer.2"
    assert router_key(keys, 7) == "others_transfer"
    # "03" is not a number in the range, as in EEP
    assert not pattern_in("model.layers.03.x", "layers.[0-5]")
    assert pattern_in("transfer.31", "transfer.[30-31]")


def _coefficients(seed=0, slots=4):
    """A hand-built dict in EEP's layout: a range group, one layer of its own, the 'others' pair."""
    g = torch.Generator().manual_seed(seed)

    def merge():
        return torch.eye(8)[:slots] * 0.8 + 0.05 * torch.rand(slots, 8, generator=g)

    def router():
        shifted = torch.roll(torch.eye(8), 1, 1)[:slots]
        return torch.eye(8)[:slots] - 0.15 * shifted + 0.05 * torch.rand(slots, 8, generator=g)

    return {
        "layers.[0-1]": merge(),
        "layers.2": merge(),
        "others": merge(),
        "transfer.[0-2]": router(),
        "others_transfer": router(),
    }


def test_signed_routers_follow_eeps_arithmetic_exactly(tiny_mixtral):
    coeff = _coefficients()
    genome = genome_from_coefficients(coeff, 8, 2, [0, 1, 2])
    assert genome.signed and genome.to_dict()["router_sign"] == "signed"
    assert Genome.from_dict(genome.to_dict()) == genome
    unsigned = {**genome.to_dict()}
    del unsigned["router_sign"]
    with pytest.raises(EepError, match="negative entry.*router_sign"):
        Genome.from_dict(unsigned)
    adapter = adapter_for(tiny_mixtral)
    block = adapter.blocks[2]
    x = torch.randn(5, 7, 32, generator=torch.Generator().manual_seed(1))
    # EEP, restated: merged experts, softmax over the 8 router logits, the signed map, top-2, plain sum
    merge, router = coeff["layers.2"], coeff["transfer.[0-2]"]
    experts = block.experts
    gate_up = torch.einsum("ji,iox->jox", merge, experts.gate_up_proj.detach())
    down = torch.einsum("ji,iox->jox", merge, experts.down_proj.detach())
    flat = x.reshape(-1, 32)
    probs = torch.softmax(flat @ block.gate.weight.detach().T, dim=-1)
    weights, index = torch.topk(probs @ router.T, 2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for w, j in zip(weights[t], index[t]):
            g, u = (gate_up[j] @ flat[t]).chunk(2)
            expected[t] += w * (down[j] @ (torch.nn.functional.silu(g) * u))
    with torch.no_grad(), adapter.applied(genome):
        got = block(x).reshape(-1, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_near_zero_denominator_is_warned_about():
    router = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    logits = torch.tensor([[0.0, 0.0]])  # equal probabilities: both scores 0, their sum 0
    with pytest.warns(RuntimeWarning, match="near zero"):
        mapped_routing(logits, router.T.contiguous(), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapped_routing(torch.tensor([[3.0, 0.0]]), torch.eye(2), 1)  # a healthy token says nothing


def test_import_eep_cli_writes_a_genome_that_exports_in_the_custom_form(tmp_path, capsys):
    from eep.config import ModelConfig
    from eep.export import export_genome
    from eep.model import load_model

    torch.save(_coefficients(seed=3), tmp_path / "wic_budget_4.pth")
    out = tmp_path / "g.json"
    assert (
        main(
            ["import-eep", str(tmp_path / "wic_budget_4.pth"), "--model", "toy", "--out", str(out)]
        )
        == 0
    )
    assert "signed router rows" in capsys.readouterr().err
    genome = Genome.load(out)
    assert genome.signed and {genome.gene(i).slots for i in range(4)} == {4}
    assert json.loads(out.read_text())["router_sign"] == "signed"
    assert (
        main(
            ["import-eep", str(tmp_path / "wic_budget_4.pth"), "--model", "toy", "--out", str(out)]
        )
        == 2
    )
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    assert (
        main(
            [
                "import-eep",
                str(tmp_path / "bad.pth"),
                "--model",
                "toy",
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
        == 2
    )
    assert "not an EEP coefficient file" in capsys.readouterr().err

    toy = ModelConfig(path="toy", device="cpu", dtype="float32")
    report = export_genome(toy, genome, tmp_path / "export", log=lambda m: None)
    assert report["form"] == "custom"
    model, tokenizer = load_model(toy)
    ids = tokenizer(["reverse : a b c d ="], return_tensors="pt")
    with torch.no_grad(), adapter_for(model).applied(genome):
        in_search = model(**ids).logits
    exported, _ = load_model(
        ModelConfig(path=str(tmp_path / "export"), device="cpu", dtype="float32")
    )
    with torch.no_grad():
        torch.testing.assert_close(exported(**ids).logits, in_search, atol=1e-5, rtol=0)

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from eep.cli import main
from eep.finetune import LoRALinear, batch_loss, lora_finetune
from eep.genome import Genome

IDS = torch.randint(0, 48, (8, 12), generator=torch.Generator().manual_seed(4))


def test_lora_starts_at_the_model_trains_and_merges_into_the_attention_weights_only(tiny_mixtral):
    before = {k: v.clone() for k, v in tiny_mixtral.state_dict().items()}
    batches = [{"input_ids": IDS[:4]}, {"input_ids": IDS[4:]}]
    with torch.no_grad():
        start = float(batch_loss(tiny_mixtral, batches[0]))
    result = lora_finetune(tiny_mixtral, batches, steps=30, rank=4, lr=1e-2)
    # B = 0: training starts at the model itself
    assert result["losses"][0] == pytest.approx(start, rel=1e-5)
    # it learns the calibration text
    assert sum(result["losses"][-5:]) / 5 < result["losses"][0] - 0.1
    assert not any(isinstance(m, LoRALinear) for m in tiny_mixtral.modules())
    after = tiny_mixtral.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(
        k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for k in changed
    )
    assert not tiny_mixtral.training and all(p.requires_grad for p in tiny_mixtral.parameters())
    with torch.no_grad():
        assert float(batch_loss(tiny_mixtral, batches[0])) < start


def test_finetune_command_writes_a_loadable_checkpoint_with_before_and_after(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.conftest import toy_config_dict

    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump({**toy_config_dict(), "baselines": {"calibration": {"size": 16}}})
    )
    Genome.from_keep(8, 2, {i: [0, 1, 2, 3] for i in range(4)}).save(tmp_path / "g.json")
    assert (
        main(
            [
                "export",
                "--model",
                "toy",
                "--genome",
                str(tmp_path / "g.json"),
                "--out",
                str(tmp_path / "small"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "finetune",
                str(tmp_path / "small"),
                "--config",
                str(config),
                "--out",
                str(tmp_path / "ft"),
                "--steps",
                "6",
                "--lr",
                "1e-3",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "ft/eep_finetune.json").read_text())
    assert len(report["losses"]) == 6 and report["trained_parameters"] > 0
    assert (
        set(report["heldout_before"]) == {"scores", "mean"}
        and 0 <= report["heldout_after"]["mean"] <= 100
    )
    assert (tmp_path / "ft/eep_genome.json").exists() and "## Fine-tuned" in (
        tmp_path / "ft/README.md"
    ).read_text()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ft")  # stock, as its source
    source, tuned = (
        load_file(tmp_path / "small/model.safetensors"),
        load_file(tmp_path / "ft/model.safetensors"),
    )
    assert set(source) == set(tuned) and sum(p.numel() for p in model.parameters()) == sum(
        v.numel() for v in tuned.values()
    )
    assert {k for k in source if not torch.equal(source[k], tuned[k])} == {
        k for k in source if k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    assert (
        main(
            [
                "finetune",
                str(tmp_path / "small"),
                "--config",
                str(config),
                "--out",
                str(tmp_path / "ft"),
            ]
        )
        == 2
    )

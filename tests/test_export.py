import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eep.config import ModelConfig, parse_config
from eep.errors import EepError
from eep.export import export_genome
from eep.genome import Genome
from eep.model import load_model, resolve_path
from eep.moe import adapter_for
from tests.conftest import toy_config_dict

GENOME = Genome.from_keep(8, 2, {0: [0, 2, 5, 7], 1: [1, 2, 3, 4], 2: [0, 3, 4, 6], 3: [1, 4, 5, 7]})
TOY = ModelConfig(path="toy", device="cpu", dtype="float32")


@pytest.mark.parametrize("active", [None, 1])
def test_export_is_smaller_loads_in_stock_transformers_and_equals_search_logits(tmp_path, active):
    out = tmp_path / "pruned"
    config = parse_config(toy_config_dict())
    genome = Genome.from_keep(8, 2, GENOME.keep_map(), active=active)
    report = export_genome(TOY, genome, out, config=config, search_fitness=87.5, log=lambda m: None)

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert exported.config.num_local_experts == 4
    assert exported.config.num_experts_per_tok == (active or 2)
    assert report["parameters"]["after"] == sum(p.numel() for p in exported.parameters())
    assert report["parameters"]["after"] < 0.75 * report["parameters"]["before"]
    source_bytes = (resolve_path("toy") + "/model.safetensors")
    assert (out / "model.safetensors").stat().st_size < 0.75 * __import__("os").path.getsize(source_bytes)

    model, _ = load_model(TOY)
    ids = tokenizer(["reverse : a b c d =", "lookup : p o n m l k ="], return_tensors="pt", padding=True)
    with torch.no_grad(), adapter_for(model).applied(genome):
        in_search = model(**ids).logits
    with torch.no_grad():
        torch.testing.assert_close(exported(**ids).logits, in_search, atol=1e-5, rtol=0)

    assert Genome.load(out / "eep_genome.json") == genome
    card = (out / "README.md").read_text()
    assert "8 → 4" in card and "held-out accuracy" in card and "87.50" in card
    saved = json.loads((out / "eep_report.json").read_text())
    assert set(saved["heldout"]["scores"]) == {"copy", "reverse", "shift", "lookup"}
    assert not list(tmp_path.glob(".*partial*"))


def test_export_refuses_existing_target_before_loading(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(EepError, match="already exists"):
        export_genome(ModelConfig(path=str(tmp_path / "no-such-model")), GENOME, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"

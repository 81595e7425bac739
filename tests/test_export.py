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
from eep.surgery import compress
from tests.conftest import toy_config_dict

GENOME = Genome.from_keep(
    8, 2, {0: [0, 2, 5, 7], 1: [1, 2, 3, 4], 2: [0, 3, 4, 6], 3: [1, 4, 5, 7]}
)
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
    source_bytes = resolve_path("toy") + "/model.safetensors"
    assert (out / "model.safetensors").stat().st_size < 0.75 * __import__("os").path.getsize(
        source_bytes
    )

    model, _ = load_model(TOY)
    ids = tokenizer(
        ["reverse : a b c d =", "lookup : p o n m l k ="], return_tensors="pt", padding=True
    )
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


def _merge_genome(seed: int, slots=(4, 4, 4, 4), selecting=False):
    import random

    from eep.genome import LayerGene

    rng = random.Random(seed)
    genes = {}
    for layer, n in enumerate(slots):
        picks = rng.sample(range(8), n)
        merge = [[(0.8 if i == e else 0.0) + rng.gauss(0, 0.05) for i in range(8)] for e in picks]
        router = (
            [[1.0 if i == e else 0.0 for i in range(8)] for e in picks]
            if selecting
            else [[(1.0 if i == e else 0.0) + 0.1 * rng.random() for i in range(8)] for e in picks]
        )
        genes[layer] = LayerGene.merged(merge, router)
    return Genome.from_genes(8, 2, genes)


CASES = {
    "merged-selecting-router": (lambda: _merge_genome(0, selecting=True), "stock"),
    "merged-general-router": (lambda: _merge_genome(1), "custom"),
    "pruned-uneven": (
        lambda: Genome.from_keep(
            8, 2, {0: [0, 2, 5], 1: [1, 2, 3, 4, 6], 2: [0, 3, 4, 6], 3: [1, 4]}, active={3: 1}
        ),
        "custom",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_export_form_equals_search_logits(tmp_path, case):
    make, kind = CASES[case]
    genome = make()
    out = tmp_path / case
    report = export_genome(TOY, genome, out, log=lambda m: None)
    assert report["form"] == kind and report["form_reason"]
    assert report["parameters"]["after"] < 0.8 * report["parameters"]["before"]
    model, tokenizer = load_model(TOY)
    ids = tokenizer(
        ["reverse : a b c d =", "lookup : p o n m l k ="], return_tensors="pt", padding=True
    )
    with torch.no_grad(), adapter_for(model).applied(genome):
        in_search = model(**ids).logits
    if kind == "stock":
        exported = AutoModelForCausalLM.from_pretrained(out).eval()
        assert not (out / "modeling_eep_moe.py").exists()
        assert report["parameters"]["after"] == sum(p.numel() for p in exported.parameters())
        with torch.no_grad():
            torch.testing.assert_close(exported(**ids).logits, in_search, atol=1e-5, rtol=0)
    else:
        _check_in_fresh_process(out, ids, in_search, report["parameters"]["after"])
    # eep's loader, no remote code
    own, _ = load_model(ModelConfig(path=str(out), device="cpu", dtype="float32"))
    with torch.no_grad():
        torch.testing.assert_close(own(**ids).logits, in_search, atol=1e-5, rtol=0)
    assert Genome.load(out / "eep_genome.json") == genome
    assert ("trust_remote_code=True" in (out / "README.md").read_text()) == (kind == "custom")


def test_forced_stock_form_of_a_general_genome_is_refused_before_writing(tmp_path):
    with pytest.raises(
        EepError, match="cannot be a stock checkpoint: layers \\[0, 1, 2, 3\\] route through"
    ):
        export_genome(TOY, _merge_genome(1), tmp_path / "x", log=lambda m: None, form="stock")
    assert not list(tmp_path.iterdir())


def _check_in_fresh_process(out, ids, expected, parameters):
    """What a user without eep sees: stock transformers refuses the custom form unless asked to
    trust its modeling file, and then loads it with the in-search logits."""
    import subprocess
    import sys

    torch.save({"ids": dict(ids), "expected": expected}, out.parent / "probe.pt")
    script = f"""
import torch
from transformers import AutoModelForCausalLM
path = {str(out)!r}
try:
    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
    raise SystemExit("loaded without trust_remote_code")
except ValueError as err:
    assert "trust_remote_code" in str(err), err
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model)
assert sum(p.numel() for p in model.parameters()) == {parameters}
probe = torch.load({str(out.parent / "probe.pt")!r})
with torch.no_grad():
    torch.testing.assert_close(model(**probe["ids"]).logits, probe["expected"], atol=1e-5, rtol=0)
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_an_interrupted_export_leaves_nothing_loadable(tmp_path, monkeypatch):
    """Interrupted after the weights are written (here: while writing the genome file), the export
    leaves neither the target nor its temporary directory behind."""

    def interrupted(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(Genome, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_genome(TOY, GENOME, tmp_path / "out", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_exports_and_run_files_are_shareable(tmp_path):
    """Written like save_pretrained's own files under the umask (0644 / 0755), never left 0600."""
    import stat

    from eep.config import ModelConfig
    from eep.export import export_genome
    from eep.genome import Genome
    from eep.journal import file_mode, write_json_atomic

    out = tmp_path / "out"
    export_genome(
        ModelConfig(path="toy", device="cpu"),
        Genome.from_keep(8, 2, {i: [0, 1, 2, 3] for i in range(4)}),
        out,
        log=lambda m: None,
    )
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == file_mode() and set(modes.values()) == {file_mode()}
    assert stat.S_IMODE(out.stat().st_mode) == file_mode() | 0o111
    write_json_atomic(tmp_path / "s.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "s.json").stat().st_mode) == file_mode()


def test_custom_checkpoints_of_earlier_versions_still_load(tmp_path):
    """Before every family had a custom form, eep_mixtral checkpoints routed every layer through a
    router matrix over all source experts (one-hot rows for kept experts) and had no eep_routing:
    eep's loader reads that layout with today's classes, to the same logits."""
    from safetensors.torch import load_file, save_file

    from eep.export import save_model

    genome = Genome.from_keep(
        8, 2, {0: [0, 2, 5], 1: [1, 2, 3, 4, 6], 2: [0, 3, 4, 6], 3: [1, 4]}, active={3: 1}
    )
    model, tokenizer = load_model(TOY)
    small, form = compress(adapter_for(model), genome)
    save_model(small, form.kind, tmp_path / "old")
    tokenizer.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    assert config["model_type"] == "eep_mixtral"
    state, source = load_file(tmp_path / "old" / "model.safetensors"), model.state_dict()
    for layer, gene in genome.layers:
        gate = f"model.layers.{layer}.mlp.gate."
        state[gate + "weight"] = source[gate + "weight"].clone()
        state[gate + "router_map"] = torch.eye(8)[list(gene.keep)]
        config["eep_layers"][str(layer)]["sources"] = 8
    del config["eep_routing"]
    save_file(state, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))

    old, _ = load_model(ModelConfig(path=str(tmp_path / "old"), device="cpu", dtype="float32"))
    ids = tokenizer(
        ["reverse : a b c d =", "lookup : p o n m l k ="], return_tensors="pt", padding=True
    )
    with torch.no_grad(), adapter_for(model).applied(genome):
        in_search = model(**ids).logits
    with torch.no_grad():
        torch.testing.assert_close(old(**ids).logits, in_search, atol=1e-5, rtol=0)

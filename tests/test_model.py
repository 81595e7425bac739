import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eep import model as eep_model
from eep.config import ModelConfig
from eep.errors import EepError
from eep.model import choose_experts, grouped_mm_runs, load_model

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_auto_takes_grouped_mm_where_torch_runs_it_else_eager(monkeypatch):
    assert choose_experts("auto", CPU, torch.float32) == (
        "grouped_mm" if grouped_mm_runs(CPU, torch.float32) else "eager"
    )
    assert choose_experts("batched_mm", CPU, torch.float32) == "batched_mm"  # asked for, so given
    monkeypatch.setattr(eep_model, "grouped_mm_runs", lambda device, dtype: False)
    assert choose_experts("auto", CPU, torch.float32) == "eager"
    with pytest.raises(
        EepError, match="is grouped_mm but torch .* for float32 on cpu; set it to auto or eager"
    ):
        choose_experts("grouped_mm", CPU, torch.float32)


def test_a_transformers_without_grouped_mm_runs_eager(monkeypatch):
    """Older transformers register fewer implementations: auto reads what is registered."""
    monkeypatch.setattr(eep_model, "registered_experts", lambda: ("eager", "batched_mm"))
    assert choose_experts("auto", CPU, torch.float32) == "eager"
    with pytest.raises(
        EepError, match="'grouped_mm' is not in this transformers .*eager, batched_mm"
    ):
        choose_experts("grouped_mm", CPU, torch.float32)


def test_the_loader_runs_the_chosen_implementation():
    for choice in ("auto", "eager", "batched_mm"):
        model, _ = load_model(ModelConfig(device="cpu", experts_implementation=choice))
        expected = choose_experts(choice, CPU, torch.float32)
        assert model.config._experts_implementation == expected
        assert model.model.layers[0].mlp.experts.config._experts_implementation == expected


def test_generate_keeps_the_chosen_kernel_while_decoding(monkeypatch):
    """transformers' generate swaps grouped_mm for batched_mm while it decodes on any device but a
    CPU (a copy of the experts' weights per token: on an H200 at Mixtral width 121 ms a step and
    89.5 GiB instead of 5.3 ms and 5.8 GiB); the models eep loads keep the kernel eep chose."""
    if not grouped_mm_runs(CPU, torch.float32):
        pytest.skip("this torch has no grouped matmul on the CPU")
    model, _ = load_model(ModelConfig(device="cpu", experts_implementation="grouped_mm"))
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    with type(model)._optimize_model_for_decode(model):  # transformers' own method
        assert model.config._experts_implementation == "batched_mm"
    assert model.config._experts_implementation == "grouped_mm"
    with model._optimize_model_for_decode():  # what generate calls on eep's model
        assert model.config._experts_implementation == "grouped_mm"
        assert model.model.layers[0].mlp.experts.config._experts_implementation == "grouped_mm"


def _score_in_this_process(path: str) -> dict:
    """Run in a fresh process: load ``path`` through eep's worker, score a half-pruned genome on
    the toy tasks' search split (128 prompts, 8 new tokens), report peak RSS (VmHWM)."""
    import random

    from eep.bench import _config, _peak_rss, half_kept
    from eep.evaluator import FitnessWorker
    from search_spaces import random_genome

    worker = FitnessWorker(_config(path, "cpu"))
    worker.scores(random_genome(half_kept(worker.adapter), random.Random(0)))
    return {
        "peak": _peak_rss(),
        "weights": sum(p.numel() * p.element_size() for p in worker.model.parameters()),
        "experts": worker.model.config._experts_implementation,
    }


@pytest.mark.slow
def test_an_evaluation_at_mixtral_width_stays_within_twice_the_weights(tmp_path):
    """Hidden 1024, intermediate 3584 (Mixtral's expert width), 8 experts, 2 layers: 696 MiB of
    fp32 weights. Measured (2 CPU cores, torch 2.13, transformers 5.24): peak 1933 MiB with
    grouped_mm, 1867 MiB with eager = twice the weights (the loaded copy, and the safetensors file
    transformers keeps mapped) + 541 MiB: the runtime, whose peak scoring the toy (3 MiB of weights)
    in the same way is 385 MiB, and this batch's activations. batched_mm would copy 3*h*i*4 bytes
    = 42 MiB of expert weights per (token, expert) pair: 128 prompts x ~10 tokens x top-2 = ~2560
    pairs, ~105 GiB in the first forward (measured: 5.0 GiB peak for 4 prompts), so it is not run."""
    from eep.bench import random_mixtral

    path = random_mixtral(tmp_path / "wide", "random-wide")
    code = f"import json; from tests.test_model import _score_in_this_process as s; print(json.dumps(s({path!r})))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["weights"] == 182_535_168 * 4
    assert result["experts"] == choose_experts("auto", CPU, torch.float32)
    runtime_allowance = 768 * 2**20  # the toy's 385 MiB + activations, with ~200 MiB to spare
    assert result["peak"] < 2 * result["weights"] + runtime_allowance, result["peak"] / 2**20


def test_a_missing_local_model_fails_at_once_not_after_hub_retries(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    # "out/nope" has the shape of a hub id, but out/ is here: a typo, not a model to download
    with pytest.raises(EepError, match=r"model path out/nope does not exist \(out/ is a local"):
        load_model(ModelConfig(path="out/nope"))
    with pytest.raises(EepError, match="model path ./nope does not exist; give"):
        eep_model.load_hf_config(ModelConfig(path="./nope"))
    assert not eep_model._looks_local("mistralai/Mixtral-8x7B-v0.1")  # no mistralai/ here

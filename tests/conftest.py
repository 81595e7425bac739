import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_mixtral_config(**overrides):
    from transformers import MixtralConfig

    values = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                  max_position_embeddings=64, tie_word_embeddings=False)
    values.update(overrides)
    return MixtralConfig(**values)


@pytest.fixture
def tiny_mixtral():
    """A random tiny Mixtral (fp32, eval mode), different weights per expert."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config()).eval()
    with torch.no_grad():  # default init gives small router weights: sharpen routing so masks matter
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    return model


def toy_config_dict(**search):
    """A small search on the embedded toy model, fast enough for unit tests."""
    return {
        "name": "test",
        "model": {"path": "toy", "device": "cpu", "dtype": "float32"},
        "search_space": {"kind": "prune", "keep": 4},
        "search": {"seed": 3, "evaluations": 16, "initial": 6, **search},
        "fitness": {"batch_size": 64, "max_new_tokens": 7, "tasks": [
            {"name": t, "dataset": f"toy:{t}", "search_size": 6, "test_size": 12}
            for t in ("copy", "reverse", "shift", "lookup")]},
    }

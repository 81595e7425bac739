"""Benchmark models: randomly initialised Mixtrals with the toy's tokenizer, saved to a directory.

Their accuracy is meaningless; their compute and memory per candidate are real.
"""

from __future__ import annotations

from pathlib import Path

SIZES = {
    # ~25M parameters: 8 layers, hidden 256
    "random-mixtral": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=4),
    # ~100M parameters: 8 layers, hidden 512
    "random-100m": dict(hidden_size=512, intermediate_size=960, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4),
}


def random_mixtral(path: Path, name: str = "random-mixtral") -> str:
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from eep.toy import TOY_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOY_DIR)
    config = MixtralConfig(vocab_size=len(tokenizer), num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0, **SIZES[name])
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    with torch.no_grad():  # default init routes almost uniformly; sharper routing is more realistic
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)

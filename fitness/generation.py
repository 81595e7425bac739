"""Greedy generation, the decoding EEP's fitness uses: prompts are batched with left padding and
decoded greedily for at most ``max_new_tokens``."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.inference_mode()
def greedy_generate(
    model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy continuations of ``prompts`` (special tokens removed), in input order."""
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            list(prompts[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            padding_side="left",
        ).to(device)
        generated = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs

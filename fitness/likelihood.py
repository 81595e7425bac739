"""Teacher-forced scoring: option log-likelihoods (multiple choice) and whole-text metrics
(perplexity, fidelity to the full model, MoE-block reconstruction), one forward pass per batch.

Texts are tokenised once into fixed, right-padded batches (:class:`TextBatches`) so that every
candidate is measured on exactly the positions the full model's reference was computed on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.inference_mode()
def continuation_logprobs(
    model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int, max_length: int
) -> list[float]:
    """Summed log-probability of each ``continuation`` given its ``context``, in input order.

    Context and continuation are tokenised separately and concatenated (as lm-evaluation-harness
    does), so the continuation's tokens are the same whatever precedes them; an over-long pair
    loses context tokens from the left, never continuation tokens.
    """
    encoded = []
    for context, continuation in pairs:
        ctx = tokenizer(context).input_ids
        cont = tokenizer(continuation, add_special_tokens=False).input_ids
        if not cont:
            raise ValueError(f"option {continuation!r} is empty after tokenisation")
        ids = (ctx + cont)[-max_length:]
        # the first token of a sequence has no prediction
        encoded.append((ids, min(len(cont), len(ids) - 1)))
    # similar lengths share a batch
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    device, out = _device(model), [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = {
            k: v.to(device)
            for k, v in _right_padded([encoded[i][0] for i in chunk], _pad_id(tokenizer)).items()
        }
        logprobs = torch.log_softmax(model(**batch).logits.float(), dim=-1)
        for row, i in enumerate(chunk):
            ids, n_cont = encoded[i]
            n = len(ids)
            targets = batch["input_ids"][row, n - n_cont : n]
            out[i] = logprobs[row, n - n_cont - 1 : n - 1].gather(-1, targets[:, None]).sum().item()
    return out


class TextBatches:
    """Texts tokenised once into fixed right-padded batches of at most ``max_length`` tokens."""

    def __init__(self, tokenizer, texts: Sequence[str], batch_size: int, max_length: int):
        rows = [tokenizer(t).input_ids[:max_length] for t in texts]
        if any(len(r) < 2 for r in rows):
            raise ValueError("every text needs at least two tokens to be scored")
        self.batches = [
            _right_padded(rows[i : i + batch_size], _pad_id(tokenizer))
            for i in range(0, len(rows), batch_size)
        ]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _forward(model, batch) -> torch.Tensor:
    """Log-probabilities [valid positions, vocab] of one batch (padding positions dropped)."""
    device = _device(model)
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
    return torch.log_softmax(logits[batch["attention_mask"].to(device).bool()], dim=-1)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n] negative log-likelihood of every predicted token: positions whose token and the one
    before it are both unpadded (for right-padded batches: every token after the first)."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return nll[mask[:, 1:].bool() & mask[:, :-1].bool()]


@torch.inference_mode()
def perplexity(model, texts: TextBatches) -> float:
    """exp(mean next-token NLL) over every predicted token of the texts."""
    device, total, count = _device(model), 0.0, 0
    for batch in texts:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        nll = next_token_nll(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        total += nll.sum().item()
        count += len(nll)
    return math.exp(total / count)


def _block_outputs(model, blocks: dict, batch) -> dict[int, torch.Tensor]:
    """Each MoE block's output at the batch's valid positions."""
    mask = batch["attention_mask"].bool()
    captured: dict[int, torch.Tensor] = {}

    def hook(layer):
        def capture(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            captured[layer] = (
                out.reshape(mask.shape + out.shape[-1:])[mask.to(out.device)].float().cpu()
            )

        return capture

    handles = [block.register_forward_hook(hook(layer)) for layer, block in blocks.items()]
    try:
        device = _device(model)
        model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
    return captured


class Reference:
    """What the full model does on the texts, computed once: per-batch next-token log-probabilities
    (for ``esap``/``kl``) and MoE block outputs (for ``reconstruction``), on the CPU.

    Memory: ``positions × vocabulary`` floats for the distributions — 256 texts of 512 tokens with
    a 32k vocabulary are 16 GiB, so size fidelity tasks accordingly (a few thousand positions carry
    most of the signal)."""

    def __init__(
        self, model, texts: TextBatches, blocks: dict | None = None, distributions: bool = True
    ):
        self.texts = texts
        with torch.inference_mode():
            self.logprobs = [_forward(model, b).cpu() for b in texts] if distributions else None
            self.outputs = [_block_outputs(model, blocks, b) for b in texts] if blocks else None
        self.layers = list(blocks or ())

    @torch.inference_mode()
    def fidelity(self, model) -> tuple[float, float]:
        """(ESAP in %, KL in nats) of ``model`` against the full model, averaged over positions.

        ESAP = Σ_v min(p_full(v), p(v)) = 1 − total variation: the expected probability that a
        token drafted by ``model`` is accepted by speculative decoding against the full model."""
        accept, kl, count = 0.0, 0.0, 0
        for batch, ref in zip(self.texts, self.logprobs, strict=True):
            cand = _forward(model, batch)
            ref = ref.to(cand.device)
            accept += torch.minimum(ref.exp(), cand.exp()).sum().item()
            kl += F.kl_div(cand, ref, log_target=True, reduction="sum").item()
            count += cand.shape[0]
        return 100.0 * accept / count, kl / count

    @torch.inference_mode()
    def reconstruction(self, model, blocks: dict) -> float:
        """Mean over MoE layers of ‖Z − Z'‖_F / ‖Z‖_F (in %), Z the full model's block outputs on
        all the texts' tokens, Z' the candidate's (each layer fed by the candidate's own earlier
        layers, so the error is the one the candidate actually makes); ``blocks``: its MoE blocks."""
        err = {layer: 0.0 for layer in self.layers}
        norm = {layer: 0.0 for layer in self.layers}
        for batch, ref in zip(self.texts, self.outputs, strict=True):
            out = _block_outputs(model, blocks, batch)
            for layer in self.layers:
                err[layer] += (out[layer] - ref[layer]).pow(2).sum().item()
                norm[layer] += ref[layer].pow(2).sum().item()
        return (
            100.0
            * sum(math.sqrt(err[i] / norm[i]) if norm[i] else 0.0 for i in self.layers)
            / len(self.layers)
        )

"""The one gradient step in eep: a short LoRA fine-tune of a compressed model on calibration text,
MoE-I²'s recovery step. Everything else in eep (search, baselines, MoE-I²'s two stages) uses
inference only; this is opt-in (`eep finetune`) and its output is labelled as fine-tuned.

LoRA (Hu et al., 2021): each targeted linear layer ``W`` gets a trainable ``ΔW = (alpha / r) B A``
with ``A`` [r, in] random and ``B`` [out, r] zero, so training starts from the compressed model
exactly; only A and B are trained (AdamW, next-token loss on the non-padding calibration tokens).
At the end ΔW is added into ``W`` and the wrappers removed, so the saved checkpoint has exactly the
source's tensors and loads as the source did (stock, or eep's custom form). Chosen here (the paper's
settings are not known first-hand): the attention projections are the targets — they exist in every
family and, unlike fused experts, are plain linear layers — rank 8, alpha 16, learning rate 1e-4.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from eep.errors import EepError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) · x Aᵀ Bᵀ`` with the base layer frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        base.weight.requires_grad_(False)
        # nn.Linear's default (kaiming-uniform, a=sqrt(5)) bound
        bound = 1 / math.sqrt(base.in_features)
        a = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) * bound
        self.a = nn.Parameter(a.to(device=base.weight.device, dtype=torch.float32))
        self.b = nn.Parameter(
            torch.zeros(base.out_features, rank, device=base.weight.device, dtype=torch.float32)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x.float(), self.a), self.b) * self.scale
        return self.base(x) + update.to(x.dtype)

    def merge(self) -> nn.Linear:
        """The base layer with the update added into its weight."""
        with torch.no_grad():
            self.base.weight += (self.scale * self.b @ self.a).to(self.base.weight.dtype)
        return self.base


def _wrap(
    model: nn.Module, targets: Sequence[str], rank: int, alpha: float, seed: int
) -> list[tuple[nn.Module, str]]:
    generator = torch.Generator().manual_seed(seed)
    wrapped = []
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha, generator))
                wrapped.append((module, child_name))
    if not wrapped:
        raise EepError(f"no linear layers named {', '.join(targets)} to fine-tune in this model")
    return wrapped


def batch_loss(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-padding positions of one batch."""
    from eep.calibration import calibration_inputs
    from fitness.likelihood import next_token_nll

    ids, mask = next(calibration_inputs(model, [inputs]))
    return next_token_nll(
        model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask
    ).mean()


def lora_finetune(
    model: nn.Module,
    batches: Iterable[dict],
    steps: int = 50,
    rank: int = 8,
    alpha: float = 16.0,
    lr: float = 1e-4,
    seed: int = 0,
    targets: Sequence[str] = TARGETS,
    log: Callable[[str], None] = lambda m: None,
) -> dict:
    """Fine-tune ``model`` in place with LoRA for ``steps`` batches (cycling through ``batches`` in
    a seeded order), then merge the updates into its weights. Returns the loss of every step and
    the number of trained parameters. The model is left in eval mode, without gradients."""
    batches = list(batches)
    if not batches:
        raise EepError("fine-tuning needs calibration texts; got none")
    frozen = [p for p in model.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    wrapped = _wrap(model, targets, rank, alpha, seed)
    trained = [
        p for parent, name in wrapped for p in getattr(parent, name).parameters() if p.requires_grad
    ]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    losses = []
    try:
        model.train()
        with torch.enable_grad():
            queue: list[int] = []
            for step in range(steps):
                if not queue:
                    queue = order.sample(range(len(batches)), len(batches))
                loss = batch_loss(model, batches[queue.pop()])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if step % 10 == 0 or step == steps - 1:
                    log(f"[eep] fine-tune step {step + 1}/{steps}: loss {losses[-1]:.4f}")
    finally:
        model.eval()
        for parent, name in wrapped:
            setattr(parent, name, getattr(parent, name).merge())
        for parameter in frozen:
            parameter.requires_grad_(True)
    return {
        "losses": losses,
        "trained_parameters": sum(p.numel() for p in trained),
        "steps": steps,
        "rank": rank,
        "alpha": alpha,
        "lr": lr,
        "seed": seed,
        "targets": list(targets),
    }

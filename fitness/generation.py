"""Greedy-generation accuracy: the fitness EEP uses.

Prompts are batched with left padding; every answer is compared to the reference after
whitespace normalisation. Scores are percentages (0-100), as in the EEP paper, so the search's
parent thresholds (3.0 and 1.0 points) mean what they mean there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

METRICS = ("exact_match", "contains")


@dataclass(frozen=True)
class Example:
    prompt: str
    answers: tuple[str, ...]
    """Any of these counts as correct."""


@dataclass(frozen=True)
class Task:
    """A named list of examples scored by one metric; ``weight`` is its share of the fitness."""

    name: str
    examples: tuple[Example, ...]
    metric: str = "exact_match"
    weight: float = 1.0


def _normalise(text: str) -> str:
    return " ".join(text.split())


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: Sequence[str], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts`` (special tokens removed), in input order."""
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start: start + batch_size]), return_tensors="pt", padding=True,
                          padding_side="left").to(device)
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


def is_correct(metric: str, completion: str, answers: Sequence[str]) -> bool:
    """``exact_match``: the completion equals an answer; ``contains``: an answer occurs in its first
    line (EEP's SQuAD rule). Both compare whitespace-normalised text."""
    text = _normalise(completion) if metric == "exact_match" else _normalise(completion.strip().split("\n")[0])
    if metric == "exact_match":
        return any(text == _normalise(a) for a in answers)
    if metric == "contains":
        return any(_normalise(a) in text for a in answers)
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def score(task: Task, completions: Sequence[str]) -> float:
    """Percentage of examples whose completion is correct under the task's metric."""
    hits = sum(is_correct(task.metric, c, ex.answers) for c, ex in zip(completions, task.examples, strict=True))
    return 100.0 * hits / len(task.examples)


def evaluate_tasks(model, tokenizer, tasks: Sequence[Task], batch_size: int, max_new_tokens: int) -> dict[str, float]:
    """Score every task; all prompts go through generation together for fuller batches."""
    prompts = [ex.prompt for task in tasks for ex in task.examples]
    completions = greedy_generate(model, tokenizer, prompts, batch_size, max_new_tokens)
    scores, offset = {}, 0
    for task in tasks:
        scores[task.name] = score(task, completions[offset: offset + len(task.examples)])
        offset += len(task.examples)
    return scores


def weighted_fitness(tasks: Sequence[Task], scores: dict[str, float]) -> float:
    total = sum(t.weight for t in tasks)
    return sum(t.weight * scores[t.name] for t in tasks) / total

"""The metrics a task can be scored by, and the pure text comparisons behind them.

Every metric belongs to one *kind*, which decides how the model is run:

- ``generate``: greedy decoding, then the completion is compared with the reference answers;
- ``choice``: the log-likelihood of each option given the prompt; the best option must be the label;
- ``text``: one teacher-forced pass over whole texts (perplexity, fidelity to the full model,
  reconstruction of the MoE blocks' outputs).

Accuracies and the expected speculative acceptance are percentages (higher is better); perplexity,
KL and reconstruction error are losses (lower is better). A search maximises the weighted mean of
the tasks' *signed* scores (losses enter negated), see :func:`weighted_fitness`.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str
    """``generate``, ``choice`` or ``text``."""
    higher_is_better: bool
    description: str


METRICS = {
    m.name: m
    for m in (
        Metric(
            "exact_match",
            "generate",
            True,
            "% of completions equal to an answer (whitespace-normalised)",
        ),
        Metric(
            "contains",
            "generate",
            True,
            "% of completions whose first line contains an answer (EEP's SQuAD rule)",
        ),
        Metric(
            "first_capital",
            "generate",
            True,
            "% of completions whose first capital letter is the answer (lettered options; EEP/OpenCompass)",
        ),
        Metric(
            "f1",
            "generate",
            True,
            "mean best token F1 against the answers, SQuAD normalisation, in %",
        ),
        Metric(
            "choice",
            "choice",
            True,
            "% of examples whose most likely option (summed log-probability) is the label",
        ),
        Metric(
            "choice_norm",
            "choice",
            True,
            "as choice, with each option's log-probability divided by its length in bytes",
        ),
        Metric(
            "perplexity",
            "text",
            False,
            "exp of the mean next-token NLL over all tokens of the texts",
        ),
        Metric(
            "esap",
            "text",
            True,
            "expected speculative acceptance vs the full model: mean Σ_v min(p_full, p), in %",
        ),
        Metric("kl", "text", False, "mean KL(p_full ‖ p) per token, in nats"),
        Metric(
            "reconstruction",
            "text",
            False,
            "mean over MoE layers of ‖Z − Z'‖_F / ‖Z‖_F of the block outputs, in %",
        ),
    )
}


def metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}") from None


def whitespace(text: str) -> str:
    return " ".join(text.split())


def squad_normalise(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return whitespace(re.sub(r"\b(a|an|the)\b", " ", text))


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD token F1 (0-1) of one prediction against one answer."""
    pred, gold = squad_normalise(prediction).split(), squad_normalise(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def cut_at_stop(completion: str, stop: Sequence[str]) -> str:
    """The completion up to the first occurrence of any stop string."""
    cut = min(
        (i for i in (completion.find(s) for s in stop if s) if i >= 0), default=len(completion)
    )
    return completion[:cut]


def generation_score(name: str, completion: str, answers: Sequence[str]) -> float:
    """One completion's score (0-1) under a generation metric."""
    if name == "exact_match":
        return float(any(whitespace(completion) == whitespace(a) for a in answers))
    if name == "contains":
        first_line = whitespace(completion.strip().split("\n")[0])
        return float(any(whitespace(a) in first_line for a in answers))
    if name == "first_capital":
        letter = next((ch for ch in completion if ch.isupper()), "")
        return float(any(letter == a.strip() for a in answers))
    if name == "f1":
        return max((token_f1(completion, a) for a in answers), default=0.0)
    raise ValueError(f"{name!r} is not a generation metric")


def best_choice(logprobs: Sequence[float], options: Sequence[str], normalise: bool) -> int:
    """Index of the most likely option; ``normalise`` divides by the option's byte length (lm-eval's
    ``acc_norm``). Ties go to the first."""
    values = [
        lp / max(len(o.encode()), 1) if normalise else lp
        for lp, o in zip(logprobs, options, strict=True)
    ]
    return max(range(len(values)), key=values.__getitem__)


def weighted_fitness(tasks, scores: dict[str, float]) -> float:
    """The search's fitness: weighted mean of the tasks' scores, losses negated so higher is better.
    ``tasks`` are objects with ``name``, ``metric`` and ``weight`` (task configs or loaded tasks)."""
    total = sum(t.weight for t in tasks)
    signed = (
        t.weight * (1 if metric(t.metric).higher_is_better else -1) * scores[t.name] for t in tasks
    )
    return sum(signed) / total

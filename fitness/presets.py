"""Ready tasks: the benchmarks EEP searched on and common zero-shot suites, written against their
``datasets`` hub ids. Use one with ``{name: boolq, preset: boolq}``; any key given next to
``preset`` overrides the preset's (e.g. ``dataset`` pointing at a local copy in the same schema).

Prompts for EEP's generation tasks follow its released evaluation configs (OpenCompass templates,
lettered options scored by the first capital letter); the zero-shot suites follow the
log-likelihood formulations of lm-evaluation-harness. GSM8K is not offered: its answers need a
numeric extraction rule and long generations, which a pruning fitness should not depend on.
"""

from __future__ import annotations

import re
from typing import Any

_SUPERGLUE = "aps/super_glue"
_GEN = {
    "metric": "first_capital",
    "chat_template": True,
    "search_split": "train",
    "test_split": "validation",
}

PRESETS: dict[str, dict[str, Any]] = {
    # -- EEP's tasks (generation) ----------------------------------------------------------------
    "boolq": {
        **_GEN,
        "dataset": "google/boolq",
        "prompt": "{passage}\nQuestion: {question}?\nA. Yes\nB. No\nAnswer:",
        "answer": "answer",
        "answer_map": {"true": "A", "false": "B"},
    },
    "rte": {
        **_GEN,
        "dataset": _SUPERGLUE,
        "subset": "rte",
        "prompt": "{premise}\n{hypothesis}\nIs the sentence below entailed by the sentence above?\n"
        "A. Yes\nB. No\nAnswer:",
        "answer": "label",
        "answer_map": {"0": "A", "1": "B"},
    },
    "cb": {
        **_GEN,
        "dataset": _SUPERGLUE,
        "subset": "cb",
        "prompt": "{premise}\n{hypothesis}\nWhat is the relation between the two sentences?\n"
        "A. Contradiction\nB. Entailment\nC. Neutral\nAnswer:",
        "answer": "label",
        "answer_map": {"0": "B", "1": "A", "2": "C"},
    },
    "wic": {
        **_GEN,
        "dataset": _SUPERGLUE,
        "subset": "wic",
        "prompt": "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nAre '{word}' in the above two sentences "
        "the same?\nA. Yes\nB. No\nAnswer:",
        "answer": "label",
        "answer_map": {"1": "A", "0": "B"},
    },
    "wsc": {
        **_GEN,
        "dataset": _SUPERGLUE,
        "subset": "wsc.fixed",
        "prompt": "{text}\nIs '{span1_text}' and '{span2_text}' the same in the above sentence?\n"
        "A. Yes\nB. No\nAnswer:",
        "answer": "label",
        "answer_map": {"1": "A", "0": "B"},
    },
    "squad": {
        "dataset": "rajpurkar/squad",
        "metric": "contains",
        "chat_template": True,
        "stop": ["\n"],
        "prompt": "{context}\nAccording to the above passage, answer the following question. "
        "Question: {question}\nAnswer:",
        "answer": "answers.text",
        "search_split": "train",
        "test_split": "validation",
    },
    "drop": {
        "dataset": "ucinlp/drop",
        "metric": "contains",
        "chat_template": True,
        "stop": ["\n"],
        "prompt": "{passage}\nAnswer the question about the passage with a short span or number. "
        "Question: {question}\nAnswer:",
        "answer": "answers_spans.spans",
        "search_split": "train",
        "test_split": "validation",
    },
    "record": {
        "dataset": _SUPERGLUE,
        "subset": "record",
        "metric": "contains",
        "chat_template": True,
        "stop": ["\n"],
        "preprocess": "record",
        "prompt": "Passage: {passage}\nResult: {query}\nQuestion: What entity does ____ refer to in the "
        "result? Give me the entity name:",
        "answer": "answers",
        "search_split": "train",
        "test_split": "validation",
    },
    # -- zero-shot suites (log-likelihood of each option) -------------------------------------------
    "arc_easy": {
        "dataset": "allenai/ai2_arc",
        "subset": "ARC-Easy",
        "metric": "choice_norm",
        "prompt": "Question: {question}\nAnswer:",
        "choices": "choices.text",
        "choice_labels": "choices.label",
        "answer": "answerKey",
        "search_split": "validation",
        "test_split": "test",
    },
    "arc_challenge": {
        "dataset": "allenai/ai2_arc",
        "subset": "ARC-Challenge",
        "metric": "choice_norm",
        "prompt": "Question: {question}\nAnswer:",
        "choices": "choices.text",
        "choice_labels": "choices.label",
        "answer": "answerKey",
        "search_split": "validation",
        "test_split": "test",
    },
    "openbookqa": {
        "dataset": "allenai/openbookqa",
        "subset": "main",
        "metric": "choice_norm",
        "prompt": "{question_stem}",
        "choices": "choices.text",
        "choice_labels": "choices.label",
        "answer": "answerKey",
        "search_split": "validation",
        "test_split": "test",
    },
    "hellaswag": {
        "dataset": "Rowan/hellaswag",
        "metric": "choice_norm",
        "preprocess": "hellaswag",
        "prompt": "{query}",
        "choices": "endings",
        "answer": "label",
        "search_split": "train",
        "test_split": "validation",
    },
    "piqa": {
        "dataset": "ybisk/piqa",
        "metric": "choice_norm",
        "prompt": "Question: {goal}\nAnswer:",
        "choices": ["{sol1}", "{sol2}"],
        "answer": "label",
        "search_split": "train",
        "test_split": "validation",
    },
    "winogrande": {
        "dataset": "allenai/winogrande",
        "subset": "winogrande_xl",
        "metric": "choice",
        "preprocess": "winogrande",
        "prompt": "{before}{choice}",
        "choices": ["{option1}", "{option2}"],
        "continuation": "{after}",
        "answer": "answer",
        "answer_map": {"1": "0", "2": "1"},
        "search_split": "train",
        "test_split": "validation",
    },
    "boolq_choice": {
        "dataset": "google/boolq",
        "metric": "choice",
        "prompt": "{passage}\nQuestion: {question}?\nAnswer:",
        "choices": ["no", "yes"],
        "answer": "answer",
        "answer_map": {"false": "0", "true": "1"},
        "search_split": "train",
        "test_split": "validation",
    },
    "mmlu": {
        "dataset": "cais/mmlu",
        "subset": "all",
        "metric": "choice",
        "prompt": "{question}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}\nAnswer:",
        "choices": ["A", "B", "C", "D"],
        "answer": "answer",
        "search_split": "validation",
        "test_split": "test",
    },
    # -- text metrics --------------------------------------------------------------------------------
    "wikitext": {
        "dataset": "Salesforce/wikitext",
        "subset": "wikitext-2-raw-v1",
        "metric": "perplexity",
        "prompt": "{text}",
        "search_split": "validation",
        "test_split": "test",
    },
    "wikitext_fidelity": {
        "dataset": "Salesforce/wikitext",
        "subset": "wikitext-2-raw-v1",
        "metric": "esap",
        "prompt": "{text}",
        "search_split": "validation",
        "test_split": "test",
    },
}


def preset_fields(name: str) -> dict[str, Any]:
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None


# -- row transforms ------------------------------------------------------------------------------


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict[str, Any]) -> dict[str, Any]:
    """lm-evaluation-harness's HellaSwag cleaning: one query from the activity and both context halves."""
    ctx = f"{row['ctx_a']} {row['ctx_b'].capitalize()}"
    return {
        **row,
        "query": _hellaswag_text(f"{row['activity_label']}: {ctx}"),
        "endings": [_hellaswag_text(e) for e in row["endings"]],
    }


def winogrande(row: dict[str, Any]) -> dict[str, Any]:
    """Split the sentence at its blank: options fill it, and the rest of the sentence is scored."""
    before, _, after = row["sentence"].partition("_")
    return {**row, "before": before, "after": after.strip()}


def record(row: dict[str, Any]) -> dict[str, Any]:
    """ReCoRD: drop the ``@highlight`` markers and show the blank as ``____``."""
    passage = row["passage"].replace("@highlight\n", "- ")
    return {**row, "passage": passage, "query": row["query"].replace("@placeholder", "____")}


PREPROCESS = {"hellaswag": hellaswag, "winogrande": winogrande, "record": record}

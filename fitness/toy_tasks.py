"""Synthetic text-to-text tasks of the embedded toy model.

Each example is a prompt such as ``"reverse : c a f b ="`` and an answer such as ``"b f a c"``,
scored by exact match of greedy generation. The tasks need different skills (attention
patterns for copy/reverse/rotate/swap, symbol maps for shift/unshift/lookup/unlookup), so experts trained to serve one
task are of little use to another and *which* experts a pruned model keeps matters.

Splits are disjoint by construction: an input sequence belongs to the split picked by a hash
of its text, so no held-out example can appear in training or in the search subset.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

SYMBOLS = tuple("abcdefghijklmnop")
TASKS = ("copy", "reverse", "shift", "unshift", "rotate", "swap", "lookup", "unlookup")
SPLITS = ("train", "search", "test")
MIN_LEN, MAX_LEN = 3, 6

# A fixed permutation of the symbols (seeded, never changes: it is part of the task).
_LOOKUP = dict(zip(SYMBOLS, random.Random(1234).sample(SYMBOLS, len(SYMBOLS))))
_UNLOOKUP = {v: k for k, v in _LOOKUP.items()}


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def solve(task: str, seq: list[str]) -> list[str]:
    """The ground-truth answer of ``task`` for the input symbols ``seq``."""
    if task == "copy":
        return list(seq)
    if task == "reverse":
        return seq[::-1]
    if task == "shift":
        return [SYMBOLS[(SYMBOLS.index(s) + 1) % len(SYMBOLS)] for s in seq]
    if task == "unshift":
        return [SYMBOLS[(SYMBOLS.index(s) - 1) % len(SYMBOLS)] for s in seq]
    if task == "rotate":
        return seq[1:] + seq[:1]
    if task == "swap":
        pairs = [seq[i : i + 2][::-1] for i in range(0, len(seq), 2)]
        return [s for pair in pairs for s in pair]
    if task == "lookup":
        return [_LOOKUP[s] for s in seq]
    if task == "unlookup":
        return [_UNLOOKUP[s] for s in seq]
    raise ValueError(f"unknown toy task {task!r}; choose one of {', '.join(TASKS)}")


def split_of(task: str, seq: list[str]) -> str:
    """Which split an input belongs to: 80 % train, 10 % search, 10 % test, by content hash."""
    bucket = int(hashlib.sha1(f"{task}|{' '.join(seq)}".encode()).hexdigest(), 16) % 10
    return "train" if bucket < 8 else ("search" if bucket == 8 else "test")


def make_example(task: str, seq: list[str], solve=solve) -> Example:
    """The prompt and answer of ``task`` on ``seq`` (``solve``: a toy's answers; both toys share the form)."""
    return Example(task, f"{task} : {' '.join(seq)} =", " ".join(solve(task, seq)))


def examples(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """``n`` distinct examples of ``task`` from ``split``, deterministic for a seed."""
    return sample(make_example, task, split, n, seed)


def sample(
    make,
    task: str,
    split: str,
    n: int,
    seed: int = 0,
    symbols=SYMBOLS,
    lengths=(MIN_LEN, MAX_LEN),
    tasks=TASKS,
    toy: str = "toy",
) -> list[Example]:
    """``n`` distinct examples ``make(task, seq)`` of random inputs in ``split`` (shared by both toys:
    ``tasks``, ``symbols``, ``lengths`` and the ``toy``'s name for errors are the caller's)."""
    if task not in tasks:
        raise ValueError(f"unknown {toy} task {task!r}; choose one of {', '.join(tasks)}")
    if split not in SPLITS:
        raise ValueError(f"unknown {toy} split {split!r}; choose one of {', '.join(SPLITS)}")
    rng = random.Random(f"{task}/{split}/{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n:
        seq = [rng.choice(symbols) for _ in range(rng.randint(*lengths))]
        ex = make(task, seq)
        if split_of(task, seq) == split and ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out


def vocabulary() -> list[str]:
    """Every word the toy tokenizer knows, special tokens first."""
    return ["<pad>", "<unk>", "<bos>", "<eos>", ":", "=", *TASKS, *SYMBOLS]

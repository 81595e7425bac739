"""Synthetic text-to-text tasks of the second toy model (:mod:`eep.toy_qwen`), none of them a task
of the first toy (:mod:`fitness.toy_tasks`): a case eep's search was never tuned on.

Prompts and answers look like the first toy's (``"sort : c a f b ="`` -> ``"a b c f"``). Five tasks
move, drop or compare symbols (sort, ends, count, skip, max); three map each symbol by a table of
their own (atbash, flip, halve): maps that depend on the task are what the experts must hold, as in
the first toy (tasks that attention alone solves survive losing their experts). Splits come from the
same content hash as the first toy's, keyed by these task names.
"""

from __future__ import annotations

from fitness import toy_tasks
from fitness.toy_tasks import Example, split_of  # noqa: F401  (split_of: for training)

SYMBOLS = tuple("abcdefghijklmnop")
TASKS = ("sort", "ends", "count", "skip", "atbash", "max", "flip", "halve")
MIN_LEN, MAX_LEN = 3, 6
NUMBERS = ("three", "four", "five", "six")  # count's answers, one word each


def solve(task: str, seq: list[str]) -> list[str]:
    """The ground-truth answer of ``task`` for the input symbols ``seq``."""
    if task == "sort":
        return sorted(seq)
    if task == "ends":  # first and last swapped
        return seq[-1:] + seq[1:-1] + seq[:1]
    if task == "count":
        return [NUMBERS[len(seq) - MIN_LEN]]
    if task == "skip":  # every other symbol, from the first
        return seq[::2]
    if task == "atbash":  # the alphabet read backwards: a <-> p, b <-> o, ...
        return [SYMBOLS[len(SYMBOLS) - 1 - SYMBOLS.index(s)] for s in seq]
    if task == "max":
        return [max(seq)]
    if task == "flip":  # each symbol's neighbour: a <-> b, c <-> d, ...
        return [SYMBOLS[SYMBOLS.index(s) ^ 1] for s in seq]
    if task == "halve":  # a, b -> a; c, d -> b; ...; o, p -> h
        return [SYMBOLS[SYMBOLS.index(s) // 2] for s in seq]
    raise ValueError(f"unknown toy-qwen task {task!r}; choose one of {', '.join(TASKS)}")


def make_example(task: str, seq: list[str]) -> Example:
    return toy_tasks.make_example(task, seq, solve)


def examples(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """``n`` distinct examples of ``task`` from ``split``, deterministic for a seed."""
    return toy_tasks.sample(
        make_example, task, split, n, seed, SYMBOLS, (MIN_LEN, MAX_LEN), TASKS, "toy-qwen"
    )


def vocabulary() -> list[str]:
    """Every word the toy-qwen tokenizer knows, special tokens first."""
    return ["<pad>", "<unk>", "<bos>", "<eos>", ":", "=", *TASKS, *SYMBOLS, *NUMBERS]

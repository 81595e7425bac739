"""Teacher-forced exact match: greedy generation's verdict from one forward pass.

Greedy decoding follows one path: at every step the argmax token. Feed the prompt followed by a
candidate tokenization of the answer, and the argmax at each answer position says whether the
greedy path takes the answer's next token. If it takes all of them (and then stops, or runs out of
``max_new_tokens``), generation produces exactly that answer; the first position where it does not
is where the greedy path leaves, and the text it has produced by then (the matched tokens plus the
argmax token) often already settles the comparison: e.g. ``"d c x"`` can never become ``"d c b a"``.

:func:`decide` makes that call on text alone and answers ``None`` whenever more tokens could still
change the verdict (a stop string that might straddle the next token, whitespace that
normalisation would drop, another tokenization of the same text); those examples, and every
metric other than ``exact_match``, are generated as before. So the verdicts are generation's own,
up to floating point: a forward pass over the whole sequence and a decode step with a KV cache
compute the same logits in a different order, so an argmax whose top two logits tie to within
rounding can differ. In float32 that is rare; in bfloat16 (the GPU default) ties are far more
common, and ``fitness.scoring: generate`` is the reference to check against (``eep eval``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fitness.metrics import cut_at_stop, whitespace

# generation settings that make generate's choice differ from the plain argmax of the logits
_PROCESSORS = (
    "repetition_penalty",
    "no_repeat_ngram_size",
    "min_length",
    "min_new_tokens",
    "suppress_tokens",
    "begin_suppress_tokens",
    "bad_words_ids",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "encoder_repetition_penalty",
    "renormalize_logits",
)
_NEUTRAL = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "min_length": 0,
    "min_new_tokens": 0,
    "no_repeat_ngram_size": 0,
    "renormalize_logits": False,
}
MAX_ROWS = 4
"""Tokenizations of an example's answers scored in one pass; beyond that the example is generated."""


def greedy_is_argmax(model) -> str | None:
    """Why ``model.generate`` would not pick the plain argmax (None when it would)."""
    config = getattr(model, "generation_config", None)
    for name in _PROCESSORS:
        value = getattr(config, name, None)
        if value is not None and value != _NEUTRAL.get(name):
            return f"its generation config sets {name}={value!r}"
    return None


def decide(text: str, final: bool, answers: Sequence[str], stop: Sequence[str]) -> bool | None:
    """Exact match of a completion that begins with ``text`` (``final``: that is all of it), or
    None when what follows could still change the verdict."""
    # a character cut in half by the token boundary: later tokens may complete it
    if "\ufffd" in text:
        return None
    targets = {whitespace(a) for a in answers}
    cut = cut_at_stop(text, stop)
    straddle = any(text.endswith(s[:k]) for s in stop if s for k in range(1, len(s)))
    if final or (len(cut) < len(text) and not straddle):  # the completion is settled
        return whitespace(cut) in targets
    if straddle:
        return None
    # text + more: its normalised form starts with text's (the last word may grow)
    start = whitespace(text)
    return None if any(t.startswith(start) for t in targets) else False


@dataclass(frozen=True)
class Item:
    """One exact-match example ready for teacher forcing."""

    prompt: list[int]
    answers: tuple[str, ...]
    stop: tuple[str, ...]
    rows: tuple[tuple[int, ...], ...]
    """Tokenizations of the answers to feed (each at most ``max_new_tokens`` long)."""


def prepare(
    tokenizer, prompt: str, answers: Sequence[str], stop: Sequence[str], max_new_tokens: int
) -> Item | None:
    """The example as an :class:`Item`, or None when it must be generated (too many tokenizations)."""
    rows = []
    for answer in answers:
        for text in (answer, " " + answer):  # with or without the space a BPE vocabulary attaches
            ids = tuple(tokenizer(text, add_special_tokens=False).input_ids[:max_new_tokens])
            if ids and ids not in rows:
                rows.append(ids)
    if not rows or len(rows) > MAX_ROWS:
        return None
    return Item(tokenizer(prompt).input_ids, tuple(answers), tuple(stop), tuple(rows))


@torch.inference_mode()
def teacher_forced(
    model, tokenizer, items: Sequence[Item], max_new_tokens: int
) -> list[bool | None]:
    """Greedy generation's exact-match verdict per item from one forward pass (None: undecided)."""
    if not items:
        return []
    device = next(model.parameters()).device
    seqs = [(i, item.prompt + list(row)) for i, item in enumerate(items) for row in item.rows]
    width = max(len(s) for _, s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (_, seq) in enumerate(seqs):  # left padding, as generation's prompts
        ids[r, width - len(seq) :] = torch.tensor(seq)
        mask[r, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(len(s) - len(items[i].prompt) for i, s in seqs) + 1
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=keep,
    ).logits
    greedy = logits.argmax(-1).tolist()  # [row][position among the last `keep`]
    verdicts: list[bool | None] = [None] * len(items)
    for r, (i, seq) in enumerate(seqs):
        item = items[i]
        row = seq[len(item.prompt) :]
        verdict = _follow(tokenizer, item, row, greedy[r][keep - len(row) - 1 :], max_new_tokens)
        if verdict is not None:
            verdicts[i] = verdict
    return verdicts


def _follow(
    tokenizer, item: Item, row: Sequence[int], argmax: Sequence[int], max_new_tokens: int
) -> bool | None:
    """Walk the greedy path along ``row``: ``argmax[j]`` is the greedy token after ``row[:j]``."""
    eos = tokenizer.eos_token_id

    def text(tokens):
        return tokenizer.decode(list(tokens), skip_special_tokens=True)

    for j, token in enumerate(argmax):
        if j == max_new_tokens:  # generation ends here
            return decide(text(row[:j]), True, item.answers, item.stop)
        if token == eos:
            return decide(text(row[:j]), True, item.answers, item.stop)
        # the greedy path leaves the answer (or goes beyond it)
        if j == len(row) or token != row[j]:
            return decide(text([*row[:j], token]), j + 1 == max_new_tokens, item.answers, item.stop)
    return None

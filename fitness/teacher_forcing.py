"""Teacher-forced exact match: greedy generation's verdict from one forward pass (rarely a few).

Greedy decoding follows one path: at every step the argmax token. Feed the prompt followed by a
candidate tokenization of the answer, and the argmax at each answer position says whether the
greedy path takes the answer's next token. If it takes all of them (and then stops, or runs out of
``max_new_tokens``), generation produces exactly that answer; the first position where it does not
is where the greedy path leaves, and the text it has produced by then (the matched tokens plus the
argmax token) often already settles the comparison: e.g. ``"d c x"`` can never become ``"d c b a"``.

:func:`decide` makes that call on text alone and answers ``None`` whenever more tokens could still
change the verdict (a special token that decoding drops, a stop string that might straddle the next
token, whitespace that normalisation would drop, half a character). Such an example is fed again:
the greedy path known so far, then the rest of the answer as a draft, which a pass checks as
speculative decoding checks a draft, taking the path at least one token further each time, so
``max_new_tokens`` passes settle every example. After the first pass only the few examples still
open are fed, one forward call a pass, where generating them would cost a prefill and a decode step
per token. A pass recomputes the whole sequence, though, so :data:`PASSES` bounds them: what that
many leave open (a greedy path that keeps taking special tokens for long answers) is generated, as
every metric other than ``exact_match`` is. So the verdicts are generation's own, up to floating
point: a forward pass over the whole sequence and a decode step with a KV cache compute the same
logits in a different order, so an argmax whose top two logits tie to within rounding can differ. In float32 that is rare; in bfloat16 (the GPU default) ties are far more
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
PASSES = 8
"""Forward passes an example gets (the first, then the greedy path so far + the rest of the answer)
before it is left to generation: every example, when ``max_new_tokens`` is at most this. Each pass
over the open examples recomputes their whole sequences, so past a few the KV-cached decode steps of
generation cost less."""


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
    model, tokenizer, items: Sequence[Item], max_new_tokens: int, passes: int | None = None
) -> list[bool | None]:
    """Greedy generation's exact-match verdict per item (None: undecided, to be generated).

    The first pass feeds each answer row. An item it leaves undecided (the greedy path left the
    answer with a token whose text settles nothing: a special token that decoding drops, half a
    character, a space normalisation removes) is fed again, up to ``passes`` in all: the greedy path
    known so far, then the rest of the answer as a draft, as speculative decoding checks a draft.
    Each pass takes the greedy path at least one token further, so ``max_new_tokens`` passes settle
    every item; generation is left only what ``passes`` (default :data:`PASSES`) do not settle."""
    passes = min(PASSES if passes is None else passes, max_new_tokens)
    verdicts: list[bool | None] = [None] * len(items)
    # per item: (tokens fed after the prompt, how many of them are known to be greedy's)
    feeds = {i: [(row, 0) for row in item.rows] for i, item in enumerate(items)}
    for _ in range(passes):
        if not feeds:
            break
        seqs = [(i, fed, start) for i, rows in feeds.items() for fed, start in rows]
        argmax = _argmax(
            model, tokenizer, [(items[i].prompt, fed, start) for i, fed, start in seqs]
        )
        # per open item: (the greedy path known, the draft after it), the longest its rows gave
        paths: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for (i, fed, start), greedy in zip(seqs, argmax, strict=True):
            if verdicts[i] is not None:
                continue
            verdict, path = _follow(tokenizer, items[i], fed, start, greedy, max_new_tokens)
            if verdict is not None:
                verdicts[i] = verdict
            elif path is not None and (i not in paths or len(path[0]) > len(paths[i][0])):
                paths[i] = path
        feeds = {
            i: [(known + draft, len(known))]
            for i, (known, draft) in paths.items()
            if verdicts[i] is None
        }
    return verdicts


def _argmax(model, tokenizer, seqs: Sequence[tuple[list[int], tuple[int, ...], int]]):
    """One forward pass over prompt + fed tokens, left padded; per sequence the argmax after each
    of ``fed[:start]``, ..., ``fed`` (``len(fed) - start + 1`` tokens)."""
    device = next(model.parameters()).device
    rows = [prompt + list(fed) for prompt, fed, _ in seqs]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):  # left padding, as generation's prompts
        ids[r, width - len(row) :] = torch.tensor(row)
        mask[r, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(len(fed) - start for _, fed, start in seqs) + 1
    logits = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=keep,
    ).logits
    greedy = logits.argmax(-1).tolist()  # [row][position among the last `keep`]
    return [g[keep - (len(fed) - start) - 1 :] for g, (_, fed, start) in zip(greedy, seqs)]


def _follow(
    tokenizer,
    item: Item,
    fed: Sequence[int],
    start: int,
    argmax: Sequence[int],
    max_new_tokens: int,
) -> tuple[bool | None, tuple[tuple[int, ...], tuple[int, ...]] | None]:
    """Walk the greedy path along ``fed`` from ``fed[start]`` (``fed[:start]`` is greedy's already):
    ``argmax[m]`` is the greedy token after ``fed[: start + m]``. Returns (the verdict, None) once
    it is settled, else (None, (the greedy path known now, the rest of ``fed`` as the next draft))."""
    eos = tokenizer.eos_token_id

    def text(tokens):
        return tokenizer.decode(list(tokens), skip_special_tokens=True)

    for m, token in enumerate(argmax):
        j = start + m
        if j == max_new_tokens or token == eos:  # generation ends here
            return decide(text(fed[:j]), True, item.answers, item.stop), None
        # the greedy path leaves the answer (or goes beyond it)
        if j == len(fed) or token != fed[j]:
            known = (*fed[:j], token)
            verdict = decide(text(known), j + 1 == max_new_tokens, item.answers, item.stop)
            draft = tuple(fed[j:])[: max_new_tokens - len(known)]
            return verdict, None if verdict is not None else (known, draft)
    return None, None

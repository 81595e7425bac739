"""Teacher-forced exact match gives greedy generation's verdicts, example by example: on the toy and
on tiny random models of three families, for many random genomes (fp32)."""

import random
from types import SimpleNamespace

import pytest
import torch

import fitness.scoring
from eep.config import ModelConfig
from eep.genome import Genome
from eep.model import load_model
from eep.moe import adapter_for
from fitness import teacher_forcing, toy_tasks
from fitness.generation import greedy_generate
from fitness.scoring import Cut, Scorer
from fitness.tasks import Example, Task
from fitness.teacher_forcing import decide
from tests.test_families import tiny_model


def test_decide_settles_only_what_more_tokens_cannot_change():
    assert decide("d c b a", True, ["d c b a"], []) is True
    assert decide("d c b", True, ["d c b a"], []) is False
    assert decide("d c x", False, ["d c b a"], []) is False  # no continuation can repair it
    assert decide("d c", False, ["d c b a"], []) is None  # the greedy path may still get there
    assert decide("d c b a", False, ["d c b a"], []) is None  # only whitespace might follow
    assert decide("d c b a e", False, ["d c b a"], []) is False
    assert decide("12", False, ["123"], []) is None  # the last word may grow
    assert decide("d c b a\nmore", False, ["d c b a"], ["\n"]) is True  # cut at the stop string
    # a stop may straddle the next token
    assert decide("d c b a\n", False, ["d c b a"], ["\n\n"]) is None
    assert decide("caf\ufffd", False, ["cafe"], []) is None  # half a character
    assert decide("  d c  b a ", True, ["d c b a"], []) is True  # whitespace-normalised


def _counting(monkeypatch):
    generated = []

    def counted(model, tokenizer, prompts, batch_size, max_new_tokens):
        generated.extend(prompts)
        return greedy_generate(model, tokenizer, prompts, batch_size, max_new_tokens)

    monkeypatch.setattr(fitness.scoring, "greedy_generate", counted)
    return generated


def _same_hits(
    model, tokenizer, tasks, genomes, monkeypatch, max_new_tokens, most_forced, batch_size=16
):
    """``most_forced``: at most a quarter of the examples generated per genome (else: some forced at all)."""
    forced = Scorer(model, tokenizer, tasks, batch_size, max_new_tokens)
    reference = Scorer(model, tokenizer, tasks, batch_size, max_new_tokens, scoring="generate")
    assert set(forced.paths.values()) == {"teacher-forced"}
    generated = _counting(monkeypatch)
    adapter, varied, fallbacks = adapter_for(model), set(), []
    for genome in genomes:
        with adapter.applied(genome):
            generated.clear()
            hits = forced.example_scores()
            fallback = len(generated)
            assert hits == reference.example_scores(), genome.to_dict()
        varied.add(tuple(h for name in hits for h in hits[name]))
        fallbacks.append(fallback)
    total = sum(len(t.examples) for t in tasks)
    if most_forced:
        assert max(fallbacks) <= total // 4
    else:  # a random model often emits special tokens, which decoding drops: those examples are generated
        assert sum(fallbacks) < total * len(genomes) * 0.9
    assert len(varied) > 5  # hits really depend on the genome
    return fallbacks


def test_toy_hits_equal_generation_for_50_random_genomes(monkeypatch):
    model, tokenizer = load_model(ModelConfig(path="toy", device="cpu", dtype="float32"))
    tasks = [
        Task(t, tuple(Example(e.prompt, (e.answer,)) for e in toy_tasks.examples(t, "search", 6)))
        for t in toy_tasks.TASKS
    ]
    rng = random.Random(0)
    genomes = [
        Genome.from_keep(
            8, 2, {i: rng.sample(range(8), rng.choice([2, 3, 4, 5])) for i in range(4)}
        )
        for _ in range(50)
    ]
    _same_hits(model, tokenizer, tasks, genomes, monkeypatch, max_new_tokens=8, most_forced=True)


@pytest.mark.parametrize("passes", [1, None])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_random_model_hits_equal_generation_for_50_random_genomes(family, passes, monkeypatch):
    """Answers are the full model's own greedy outputs, so some genomes keep them and others lose
    them. A random model's greedy path often takes a special token, which decoding drops, so one
    pass leaves those examples open (generated: 1010, 50 and 537 of 1200 here); the later passes
    (greedy path so far + the rest of the answer) settle every one, with generation's verdicts."""
    if passes is not None:
        monkeypatch.setattr(teacher_forcing, "PASSES", passes)
    _, tokenizer = load_model(ModelConfig(path="toy", device="cpu", dtype="float32"))
    model = tiny_model(family, vocab_size=len(tokenizer))
    prompts = [
        e.prompt for t in ("copy", "reverse", "shift") for e in toy_tasks.examples(t, "search", 8)
    ]
    answers = greedy_generate(model, tokenizer, prompts, 32, 4)
    tasks = [Task("own", tuple(Example(p, (a,)) for p, a in zip(prompts, answers)))]
    layers = sorted(adapter_for(model).blocks)
    rng = random.Random(1)
    genomes = [
        Genome.from_keep(
            8, 2, {i: rng.sample(range(8), rng.choice([3, 4, 5, 6, 7])) for i in layers}
        )
        for _ in range(50)
    ]
    fallbacks = _same_hits(
        model, tokenizer, tasks, genomes, monkeypatch, max_new_tokens=4, most_forced=False
    )
    assert (sum(fallbacks) > 0) if passes == 1 else (sum(fallbacks) == 0)


def test_a_generation_config_that_changes_greedy_choices_falls_back_to_generation():
    model, tokenizer = load_model(ModelConfig(path="toy", device="cpu", dtype="float32"))
    model.generation_config.repetition_penalty = 1.3
    tasks = [
        Task("copy", (Example("copy : a b =", ("a b",)),)),
        Task("f", (Example("copy : a =", ("a",)),), "f1"),
    ]
    scorer = Scorer(model, tokenizer, tasks)
    assert scorer.paths == {
        "copy": "generated (its generation config sets repetition_penalty=1.3)",
        "f": "generated (f1 compares free text)",
    }


def test_cut_raises_once_the_bound_falls_below_the_bar():
    model, tokenizer = load_model(ModelConfig(path="toy", device="cpu", dtype="float32"))
    tasks = [
        Task(t, tuple(Example(e.prompt, (e.answer,)) for e in toy_tasks.examples(t, "search", 8)))
        for t in ("copy", "reverse")
    ]
    scorer = Scorer(model, tokenizer, tasks, batch_size=4)
    genome = Genome.from_keep(8, 2, {i: [0, 1] for i in range(4)})
    with adapter_for(model).applied(genome):
        scores = scorer()
        fitness = (scores["copy"] + scores["reverse"]) / 2
        assert scorer(cut_below=fitness) == scores  # reaching the bar exactly is never cut
        with pytest.raises(Cut) as cut:
            scorer(cut_below=fitness + 60.0)
    assert fitness <= cut.value.bound < fitness + 60.0 and 0 < cut.value.scored < 1


class _Scripted(torch.nn.Module):
    """A causal "model" whose greedy path after the prompt is ``path`` and then end of sequence: the
    logits at a position depend only on how many tokens follow the prompt's last token up to it."""

    def __init__(self, marker: int, path: list[int], eos: int, vocab: int):
        super().__init__()
        self.marker, self.path, self.eos, self.vocab = marker, path, eos, vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))  # for the device lookup
        self.forwards = 0

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        self.forwards += 1
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for r, row in enumerate(input_ids.tolist()):
            after = -1
            for t, token in enumerate(row):
                after = 0 if token == self.marker else after + (after >= 0)
                nxt = self.path[after] if 0 <= after < len(self.path) else self.eos
                logits[r, t, nxt] = 1.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


@pytest.mark.parametrize("answer, hit", [("d e", True), ("d f", False)])
def test_passes_go_on_until_the_greedy_path_is_settled(answer, hit):
    """Four special tokens (dropped by decoding) before ``d e``: each pass takes the path one token
    further, so three passes leave the example open and the default (8) settles it in five, with the
    verdict greedy decoding gives."""
    _, tokenizer = load_model(ModelConfig(path="toy", device="cpu", dtype="float32"))
    prompt = tokenizer("a b c").input_ids
    unk = tokenizer.unk_token_id
    model = _Scripted(
        prompt[-1],
        [unk] * 4 + tokenizer("d e", add_special_tokens=False).input_ids,
        tokenizer.eos_token_id,
        len(tokenizer),
    )
    item = teacher_forcing.prepare(tokenizer, "a b c", [answer], [], 8)
    assert teacher_forcing.teacher_forced(model, tokenizer, [item], 8, passes=3) == [None]
    model.forwards = 0
    assert teacher_forcing.teacher_forced(model, tokenizer, [item], 8) == [hit]
    assert model.forwards == 5  # four passes over the special tokens, one over the answer
    # greedy decoding of the same model, step by step: the answer exactly when `hit`
    ids = list(prompt)
    while len(ids) < len(prompt) + 8:
        step = model(torch.tensor([ids]), None, None, 1).logits[0, -1].argmax().item()
        if step == tokenizer.eos_token_id:
            break
        ids.append(step)
    text = tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True)
    assert (text.strip() == answer) is hit


def test_passes_stop_at_their_bound_and_leave_the_rest_to_generation():
    """Ten special tokens before the answer, 16 new tokens allowed: each pass recomputes the whole
    sequence, so after ``PASSES`` (8) forward calls the example is left open for generation."""
    _, tokenizer = load_model(ModelConfig(path="toy", device="cpu", dtype="float32"))
    prompt = tokenizer("a b c").input_ids
    model = _Scripted(
        prompt[-1],
        [tokenizer.unk_token_id] * 10 + tokenizer("d e", add_special_tokens=False).input_ids,
        tokenizer.eos_token_id,
        len(tokenizer),
    )
    item = teacher_forcing.prepare(tokenizer, "a b c", ["d e"], [], 16)
    assert teacher_forcing.teacher_forced(model, tokenizer, [item], 16) == [None]
    assert model.forwards == teacher_forcing.PASSES == 8
    model.forwards = 0
    assert teacher_forcing.teacher_forced(model, tokenizer, [item], 16, passes=16) == [True]
    assert model.forwards == 11  # ten passes over the special tokens, one over the answer

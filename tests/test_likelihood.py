"""fitness.likelihood through the scorer: option log-likelihoods and whole-text metrics, checked
by hand on a model whose logits are known in closed form."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from eep import toy
from eep.errors import EepError
from eep.genome import Genome
from eep.moe import adapter_for
from fitness.likelihood import continuation_logprobs
from fitness.scoring import Scorer
from fitness.tasks import Example, Task


class Bigram(torch.nn.Module):
    """logits[t] = table[token t]: every probability is known in closed form."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def _bigram(tokenizer, seed):
    return Bigram(
        torch.randn(len(tokenizer), len(tokenizer), generator=torch.Generator().manual_seed(seed))
        * 2
    )


def _logp(model, prev, nxt):
    return torch.log_softmax(model.table[prev], -1)[nxt].item()


def test_continuation_logprobs_match_the_bigram_by_hand(tokenizer):
    model = _bigram(tokenizer, 0)
    ids = tokenizer.convert_tokens_to_ids
    got = continuation_logprobs(
        model, tokenizer, [("copy : a", " b c"), ("swap : a b c d =", " e")], 2, 64
    )
    bos = tokenizer.bos_token_id
    assert tokenizer("copy : a").input_ids == [bos, *ids(["copy", ":", "a"])]
    assert got[0] == pytest.approx(
        _logp(model, ids("a"), ids("b")) + _logp(model, ids("b"), ids("c")), abs=1e-5
    )
    assert got[1] == pytest.approx(_logp(model, ids("="), ids("e")), abs=1e-5)
    # truncation keeps the continuation and drops context from the left
    short = continuation_logprobs(model, tokenizer, [("copy : a", " b c")], 1, 3)
    assert short[0] == pytest.approx(got[0], abs=1e-5)


def test_choice_task_picks_the_likelier_option_and_normalises_by_length(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    table = torch.zeros(len(tokenizer), len(tokenizer))
    table[ids("="), ids("a")] = 3.0  # after "=", "a" is likely ...
    table[ids("a"), ids("b")] = -5.0  # ... but "a b" is not
    model = Bigram(table)
    ex = Example("copy : c =", options=(("copy : c =", " a b"), ("copy : c =", " c")), label=1)
    lp = continuation_logprobs(model, tokenizer, ex.options, 2, 64)
    v = len(tokenizer)
    expected_a = (3 - math.log(math.exp(3) + v - 1)) + (-5 - math.log(math.exp(-5) + v - 1))
    assert lp[0] == pytest.approx(expected_a, abs=1e-4)
    assert lp[1] == pytest.approx(-math.log(math.exp(3) + v - 1), abs=1e-4)
    both = Scorer(
        model, tokenizer, [Task("sum", (ex,), "choice"), Task("norm", (ex,), "choice_norm")]
    )()
    # summed: " c" (one unlikely token) beats " a b"; per byte: " a b" has 4 bytes to spread its loss over
    assert both["sum"] == 100.0
    assert (lp[0] / 4 > lp[1] / 2) == (both["norm"] == 0.0)


def test_text_metrics_by_hand(tokenizer):
    full, cand = _bigram(tokenizer, 1), _bigram(tokenizer, 2)
    texts = ["copy : a b = a b", "lookup : c ="]
    tasks = [Task(m, tuple(Example(t) for t in texts), m) for m in ("perplexity", "esap", "kl")]
    rows = [tokenizer(t).input_ids for t in texts]
    nll = [-_logp(cand, a, b) for r in rows for a, b in zip(r, r[1:])]
    accept, kl = [], []
    for r in rows:
        for tok in r:  # every position's next-token distribution
            p, q = torch.softmax(full.table[tok], -1), torch.softmax(cand.table[tok], -1)
            accept.append(torch.minimum(p, q).sum().item())
            kl.append((p * (p.log() - q.log())).sum().item())
    scorer = Scorer(full, tokenizer, tasks, batch_size=2)  # references from the full model
    assert scorer()["esap"] == pytest.approx(100.0) and scorer()["kl"] == pytest.approx(
        0.0, abs=1e-6
    )
    scores = scorer(cand)
    assert scores["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert scores["esap"] == pytest.approx(100 * sum(accept) / len(accept), rel=1e-5)
    assert scores["kl"] == pytest.approx(sum(kl) / len(kl), rel=1e-4)
    assert (
        scores["esap.kl"] == pytest.approx(scores["kl"], rel=1e-6)
        and scores["kl.esap"] == scores["esap"]
    )


def test_reconstruction_is_the_relative_error_of_the_moe_block_outputs(tiny_mixtral):
    model = tiny_mixtral
    adapter = adapter_for(model)
    tok = SimpleNamespace  # token ids are given directly: a stand-in tokenizer
    texts = [[1, 5, 9, 3, 7, 2], [4, 4, 8, 1]]

    class Ids:
        pad_token_id, eos_token_id = 0, 0

        def __call__(self, text, add_special_tokens=True):
            return tok(input_ids=texts[int(text)])

    task = Task("rec", (Example("0"), Example("1")), "reconstruction")
    scorer = Scorer(model, Ids(), [task], batch_size=2, blocks=adapter.blocks)
    assert scorer()["rec"] == pytest.approx(0.0, abs=1e-9)
    genome = Genome.from_keep(8, 2, {0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 2: [1, 3, 5, 7]})

    def outputs():
        got = {}
        hooks = [
            b.register_forward_hook(lambda m, a, o, i=i: got.setdefault(i, []).append(o))
            for i, b in adapter.blocks.items()
        ]
        with torch.no_grad():
            for t in texts:
                model(input_ids=torch.tensor([t]))
        for h in hooks:
            h.remove()
        return {i: torch.cat([o.reshape(-1, o.shape[-1]) for o in v]) for i, v in got.items()}

    ref = outputs()
    with adapter.applied(genome):
        pruned = outputs()
        rec = scorer()["rec"]
    expected = (
        100 * sum(((pruned[i] - ref[i]).norm() / ref[i].norm()).item() for i in ref) / len(ref)
    )
    assert rec == pytest.approx(expected, rel=1e-4) and rec > 1.0


def test_chat_template_wraps_prompts_when_a_task_asks(tokenizer):
    model = _bigram(tokenizer, 3)
    task = Task("chat", (Example("copy : a =", ("a",)),), "exact_match", chat_template=True)
    with pytest.raises(EepError, match="tokenizer has none"):
        Scorer(model, tokenizer, [task])
    chatty = AutoTokenizer.from_pretrained(toy.TOY_DIR)
    chatty.chat_template = "{% for m in messages %}<bos> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} ={% endif %}"
    assert Scorer(model, chatty, [task]).prompts["chat"] == ["<bos> copy : a = ="]
    plain = Task("plain", task.examples, "exact_match")
    assert Scorer(model, chatty, [plain]).prompts["plain"] == ["copy : a ="]

import itertools
import math

import pytest
import torch

from eep.baselines import (
    frequency_genome,
    naee_genome,
    random_genomes,
    reap_genome,
    skip_betas,
)
from eep.calibration import Calibration, collect, output_error
from eep.errors import EepError
from eep.genome import Genome, LayerGene
from eep.moe import adapter_for, shape_of


def _batch(rows, length, seed, pad=0):
    """``rows`` random sequences of ``length`` tokens, right-padded with ``pad`` random ids."""
    ids = torch.randint(1, 48, (rows, length + pad), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(rows, length + pad, dtype=torch.long)
    mask[:, length:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# 32 tokens: every statistic below covers all of them
BATCHES = [
    _batch(2, 11, 1),
    _batch(1, 10, 2),
]
TOKENS = 32


@pytest.fixture
def calibrated(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    return tiny_mixtral, adapter, collect(tiny_mixtral, adapter, BATCHES, max_tokens_per_layer=64)


def _router_outputs(model, batches):
    """Per layer, the (valid) router inputs, logits and top-k index of a plain forward pass."""
    seen = {i: [] for i in range(len(model.model.layers))}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: seen[i].append((a[0], *out)))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for hook in hooks:
        hook.remove()
    valid = torch.cat([b["attention_mask"].reshape(-1).bool() for b in batches])
    return {
        i: [torch.cat([s[j] for s in steps])[valid] for j in (0, 1, 3)] for i, steps in seen.items()
    }


def test_frequency_and_reap_equal_a_direct_count(calibrated):
    model, adapter, cal = calibrated
    assert cal.tokens == TOKENS and cal.moe_layers == (0, 1, 2)
    for layer, (x, logits, index) in _router_outputs(model, BATCHES).items():
        assert torch.equal(cal.counts[layer], torch.bincount(index.reshape(-1), minlength=8))
        experts = adapter.blocks[layer].experts
        total, routed = torch.zeros(8, dtype=torch.float64), torch.zeros(8)
        with torch.no_grad():
            for t, chosen in enumerate(index.tolist()):
                for e in chosen:  # the block's own experts, with only expert e at weight 1
                    out = experts(x[t : t + 1], torch.tensor([[e]]), torch.tensor([[1.0]]))
                    total[e] += float(torch.softmax(logits[t], -1)[e] * out.norm())
                    routed[e] += 1
        torch.testing.assert_close(
            cal.reap[layer], torch.where(routed > 0, total / routed.clamp(min=1), 0.0)
        )


def test_expert_outputs_sum_to_the_block_output(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    block = adapter.blocks[1]
    with torch.no_grad():
        _, weights, index = block.gate(x)
        by_hand = sum(
            weights[:, j, None]
            * torch.stack(
                [adapter.expert_output(1, int(e), x[t]) for t, e in enumerate(index[:, j])]
            )
            for j in range(2)
        )
        torch.testing.assert_close(by_hand, block(x[None])[0], atol=1e-6, rtol=0)


def test_padding_counts_nowhere(tiny_mixtral, calibrated):
    _, adapter, cal = calibrated
    # both batches in one, the shorter row right-padded with a real token id; then a batch of padding only
    second = {
        "input_ids": torch.cat([BATCHES[1]["input_ids"], torch.tensor([[7]])], 1),
        "attention_mask": torch.cat([BATCHES[1]["attention_mask"], torch.tensor([[0]])], 1),
    }
    padded = [
        {k: torch.cat([BATCHES[0][k], second[k]]) for k in second},
        _batch(2, 3, 9, pad=4) | {"attention_mask": torch.zeros(2, 7, dtype=torch.long)},
    ]
    other = collect(tiny_mixtral, adapter, padded, max_tokens_per_layer=64)
    assert other.tokens == TOKENS
    genome = Genome.from_keep(8, 2, {i: [0, 2, 4, 6] for i in range(3)})
    assert skip_betas(other, genome) == pytest.approx(skip_betas(cal, genome), rel=1e-5)
    for layer in range(3):
        assert torch.equal(other.counts[layer], cal.counts[layer])
        torch.testing.assert_close(other.reap[layer], cal.reap[layer])
        assert output_error(other, layer, [1, 3, 5, 7]) == pytest.approx(
            output_error(cal, layer, [1, 3, 5, 7]), rel=1e-4
        )


def test_token_sample_is_seeded_bounded_and_drawn_from_the_stream(tiny_mixtral, calibrated):
    _, adapter, cal = calibrated
    small = [
        collect(tiny_mixtral, adapter, BATCHES, max_tokens_per_layer=10, seed=s) for s in (0, 0, 1)
    ]
    assert small[0].logits[1].shape == (10, 8) and small[0].gram[1].shape == (10, 8, 8)
    assert torch.equal(small[0].logits[1], small[1].logits[1])
    assert not torch.equal(small[0].logits[1], small[2].logits[1])
    # each sampled row is one of the stream's tokens
    for row, gram in zip(small[0].logits[2], small[0].gram[2]):
        match = (cal.logits[2] - row).abs().amax(dim=1).argmin()
        torch.testing.assert_close(cal.logits[2][match], row)
        torch.testing.assert_close(cal.gram[2][match], gram)
    # frequency and REAP always see every token
    assert torch.equal(small[0].counts[0], cal.counts[0])


def test_collect_leaves_the_model_as_it_was(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    with torch.no_grad():
        before = tiny_mixtral(**BATCHES[0]).logits

    def failing():
        yield BATCHES[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        collect(tiny_mixtral, adapter, failing())
    collect(tiny_mixtral, adapter, BATCHES)
    assert all(
        not block.gate._forward_hooks and not block._forward_hooks
        for block in adapter.blocks.values()
    )
    with torch.no_grad():
        assert torch.equal(tiny_mixtral(**BATCHES[0]).logits, before)
    with pytest.raises(EepError, match="no tokens"):
        collect(tiny_mixtral, adapter, [_batch(1, 0, 1, pad=3)])


def test_naee_error_equals_applying_each_keep_set(calibrated):
    """The independent check: each layer's block, run on its calibration inputs with every keep set
    applied through ``adapter.applied``, against its output with all experts."""
    model, adapter, cal = calibrated
    genome, how = naee_genome(cal, 4)
    assert how == "enumeration"
    for layer, (x, _, _) in _router_outputs(model, BATCHES).items():

        def block_output(keep, layer=layer, x=x):
            with torch.no_grad(), adapter.applied(Genome.from_keep(8, 2, {layer: keep})):
                return adapter.blocks[layer](x[None])[0].double()

        full = block_output(range(8))
        measured = {
            keep: float(((block_output(keep) - full) ** 2).sum())
            for keep in itertools.combinations(range(8), 4)
        }
        for keep, error in measured.items():
            assert output_error(cal, layer, keep) == pytest.approx(error, rel=1e-4, abs=1e-12)
        assert measured[genome.keep(layer)] == pytest.approx(min(measured.values()), rel=1e-6)
        assert max(measured.values()) > 1.5 * min(measured.values())  # the choice matters


def test_greedy_fallback(calibrated):
    _, adapter, cal = calibrated
    # one elimination step scores every set of E - 1: greedy is the enumeration there
    assert naee_genome(cal, 7, max_subsets=1) == (naee_genome(cal, 7)[0], "greedy")
    greedy, how = naee_genome(cal, 4, max_subsets=69)
    best, _ = naee_genome(cal, 4, max_subsets=70)
    assert how == "greedy"
    adapter.validate(greedy)
    for layer in cal.moe_layers:  # not guaranteed optimal; here no worse than an average keep set
        errors = [output_error(cal, layer, keep) for keep in itertools.combinations(range(8), 4)]
        assert output_error(cal, layer, best.keep(layer)) <= output_error(
            cal, layer, greedy.keep(layer)
        )
        assert output_error(cal, layer, greedy.keep(layer)) <= sum(errors) / len(errors)


def test_baseline_genomes_are_valid_and_keep_exactly_keep(calibrated):
    _, adapter, cal = calibrated
    genomes = [
        frequency_genome(cal, 3),
        reap_genome(cal, 3),
        naee_genome(cal, 3)[0],
        *random_genomes(cal, 3, 5, seed=0),
        *random_genomes(shape_of(adapter.config), 3, 5, seed=0),
    ]
    for genome in genomes:
        adapter.validate(genome)
        assert [len(genome.keep(i)) for i in range(3)] == [3, 3, 3] and dict(
            genome.layers
        ).keys() == {0, 1, 2}
    for layer in range(3):
        ranked = sorted(range(8), key=lambda e: -cal.reap[layer][e])
        assert genomes[1].keep(layer) == tuple(sorted(ranked[:3]))
    with pytest.raises(EepError, match="keep must be between"):
        frequency_genome(cal, 1)


def test_frequency_ties_go_to_the_lower_index():
    counts = torch.tensor([3, 5, 1, 5, 0, 5, 2, 2])
    cal = Calibration(8, 2, (0,), 23, {0: counts}, {0: counts.double()}, {}, {})
    assert frequency_genome(cal, 2).keep(0) == (1, 3)
    assert frequency_genome(cal, 5).keep(0) == (0, 1, 3, 5, 6)
    assert reap_genome(cal, 2).keep(0) == (1, 3)


def test_random_genomes_are_distinct_and_seeded(calibrated):
    _, _, cal = calibrated
    drawn = random_genomes(cal, 4, 20, seed=7)
    assert len({g.key for g in drawn}) == 20
    assert drawn == random_genomes(cal, 4, 20, seed=7) and drawn != random_genomes(
        cal, 4, 20, seed=8
    )
    one_layer = Calibration(8, 2, (0,), 1, {}, {}, {}, {})
    assert len(random_genomes(one_layer, 7, 8, seed=0)) == 8 == math.comb(8, 7)
    with pytest.raises(EepError, match="only 8 exist"):
        random_genomes(one_layer, 7, 9, seed=0)


# -- dynamic skipping ---------------------------------------------------------------------------

PRUNE = Genome.from_keep(8, 2, {0: [1, 3, 4, 6], 1: [0, 2, 5, 7], 2: [2, 3, 6, 7]})
MERGE = Genome.from_genes(
    8,
    2,
    {
        i: LayerGene.merged(
            [[0.5 if j in (a, b) else 0.0 for j in range(8)] for a, b in ((0, 1), (2, 3), (4, 5))],
            [[1.0 if j == a else 0.0 for j in range(8)] for a in (1, 2, 5)],
        )
        for i in range(3)
    },
)


def _logits(model, adapter, genome, skip=None):
    with torch.no_grad(), adapter.applied(genome, skip=skip):
        return model(**BATCHES[0]).logits


@pytest.mark.parametrize(
    "genome", [Genome.from_keep(8, 2, {}), PRUNE, MERGE], ids=["full", "prune", "merge"]
)
def test_skip_zero_changes_nothing_and_huge_skip_is_top1(tiny_mixtral, genome):
    adapter = adapter_for(tiny_mixtral)
    plain = _logits(tiny_mixtral, adapter, genome)
    assert torch.equal(_logits(tiny_mixtral, adapter, genome, {0: 0.0, 1: 0.0, 2: 0.0}), plain)
    top1 = Genome.from_genes(
        8,
        2,
        {
            i: LayerGene(genome.gene(i).keep, 1, genome.gene(i).merge, genome.gene(i).router)
            for i in range(3)
        },
    )
    skipped = _logits(tiny_mixtral, adapter, genome, {0: 1e9, 1: 1e9, 2: 1e9})
    torch.testing.assert_close(skipped, _logits(tiny_mixtral, adapter, top1), atol=1e-6, rtol=0)
    assert (skipped - plain).abs().max() > 1e-3
    assert all(not block.gate._forward_hooks for block in adapter.blocks.values())


def test_skip_betas_skip_half_the_tokens_under_the_genomes_routing(calibrated):
    """beta is the median ratio under the pruned routing: applied with a prune genome, the first
    MoE layer (whose inputs pruning does not change) skips exactly half the calibration tokens."""
    model, adapter, cal = calibrated
    betas = skip_betas(cal, PRUNE)
    assert betas != skip_betas(cal, Genome.from_keep(8, 2, {}))
    weights = []
    with torch.no_grad(), adapter.applied(PRUNE, skip=betas):
        hook = adapter.blocks[0].gate.register_forward_hook(
            lambda m, a, out: weights.append(out[1])
        )
        for batch in BATCHES:
            model(**batch)
        hook.remove()
    assert int((torch.cat(weights)[:, 1] == 0).sum()) == TOKENS // 2


def test_skip_is_only_for_top2_moe_layers(calibrated):
    _, adapter, cal = calibrated
    top1 = Genome.from_keep(8, 2, {0: [0, 1, 2, 3]}, active={0: 1})
    with pytest.raises(EepError, match="needs top-2 routing; layer 0"):
        skip_betas(cal, top1)
    with pytest.raises(EepError, match="needs top-2 routing; layer 0"):
        with adapter.applied(top1, skip={0: 0.5}):
            pass
    with pytest.raises(EepError, match="layer 5, which is not an MoE layer"):
        with adapter.applied(PRUNE, skip={5: 0.5}):
            pass
    assert all(not block.gate._forward_hooks for block in adapter.blocks.values())

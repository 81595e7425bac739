import pytest
import torch

from eep.errors import EepError
from eep.genome import Genome, LayerGene
from eep.moe import adapter_for
from eep.surgery import compress, form_of, sliced
from tests.conftest import tiny_mixtral_config

KEEP = {0: [1, 3, 4, 6], 1: [0, 2, 5, 7], 2: [2, 3, 6, 7]}


def _ids():
    return torch.randint(0, 48, (4, 11), generator=torch.Generator().manual_seed(1))


def _physically_sliced(model, keep):
    """Reference: an independently built smaller Mixtral holding only the kept experts."""
    from transformers import MixtralForCausalLM

    config = tiny_mixtral_config(num_local_experts=len(next(iter(keep.values()))))
    small = MixtralForCausalLM(config).eval()
    state = model.state_dict()
    for layer, experts in keep.items():
        for name in ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            key = f"model.layers.{layer}.{name}"
            state[key] = state[key][experts]
    small.load_state_dict(state)
    return small


def test_apply_equals_physical_slice(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    genome = Genome.from_keep(8, 2, KEEP)
    with torch.no_grad():
        full = tiny_mixtral(_ids()).logits
        with adapter.applied(genome):
            pruned = tiny_mixtral(_ids()).logits
        reference = _physically_sliced(tiny_mixtral, KEEP)(_ids()).logits
        restored = tiny_mixtral(_ids()).logits
    torch.testing.assert_close(pruned, reference, atol=1e-5, rtol=0)
    assert (pruned - full).abs().max() > 1e-3  # pruning really changed the model
    assert torch.equal(restored, full)  # and leaving the block restored it exactly


def test_partial_genome_leaves_other_layers_unchanged(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    keep = {1: KEEP[1]}
    with torch.no_grad(), adapter.applied(Genome.from_keep(8, 2, keep)):
        pruned = tiny_mixtral(_ids()).logits
    full_keep = {0: list(range(8)), 1: KEEP[1], 2: list(range(8))}
    with torch.no_grad(), adapter.applied(Genome.from_keep(8, 2, full_keep)):
        explicit = tiny_mixtral(_ids()).logits
    assert torch.equal(pruned, explicit)


def test_restores_after_an_error(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    with torch.no_grad():
        full = tiny_mixtral(_ids()).logits
        with pytest.raises(RuntimeError), adapter.applied(Genome.from_keep(8, 2, KEEP)):
            raise RuntimeError("boom")
        assert torch.equal(tiny_mixtral(_ids()).logits, full)
    assert all(not block.gate._forward_hooks for block in adapter.blocks.values())


def test_sliced_model_is_smaller_and_equal(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    genome = Genome.from_keep(8, 2, KEEP)
    small = sliced(adapter, genome)
    assert small.config.num_local_experts == 4
    assert small.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    assert sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in tiny_mixtral.parameters()
    )
    with torch.no_grad(), adapter.applied(genome):
        torch.testing.assert_close(
            small(_ids()).logits, tiny_mixtral(_ids()).logits, atol=1e-5, rtol=0
        )


def test_sliced_rejects_uneven_keep_counts(tiny_mixtral):
    genome = Genome.from_keep(8, 2, {0: [0, 1, 2], 1: [0, 1, 2, 3]})
    with pytest.raises(
        EepError, match="cannot be a stock checkpoint: layers keep different numbers of experts"
    ):
        sliced(adapter_for(tiny_mixtral), genome)


def test_wrong_genome_is_rejected_before_applying(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    with pytest.raises(EepError, match="16 experts"):
        with adapter.applied(Genome.from_keep(16, 2, {0: [0, 1]})):
            pass
    with pytest.raises(EepError, match="not MoE layers"):
        with adapter.applied(Genome.from_keep(8, 2, {7: [0, 1]})):
            pass


def test_top_k_reduction_equals_a_stock_top1_model(tiny_mixtral):
    """keep 4 + top-1: in-search routing equals a stock Mixtral built with num_experts_per_tok=1."""
    from transformers import MixtralForCausalLM

    adapter = adapter_for(tiny_mixtral)
    genome = Genome.from_keep(8, 2, KEEP, active=1)
    reference = _physically_sliced(tiny_mixtral, KEEP)
    top1 = MixtralForCausalLM(
        tiny_mixtral_config(num_local_experts=4, num_experts_per_tok=1)
    ).eval()
    top1.load_state_dict(reference.state_dict())
    small = sliced(adapter, genome)
    assert small.config.num_experts_per_tok == 1 and small.config.num_local_experts == 4
    with torch.no_grad():
        with adapter.applied(genome):
            in_search = tiny_mixtral(_ids()).logits
        top2 = reference(_ids()).logits
        torch.testing.assert_close(in_search, top1(_ids()).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(small(_ids()).logits, in_search, atol=1e-5, rtol=0)
    assert (in_search - top2).abs().max() > 1e-3  # top-1 really differs from top-2


def test_top_k_alone_without_pruning(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    genome = Genome.from_keep(8, 2, {i: range(8) for i in range(3)}, active=1)
    from transformers import MixtralForCausalLM

    top1 = MixtralForCausalLM(tiny_mixtral_config(num_experts_per_tok=1)).eval()
    top1.load_state_dict(tiny_mixtral.state_dict())
    with torch.no_grad(), adapter.applied(genome):
        torch.testing.assert_close(
            tiny_mixtral(_ids()).logits, top1(_ids()).logits, atol=1e-5, rtol=0
        )


def test_uneven_top_k_cannot_be_a_stock_checkpoint(tiny_mixtral):
    genome = Genome.from_keep(8, 2, KEEP, active={0: 1, 1: 2, 2: 2})
    with pytest.raises(EepError, match="layers route to different top_k"):
        sliced(adapter_for(tiny_mixtral), genome)


def _one_hot(keep, value=1.0):
    return [[value if i == e else 0.0 for i in range(8)] for e in keep]


def _random_merge_genome(seed, slots=(4, 4, 4), active=None):
    import random

    rng = random.Random(seed)
    genes = {
        layer: LayerGene.merged(
            [[rng.gauss(0, 0.5) for _ in range(8)] for _ in range(n)],
            [[rng.random() for _ in range(8)] for _ in range(n)],
            active,
        )
        for layer, n in enumerate(slots)
    }
    return Genome.from_genes(8, 2, genes)


def test_one_hot_merge_equals_pruning_equals_physical_slice(tiny_mixtral):
    """EEP's claim, on the merge code path: one-hot merge rows with a selecting router (here scaled
    by 0.5 and in permuted slot order, so it stays a merge gene) route and weigh exactly as pruning."""
    adapter = adapter_for(tiny_mixtral)
    merge_genome = Genome.from_genes(
        8,
        2,
        {
            i: LayerGene.merged(_one_hot(keep[::-1]), _one_hot(keep[::-1], 0.5))
            for i, keep in KEEP.items()
        },
    )
    assert merge_genome.is_merge and merge_genome.keep_map() == {
        i: tuple(k) for i, k in KEEP.items()
    }
    assert form_of(adapter, merge_genome).kind == "stock"
    with torch.no_grad():
        with adapter.applied(merge_genome):
            merged = tiny_mixtral(_ids()).logits
        with adapter.applied(Genome.from_keep(8, 2, KEEP)):
            pruned = tiny_mixtral(_ids()).logits
        reference = _physically_sliced(tiny_mixtral, KEEP)(_ids()).logits
        stock = sliced(adapter, merge_genome)(_ids()).logits
    torch.testing.assert_close(merged, pruned, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(stock, merged, atol=1e-5, rtol=0)


def test_identical_one_hot_matrices_are_the_pruning_gene():
    gene = LayerGene.merged(_one_hot([5, 1, 3, 2]), _one_hot([5, 1, 3, 2]))
    assert not gene.is_merge and gene.keep == (1, 2, 3, 5)


def test_merge_genome_applies_reversibly_and_equals_its_hand_built_model(tiny_mixtral):
    from transformers import MixtralForCausalLM

    adapter = adapter_for(tiny_mixtral)
    genome = Genome.from_genes(
        8,
        2,
        {
            i: LayerGene.merged(
                [
                    [0.5 if i in (a, b) else 0.0 for i in range(8)]
                    for a, b in ((0, 1), (2, 3), (4, 5), (6, 7))
                ],
                _one_hot([1, 2, 5, 6]),
            )
            for i in range(3)
        },
    )
    params = {name: p for name, p in tiny_mixtral.named_parameters()}
    before = {name: p.clone() for name, p in params.items()}
    # the same model by hand: averaged expert pairs, router rows of experts 1, 2, 5, 6
    reference = MixtralForCausalLM(tiny_mixtral_config(num_local_experts=4)).eval()
    state = tiny_mixtral.state_dict()
    for layer in range(3):
        for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            w = state[f"model.layers.{layer}.{name}"]
            state[f"model.layers.{layer}.{name}"] = (w[0::2] + w[1::2]) / 2
        key = f"model.layers.{layer}.mlp.gate.weight"
        state[key] = state[key][[1, 2, 5, 6]]
    reference.load_state_dict(state)
    with torch.no_grad():
        full = tiny_mixtral(_ids()).logits
        with adapter.applied(genome):
            merged = tiny_mixtral(_ids()).logits
        after = tiny_mixtral(_ids()).logits
        torch.testing.assert_close(merged, reference(_ids()).logits, atol=1e-5, rtol=0)
    assert (merged - full).abs().max() > 1e-3
    assert torch.equal(after, full)
    assert all(
        p is params[n] and torch.equal(p, before[n]) for n, p in tiny_mixtral.named_parameters()
    )
    assert all(block.experts.num_experts == 8 for block in adapter.blocks.values())


def test_merge_restores_after_an_error(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    shapes = [tuple(b.experts.gate_up_proj.shape) for b in adapter.blocks.values()]
    with pytest.raises(RuntimeError), adapter.applied(_random_merge_genome(1)):
        raise RuntimeError("boom")
    assert [tuple(b.experts.gate_up_proj.shape) for b in adapter.blocks.values()] == shapes
    assert all(not block.gate._forward_hooks for block in adapter.blocks.values())


@pytest.mark.parametrize(
    "slots, active, why",
    [
        ((4, 4, 4), None, "router matrix that mixes experts"),
        ((3, 5, 4), None, "different numbers of experts"),
        ((4, 4, 4), 1, "router matrix that mixes experts"),
    ],
)
def test_general_merge_genome_compresses_to_the_custom_form(tiny_mixtral, slots, active, why):
    adapter = adapter_for(tiny_mixtral)
    genome = _random_merge_genome(2, slots, active)
    small, form = compress(adapter, genome)
    assert form.kind == "custom" and why in form.reason
    assert [small.model.layers[i].mlp.experts.gate_up_proj.shape[0] for i in range(3)] == list(
        slots
    )
    with torch.no_grad():
        with adapter.applied(genome):
            in_search = tiny_mixtral(_ids()).logits
        torch.testing.assert_close(small(_ids()).logits, in_search, atol=1e-5, rtol=0)


def test_uneven_pruning_compresses_to_the_custom_form(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    genome = Genome.from_keep(8, 2, {0: [0, 1, 2], 1: [0, 1, 2, 3, 4, 5], 2: [3, 6]})
    small, form = compress(adapter, genome)
    assert form.kind == "custom" and "different numbers of experts" in form.reason
    with torch.no_grad():
        with adapter.applied(genome):
            in_search = tiny_mixtral(_ids()).logits
        torch.testing.assert_close(small(_ids()).logits, in_search, atol=1e-5, rtol=0)


def test_reused_merge_buffers_never_serve_stale_experts(tiny_mixtral, monkeypatch):
    import eep.moe

    a = _random_merge_genome(3)
    # differs in layer 1
    b = Genome.from_genes(8, 2, {0: a.gene(0), 1: _random_merge_genome(4).gene(1), 2: a.gene(2)})
    c = _random_merge_genome(5, slots=(3, 5, 4))
    expected = {}
    for name, genome in (("a", a), ("b", b), ("c", c)):
        # a fresh adapter: no reuse
        with (
            torch.no_grad(),
            adapter_for(tiny_mixtral).applied(genome),
        ):
            expected[name] = tiny_mixtral(_ids()).logits
    merges = []
    real = eep.moe.merge_experts
    monkeypatch.setattr(eep.moe, "merge_experts", lambda *args: merges.append(1) or real(*args))
    adapter = adapter_for(tiny_mixtral)
    for name, genome, layers_merged in (
        ("a", a, 3),
        ("b", b, 1),
        ("a", a, 1),
        ("c", c, 3),
        ("a", a, 3),
        ("a", a, 0),
    ):
        merges.clear()
        with torch.no_grad(), adapter.applied(genome):
            torch.testing.assert_close(tiny_mixtral(_ids()).logits, expected[name], atol=0, rtol=0)
        assert len(merges) == 2 * layers_merged, name  # two expert tensors per merged layer


def test_the_custom_form_can_be_asked_for_a_stock_genome(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    genome = Genome.from_keep(8, 2, KEEP)
    small, form = compress(adapter, genome, form="custom")
    assert form.kind == "custom" and form.reason == "the custom form was asked for"
    assert (
        type(small).__name__ == "EepMixtralForCausalLM"
        and small.config.eep_layers["1"]["experts"] == 4
    )
    with torch.no_grad(), adapter.applied(genome):
        torch.testing.assert_close(
            small(_ids()).logits, tiny_mixtral(_ids()).logits, atol=1e-5, rtol=0
        )


def _toy_logits(implementation: str) -> dict[str, torch.Tensor]:
    """The toy's logits, loaded by eep with this experts implementation, under one genome of each
    kind eep applies in place: pruning (router rerun on sliced tensors), top-1, a merge mixing
    experts (swapped buffers, fewer experts) and low-rank experts (factors in the buffers)."""
    import random

    from eep.config import ModelConfig
    from eep.model import load_model

    model, _ = load_model(
        ModelConfig(device="cpu", dtype="float32", experts_implementation=implementation)
    )
    assert model.config._experts_implementation == implementation
    keep = {0: [1, 3, 4, 6], 1: [0, 2, 5, 7], 2: [2, 3, 6, 7], 3: [0, 1, 4]}
    rng = random.Random(0)
    merge = {
        layer: LayerGene.merged(
            [[rng.gauss(0, 0.5) for _ in range(8)] for _ in range(3)],
            [[rng.random() for _ in range(8)] for _ in range(3)],
        )
        for layer in range(4)
    }
    genomes = {
        "full": None,
        "prune": Genome.from_keep(8, 2, keep),
        "top-1": Genome.from_keep(8, 2, keep, active=1),
        "merge": Genome.from_genes(8, 2, merge),
        "low-rank": Genome.from_keep(8, 2, keep).with_ranks({1: {0: 4, 2: 9, 5: 1, 7: 30}}),
    }
    ids = torch.randint(4, 30, (6, 12), generator=torch.Generator().manual_seed(0))
    adapter, logits = adapter_for(model), {}
    with torch.no_grad():
        for name, genome in genomes.items():
            with adapter.applied(genome) if genome is not None else torch.no_grad():
                logits[name] = model(ids).logits
        # and as a latency is timed: the kept experts moved to the front, the modules sliced
        for name in ("prune", "top-1"):
            with adapter.compacted(genomes[name]):
                logits[f"{name}, compacted"] = model(ids).logits
    return logits


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_genomes_apply_alike_under_every_experts_implementation(implementation):
    """Whichever experts implementation eep picks (or a config sets), a genome applied in place
    computes what it computes under eager. rtol: batched_mm's per-token products sum in another
    order, 7e-6 apart on the full model's logits (up to 13) and 1.2e-5 under pruning."""
    eager, other = _toy_logits("eager"), _toy_logits(implementation)
    for name in eager:
        torch.testing.assert_close(other[name], eager[name], atol=1e-5, rtol=1e-6, msg=name)
        if name.endswith(", compacted"):  # what a latency is timed on computes what is scored
            torch.testing.assert_close(
                other[name], other[name.split(",")[0]], atol=1e-5, rtol=1e-6, msg=name
            )
        if name != "full":
            # the genome changed the model
            assert (eager[name] - eager["full"]).abs().max() > 1e-3, name

import pytest
import torch

from eep.errors import EepError
from eep.genome import Genome
from eep.moe import adapter_for, shape_of
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
    small = adapter.sliced(genome)
    assert small.config.num_local_experts == 4
    assert small.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in tiny_mixtral.parameters())
    with torch.no_grad(), adapter.applied(genome):
        torch.testing.assert_close(small(_ids()).logits, tiny_mixtral(_ids()).logits, atol=1e-5, rtol=0)


def test_sliced_rejects_uneven_keep_counts(tiny_mixtral):
    genome = Genome.from_keep(8, 2, {0: [0, 1, 2], 1: [0, 1, 2, 3]})
    with pytest.raises(EepError, match="different expert counts"):
        adapter_for(tiny_mixtral).sliced(genome)


def test_wrong_genome_is_rejected_before_applying(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    with pytest.raises(EepError, match="16 experts"):
        with adapter.applied(Genome.from_keep(16, 2, {0: [0, 1]})):
            pass
    with pytest.raises(EepError, match="not MoE layers"):
        with adapter.applied(Genome.from_keep(8, 2, {7: [0, 1]})):
            pass


def test_unsupported_family_names_the_supported_ones():
    from transformers import LlamaConfig

    with pytest.raises(EepError, match="unsupported model family 'llama'; supported: mixtral"):
        shape_of(LlamaConfig())


def test_top_k_reduction_equals_a_stock_top1_model(tiny_mixtral):
    """keep 4 + top-1: in-search routing equals a stock Mixtral built with num_experts_per_tok=1."""
    from transformers import MixtralForCausalLM

    adapter = adapter_for(tiny_mixtral)
    genome = Genome.from_keep(8, 2, KEEP, active=1)
    reference = _physically_sliced(tiny_mixtral, KEEP)
    top1 = MixtralForCausalLM(tiny_mixtral_config(num_local_experts=4, num_experts_per_tok=1)).eval()
    top1.load_state_dict(reference.state_dict())
    small = adapter.sliced(genome)
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
        torch.testing.assert_close(tiny_mixtral(_ids()).logits, top1(_ids()).logits, atol=1e-5, rtol=0)


def test_uneven_top_k_cannot_be_a_stock_checkpoint(tiny_mixtral):
    genome = Genome.from_keep(8, 2, KEEP, active={0: 1, 1: 2, 2: 2})
    with pytest.raises(EepError, match="different top_k per layer"):
        adapter_for(tiny_mixtral).sliced(genome)

import pytest
import torch

from eep import baselines as bl
from eep.errors import EepError
from eep.genome import Genome
from eep.moe import adapter_for
from eep.moei2 import expert_importance, layer_keep_counts


def _ids():
    return torch.randint(0, 48, (4, 11), generator=torch.Generator().manual_seed(5))


def test_an_expert_whose_output_is_zero_has_no_importance(tiny_mixtral):
    with torch.no_grad():
        tiny_mixtral.model.layers[1].mlp.experts.down_proj[3].zero_()
    adapter = adapter_for(tiny_mixtral)
    cal = bl.collect(tiny_mixtral, adapter, [{"input_ids": _ids()}], max_tokens_per_layer=1000)
    importance = expert_importance(cal)
    assert importance[1][3] == 0.0
    assert (importance[1][[0, 1, 2, 4, 5, 6, 7]] > 0).all() and (importance[0] > 0).all()


def test_rerouted_importance_is_the_real_output_change_of_pruning_that_expert(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    inputs = {}
    hook = adapter.blocks[2].register_forward_pre_hook(lambda m, args: inputs.__setitem__(2, args[0]))
    cal = bl.collect(tiny_mixtral, adapter, [{"input_ids": _ids()}], max_tokens_per_layer=1000)
    hook.remove()
    importance = expert_importance(cal, reroute=True)
    for expert in (0, 5):
        genome = Genome.from_keep(8, 2, {2: [e for e in range(8) if e != expert]})
        with torch.no_grad():
            full = adapter.blocks[2](inputs[2])
            with adapter.applied(genome):
                pruned = adapter.blocks[2](inputs[2])
        assert float(importance[2][expert]) == pytest.approx(float(((full - pruned).double() ** 2).sum()), rel=1e-4)


@pytest.mark.parametrize("sums, budget, low, high, expected", [
    ({0: 1.0, 1: 3.0, 2: 0.0, 3: 4.0}, 16, 2, 8, {0: 3, 1: 5, 2: 2, 3: 6}),  # the 8 spare in proportion
    ({0: 10.0, 1: 0.0}, 12, 2, 8, {0: 8, 1: 4}),  # capped at 8; the rest goes to the other layer
    ({0: 1.0, 1: 1.0, 2: 1.0}, 10, 2, 8, {0: 4, 1: 3, 2: 3}),  # 3.33 each: largest remainder, lower layer first
    ({0: 0.0, 1: 0.0}, 6, 2, 8, {0: 3, 1: 3}),  # nothing matters: an even split
])
def test_keep_counts_follow_layer_importance_within_bounds(sums, budget, low, high, expected):
    importance = {layer: torch.tensor([value / 4] * 4, dtype=torch.float64) for layer, value in sums.items()}
    counts = layer_keep_counts(importance, budget, low, high)
    assert counts == expected and sum(counts.values()) == budget


def test_an_impossible_budget_is_refused():
    with pytest.raises(EepError, match="a budget of 3 experts must lie in 4..16"):
        layer_keep_counts({0: torch.ones(8), 1: torch.ones(8)}, 3, 2, 8)

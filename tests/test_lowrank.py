import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from eep import calibration, lowrank
from eep.errors import EepError
from eep.genome import Genome
from eep.moe import adapter_for
from eep.surgery import compress, parameter_counts

IDS = torch.randint(0, 48, (3, 10), generator=torch.Generator().manual_seed(2))


def _save(model, form, path):
    from eep.export import save_model

    save_model(model, form.kind, path)


def _pruned():
    return Genome.from_keep(8, 2, {0: [0, 2, 5, 7], 1: [1, 2, 3, 4, 6], 2: [3, 6]})


def test_ranks_round_trip_in_the_file_form_and_old_files_stay_valid():
    genome = _pruned().with_ranks({0: {0: 3, 2: 1, 5: 7, 7: 2}})
    data = genome.to_dict()
    assert data["layers"]["0"]["rank"] == [3, 1, 7, 2] and "rank" not in data["layers"]["1"]
    again = Genome.from_dict(json.loads(json.dumps(data)))
    assert again == genome and again.key == genome.key and again.is_low_rank
    assert Genome.from_dict(_pruned().to_dict()) == _pruned() and not _pruned().is_low_rank
    assert genome.dense() == _pruned()
    # listed in the order of 'keep', whatever that order is
    shuffled = {
        **data,
        "layers": {**data["layers"], "0": {"keep": [7, 0, 5, 2], "rank": [2, 3, 7, 1]}},
    }
    assert Genome.from_dict(shuffled) == genome


@pytest.mark.parametrize(
    "gene, message",
    [
        ({"keep": [0, 1], "rank": [2]}, "one integer per kept expert"),
        ({"keep": [0, 1], "rank": [2, 0]}, "one positive integer per kept expert"),
        (
            {"merge": [[1, 0], [0, 1]], "router": [[1, 0], [0, 1]], "rank": [1, 1]},
            "'rank' is for pruning genes",
        ),
    ],
)
def test_bad_ranks_are_refused_with_the_reason(gene, message):
    data = {"format": "eep.genome/v1", "num_experts": 2, "top_k": 1, "layers": {"0": gene}}
    with pytest.raises(EepError, match=message):
        Genome.from_dict(data)


def test_a_rank_above_the_experts_full_rank_is_refused(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    # hidden 32, intermediate 48: gate_up [96, 32], down [32, 48]
    assert lowrank.full_rank(adapter) == 32
    genome = _pruned().with_ranks({2: {3: 33, 6: 4}})
    with pytest.raises(EepError, match="rank 33 exceeds the experts' full rank 32"):
        with adapter.applied(genome):
            pass


def test_full_rank_factors_reproduce_the_original_logits(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    pruned = _pruned()
    full_rank = pruned.with_ranks({i: {e: 32 for e in pruned.keep(i)} for i in (0, 1, 2)})
    with torch.no_grad(), adapter.applied(pruned):
        expected = tiny_mixtral(IDS).logits
    with torch.no_grad(), adapter.applied(full_rank):
        got = tiny_mixtral(IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_low_rank_applies_reversibly_and_lower_ranks_change_more(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    before = {k: v.clone() for k, v in tiny_mixtral.state_dict().items()}
    pruned = _pruned()
    with torch.no_grad(), adapter.applied(pruned):
        reference = tiny_mixtral(IDS).logits
    errors = []
    for rank in (24, 8, 1):
        genome = pruned.with_ranks({i: {e: rank for e in pruned.keep(i)} for i in (0, 1, 2)})
        with torch.no_grad(), adapter.applied(genome):
            errors.append(float((tiny_mixtral(IDS).logits - reference).abs().mean()))
    assert 0 < errors[0] < errors[1] < errors[2]
    after = tiny_mixtral.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_exported_low_rank_model_is_smaller_and_equals_the_in_search_logits(tiny_mixtral, tmp_path):
    adapter = adapter_for(tiny_mixtral)
    stage1 = _pruned()
    genome = stage1.with_ranks({0: {0: 3, 2: 1, 5: 7, 7: 2}, 1: {1: 4, 2: 9, 3: 4, 4: 4, 6: 12}})
    with torch.no_grad(), adapter.applied(genome):
        expected = tiny_mixtral(IDS).logits
    small, form = compress(adapter, genome)
    assert form.kind == "custom" and "low-rank expert factors" in form.reason
    _save(small, form, tmp_path / "factors")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "factors", trust_remote_code=True
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, atol=1e-4, rtol=0)
    stage1_model, stage1_form = compress(adapter, stage1)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(loaded) < count(stage1_model)
    # factors: exactly the ranks' numbers instead of the dense matrices (+ layer 2 unchanged)
    shapes = [(96, 32), (32, 48)]
    saved = sum(sum(o * i - r * (o + i) for o, i in shapes) for r in (3, 1, 7, 2, 4, 9, 4, 4, 12))
    assert count(stage1_model) - count(loaded) == saved
    kept, _ = parameter_counts(tiny_mixtral, adapter, genome)
    assert kept == parameter_counts(tiny_mixtral, adapter, stage1)[0] - saved
    # --dense: the re-multiplied matrices, same logits, dense size
    dense, dense_form = compress(adapter, genome, dense=True)
    assert dense_form == stage1_form and count(dense) == count(stage1_model)
    with torch.no_grad():
        torch.testing.assert_close(dense(IDS).logits, expected, atol=1e-4, rtol=0)


def test_dense_low_rank_with_uniform_pruning_is_a_stock_checkpoint(tiny_mixtral, tmp_path):
    adapter = adapter_for(tiny_mixtral)
    uniform = Genome.from_keep(8, 2, {i: [0, 3, 4, 6] for i in range(3)})
    genome = uniform.with_ranks({1: {0: 5, 3: 6, 4: 7, 6: 8}})
    with torch.no_grad(), adapter.applied(genome):
        expected = tiny_mixtral(IDS).logits
    dense, form = compress(adapter, genome, dense=True)
    assert form.kind == "stock"
    _save(dense, form, tmp_path / "stock")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, atol=1e-4, rtol=0)


def test_ranks_follow_importance_within_the_parameter_budget(tiny_mixtral):
    adapter = adapter_for(tiny_mixtral)
    genome = _pruned()
    importance = {i: torch.arange(1, 9, dtype=torch.float64) ** 4 * (i + 1) for i in range(3)}
    dense = lowrank.expert_params(adapter, None)
    for fraction in (0.2, 0.5):
        ranked = lowrank.allocate_ranks(genome, importance, adapter, fraction)
        assert ranked.dense() == genome
        for _, gene in ranked.layers:
            used = sum(lowrank.expert_params(adapter, r) for r in gene.ranks)
            budget = fraction * dense * len(gene.keep)
            # spent, never exceeded
            assert budget - lowrank.expert_params(adapter, 1) < used <= budget
            # importance grows with id
            assert list(gene.ranks) == sorted(gene.ranks) and gene.ranks[0] < gene.ranks[-1]
    # alpha = 0: importance ignored, ranks even
    even = lowrank.allocate_ranks(genome, importance, adapter, 0.5, alpha=0.0)
    assert all(max(g.ranks) - min(g.ranks) <= 1 for _, g in even.layers)
    with pytest.raises(EepError, match="below rank 1"):
        lowrank.allocate_ranks(genome, importance, adapter, 0.001)


def _skewed(model):
    """Layer 1's MoE inputs with per-channel scales spread over two decades (as real models have)."""
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.mul_(
            torch.logspace(-1, 1, 32)[torch.randperm(32)]
        )
    return model


def test_activation_aware_factors_fit_the_calibration_activations_better(tiny_mixtral):
    model = _skewed(tiny_mixtral)
    adapter = adapter_for(model)
    batches = [{"input_ids": IDS}]
    scales = calibration.collect_scales(model, adapter, batches)
    assert {key.split(".")[0] for key in scales} == {"0", "1", "2"}
    assert scales["1.gate_up_proj.0"].shape == (32,) and scales["1.down_proj.0"].shape == (48,)
    inputs = {}
    hook = adapter.blocks[1].register_forward_pre_hook(
        lambda m, args: inputs.__setitem__("x", args[0])
    )
    with torch.no_grad():
        model(IDS)
    hook.remove()
    everyone = Genome.from_keep(8, 2, {1: range(8)})
    with torch.no_grad():
        full = adapter.blocks[1](inputs["x"])
    errors = {}
    for name, values in (("svd", None), ("activation", scales)):
        adapter.use_scales(values)
        genome = everyone.with_ranks({1: dict.fromkeys(range(8), 6)}, adapter.factors.digest)
        with torch.no_grad(), adapter.applied(genome):
            errors[name] = float((adapter.blocks[1](inputs["x"]) - full).pow(2).sum())
        at_full_rank = everyone.with_ranks({1: dict.fromkeys(range(8), 32)}, adapter.factors.digest)
        with torch.no_grad(), adapter.applied(at_full_rank):
            torch.testing.assert_close(adapter.blocks[1](inputs["x"]), full, atol=1e-5, rtol=0)
    assert errors["activation"] < 0.8 * errors["svd"], errors


def test_an_activation_aware_genome_needs_its_scales(tiny_mixtral, tmp_path):
    adapter = adapter_for(tiny_mixtral)
    scales = calibration.collect_scales(tiny_mixtral, adapter, [{"input_ids": IDS}])
    adapter.use_scales(scales)
    genome = _pruned().with_ranks({0: {0: 3, 2: 1, 5: 7, 7: 2}}, adapter.factors.digest)
    assert genome.to_dict()["activation_scales"] == lowrank.scales_digest(scales)
    assert Genome.from_dict(genome.to_dict()) == genome and genome.dense().scales is None
    with pytest.raises(EepError, match="activation_scales only goes with low-rank experts"):
        Genome.from_dict({**_pruned().to_dict(), "activation_scales": "abc"})
    lowrank.save_scales(scales, tmp_path / "s.safetensors")
    assert lowrank.scales_digest(lowrank.load_scales(tmp_path / "s.safetensors")) == genome.scales
    adapter.use_scales(None)
    with pytest.raises(EepError, match="activation-aware, made with the scales .* holds none"):
        with adapter.applied(genome):
            pass


def test_low_rank_and_merge_genomes_share_the_buffers_without_mixing_up(tiny_mixtral):
    """Low-rank experts are written into the buffers merged experts live in: a merge evaluated
    after a low-rank genome must merge again, not reuse what the buffers hold."""
    adapter = adapter_for(tiny_mixtral)
    merge = [[0.5, 0.5, 0, 0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0, 0, 0], [0, 0, 0, 0.3, 0.7, 0, 0, 0]]
    merged = Genome.from_dict(
        {
            "format": "eep.genome/v1",
            "num_experts": 8,
            "top_k": 2,
            "layers": {"1": {"merge": merge, "router": merge}},
        }
    )
    low = Genome.from_keep(8, 2, {1: [0, 2, 3]}).with_ranks({1: {0: 2, 2: 2, 3: 2}})
    with torch.no_grad():
        with adapter.applied(merged):
            first = tiny_mixtral(IDS).logits
        with adapter.applied(low):
            between = tiny_mixtral(IDS).logits
        with adapter.applied(merged):
            again = tiny_mixtral(IDS).logits
    assert not torch.allclose(first, between)
    assert torch.equal(first, again)

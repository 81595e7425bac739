"""Every supported MoE family, on a tiny random model built from its own config class (fp32):
identity genomes change nothing, pruning in place equals the sliced and reloaded export, merging's
export equals its in-search logits, and a short search runs end to end and exports."""

import json
import shutil

import pytest
import torch
import transformers as tf

from eep import calibration
from eep.errors import EepError
from eep.families import FAMILIES, shape_of
from eep.genome import Genome, LayerGene
from eep.moe import adapter_for
from eep.surgery import compress, form_of, sliced

COMMON = dict(
    vocab_size=48,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
LINEAR_ATTENTION = dict(
    layer_types=["linear_attention", "full_attention", "linear_attention"],
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=2,
)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)

# each with what makes its family differ: dense layers, shared experts, no renormalisation,
# expert groups, scaling factors, router and expert biases
CONFIGS = {
    "mixtral": lambda **c: tf.MixtralConfig(
        **c, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2
    ),
    "qwen2_moe": lambda **c: tf.Qwen2MoeConfig(
        **c,
        intermediate_size=40,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": lambda **c: tf.Qwen3MoeConfig(
        **c,
        head_dim=8,
        intermediate_size=40,
        moe_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[0],
    ),
    "qwen3_next": lambda **c: tf.Qwen3NextConfig(
        **c,
        **LINEAR_ATTENTION,
        head_dim=8,
        intermediate_size=40,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "qwen3_5_moe_text": lambda **c: tf.Qwen3_5MoeTextConfig(
        **c,
        **LINEAR_ATTENTION,
        head_dim=8,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
    ),
    "olmoe": lambda **c: tf.OlmoeConfig(
        **c, intermediate_size=24, num_experts=8, num_experts_per_tok=2
    ),
    "deepseek_v2": lambda **c: tf.DeepseekV2Config(
        **c,
        **MLA,
        intermediate_size=40,
        moe_intermediate_size=24,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        q_lora_rank=None,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
    ),
    "deepseek_v3": lambda **c: tf.DeepseekV3Config(
        **c,
        **MLA,
        intermediate_size=40,
        moe_intermediate_size=24,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        q_lora_rank=16,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
    ),
    "glm4_moe": lambda **c: tf.Glm4MoeConfig(
        **c,
        head_dim=8,
        intermediate_size=40,
        moe_intermediate_size=24,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.8,
    ),
    "gpt_oss": lambda **c: tf.GptOssConfig(
        **c,
        head_dim=8,
        intermediate_size=24,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
}
# two of the eight experts from each half: DeepSeek's tiny configs route within two groups of four
KEEP = [0, 2, 5, 7]


def tiny_model(family: str, **overrides):
    """A random model of ``family`` whose routing decides something: router weights and biases
    drawn large enough that pruning changes the output."""
    torch.manual_seed(0)
    values = {
        **COMMON,
        **({"num_key_value_heads": 4} if family.startswith("deepseek") else {}),
        **overrides,
    }
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[family](**values)).eval()
    adapter = adapter_for(model)
    with torch.no_grad():
        for router in adapter.routers.values():
            for name in adapter.router_tensors:
                getattr(router, name).normal_(0, 1.0 if name == "weight" else 0.3)
        for block in adapter.blocks.values():
            for name in adapter.expert_tensors:
                if name.endswith("bias"):
                    getattr(block.experts, name).normal_(0, 0.1)
    return model


def _ids(vocab=48):
    return torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(1))


def _logits(model, genome=None, adapter=None):
    with torch.no_grad():
        if genome is None:
            return model(_ids()).logits
        with adapter.applied(genome):
            return model(_ids()).logits


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_identity_prune_and_merge_equal_their_exports(family, tmp_path):
    model = tiny_model(family)
    adapter = adapter_for(model)
    assert adapter.family.model_type == family and adapter.moe_layers == list(
        shape_of(model.config).moe_layers
    )
    layers = adapter.moe_layers
    full = _logits(model)

    # (a) keeping every expert at the model's top-k changes nothing
    identity = Genome.from_keep(8, adapter.top_k, {i: range(8) for i in layers})
    assert torch.equal(_logits(model, identity, adapter), full)

    # (b) pruning in place == the physically sliced model, saved and reloaded by stock transformers
    pruned = Genome.from_keep(8, adapter.top_k, {i: KEEP for i in layers})
    in_search = _logits(model, pruned, adapter)
    assert (in_search - full).abs().max() > 1e-3  # pruning really changed the model
    sliced(adapter, pruned).save_pretrained(tmp_path / "pruned")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert type(reloaded) is type(model)
    assert getattr(reloaded.config.get_text_config(), adapter.family.experts_key) == 4
    assert sum(p.numel() for p in reloaded.parameters()) < sum(
        p.numel() for p in model.parameters()
    )
    torch.testing.assert_close(_logits(reloaded), in_search, atol=1e-5, rtol=0)
    assert torch.equal(_logits(model), full)  # restored exactly

    # top-1 routing over the kept experts: a stock model with num_experts_per_tok=1
    top1 = Genome.from_keep(8, adapter.top_k, {i: KEEP for i in layers}, active=1)
    small = sliced(adapter, top1)
    assert small.config.get_text_config().num_experts_per_tok == 1
    torch.testing.assert_close(_logits(small), _logits(model, top1, adapter), atol=1e-5, rtol=0)

    # (c) merged experts with a selecting router: in-search logits == the exported model's
    if adapter.shape.expert_groups == 1:
        rng = torch.Generator().manual_seed(2)
        genes = {
            i: LayerGene.merged(
                torch.rand(4, 8, generator=rng).tolist(),
                [[1.0 if e == k else 0.0 for e in range(8)] for k in KEEP],
            )
            for i in layers
        }
        merged = Genome.from_genes(8, adapter.top_k, genes)
        assert form_of(adapter, merged).kind == "stock"
        in_search = _logits(model, merged, adapter)
        sliced(adapter, merged).save_pretrained(tmp_path / "merged")
        reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(_logits(reloaded), in_search, atol=1e-5, rtol=0)
        # the merge mattered
        assert (in_search - _logits(model, pruned, adapter)).abs().max() > 1e-3


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_a_compacted_genome_computes_what_the_applied_one_does_and_restores(family):
    """What a latency is timed on (the kept experts moved to the front rows, the modules sliced
    to them, no hooks) computes the in-search logits, and leaves every weight as it was."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    layers = adapter.moe_layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if adapter.shape.expert_groups == 1:  # uneven keep sets and top-k, one layer untouched
        keep = {i: [7, 2, 5, 0, 3][: 5 - n] for n, i in enumerate(layers)}
        keep[layers[0]] = range(8)
        genome = Genome.from_keep(
            8, adapter.top_k, keep, {i: 1 + n % 2 for n, i in enumerate(layers)}
        )
    else:  # grouped routing: the same number kept in each group
        genome = Genome.from_keep(8, adapter.top_k, {i: KEEP for i in layers})
    with torch.no_grad(), adapter.compacted(genome):
        compact = model(_ids()).logits
    torch.testing.assert_close(compact, _logits(model, genome, adapter), atol=1e-5, rtol=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError), adapter.compacted(genome):
        raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_calibration_error_and_baselines_follow_the_familys_routing(family):
    """NAEE's error from one calibration pass (logits + Gram matrices, routed by the family's own
    router code) equals the MoE block's output change when the layer is really pruned; shared
    experts cancel. Frequency / REAP / NAEE genomes are valid for the model."""
    from eep import baselines as bl

    model = tiny_model(family)
    adapter = adapter_for(model)
    ids = _ids()
    inputs = {}
    hooks = [
        block.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
        for i, block in adapter.blocks.items()
    ]
    cal = calibration.collect(model, adapter, [{"input_ids": ids}], max_tokens_per_layer=1000)
    for hook in hooks:
        hook.remove()
    assert cal.tokens == ids.numel()
    for layer in adapter.moe_layers:
        block, x = adapter.blocks[layer], inputs[layer]
        genome = Genome.from_keep(8, adapter.top_k, {layer: KEEP})
        with torch.no_grad():
            full = _first(block(x))
            with adapter.applied(genome):
                pruned = _first(block(x))
        expected = float(((full - pruned).double() ** 2).sum())
        assert expected > 1e-6
        assert calibration.output_error(cal, layer, KEEP) == pytest.approx(expected, rel=1e-4)
    if adapter.shape.expert_groups == 1:
        for genome in (
            bl.frequency_genome(cal, 4),
            bl.reap_genome(cal, 4),
            bl.naee_genome(cal, 4)[0],
        ):
            adapter.validate(genome)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def test_grouped_routing_needs_even_groups():
    model = tiny_model("deepseek_v3")
    adapter = adapter_for(model)
    assert (adapter.shape.expert_groups, adapter.shape.group_min) == (2, 2)
    uneven = Genome.from_keep(8, 2, {i: [0, 1, 2, 5] for i in adapter.moe_layers})
    with pytest.raises(
        EepError, match=r"keeps \[3, 1\] experts in the 2 expert groups; DeepSeek-V3 routes within"
    ):
        form_of(adapter, uneven)
    with pytest.raises(EepError, match="routes within groups"), adapter.applied(uneven):
        pass
    merge = Genome.from_genes(
        8,
        2,
        {
            i: LayerGene.merged([[1.0] * 8] * 4, [[float(e == k) for e in range(8)] for k in KEEP])
            for i in adapter.moe_layers
        },
    )
    with pytest.raises(EepError, match="supports pruning only"):
        form_of(adapter, merge)


def _custom_round_trip(model, adapter, genome, path):
    """The genome's custom-form export, saved and loaded from its own modeling file by stock
    transformers (trust_remote_code), has the in-search logits."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from eep.export import save_model

    in_search = _logits(model, genome, adapter)
    small, form = compress(adapter, genome)
    assert form.kind == "custom"
    save_model(small, form.kind, path)
    # what from_pretrained(path, trust_remote_code=True) loads (in this process eep may have
    # registered its own copy of the classes, which transformers would prefer)
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    remote = get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], path)
    assert not remote.__module__.startswith("eep.")  # the checkpoint's own copy of the file
    reloaded = remote.from_pretrained(path).eval()
    assert reloaded.config.model_type == "eep_" + adapter.family.model_type
    torch.testing.assert_close(_logits(reloaded), in_search, atol=1e-5, rtol=0)
    return in_search


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_family_has_the_custom_form(family, tmp_path):
    """Per-layer expert counts and top-k, router matrices that mix experts and low-rank experts,
    each exported in eep's custom form and loaded by stock transformers with remote code."""
    from eep.moe import mapped_routing

    model = tiny_model(family)
    adapter = adapter_for(model)
    first, last = adapter.moe_layers[0], adapter.moe_layers[-1]
    full = _logits(model)

    # uneven layers (grouped routing: the same experts in each group, another top-k)
    grouped = adapter.shape.expert_groups > 1
    keep = {i: KEEP if grouped or i != last else [0, 1, 2, 5, 6, 7] for i in adapter.moe_layers}
    uneven = Genome.from_keep(8, adapter.top_k, keep, active={last: 1})
    assert (
        _custom_round_trip(model, adapter, uneven, tmp_path / "uneven") - full
    ).abs().max() > 1e-3

    rule = adapter.shape.router_matrix
    rng = torch.Generator().manual_seed(3)
    if rule is not None:
        # a one-hot router matrix routes exactly as the family's own router over the picked experts
        logits = torch.randn(50, 8, generator=rng) * 2
        one_hot = torch.eye(8)[KEEP]
        weights, slots = mapped_routing(logits, one_hot.T.contiguous(), 2, *rule)
        own_weights, own_ids = adapter.route(first, logits, KEEP, 2)
        ids = torch.tensor(KEEP)[slots]
        by_id, own_by_id = ids.argsort(dim=-1), own_ids.argsort(dim=-1)
        assert torch.equal(ids.gather(1, by_id), own_ids.gather(1, own_by_id))
        torch.testing.assert_close(
            weights.gather(1, by_id), own_weights.float().gather(1, own_by_id)
        )
        # and one that mixes them: eep's custom form holds it
        genes = {
            i: LayerGene.merged(
                torch.rand(4, 8, generator=rng).tolist(), torch.rand(4, 8, generator=rng).tolist()
            )
            for i in adapter.moe_layers
        }
        mixing = Genome.from_genes(8, adapter.top_k, genes)
        assert (
            _custom_round_trip(model, adapter, mixing, tmp_path / "mixing") - full
        ).abs().max() > 1e-3
    elif not grouped:
        mixing = Genome.from_genes(
            8,
            2,
            {i: LayerGene.merged([[0.5] * 8] * 4, [[0.2] * 8] * 4) for i in adapter.moe_layers},
        )
        with pytest.raises(
            EepError,
            match="mixes experts, which maps softmax probabilities; this .* routes otherwise",
        ):
            form_of(adapter, mixing)

    # low-rank experts, stored as their factors
    low_rank = Genome.from_keep(8, adapter.top_k, {i: KEEP for i in adapter.moe_layers}).with_ranks(
        {first: {0: 2, 2: 5, 5: 1, 7: 8}}
    )
    if adapter.family.gated_experts:
        _custom_round_trip(model, adapter, low_rank, tmp_path / "low-rank")
    else:
        with pytest.raises(
            EepError, match="have no low-rank form in eep's custom code; export with --dense"
        ):
            form_of(adapter, low_rank)
        dense, form = compress(adapter, low_rank, dense=True)  # re-multiplied: a stock checkpoint
        assert form.kind == "stock"
        torch.testing.assert_close(
            _logits(dense), _logits(model, low_rank, adapter), atol=1e-5, rtol=0
        )
    assert torch.equal(_logits(model), full)  # restored exactly


def test_sigmoid_routing_keeps_merges_selecting():
    model = tiny_model("glm4_moe")
    adapter = adapter_for(model)
    assert adapter.shape.router_matrix is None and adapter.shape.expert_groups == 1
    mixing = Genome.from_genes(
        8, 2, {i: LayerGene.merged([[0.5] * 8] * 4, [[0.2] * 8] * 4) for i in adapter.moe_layers}
    )
    with pytest.raises(EepError, match="GLM-4-MoE model routes otherwise \\(sigmoid"):
        form_of(adapter, mixing)


def test_detection_errors_name_the_supported_families():
    with pytest.raises(
        EepError, match="'llama' has no MoE layers .* Mixtral \\(mixtral\\), Qwen2-MoE"
    ):
        shape_of(tf.LlamaConfig())
    with pytest.raises(
        EepError,
        match="'phimoe' is a mixture of experts eep has no adapter for; supported: Mixtral",
    ):
        shape_of(tf.PhimoeConfig())
    with pytest.raises(EepError, match="has no MoE layers \\(all 2 layers are dense\\)"):
        shape_of(tf.Qwen2MoeConfig(num_hidden_layers=2, mlp_only_layers=[0, 1]))
    # three dense layers first
    assert shape_of(tf.DeepseekV3Config()).moe_layers == tuple(range(3, 61))
    assert set(FAMILIES) == set(CONFIGS)


def _saved_tiny(family: str, path):
    """A tiny random model of ``family`` saved at ``path`` with the toy's tokenizer, and a config
    that searches it on one toy task."""
    from eep.toy import TOY_DIR

    tokenizer = tf.AutoTokenizer.from_pretrained(TOY_DIR)
    model = tiny_model(family, vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = {
        "name": family,
        "model": {"path": str(path), "device": "cpu", "dtype": "float32"},
        "fitness": {
            "batch_size": 8,
            "max_new_tokens": 4,
            "tasks": [{"name": "copy", "dataset": "toy:copy", "search_size": 3, "test_size": 3}],
        },
    }
    return model, tokenizer, config


def _export_of(out, model, tokenizer):
    """The checkpoint in ``out``, loaded in stock transformers (custom form: with its modeling
    file), after checking that it gives the logits of ``model`` with its genome applied; returns
    the export, its genome and whether it is in the custom form."""
    genome = Genome.load(out / "eep_genome.json")
    custom = json.loads((out / "eep_report.json").read_text())["form"] == "custom"
    exported = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=custom).eval()
    ids = torch.randint(0, len(tokenizer), (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), adapter_for(model).applied(genome):
        in_search = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, in_search, atol=1e-5, rtol=0)
    return exported, genome, custom


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, space",
    [
        *((f, {"kind": "prune", "keep": 4}) for f in sorted(CONFIGS)),
        ("qwen3_moe", {"budget": 7}),
        ("olmoe", {"kind": "merge", "keep": 4, "merge_after": 3}),
        ("qwen2_moe", {"kind": "moei2", "budget": 7}),
    ],
)
def test_short_search_and_export_end_to_end(family, space, tmp_path, capsys):
    """`eep search` then `eep export` on a tiny random model of the family saved with the toy's
    tokenizer: the run finishes, the export loads in stock transformers (custom form: with its
    modeling file) and equals the search."""
    import yaml

    from eep.cli import main

    model, tokenizer, config = _saved_tiny(family, tmp_path / "model")
    config |= {
        "search_space": space,
        "search": {"seed": 0, "evaluations": 5, "initial": 3},
        "moei2": {
            "population": 4,
            "generations": 2,
            "candidates": 2,
            "block": 2,
            "rank_params": 0.8,
        },
        "baselines": {"calibration": {"size": 16}},
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(["search", str(tmp_path / "search.yaml"), "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["heldout"]["best"]["mean"] is not None
    assert main(["export", str(run), "--out", str(out)]) == 0
    exported, best, custom = _export_of(out, model, tokenizer)
    assert custom or "budget" not in space  # an odd budget over two layers: uneven, so custom
    assert best.is_low_rank == (space.get("kind") == "moei2")
    assert (type(exported) is type(model)) != custom
    shutil.rmtree(tmp_path / "model")


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, objective", [("deepseek_v3", "active_params"), ("qwen2_moe", "kept_params")]
)
def test_frontier_search_and_point_export(family, objective, tmp_path):
    """A frontier search on a tiny random model of the family (grouped routing: over top-k, every
    expert kept; shared experts: over kept experts), then `eep export --point`: the export loads
    and equals the search."""
    import yaml

    from eep.cli import main

    model, tokenizer, config = _saved_tiny(family, tmp_path / "model")
    config |= {
        "search_space": {"kind": "prune"},
        "search": {
            "seed": 0,
            "evaluations": 12,
            "initial": 6,
            "population": 4,
            "objectives": ["fitness", objective],
        },
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(["search", str(tmp_path / "search.yaml"), "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objective"] == objective and summary["front"] and summary["picks"]
    point = summary["front"][0]
    assert main(["export", str(run), "--point", str(point["id"]), "--out", str(out)]) == 0
    _, genome, _ = _export_of(out, model, tokenizer)
    assert genome.to_dict() == point["genome"]

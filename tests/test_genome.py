import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eep.errors import EepError
from eep.genome import GENOME_FORMAT, Genome


def test_round_trip_and_file_form(tmp_path):
    g = Genome.from_keep(8, 2, {1: [6, 0, 3, 2], 0: [1, 3, 4, 6]})
    d = g.to_dict()
    assert d == {
        "format": GENOME_FORMAT,
        "num_experts": 8,
        "top_k": 2,
        "layers": {"0": {"keep": [1, 3, 4, 6]}, "1": {"keep": [0, 2, 3, 6]}},
    }
    assert Genome.from_dict(json.loads(json.dumps(d))) == g
    g.save(tmp_path / "g.json")
    assert Genome.load(tmp_path / "g.json") == g


def test_per_layer_top_k():
    g = Genome.from_dict(
        {
            "format": GENOME_FORMAT,
            "num_experts": 8,
            "top_k": 2,
            "layers": {"0": {"keep": [0, 5], "top_k": 1}, "1": {"keep": [1, 2, 3]}},
        }
    )
    assert g.active(0) == 1 and g.active(1) == 2 and g.active(7) == 2
    assert g.to_dict()["layers"] == {"0": {"keep": [0, 5], "top_k": 1}, "1": {"keep": [1, 2, 3]}}
    assert Genome.from_dict(g.to_dict()) == g
    assert g.key != Genome.from_keep(8, 2, {0: [0, 5], 1: [1, 2, 3]}).key
    one = Genome.from_keep(8, 2, {0: [3]}, active=1)  # top-1 lets a layer keep a single expert
    assert one.keep(0) == (3,)
    with pytest.raises(EepError, match="layer 0: keeps 2 experts but routes each token to top_k=3"):
        Genome.from_keep(8, 2, {0: [0, 5]}, active=3)
    with pytest.raises(EepError, match="layer 0: top_k must be a positive integer"):
        Genome.from_keep(8, 2, {0: [0, 5]}, active=0)


def _merge_layer(rows=2, **override):
    gene = {
        "merge": [[0.5, 0.5, 0, 0], [0, 0, 0.25, 0.75]][:rows],
        "router": [[1, 0, 0, 0], [0, 0, 0.5, 0.5]][:rows],
    }
    return {**gene, **override}


def test_merge_gene_file_form_round_trips_and_old_files_stay_valid():
    data = {
        "format": GENOME_FORMAT,
        "num_experts": 4,
        "top_k": 2,
        "layers": {"0": _merge_layer(), "1": {"keep": [0, 3]}, "2": _merge_layer(top_k=1)},
    }
    g = Genome.from_dict(data)
    assert g.is_merge and g.gene(0).is_merge and not g.gene(1).is_merge
    assert g.keep(0) == (0, 1, 2, 3) and g.gene(0).slots == 2 and g.active(2) == 1
    assert g.to_dict()["layers"]["0"] == {
        "merge": [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.25, 0.75]],
        "router": [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]],
    }
    assert Genome.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    merge, router = g.gene(1).matrices(4)
    assert merge == router == ((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0))
    one_hot = Genome.from_dict(
        {
            **data,
            "layers": {
                "0": {"merge": [[0, 0, 1, 0], [1, 0, 0, 0]], "router": [[0, 0, 1, 0], [1, 0, 0, 0]]}
            },
        }
    )
    assert one_hot == Genome.from_keep(4, 2, {0: [0, 2]}) and not one_hot.is_merge


@pytest.mark.parametrize(
    "gene, message",
    [
        (
            _merge_layer(merge=[[0.5, 0.5, 0]]),
            "layer 0: merge row 0 has 3 entries; it needs one per source expert",
        ),
        (_merge_layer(router=[[1, 0, 0, 0]]), "same number of rows"),
        (
            _merge_layer(merge=[[float("nan"), 0, 0, 0], [0, 0, 0, 1]]),
            "layer 0: merge row 0 has a NaN",
        ),
        (_merge_layer(router=[[1, 0, 0, 0], [0, 0, 0, 0]]), "layer 0: router row 1 is all zeros"),
        (
            _merge_layer(router=[[1, 0, 0, 0], [0, -0.1, 1, 0]]),
            "layer 0: router row 1 has a negative entry",
        ),
        (_merge_layer(rows=1), "layer 0: keeps 1 merged experts but routes each token to top_k=2"),
        (_merge_layer(keep=[0, 1]), "either 'keep', or both 'merge' and 'router'"),
        ({"merge": [[1, 0, 0, 0], [0, 1, 0, 0]]}, "either 'keep', or both 'merge' and 'router'"),
        (_merge_layer(merge="x"), "'merge' must be a list of rows of numbers"),
        (
            _merge_layer(router=[[True, 0, 0, 0], [0, 1, 0, 0]]),
            "'router' must be a list of rows of numbers",
        ),
    ],
)
def test_invalid_merge_matrices_name_layer_and_key(gene, message):
    with pytest.raises(EepError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Genome.from_dict(
            {"format": GENOME_FORMAT, "num_experts": 4, "top_k": 2, "layers": {"0": gene}}
        )


def test_key_is_content_hash():
    a = Genome.from_keep(8, 2, {0: [1, 2], 1: [3, 4]})
    b = Genome.from_keep(8, 2, {1: [4, 3], 0: [2, 1]})
    c = Genome.from_keep(8, 2, {0: [1, 2], 1: [3, 5]})
    assert a.key == b.key and hash(a) == hash(b)
    assert a.key != c.key
    assert len({a, b, c}) == 2


def test_kept_bits_count_the_kept_experts_two_genomes_share():
    a = Genome.from_keep(8, 2, {0: [1, 2], 3: [0, 7]})
    b = Genome.from_keep(8, 2, {0: [2, 5], 2: [0, 7], 3: [7, 6]})
    assert a.kept_bits.bit_count() == 4
    assert (a.kept_bits & b.kept_bits).bit_count() == 2  # (0, 2) and (3, 7); not (2, 7)
    assert a.kept_bits == Genome.from_dict(a.to_dict()).kept_bits


def test_missing_layer_keeps_everything():
    g = Genome.from_keep(8, 2, {1: [0, 1, 2, 3]})
    assert g.keep(0) == tuple(range(8))
    assert g.keep(1) == (0, 1, 2, 3)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"format": "other"}, "unsupported genome format"),
        (
            {
                "format": GENOME_FORMAT,
                "num_experts": 8,
                "top_k": 2,
                "layers": {"0": {"keep": [1, 1, 2]}},
            },
            "distinct",
        ),
        (
            {
                "format": GENOME_FORMAT,
                "num_experts": 8,
                "top_k": 2,
                "layers": {"0": {"keep": [1, 9]}},
            },
            "0..7",
        ),
        (
            {"format": GENOME_FORMAT, "num_experts": 8, "top_k": 2, "layers": {"0": {"keep": [1]}}},
            "keep at least 2",
        ),
        (
            {
                "format": GENOME_FORMAT,
                "num_experts": 8,
                "top_k": 2,
                "layers": {"0": {"keep": [1, 2], "top_k": "1"}},
            },
            "top_k must be an integer",
        ),
        (
            {
                "format": GENOME_FORMAT,
                "num_experts": 8,
                "top_k": 2,
                "layers": {"x": {"keep": [1, 2]}},
            },
            "decimal",
        ),
        (
            {
                "format": GENOME_FORMAT,
                "num_experts": 8,
                "top_k": 2,
                "layers": {"0": {"kep": [1, 2]}},
            },
            "unknown gene keys",
        ),
        (
            {"format": GENOME_FORMAT, "num_experts": "8", "top_k": 2, "layers": {}},
            "num_experts must be an integer",
        ),
        (
            {"format": GENOME_FORMAT, "num_experts": 8, "top_k": 2, "layers": {}, "extra": 1},
            "unknown genome keys",
        ),
    ],
)
def test_malformed_genomes_are_rejected(data, message):
    with pytest.raises(EepError, match=message):
        Genome.from_dict(data)


def test_validate_for_model():
    g = Genome.from_keep(8, 2, {0: [0, 1, 2, 3], 5: [0, 1, 2, 3]})
    g.validate_for(8, 2, range(6))
    with pytest.raises(EepError, match="8 experts"):
        g.validate_for(16, 2, range(6))
    with pytest.raises(EepError, match="top_k=2"):
        g.validate_for(8, 1, range(6))
    with pytest.raises(EepError, match=r"\[5\]"):
        g.validate_for(8, 2, range(4))


def test_load_reports_bad_files(tmp_path):
    with pytest.raises(EepError, match="does not exist"):
        Genome.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EepError, match="not valid JSON"):
        Genome.load(tmp_path / "bad.json")


numbers = st.one_of(st.integers(-2, 2), st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 12) | st.text(max_size=3),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=3), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    num_experts=st.one_of(st.integers(-1, 10), json_values),
    top_k=st.one_of(st.integers(-1, 10), json_values),
    layers=st.one_of(
        json_values,
        st.dictionaries(
            st.sampled_from(["0", "1", "2", "x", "-1"]),
            st.one_of(
                json_values,
                st.fixed_dictionaries({"keep": st.lists(st.integers(-1, 10), max_size=9)}),
                st.fixed_dictionaries(
                    {
                        "merge": st.lists(st.lists(numbers, max_size=9), max_size=4),
                        "router": st.lists(st.lists(numbers, max_size=9), max_size=4),
                    }
                ),
            ),
            max_size=3,
        ),
    ),
)
def test_any_input_parses_or_raises_eep_error(num_experts, top_k, layers):
    data = {"format": GENOME_FORMAT, "num_experts": num_experts, "top_k": top_k, "layers": layers}
    try:
        g = Genome.from_dict(data)
    except EepError:
        return
    assert Genome.from_dict(g.to_dict()) == g
    for _, gene in g.layers:
        assert gene.slots >= g.top_k and len(set(gene.keep)) == len(gene.keep)
        assert all(0 <= e < g.num_experts for e in gene.keep)
        if gene.is_merge:
            assert all(
                len(row) == g.num_experts and min(row) >= 0 and max(row) > 0 for row in gene.router
            )

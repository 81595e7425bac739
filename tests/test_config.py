import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eep.config import load_config, parse_config
from eep.errors import EepError
from tests.conftest import toy_config_dict


def test_defaults_follow_eep():
    cfg = parse_config(toy_config_dict()).search
    assert (cfg.mutate_threshold, cfg.crossover_threshold, cfg.crossover_pool_min) == (3.0, 1.0, 6)
    assert (cfg.crossover_prob, cfg.layer_prob, cfg.swap_prob) == (0.3, 0.25, 0.15)


def test_overrides_parse_values_as_yaml(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(toy_config_dict()))
    cfg = load_config(
        path, ["search.evaluations=99", "fitness.tasks.1.weight=2.5", "model.dtype=bfloat16"]
    )
    assert (
        cfg.search.evaluations == 99
        and cfg.fitness.tasks[1].weight == 2.5
        and cfg.model.dtype == "bfloat16"
    )
    assert cfg.digest() != load_config(path).digest()
    with pytest.raises(EepError, match="not an index"):
        load_config(path, ["fitness.tasks.9.weight=1"])


def test_a_frontier_refuses_a_written_keep_even_the_default_value(tmp_path):
    import yaml

    data = toy_config_dict()
    data["search"]["objectives"] = ["fitness", "kept_params"]
    data["search_space"] = {"kind": "prune"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).search.frontier
    assert load_config(path, ["search_space.keep=null"]).search.frontier
    # 4 is also the value Config fills in when keep is not given: only what was written tells
    with pytest.raises(EepError, match=r"^--set search_space.keep=4: .*spans every size"):
        load_config(path, ["search_space.keep=4"])
    data["search_space"]["keep"] = 4
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(EepError, match=r"c.yaml: search_space.keep: .*remove search_space.keep"):
        load_config(path)
    # a stored run config carries the filled-in default and still parses
    assert parse_config(parse_config(data | {"search_space": {"kind": "prune"}}).to_dict())


def test_config_rejects_duplicate_task_names_and_bad_initial():
    data = toy_config_dict()
    data["fitness"]["tasks"][1]["name"] = "copy"
    with pytest.raises(EepError, match="task names must be unique"):
        parse_config(data)
    with pytest.raises(EepError, match="initial .* must not exceed evaluations"):
        parse_config(toy_config_dict(initial=50, evaluations=10))


def test_invalid_yaml_is_reported(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(EepError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(EepError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-5, 500)
    | st.floats(-2, 2)
    | st.just(float("nan"))
    | st.text(max_size=4)
)
values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=10,
)
keys = st.sampled_from(
    [
        "name",
        "model",
        "search",
        "search_space",
        "fitness",
        "evaluator",
        "seed",
        "keep",
        "evaluations",
        "tasks",
        "x",
    ]
)


@settings(max_examples=300, deadline=None)
@given(section=keys, key=keys, value=values)
def test_any_mutation_parses_or_raises_eep_error(section, key, value):
    data = toy_config_dict()
    target = data.setdefault(section, {})
    if isinstance(target, dict):
        target[key] = value
    else:
        data[section] = value
    try:
        cfg = parse_config(data)
    except EepError as err:
        assert "\n" not in str(err)
        return
    assert parse_config(cfg.to_dict()) == cfg


def test_settings_added_with_neutral_defaults_keep_older_runs_resumable():
    """A run records its config's digest; a key added later with a neutral default (MoE-I²'s
    section, seed genomes) must not change it, or runs started by an earlier eep would refuse to
    resume. The pinned value is experiments/toy.yaml's digest before those keys existed."""
    from pathlib import Path

    # the toy demo as it was when the pin was taken (it now scores in chunks of 32 for the early cut,
    # spends 500 evaluations and starts from greedy elimination; its validation examples stay out of
    # the digest). A run stores warm_start resolved, so an old run's [] stays [].
    config = load_config(
        Path(__file__).resolve().parents[1] / "experiments/toy.yaml",
        ["fitness.batch_size=128", "search.evaluations=200", "search.warm_start=[]"],
    )
    assert "moei2" not in config.outcome() and "seed_genomes" not in config.outcome()["search"]
    assert config.digest() == "fdf1cdd0be23161d"
    assert "latency_repeats" not in config.outcome()["search"]  # it decides a latency search only
    # how a candidate is computed never decides the search: kernel, scoring path, early cut
    eager = config.model_copy(
        update={"model": config.model.model_copy(update={"experts_implementation": "eager"})}
    )
    assert parse_config(eager.to_dict()) == eager and eager.digest() == config.digest()
    generate = config.model_copy(
        update={"fitness": config.fitness.model_copy(update={"scoring": "generate"})}
    )
    uncut = config.model_copy(
        update={"search": config.search.model_copy(update={"early_cut": False})}
    )
    assert generate.digest() == uncut.digest() == config.digest()
    seeded = config.model_copy(
        update={"search": config.search.model_copy(update={"seed_genomes": ["s.json"]})}
    )
    assert seeded.digest() != config.digest()
    moei2 = config.model_copy(update={"method": "moei2"})
    assert "moei2" in moei2.outcome() and "calibration" in moei2.outcome()
    # runs written before the method key spelled it search_space.kind: moei2: same config, same digest
    old = config.to_dict()
    del old["method"]
    old["search_space"]["kind"] = "moei2"
    assert parse_config(old) == moei2 and parse_config(old).digest() == moei2.digest()
    assert moei2.outcome()["search_space"]["kind"] == "moei2" and "method" not in moei2.outcome()
    with pytest.raises(
        EepError, match="^config: search_space.kind: moei2 is method: moei2; drop one"
    ):
        parse_config({**old, "method": "eep"})
    with pytest.raises(EepError, match="method: moei2 keeps experts"):
        parse_config({**config.to_dict(), "method": "moei2", "search_space": {"kind": "merge"}})


def test_an_override_of_a_template_keeps_its_braces():
    from eep.config import apply_override

    data = {"fitness": {"tasks": [{"prompt": "x"}]}}
    apply_override(data, "fitness.tasks.0.prompt={question}")  # YAML would read a mapping
    assert data["fitness"]["tasks"][0]["prompt"] == "{question}"
    apply_override(data, "fitness.tasks.0.prompt={context} Q: {question} A:")  # not YAML at all
    assert data["fitness"]["tasks"][0]["prompt"] == "{context} Q: {question} A:"
    # a mapping with values stays one
    apply_override(data, "fitness.tasks.0.answer_map={A: '0', B: '1'}")
    assert data["fitness"]["tasks"][0]["answer_map"] == {"A": "0", "B": "1"}

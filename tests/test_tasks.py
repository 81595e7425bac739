"""fitness.tasks and fitness.presets: examples from the toys, from datasets and from files as
they lie, checked before any model loads."""

import json

import pytest

from eep.config import TaskConfig
from eep.errors import EepError
from fitness import presets, toy_tasks
from fitness.tasks import check_tasks, load_tasks


def test_toy_splits_are_disjoint_and_deterministic():
    for task in toy_tasks.TASKS:
        search = toy_tasks.examples(task, "search", 50)
        test = toy_tasks.examples(task, "test", 50)
        assert not {e.prompt for e in search} & {e.prompt for e in test}
        assert toy_tasks.examples(task, "test", 50) == test
        assert all(toy_tasks.split_of(task, e.prompt.split()[2:-1]) == "test" for e in test)
    assert toy_tasks.make_example("reverse", list("abc")).answer == "c b a"
    assert toy_tasks.make_example("shift", list("aop")).answer == "b p a"
    assert toy_tasks.make_example("unshift", list("bpa")).answer == "a o p"
    assert toy_tasks.make_example("rotate", list("abcd")).answer == "b c d a"
    assert toy_tasks.make_example("swap", list("abcde")).answer == "b a d c e"
    for s in toy_tasks.SYMBOLS:
        assert toy_tasks.solve("unlookup", toy_tasks.solve("lookup", [s])) == [s]


def test_toy_tasks_as_texts_and_fidelity_on_the_toy(tokenizer):
    cfg = TaskConfig(name="fid", dataset="toy:reverse", metric="esap", search_size=4)
    (task,) = load_tasks([cfg], "search")
    assert all(ex.prompt.startswith("reverse : ") and " = " in ex.prompt for ex in task.examples)
    with pytest.raises(EepError, match="toy tasks have no options"):
        check_tasks([cfg.model_copy(update={"metric": "choice"})])


def _write_dataset(root):
    root.mkdir()
    for split, n in (("train", 10), ("validation", 4)):
        rows = [
            {
                "question": f"q{i}",
                "context": f"c{i}",
                "answers": {"text": [f"a{i}", f"b{i}"]},
                "label": bool(i % 2),
            }
            for i in range(n)
        ]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def test_dataset_task_from_local_files(tmp_path):
    path = _write_dataset(tmp_path / "qa")
    cfg = TaskConfig(
        name="qa",
        dataset=path,
        prompt="{context} Q: {question} A:",
        answer="answers.text",
        metric="contains",
        search_split="train",
        test_split="validation",
        search_size=6,
        test_size=50,
    )
    (search,) = load_tasks([cfg], "search")
    (test,) = load_tasks([cfg], "test")
    assert len(search.examples) == 6 and len(test.examples) == 4  # capped at the split's size
    first = search.examples[0]
    i = first.prompt.split()[0][1:]
    assert first.prompt == f"c{i} Q: q{i} A:" and first.answers == (f"a{i}", f"b{i}")
    assert load_tasks([cfg], "search") == [search]  # seeded subset
    yes_no = cfg.model_copy(
        update={"answer": "label", "answer_map": {"true": "yes", "false": "no"}}
    )
    assert {ex.answers for ex in load_tasks([yes_no], "test")[0].examples} == {("yes",), ("no",)}


@pytest.mark.parametrize(
    "update, message",
    [
        ({"answer": "missing"}, "field 'missing' is missing from"),
        ({"prompt": "{nope}"}, "template '{nope}' uses 'nope'"),
        ({"search_split": "nosuch"}, "cannot load split 'nosuch'"),
        (
            {"metric": "choice", "choices": "nochoices", "answer": "label"},
            "field 'nochoices' is missing",
        ),
        (
            {"metric": "choice", "choices": ["no", "yes"], "answer": "question"},
            "not an option index below 2",
        ),
        (
            {"answer": "label", "answer_map": {"true": "yes"}},
            "answer value 'false' is not in answer_map",
        ),
        ({"dataset": "EMPTY"}, "split 'train' of .* is empty"),
    ],
)
def test_bad_dataset_tasks_fail_clearly(tmp_path, update, message):
    root = _write_dataset(tmp_path / "qa")
    (tmp_path / "empty.jsonl").write_text("")
    if update.get("dataset") == "EMPTY":
        update = {"dataset": str(tmp_path / "empty.jsonl")}
    cfg = TaskConfig(
        name="qa",
        dataset=root,
        prompt="{question}",
        answer="answers.text",
        search_split="train",
        test_split="validation",
    ).model_copy(update=update)
    with pytest.raises(EepError, match=message):
        load_tasks([cfg], "search")


def test_a_missing_data_file_and_rows_without_a_field_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TaskConfig(name="rev", dataset="rev2.jsonl", prompt="{question}", answer="target")
    # a data file's name that is not there: refused before any loading, not looked up on the hub
    with pytest.raises(EepError, match="dataset 'rev2.jsonl' is no such file or directory"):
        check_tasks([cfg])
    with pytest.raises(EepError, match="no such file"):
        check_tasks([cfg.model_copy(update={"dataset": "./data/rev"})])
    check_tasks([cfg.model_copy(update={"dataset": "org/rev"})])  # a hub id: left to the run
    rows = [{"question": f"q{i}", "target": f"a{i}"} for i in range(40)]
    _jsonl(tmp_path / "rev2.jsonl", rows[:30] + [{"question": f"q{i}"} for i in range(30, 40)])
    # datasets fills a key a row lacks with None; it must not become the answer "None"
    with pytest.raises(
        EepError, match="field 'target' is missing or null in a row of 'rev2.jsonl'"
    ):
        load_tasks([cfg.model_copy(update={"search_size": 40, "test_size": 40})], "search")
    _jsonl(tmp_path / "rev2.jsonl", rows[:30] + [{"target": f"a{i}"} for i in range(30, 40)])
    with pytest.raises(EepError, match="field 'question' is missing or null"):
        load_tasks([cfg.model_copy(update={"search_size": 40, "test_size": 40})], "search")


def test_an_answer_map_to_option_indices_may_give_them_as_numbers():
    cfg = TaskConfig(name="mc", dataset="org/mc", prompt="{q}", answer="label", answer_map={"A": 0})
    assert cfg.answer_map == {"A": "0"}
    with pytest.raises(ValueError, match="valid string"):  # YAML's unquoted yes: never meant
        TaskConfig(name="mc", dataset="org/mc", prompt="{q}", answer="a", answer_map={"y": True})


def test_example_counts_are_what_local_data_really_has(tmp_path):
    from fitness.tasks import example_counts

    rows = [{"question": f"q{i}", "target": f"a{i}"} for i in range(60)]
    path = str(_jsonl(tmp_path / "rev.jsonl", rows))
    short = TaskConfig(name="rev", dataset=path, prompt="{question}", answer="target")
    hub = TaskConfig(name="hub", dataset="org/rev", prompt="{question}", answer="target")
    counts = example_counts([short, hub])
    assert set(counts) == {"rev"}  # a hub dataset is not loaded
    # one file of 60 rows, 3 in 10 held out: 32 searched, what is left validates (at most 64)
    n = counts["rev"]
    assert n["search"] == 32 and n["search"] + n["validation"] + n["test"] == 60
    assert n["test"] == len(load_tasks([short], "test")[0].examples) < short.test_size


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_and_heldout(train, heldout) -> list[dict]:
    """40 question/answer rows, the first 30 written to ``train``, the last 10 to ``heldout``."""
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(40)]
    _jsonl(train, rows[:30])
    _jsonl(heldout, rows[30:])
    return rows


def _preset(name, tmp_path, rows, **over):
    """A preset task loading small local files in the hub dataset's schema (the hub is offline here)."""
    fields = presets.preset_fields(name)
    for split in (fields["search_split"], fields["test_split"]):
        _jsonl(tmp_path / name / f"{split}.jsonl", rows)
    cfg = TaskConfig(name=name, preset=name, dataset=str(tmp_path / name), subset=None, **over)
    return load_tasks([cfg], "search")[0]


def test_presets_parse_their_hub_schemas(tmp_path):
    boolq = _preset("boolq", tmp_path, [{"question": "is it", "passage": "It is.", "answer": True}])
    assert (
        boolq.metric == "first_capital"
        and boolq.chat_template
        and boolq.examples[0].answers == ("A",)
    )
    assert boolq.examples[0].prompt == "It is.\nQuestion: is it?\nA. Yes\nB. No\nAnswer:"
    arc = _preset(
        "arc_easy",
        tmp_path,
        [
            {
                "question": "Q?",
                "answerKey": "C",
                "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
            }
        ],
    )
    ex = arc.examples[0]
    assert ex.label == 2 and ex.options[2] == ("Question: Q?\nAnswer:", " z")
    hs = _preset(
        "hellaswag",
        tmp_path,
        [
            {
                "activity_label": "Cooking",
                "ctx_a": "He cuts.",
                "ctx_b": "then he",
                "endings": ["eats [title] it.", "runs."],
                "label": "1",
            }
        ],
    )
    assert (
        hs.examples[0].options[0] == ("Cooking: He cuts. Then he", " eats. it.")
        and hs.examples[0].label == 1
    )
    wg = _preset(
        "winogrande",
        tmp_path,
        [
            {
                "sentence": "Tom gave Ann a gift because _ was kind.",
                "option1": "Tom",
                "option2": "Ann",
                "answer": "2",
            }
        ],
    )
    assert (
        wg.examples[0].options
        == (
            ("Tom gave Ann a gift because Tom", " was kind."),
            ("Tom gave Ann a gift because Ann", " was kind."),
        )
        and wg.examples[0].label == 1
    )
    piqa = _preset(
        "piqa", tmp_path, [{"goal": "Open a jar", "sol1": "twist", "sol2": "kick", "label": 0}]
    )
    assert [c for _, c in piqa.examples[0].options] == [" twist", " kick"] and piqa.examples[
        0
    ].label == 0
    mmlu = _preset(
        "mmlu",
        tmp_path,
        [{"question": "2+2?", "subject": "math", "choices": ["1", "2", "3", "4"], "answer": 3}],
    )
    assert mmlu.examples[0].options[3] == ("2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:", " D")
    squad = _preset(
        "squad",
        tmp_path,
        [
            {
                "context": "C",
                "question": "Q",
                "answers": {"text": ["a", "b"], "answer_start": [0, 1]},
            }
        ],
    )
    assert squad.examples[0].answers == ("a", "b") and squad.stop == ("\n",)
    wiki = _preset(
        "wikitext", tmp_path, [{"text": ""}, {"text": " = Title = "}, {"text": "  "}], search_size=5
    )
    assert [ex.prompt for ex in wiki.examples] == [" = Title = "]  # blank texts are dropped
    with pytest.raises(EepError, match="unknown preset 'nope'"):
        from eep.config import parse_config

        parse_config({"name": "x", "fitness": {"tasks": [{"name": "t", "preset": "nope"}]}})


def test_every_preset_is_a_valid_task_config():
    for name in presets.PRESETS:
        check_tasks([TaskConfig(name=name, preset=name)])


def test_search_and_heldout_splits_never_share_an_example(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(20)]
    _jsonl(tmp_path / "d" / "train.jsonl", rows[:10])
    _jsonl(tmp_path / "d" / "validation.jsonl", rows[10:])
    cfg = TaskConfig(
        name="t",
        dataset=str(tmp_path / "d"),
        prompt="{question}",
        answer="answer",
        search_split="train",
        test_split="validation",
        search_size=10,
        test_size=10,
    )
    search, test = load_tasks([cfg], "search")[0], load_tasks([cfg], "test")[0]
    assert not {e.prompt for e in search.examples} & {e.prompt for e in test.examples}
    assert len(search.examples) == len(test.examples) == 10
    one_file = TaskConfig(
        name="t",
        dataset=str(tmp_path / "d" / "train.jsonl"),
        prompt="{question}",
        answer="answer",
        search_split="train",
        test_split="validation",
        search_size=3,
    )
    assert len(load_tasks([one_file], "search")[0].examples) == 3


@pytest.mark.parametrize(
    "cfg, message",
    [
        (TaskConfig(name="x", dataset="toy:sort"), "unknown toy task"),
        (TaskConfig(name="x", dataset="toy:copy", test_split="dev"), "unknown split 'dev'"),
        (TaskConfig(name="x", dataset="rajpurkar/squad"), "needs 'prompt'"),
        (TaskConfig(name="x", dataset="d", prompt="{a}"), "needs 'answer'"),
        (
            TaskConfig(name="x", dataset="d", prompt="{a}", answer="b", metric="choice"),
            "needs 'choices'",
        ),
        (
            TaskConfig(name="x", dataset="d", prompt="{a}", answer="b", choices=["x"]),
            "'choices' is for choice",
        ),
        (TaskConfig(name="x", dataset="d", prompt="{a}", preprocess="nope"), "unknown preprocess"),
        (
            TaskConfig(name="x", dataset="d", prompt="{a}", metric="esap", chat_template=True),
            "chat_template applies",
        ),
        (
            TaskConfig(
                name="x",
                dataset="d",
                prompt="{a}",
                answer="b",
                metric="choice",
                choices=["x"],
                continuation="{c}",
            ),
            "needs 'continuation'|needs {choice}",
        ),
        (TaskConfig(name="x", dataset="d", prompt="{a", answer="b"), "malformed"),
        (
            TaskConfig(
                name="x", dataset="d", prompt="{a}", answer="b", search_split="t", test_split="t"
            ),
            "must not be",
        ),
    ],
)
def test_task_configs_are_checked_without_loading(cfg, message):
    with pytest.raises(EepError, match=message):
        check_tasks([cfg])


def test_task_files_as_they_lie_and_one_file_never_read_twice(tmp_path):
    rows = _train_and_heldout(tmp_path / "rev_train.jsonl", tmp_path / "rev_heldout.jsonl")
    files = TaskConfig(
        name="rev",
        data_files={
            "search": str(tmp_path / "rev_train.jsonl"),
            "test": str(tmp_path / "rev_held*.jsonl"),
        },
        prompt="{question}",
        answer="answer",
        search_size=30,
        test_size=30,
    )
    search, test = load_tasks([files], "search")[0], load_tasks([files], "test")[0]
    assert len(search.examples) == 30 and len(test.examples) == 10
    assert not {e.prompt for e in search.examples} & {e.prompt for e in test.examples}

    one = TaskConfig(
        name="rev",
        dataset=str(tmp_path / "rev_train.jsonl"),
        prompt="{question}",
        answer="answer",
        search_split="train",
        test_split="heldout",
        search_size=100,
        test_size=100,
    )
    search, test = (
        {e.prompt for e in load_tasks([one], w)[0].examples} for w in ("search", "test")
    )
    assert (
        not search & test
        and search | test == {f"q{i}" for i in range(30)}
        and 0 < len(test) < len(search)
    )
    # the split follows the rows, not their order
    _jsonl(tmp_path / "shuffled.jsonl", rows[:30][::-1])
    shuffled = one.model_copy(update={"dataset": str(tmp_path / "shuffled.jsonl")})
    assert {e.prompt for e in load_tasks([shuffled], "test")[0].examples} == test

    for update, message in (
        (
            {"data_files": {"search": str(tmp_path / "nope*.jsonl"), "test": "x"}},
            "data_files.search .* matches no file",
        ),
        ({"test_split": "heldout"}, "split 'heldout' is not in data_files \\(search, test\\)"),
    ):
        with pytest.raises(EepError, match=message):
            load_tasks([files.model_copy(update=update)], "search")
    with pytest.raises(ValueError, match="give either dataset or data_files"):
        TaskConfig(name="x", dataset="d", data_files={"search": "a"}, prompt="{a}", answer="b")


def test_overlapping_task_files_are_refused_before_any_model_loads(tmp_path, capsys):
    import yaml

    from eep.cli import main
    from tests.conftest import toy_config_dict

    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(10)]
    _jsonl(tmp_path / "train.jsonl", rows)
    _jsonl(tmp_path / "held.jsonl", rows[7:] + [{"question": "new", "answer": "x"}])
    data = toy_config_dict()
    data["fitness"]["tasks"] = [
        {
            "name": "qa",
            "prompt": "{question} =",
            "answer": "answer",
            "search_size": 10,
            "data_files": {
                "search": str(tmp_path / "train.jsonl"),
                "test": str(tmp_path / "held.jsonl"),
            },
        }
    ]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert (
        main(["search", str(tmp_path / "c.yaml"), "--dry-run", "--run-dir", str(tmp_path / "r")])
        == 2
    )
    err = capsys.readouterr().err
    assert "3 test examples also appear among its search examples" in err and err.count("\n") == 1


def test_validation_is_auto_by_default_and_takes_what_the_source_has_left(tmp_path):
    from eep.config import AUTO_VALIDATION

    _train_and_heldout(tmp_path / "train.jsonl", tmp_path / "held.jsonl")
    task = TaskConfig(
        name="qa",
        data_files={"search": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "held.jsonl")},
        prompt="{question}",
        answer="answer",
        search_size=20,
    )
    assert task.validation_size == "auto" and task.validation_count == AUTO_VALIDATION
    # a run written before ``auto`` stored null for "none"
    old = TaskConfig(**{**task.model_dump(), "validation_size": None})
    assert old.validation_size == 0 and old.validation_count == 0
    assert load_tasks([old], "validation") == []
    # fewer rows than asked: the 10 the search left, none of them searched
    (validation,) = load_tasks([task], "validation")
    searched = {e.prompt for e in load_tasks([task], "search")[0].examples}
    assert len(validation.examples) == 10 and not searched & {e.prompt for e in validation.examples}
    # nothing left: auto leaves the task out; a size asked for is an error
    every = task.model_copy(update={"search_size": 30})
    assert load_tasks([every], "validation") == []
    with pytest.raises(EepError, match="no rows left for validation after the 30 search ones"):
        load_tasks([every.model_copy(update={"validation_size": 5})], "validation")
    # toys have examples to spare
    (toy,) = load_tasks([TaskConfig(name="copy", dataset="toy:copy", search_size=4)], "validation")
    assert len(toy.examples) == AUTO_VALIDATION
